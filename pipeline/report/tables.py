"""A run's outcome as flat rows and columns, for tables outside the run's own page.

``results_table`` is one row per SSL arm (the Prefect table artifact and the run report's
results); ``outcome_columns`` is one run as a row of the ablation table and the benchmark
history. Both read :class:`pipeline.report.data.RunData`; percentages and points are rounded
here, once, so the tables agree with each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.data.pool_labels import NOT_COMPUTED
from pipeline.report.data import (
    ARM_ORDER,
    NOT_RUN,
    Comparison,
    RunData,
    budget_short,
    load_run,
    report_arms,
)
from pipeline.report.render import num, pct, pct_labels


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def paired_columns(comp: Comparison | None, prefix: str = "delta") -> dict[str, Any]:
    """Flat columns of one comparison, in percentage points: n, mean, std, 95% CI and p
    (CI and p None below ``MIN_REPETITIONS`` pairs)."""
    if comp is None:
        return {f"{prefix}_n": 0, f"{prefix}_pp": None, f"{prefix}_std_pp": None,
                f"{prefix}_ci_low_pp": None, f"{prefix}_ci_high_pp": None, f"{prefix}_p": None}
    d = comp.paired

    def pts(x):
        return None if x is None else _r(100 * x)

    return {f"{prefix}_n": d.n, f"{prefix}_pp": pts(d.mean), f"{prefix}_std_pp": pts(d.std),
            f"{prefix}_ci_low_pp": pts(d.ci_low), f"{prefix}_ci_high_pp": pts(d.ci_high),
            f"{prefix}_p": _r(d.p_value, 6)}


def outcome_columns(run: RunData, names: dict[str, str], digits: int | None = None
                    ) -> dict[str, Any]:
    """A run's outcome as flat columns, shared by the ablation table and the benchmark
    history: per arm its mean error and std in % and its seed count (named by ``names``'
    templates for "error", "std" and "seeds", e.g. ``"error_{arm}_pct"``), augmented minus
    baseline and minus control (:func:`paired_columns`), whether the budget was too short,
    and the quality and sampling-speed headlines. ``digits`` rounds the % columns."""
    def pct_col(x):
        return None if x is None else (100 * x if digits is None else round(100 * x, digits))

    row: dict[str, Any] = {}
    for arm in ARM_ORDER:
        mean, std, n = run.arms[arm].summary if arm in run.arms else (None, None, 0)
        row[names["error"].format(arm=arm)] = pct_col(mean)
        row[names["std"].format(arm=arm)] = pct_col(std)
        row[names["seeds"].format(arm=arm)] = n
    row.update(paired_columns(run.comparison("augmented", "baseline")))
    row.update(paired_columns(run.comparison("augmented", "control"), "vs_control"))
    row["budget_short"] = budget_short(run)
    q = (run.quality or {}).get("overall", {})
    for k in ("kid", "label_consistency", "diversity_synthetic", "within_condition_diversity"):
        row[k] = q.get(k)
    row["sampling_images_per_s"] = run.sampling_images_per_s()
    return row


def results_table(run: RunData | str | Path) -> list[dict[str, Any]]:
    """One row per SSL arm (error in %, mean/std/n over seeds, validation error where the run
    had a validation split, change vs baseline in points with its 95% CI and p).

    Flat JSON-friendly rows, the shape Prefect's ``create_table_artifact`` takes.
    """
    run = run if isinstance(run, RunData) else load_run(run)
    rows = []
    for arm in report_arms(run):
        res = run.arms.get(arm)
        comp = run.comparison(arm, "baseline")
        delta = paired_columns(comp)
        if res is None:
            rows.append({"arm": arm, "status": run.corrupt.get(arm, NOT_RUN), "error_pct": None, "std_pct": None,
                         "n_seeds": 0, "val_error_pct": None,
                         "delta_vs_baseline_pp": None, "delta_std_pp": None,
                         "delta_n": 0, "delta_ci_low_pp": None, "delta_ci_high_pp": None,
                         "delta_p": None})
            continue
        mean, std, n = res.summary
        vmean = res.val_summary[0]
        rows.append({"arm": arm, "status": "done", "error_pct": _r(100 * mean),
                     "std_pct": _r(None if std is None else 100 * std), "n_seeds": n,
                     "val_error_pct": _r(None if vmean is None else 100 * vmean),
                     "delta_vs_baseline_pp": delta["delta_pp"],
                     "delta_std_pp": delta["delta_std_pp"], "delta_n": delta["delta_n"],
                     "delta_ci_low_pp": delta["delta_ci_low_pp"],
                     "delta_ci_high_pp": delta["delta_ci_high_pp"], "delta_p": delta["delta_p"]})
    return rows


def quality_overall(q: dict | None) -> list[tuple[str, str]]:
    if not q:
        return []
    o = q.get("overall", {})
    return [("synthetic images measured", num(o.get("n_synthetic"))),
            ("KID to real same-class images (mean over classes)", num(o.get("kid"), 4)),
            ("label consistency (reference classifier)",
             pct_labels(o.get("label_consistency"), o.get("label_consistency" + NOT_COMPUTED),
                        NOT_RUN)),
            ("reference accuracy on real test images" + _reference_trained_on(q),
             pct(o.get("reference_test_accuracy"))),
            ("diversity synthetic / real", (f"{num(o.get('diversity_synthetic'))} / "
                                           f"{num(o.get('diversity_real'))}")),
            ("within-condition diversity", num(o.get("within_condition_diversity"))),
            ("nearest labeled image RMSE synthetic / real",
             f"{num(o.get('nn_rmse_synthetic'))} / {num(o.get('nn_rmse_real'))}"),
            ("synthetic closer to a labeled image than any real one",
             pct(o.get("closer_than_real_share")) if o.get("closer_than_real_share") is not None
             or not q.get("real_images") else "needs held-out labeled images; not computed")]


def _reference_trained_on(q: dict) -> str:
    """Where the pool has no labels the reference learns from the labeled images alone: say so
    beside its accuracy, which is then no judge of the synthetic images."""
    ref = q.get("reference") or {}
    if not ref.get("unlabeled_left_out"):
        return ""
    return f" (trained on the {ref.get('train_images')} labeled images only)"
