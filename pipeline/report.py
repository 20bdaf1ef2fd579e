"""The run report: one self-contained HTML page plus a Markdown summary in the run directory.

``build_run_report(run_dir)`` reads the stage outputs (:mod:`pipeline.report_data`), draws the
figures (:mod:`pipeline.report_plots`) and renders ``report.html`` (images embedded as data
URIs, no external CSS/JS, so it opens offline or as an e-mail attachment) and ``report.md``.
A stage that has not run yet shows as "not run". ``markdown_summary`` and ``results_table``
are what the flow publishes as Prefect artifacts. Ablations and the benchmark history live
in :mod:`pipeline.report_ablation` and :mod:`pipeline.report_history`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline import report_plots as plots
from pipeline.atomic import atomic_write_text
from pipeline.report_ablation import build_ablation_report
from pipeline.report_data import NOT_RUN, RunData, load_run, results_table
from pipeline.report_history import append_history, history_row, render_history
from pipeline.report_render import mb, md_table, num, pct, pp, render, seconds

__all__ = ["append_history", "artifacts", "build_ablation_report", "build_run_report",
           "history_row", "load_run", "markdown_summary", "render_history", "results_table",
           "write_report"]

HTML_NAME, MD_NAME = "report.html", "report.md"


# --------------------------------------------------------------------------- verdict


def verdict(run: RunData) -> dict:
    """One sentence a reader can act on: did the synthetic data help, by how much, how sure."""
    comp = {(c.arm, c.against): c for c in run.comparisons()}.get(("augmented", "baseline"))
    if comp is None:
        have = ", ".join(run.arms) or "no arm"
        return {"cls": "missing", "text": f"Augmented vs baseline: {NOT_RUN} "
                f"(finished SSL arms: {have})."}
    mean, std, n = comp.summary
    aug, base = run.arms["augmented"].summary[0], run.arms["baseline"].summary[0]
    spread = f"std {100 * std:.2f} pp over {n} seeds" if std is not None else \
        "one seed, so no uncertainty estimate"
    if std is not None and abs(mean) <= std:
        word, cls = "did not change the error beyond seed noise", "neutral"
    elif mean < 0:
        word, cls = "lowered the test error", "good"
    elif mean > 0:
        word, cls = "raised the test error", "bad"
    else:
        word, cls = "left the test error unchanged", "neutral"
    return {"cls": cls, "text": f"Synthetic data {word}: {pp(mean)} "
            f"(augmented {pct(aug)} vs baseline {pct(base)}; {spread})."}


# --------------------------------------------------------------------------- sections


def _stage_figures(rec: dict) -> str:
    metrics = rec.get("metrics") or {}
    parts = [f"{k}={num(v, 3) if isinstance(v, float) else v}" for k, v in metrics.items()
             if isinstance(v, (int, float, str)) and not isinstance(v, bool) and k != "units"]
    return ", ".join(parts[:8])


def stage_rows(run: RunData) -> list[dict]:
    rows = []
    for stage in ("split", "pretrain", "encode", "tune", "sample", "shards", "quality", "ssl",
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


def overview(run: RunData) -> dict:
    cfg = run.config or {}
    split = (run.stages.get("split") or {}).get("metrics") or {}
    sampling = cfg.get("sampling") or {}
    ssl = cfg.get("ssl") or {}
    v = run.versions
    rows = [
        ("preset", cfg.get("preset")), ("config hash", cfg.get("config_hash")),
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
    return {"dataset": cfg.get("dataset", "unknown"), "rows": rows}


def ssl_section(run: RunData) -> dict:
    arms = []
    for arm in ("supervised", "baseline", "augmented", *[a for a in run.arms if a not in
                                                         ("supervised", "baseline", "augmented")]):
        res = run.arms.get(arm)
        if res is None:
            if arm in ((run.config or {}).get("ssl") or {}).get("arms", [arm]):
                arms.append({"arm": arm, "n": 0})
            continue
        mean, std, n = res.summary
        m0 = res.seeds[0].metrics
        rates = [s.metrics.get("steps_per_s") for s in res.seeds if s.metrics.get("steps_per_s")]
        arms.append({"arm": arm, "mean": mean, "std": std, "n": n,
                     "seeds": [{"seed": s.seed, "top1_error": s.top1_error} for s in res.seeds],
                     "steps": m0.get("steps"), "net": m0.get("net"),
                     "steps_per_s": float(np.mean(rates)) if rates else None})
    comps = [{"arm": c.arm, "against": c.against, "mean": c.summary[0], "std": c.summary[1],
              "n": c.summary[2]} for c in run.comparisons()]
    out: dict = {"arms": arms if run.arms else [], "comparisons": comps, "per_class": [],
                 "per_class_arms": [], "per_class_delta": False, "per_class_png": None,
                 "per_class_label": "", "confusions": [], "curves": None}
    if not run.arms:
        return out
    curves = plots.learning_curves(run.arms)
    out["curves"] = plots.data_uri(curves) if curves else None
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
        out["per_class_label"] = f"{pair[0]} − {pair[1]}"
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
            "reference": {"reference_id": "unknown", "test_accuracy": None,
                          **(q.get("reference") or {})},
            "notes": {"kid": "", "diversity": "", "nn_rmse": "", **(q.get("notes") or {})},
            "per_class": [{k: c.get(k) for k in CLASS_KEYS} for c in q.get("per_class", [])],
            "by_mask_ratio": [{k: m.get(k) for k in MASK_KEYS}
                              for m in q.get("by_mask_ratio", [])]}


def quality_overall(q: dict | None) -> list[tuple[str, str]]:
    if not q:
        return []
    o = q.get("overall", {})
    return [("synthetic images measured", num(o.get("n_synthetic"))),
            ("KID to real same-class images (mean over classes)", num(o.get("kid"), 4)),
            ("label consistency (reference classifier)", pct(o.get("label_consistency"))),
            ("reference accuracy on real test images", pct(o.get("reference_test_accuracy"))),
            ("diversity synthetic / real", (f"{num(o.get('diversity_synthetic'))} / "
                                           f"{num(o.get('diversity_real'))}")),
            ("within-condition diversity", num(o.get("within_condition_diversity"))),
            ("nearest labeled image RMSE synthetic / real",
             f"{num(o.get('nn_rmse_synthetic'))} / {num(o.get('nn_rmse_real'))}"),
            ("synthetic closer to a labeled image than any real one",
             pct(o.get("closer_than_real_share")))]


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
    """The Markdown summary (report.md and the Prefect markdown artifact)."""
    run = run if isinstance(run, RunData) else load_run(run)
    v = verdict(run)
    lines = [f"# {run.preset}: run `{run.name}`", "",
             f"**{v['text']}**", "",
             (f"Config hash `{run.config_hash or 'unknown'}`, dataset "
             f"{(run.config or {}).get('dataset', 'unknown')}."), "",
             "## Semi-supervised results (top-1 test error)", ""]
    rows = results_table(run)
    lines.append(md_table([{"arm": r["arm"],
                            "error %": r["error_pct"] if r["status"] == "done" else NOT_RUN,
                            "std %": r["std_pct"], "seeds": r["n_seeds"],
                            "vs baseline (pp)": r["delta_vs_baseline_pp"],
                            "std (pp)": r["delta_std_pp"]} for r in rows]))
    per_seed = [{"arm": a, "seed": s.seed, "top1_error": s.top1_error, "error": pct(s.top1_error)}
                for a, res in run.arms.items() for s in res.seeds]
    if per_seed:
        lines += ["Per seed:", "", md_table(per_seed, ["arm", "seed", "error"])]
    lines += ["## Synthetic data quality", ""]
    q = run.quality
    if q:
        lines.append(md_table([{"measure": k, "value": val} for k, val in quality_overall(q)]))
    else:
        lines.append(f"Quality: {NOT_RUN}.\n")
    lines += ["## Stages", "", md_table([{"stage": s["name"], "status": s["status"],
                                          "wall": seconds(s["wall_s"]),
                                          "peak memory": mb(s["peak_mem_mb"])}
                                         for s in stage_rows(run)])]
    cost = [{"measure": k, "value": val if val is not None else NOT_RUN}
            for k, val in cost_rows(run)]
    lines += ["## Cost", "", md_table(cost)]
    return "\n".join(lines)


def artifacts(run_dir: str | Path) -> tuple[str, list[dict]]:
    """(markdown, table rows) for Prefect's create_markdown_artifact / create_table_artifact."""
    run = load_run(run_dir)
    return markdown_summary(run), results_table(run)


def build_run_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into the run directory; return both paths."""
    run = load_run(run_dir)
    cfg_text = json.dumps(run.config, indent=2, sort_keys=True) if run.config else NOT_RUN
    tuning = plots.tuning_losses(run.tunes)
    html = render("run.html.j2", title=f"anl-augment report: {run.preset}", run=run,
                  verdict=verdict(run), overview=overview(run), ssl=ssl_section(run),
                  synthetic=synthetic_section(run), quality=quality_view(run.quality),
                  quality_overall=quality_overall(run.quality), cost=cost_rows(run),
                  tuning_png=plots.data_uri(tuning) if tuning else None,
                  stages=stage_rows(run), config_json=cfg_text)
    html_path = atomic_write_text(run.run_dir / HTML_NAME, html)
    md_path = atomic_write_text(run.run_dir / MD_NAME, markdown_summary(run))
    return html_path, md_path


write_report = build_run_report  # the name the report stage calls
