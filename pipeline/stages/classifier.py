"""The run's classifier out: after the ssl stage, one unit's EMA classifier is exported to
``<run_dir>/classifier/`` (``pipeline.ssl.export``), and ``augment export`` does the same
for any arm and seed of a finished run.

Not a stage of its own (no key, no record): the ssl stage's record notes what was exported
(``outputs.classifier``, ``metrics.export``). A rerun finds the same export and keeps it.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from pipeline.atomic import atomic_write_json
from pipeline.config import AugmentConfig, config_hash
from pipeline.runs import read_json
from pipeline.ssl.arm_names import EVALUATION_ARMS
from pipeline.ssl.export import ExportError, export_classifier, export_matches
from pipeline.stages.inputs import dataset_for, ssl_rel

CLASSIFIER_DIR = "classifier"
# Without a validation split no arm can be chosen on data (never on test): the method's own
# arm, else the SSL baseline, else the first configured arm.
FALLBACK_ORDER = ("augmented", "baseline", "supervised+synthetic", "supervised")


def choose_arm(run_dir: Path, config: AugmentConfig, arm: str = "best"
               ) -> tuple[str, str, dict[str, float | None]]:
    """(arm, why it was chosen, mean validation error of each candidate arm)."""
    if arm != "best":
        return arm, "named", {}
    candidates = [a for a in config.ssl.arms if a not in EVALUATION_ARMS] or list(config.ssl.arms)
    val: dict[str, float | None] = {}
    for a in candidates:
        errors = [(read_json(run_dir / ssl_rel(a, s) / "metrics.json") or {}).get("val_error")
                  for s in config.ssl.seeds]
        errors = [e for e in errors if e is not None]
        val[a] = statistics.fmean(errors) if errors else None
    scored = [a for a in candidates if val[a] is not None]
    if scored:  # ties: the arm listed first in ssl.arms
        return min(scored, key=lambda a: val[a]), "lowest validation error", val
    chosen = next((a for a in FALLBACK_ORDER if a in candidates), candidates[0])
    return chosen, "no validation split: the default arm", val


def export_run_classifier(run_dir: Path, config: AugmentConfig, *, arm: str | None = None,
                          seed: int | None = None, out: Path | None = None) -> dict:
    """Export one unit of the run (``arm`` and ``seed``: the config's ``export`` section by
    default) to ``out`` (default ``run_dir/classifier``); returns what was exported."""
    run_dir = Path(run_dir)
    chosen, why, val = choose_arm(run_dir, config, arm or config.export.arm)
    seed = seed if seed is not None else (config.export.seed if config.export.seed is not None
                                          else config.ssl.seeds[0])
    unit = run_dir / ssl_rel(chosen, seed)
    metrics = read_json(unit / "metrics.json")
    if metrics is None:
        raise ExportError(f"{unit} has no finished classifier (arm {chosen}, seed {seed}); run "
                          "the ssl stage first, or choose a trained arm and seed")
    out = Path(out) if out is not None else run_dir / CLASSIFIER_DIR
    info = {"arm": chosen, "seed": seed, "chosen_by": why, "val_error_by_arm": val,
            "val_error": metrics.get("val_error"), "top1_error": metrics.get("top1_error"),
            "path": str(out.relative_to(run_dir)) if out.is_relative_to(run_dir) else str(out)}
    if export_matches(out, unit):
        return {**info, "skipped": True}
    from pipeline.provenance import versions

    ds = dataset_for(config)
    marker = read_json(unit / "unit.json") or {}
    provenance = {"run": run_dir.name, "config_hash": config_hash(config),
                  "dataset": config.dataset, "dataset_root": config.dataset_root,
                  "unit": ssl_rel(chosen, seed), "unit_key": marker.get("key"),
                  "chosen_by": why, "versions": versions()}
    export_classifier(unit, out, class_names=list(ds.class_names), provenance=provenance,
                      image_shape=ds.image_shape, check=(ds.test_images, ds.test_labels),
                      device=config.resolved_device())
    return {**info, "skipped": False}


def note_export(run_dir: Path, record: dict, info: dict) -> dict:
    """The ssl stage record with the export noted (rewritten, same key, only when it changed)."""
    note = {k: v for k, v in info.items() if k != "skipped"}
    rec = {k: v for k, v in record.items() if k != "skipped"}
    if rec.get("metrics", {}).get("export") != note or \
            rec.get("outputs", {}).get("classifier") != f"{CLASSIFIER_DIR}/":
        rec["outputs"] = {**rec.get("outputs", {}), "classifier": f"{CLASSIFIER_DIR}/"}
        rec["metrics"] = {**rec.get("metrics", {}), "export": note}
        atomic_write_json(run_dir / "stages" / "ssl.json", rec)
        return rec
    return record
