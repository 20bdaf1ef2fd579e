"""The run report: one self-contained HTML page plus a Markdown summary in the run directory.

``build_run_report(run_dir)`` reads the stage outputs (:mod:`pipeline.report.data`), draws the
figures (:mod:`pipeline.report.plots`) and renders ``report.html`` (images embedded as data
URIs, no external CSS/JS, so it opens offline or as an e-mail attachment) and ``report.md``;
its headline sentences come from :mod:`pipeline.report.verdict`.
A stage that has not run yet shows as "not run". ``markdown_summary`` (template
``run.md.j2``) and :func:`pipeline.report.tables.results_table` are what the flow publishes as
Prefect artifacts. Ablations and the benchmark history live in :mod:`pipeline.report.ablation`
and :mod:`pipeline.report.history`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write_text
from pipeline.data.pool_labels import NOT_COMPUTED
from pipeline.evaluate.paired import MIN_REPETITIONS
from pipeline.report import plots
from pipeline.report.data import NOT_RUN, RunData, load_run, report_arms
from pipeline.report.render import (
    NEEDS_LABELS,
    ci_pp,
    mb,
    md_table,
    num,
    pct,
    pct_labels,
    pct_or,
    pp,
    pval,
    render,
    seconds,
)
from pipeline.report.tables import quality_overall, results_table
from pipeline.report.verdict import fit_sentence, ssl_budget, verdict

HTML_NAME, MD_NAME = "report.html", "report.md"


# --------------------------------------------------------------------------- sections


def _stage_figures(rec: dict) -> str:
    metrics = rec.get("metrics") or {}
    parts = [f"{k}={num(v, 3) if isinstance(v, float) else v}" for k, v in metrics.items()
             if isinstance(v, (int, float, str)) and not isinstance(v, bool) and k != "units"]
    return ", ".join(parts[:8])


def stage_rows(run: RunData) -> list[dict]:
    rows = []
    for stage in ("split", "pretrain", "fit", "encode", "tune", "sample", "shards", "quality", "ssl",
                  "report"):
        rec = run.stages.get(stage)
        if rec is None and stage == "pretrain" and not (run.config or {}).get("pretrain"):
            continue  # the preset uses a pretrained base: not a missing stage
        if rec is None and stage == "report":
            continue  # this page is being written by that stage right now
        rec = rec or {}
        rows.append({"name": stage, "status": run.stage_status(stage),
                     "wall_s": rec.get("wall_s"), "peak_mem_mb": rec.get("peak_mem_mb"),
                     "device": rec.get("device"), "adopted_from": rec.get("adopted_from"),
                     "figures": _stage_figures(rec)})
    return rows


def _classifier_row(run: RunData) -> str | None:
    """Where the run's exported classifier is, which arm it is and why (``augment predict``)."""
    export = ((run.stages.get("ssl") or {}).get("metrics") or {}).get("export")
    if not export:
        return None
    err = export.get("top1_error")
    return (f"{export['path']}/: {export['arm']}, seed {export['seed']} ({export['chosen_by']}"
            + (f"; test error {100 * err:.2f}%" if err is not None else "") + "); "
            f"`augment predict {run.run_dir / export['path']} IMAGES...`")


def overview(run: RunData) -> dict:
    cfg = run.config or {}
    split = (run.stages.get("split") or {}).get("metrics") or {}
    sampling = cfg.get("sampling") or {}
    ssl = cfg.get("ssl") or {}
    v = run.versions
    rows = [
        ("preset", cfg.get("preset")), ("config hash", run.config_hash),
        ("dataset", cfg.get("dataset")),
        ("split", f"{cfg.get('labels_per_class')} labels per class, seed "
                  f"{cfg.get('split_seed')}" + (f" ({split.get('labeled')} labeled, "
                                               f"{split.get('unlabeled')} unlabeled)"
                                               if split else "") if cfg else None),
        ("base model", "pretrained in this run (base/)" if cfg.get("pretrain")
         else cfg.get("base_model")),
        ("encoder", cfg.get("encoder")),
        ("adapter", (cfg.get("adapter") or {}).get("scope")),
        ("sampling", f"{sampling.get('per_condition')} per condition, mask ratios "
                     f"{sampling.get('mask_ratios')}, guidance {sampling.get('guidance')}, "
                     f"{sampling.get('num_inference_steps')} steps" if sampling else None),
        ("SSL", f"{ssl.get('algorithm')}, {ssl.get('steps')} steps, arms {ssl.get('arms')}, "
                f"seeds {ssl.get('seeds')}" if ssl else None),
        ("versions", ", ".join(f"{k} {val}" for k, val in v.items() if k != "git_commit" and val)
         or None),
        ("git commit", v.get("git_commit")),
    ]
    if (fit := fit_sentence(run)) is not None:
        rows.append(("base fits the data", fit[0]))
    if (classifier := _classifier_row(run)) is not None:
        rows.append(("classifier", classifier))
    return {"dataset": cfg.get("dataset", "unknown"), "rows": rows}


def comparison_rows(run: RunData) -> list[dict]:
    """Every paired comparison with n, mean, std, 95% CI and p (None below 3 pairs), and
    ``note`` where the budget is too short for SSL arms to be compared."""
    budget = ssl_budget(run)
    short = bool(budget and budget["short"])
    rows = []
    for c in run.comparisons():
        d = c.paired
        ssl_only = "supervised" not in (c.arm, c.against)
        rows.append({"arm": c.arm, "against": c.against, "n": d.n, "mean": d.mean,
                     "std": d.std, "ci_low": d.ci_low, "ci_high": d.ci_high, "p": d.p_value,
                     "enough": d.enough, "direction": d.direction,
                     "note": "budget too short for an SSL comparison" if short and ssl_only
                     else ""})
    return rows


def ssl_section(run: RunData) -> dict:
    arms = []
    configured = set(((run.config or {}).get("ssl") or {}).get("arms") or [])
    for arm in report_arms(run):
        res = run.arms.get(arm)
        if res is None:
            if arm in configured or (not configured and arm != "control") \
                    or arm in run.corrupt:
                arms.append({"arm": arm, "n": 0, "missing": run.corrupt.get(arm, NOT_RUN)})
            continue
        mean, std, n = res.summary
        m0 = res.seeds[0].metrics
        rates = [s.metrics.get("steps_per_s") for s in res.seeds if s.metrics.get("steps_per_s")]
        vmean, _, vn = res.val_summary
        arms.append({"arm": arm, "mean": mean, "std": std, "n": n, "val_mean": vmean,
                     "val_n": vn, "num_validation": m0.get("num_validation"),
                     "seeds": [{"seed": s.seed, "top1_error": s.top1_error,
                                "val_error": s.val_error} for s in res.seeds],
                     "steps": m0.get("steps"), "net": m0.get("net"),
                     "steps_per_s": float(np.mean(rates)) if rates else None})
    comps = comparison_rows(run)
    out: dict = {"arms": arms if run.arms or run.corrupt else [], "comparisons": comps,
                 "per_class": [],
                 "per_class_arms": [], "per_class_delta": False, "per_class_png": None,
                 "per_class_label": "", "confusions": [], "curves": None,
                 "curve_split": "test", "has_val": any(a.get("val_mean") is not None
                                                       for a in arms)}
    if not run.arms:
        return out
    curves = plots.learning_curves(run.arms)
    out["curves"] = plots.data_uri(curves) if curves else None
    out["curve_split"] = plots.curve_split(run.arms)
    per_arm = {a: r.per_class_accuracy() for a, r in run.arms.items()}
    names = list(next(iter(per_arm.values())))
    out["per_class_arms"] = list(per_arm)
    pair = next(((a, b) for a, b in (("augmented", "baseline"), ("baseline", "supervised"))
                 if a in per_arm and b in per_arm), None)
    out["per_class_delta"] = pair is not None
    for name in names:
        vals = [per_arm[a].get(name) for a in per_arm]
        delta = None
        if pair and None not in (per_arm[pair[0]].get(name), per_arm[pair[1]].get(name)):
            delta = per_arm[pair[0]][name] - per_arm[pair[1]][name]
        out["per_class"].append({"name": name, "accs": vals, "delta": delta})
    if pair:
        budget = ssl_budget(run)
        out["per_class_label"] = f"{pair[0]} − {pair[1]}" + (
            " (budget too short for an SSL comparison)"
            if budget and budget["short"] and "supervised" not in pair else "")
        out["per_class_png"] = plots.data_uri(plots.per_class_change(
            names, [per_arm[pair[1]][n] for n in names], [per_arm[pair[0]][n] for n in names],
            out["per_class_label"]))
    for arm, res in run.arms.items():
        cm = res.confusion()
        if cm is not None:
            labels = res.seeds[0].metrics.get("class_names") or names
            out["confusions"].append((arm, plots.data_uri(plots.confusion(
                cm, labels, f"{arm} ({len(res.seeds)} seed{'s' if len(res.seeds) > 1 else ''})"))))
    return out


def _grid_uris(run: RunData) -> list[tuple[str, str]]:
    """The quality stage's per-class grids (real labeled row + one row per mask ratio)."""
    out = []
    for c in (run.quality or {}).get("per_class", []):
        path = run.run_dir / c.get("grid", "")
        if c.get("grid") and path.is_file():
            out.append((f"{c['class']}: {c['name']}", plots.data_uri(path.read_bytes())))
    return out


def synthetic_section(run: RunData) -> dict:
    m = run.manifest
    ratios = (run.quality or {}).get("mask_ratios") or \
        ((run.config or {}).get("sampling") or {}).get("mask_ratios") or []
    shards = ((run.stages or {}).get("shards") or {}).get("metrics") or {}
    kept = {"method": shards["filter"], "sampled": shards.get("rows_sampled"),
            "share": shards.get("kept_share")} if shards.get("filter") else None
    return {"manifest": m, "rows": (m or {}).get("num_rows"),
            "files": len((m or {}).get("shards", [])), "mask_ratios": ratios,
            "filter": kept, "grids": _grid_uris(run)}


def round_two_section(run: RunData) -> dict | None:
    """The second round (``loop.rounds: 2``): its pseudo-labels, their precision against
    the true labels (an evaluation figure: nothing in the run reads it), its shards and grids;
    its arms' errors are in the results table with everyone else's. None when it did not run."""
    rec = (run.stages or {}).get("loop")
    if not rec:
        return None
    m = rec.get("metrics") or {}
    pseudo = m.get("pseudo") or {}
    names = m.get("class_names") or [str(c) for c in range(len(pseudo.get("per_class", [])))]
    loop_cfg = (run.config or {}).get("loop") or {}
    reason = pseudo.get("precision" + NOT_COMPUTED)
    # Per class, a reason only where its pseudo-labels had no known label (a class with no
    # pseudo-label had nothing to score: a dash, not "needs labels").
    n_classes = len(pseudo.get("per_class", []))
    reasons = pseudo.get("precision_per_class" + NOT_COMPUTED) or [None] * n_classes
    rows = [{"class": c, "name": name, "pseudo": n, "precision": prec,
             "precision_reason": why if n else None}
            for c, (name, n, prec, why) in enumerate(zip(
                names, pseudo.get("per_class", []), pseudo.get("precision_per_class", []),
                reasons, strict=False))]
    grids = []
    for rel in (rec.get("outputs") or {}).get("grids", []):
        path = run.run_dir / rel
        if path.is_file():
            grids.append((Path(rel).stem, plots.data_uri(path.read_bytes())))
    return {"pseudo_labeled": pseudo.get("pseudo_labeled"), "pool": pseudo.get("pool"),
            "precision": pseudo.get("precision"), "precision_reason": reason,
            "precision_scored": pseudo.get("precision_scored"),
            "precision_text": _precision_text(pseudo), "classifier": pseudo.get("classifier"),
            "per_class_k": loop_cfg.get("per_class"), "threshold": loop_cfg.get("threshold"),
            "warm_start": loop_cfg.get("warm_start"), "conditions": loop_cfg.get("conditions"),
            "rows": m.get("rows"), "kept_share": m.get("kept_share"), "classes": rows,
            "grids": grids}


def _precision_text(pseudo: dict) -> str:
    """How many pseudo-labels are right, as a clause: over those with a known label where the
    pool is partly unlabeled, NEEDS_LABELS where it has no labels."""
    reason = pseudo.get("precision" + NOT_COMPUTED)
    if reason:
        return f"how many of them are right: {NEEDS_LABELS}, as {reason}"
    if pseudo.get("precision_scored") is not None:
        return (f"{pct_or(pseudo.get('precision'))} of the {pseudo['precision_scored']} of them "
                "with a known label are right")
    return f"{pct_or(pseudo.get('precision'))} of them are right"


CLASS_KEYS = ("class", "name", "n_synthetic", "kid", "kid_std", "label_consistency",
              "reference_accuracy", "diversity_synthetic", "diversity_real",
              "within_condition_diversity", "nn_rmse_synthetic", "nn_rmse_real", "top_confusion",
              "closer_than_real_share", "grid")
MASK_KEYS = ("mask_ratio", "n", "kid", "label_consistency", "diversity_synthetic",
             "within_condition_diversity")


def quality_view(q: dict | None) -> dict | None:
    """quality.json with every key the page shows present (None where a class had no images)."""
    if not q:
        return None
    return {**q,
            "feature_space": q.get("feature_space", "unknown"),
            "real_images": q.get("real_images"),
            "reference": {"reference_id": "unknown", "test_accuracy": None,
                          "train_images": None, "unlabeled_left_out": 0,
                          **(q.get("reference") or {})},
            "notes": {"kid": "", "diversity": "", "nn_rmse": "", **(q.get("notes") or {})},
            "consistency_reason": (q.get("overall") or {}).get("label_consistency" + NOT_COMPUTED),
            "per_class": [{k: c.get(k) for k in CLASS_KEYS} for c in q.get("per_class", [])],
            "by_mask_ratio": [{k: m.get(k) for k in MASK_KEYS}
                              for m in q.get("by_mask_ratio", [])]}


def cost_rows(run: RunData) -> list[tuple[str, str | None]]:
    pc = run.param_counts()
    tune = (run.stages.get("tune") or {}).get("metrics") or {}
    sample = run.sampling_images_per_s()
    total = sum(float(r.get("wall_s") or 0) for s, r in run.stages.items() if s != "report")
    return [
        ("sampling throughput", f"{num(sample, 1)} images/s" if sample else None),
        ("adapter tuning", f"{num(tune.get('steps_per_s'), 2)} steps/s"
         if tune.get("steps_per_s") else None),
        ("adapter parameters (trained)", num(pc.get("adapter")) if pc else None),
        ("base U-Net parameters (frozen)", num(pc.get("base")) if pc else None),
        ("adapter / base", f"{100 * pc['adapter'] / pc['base']:.1f}%"
         if pc and pc.get("base") else None),
        ("adapters", str(len(run.tunes)) if run.tunes else None),
        ("total stage wall time", seconds(total) if run.stages else None),
        ("largest peak memory", mb(max((r.get("peak_mem_mb") or 0) for r in
                                       run.stages.values())) if run.stages else None),
    ]


# --------------------------------------------------------------------------- outputs


def markdown_summary(run: RunData | str | Path) -> str:
    """The Markdown summary (report.md and the Prefect markdown artifact): the template
    ``run.md.j2`` lays out the prose, and its tables come ready-made from here."""
    run = run if isinstance(run, RunData) else load_run(run)
    rows = results_table(run)
    has_val = any(r["val_error_pct"] is not None for r in rows)
    results = md_table([{"arm": r["arm"],
                         "error %": r["error_pct"] if r["status"] == "done" else r["status"],
                         "val error %": r["val_error_pct"],
                         "std %": r["std_pct"], "seeds": r["n_seeds"]} for r in rows],
                       ["arm", "error %", *(["val error %"] if has_val else []), "std %", "seeds"])
    few = f"n<{MIN_REPETITIONS}"
    comparisons = [{"comparison": f"{c['arm']} − {c['against']}", "n": c["n"],
                    "mean": pp(c["mean"]),
                    "std": "—" if c["std"] is None else f"{100 * c['std']:.2f} pp",
                    "95% CI": ci_pp(c["ci_low"], c["ci_high"], few), "p": pval(c["p"], few),
                    "note": c["note"]} for c in comparison_rows(run)]
    per_seed = [{"arm": a, "seed": s.seed, "error": pct(s.top1_error),
                 "val error": pct_or(s.val_error)}
                for a, res in run.arms.items() for s in res.seeds]
    r2 = round_two_section(run)
    r2_classes = [{"class": f"{c['class']}: {c['name']}", "pseudo-labeled": c["pseudo"],
                   "precision": pct_labels(c["precision"], c["precision_reason"])}
                  for c in (r2 or {}).get("classes", [])]
    quality = [{"measure": k, "value": val} for k, val in quality_overall(run.quality)]
    stages = [{"stage": s["name"], "status": s["status"], "wall": seconds(s["wall_s"]),
               "peak memory": mb(s["peak_mem_mb"])} for s in stage_rows(run)]
    cost = [{"measure": k, "value": val if val is not None else NOT_RUN}
            for k, val in cost_rows(run)]
    return render(
        "run.md.j2", run=run, verdict=verdict(run), min_repetitions=MIN_REPETITIONS,
        not_run=NOT_RUN, dataset=(run.config or {}).get("dataset", "unknown"),
        fit=(fit_sentence(run) or (None,))[0], has_val=has_val, results=results,
        comparisons=md_table(comparisons, ["comparison", "n", "mean", "std", "95% CI", "p",
                                           "note"]) if comparisons else None,
        per_seed=md_table(per_seed, ["arm", "seed", "error",
                                     *(["val error"] if has_val else [])]) if per_seed else None,
        round_two=r2,
        round_two_classes=md_table(r2_classes, ["class", "pseudo-labeled", "precision"]),
        quality=md_table(quality) if quality else None,
        stages=md_table(stages), cost=md_table(cost))


def artifacts(run_dir: str | Path) -> tuple[str, list[dict]]:
    """(markdown, table rows) for Prefect's create_markdown_artifact / create_table_artifact."""
    run = load_run(run_dir)
    return markdown_summary(run), results_table(run)


def build_run_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into the run directory; return both paths."""
    run = load_run(run_dir)
    cfg_text = json.dumps(run.config, indent=2, sort_keys=True) if run.config else NOT_RUN
    tuning = plots.tuning_losses(run.tunes)
    html = render("run.html.j2", title=f"anl-augment report: {run.name}", run=run,
                  verdict=verdict(run), overview=overview(run), ssl=ssl_section(run),
                  synthetic=synthetic_section(run), round_two=round_two_section(run),
                  quality=quality_view(run.quality),
                  quality_overall=quality_overall(run.quality), cost=cost_rows(run),
                  tuning_png=plots.data_uri(tuning) if tuning else None,
                  stages=stage_rows(run), config_json=cfg_text,
                  min_repetitions=MIN_REPETITIONS)
    html_path = atomic_write_text(run.run_dir / HTML_NAME, html)
    md_path = atomic_write_text(run.run_dir / MD_NAME, markdown_summary(run))
    return html_path, md_path
