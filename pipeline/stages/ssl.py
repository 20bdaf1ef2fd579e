"""The ssl stage: one classifier unit per arm and seed (``pipeline.ssl.run_arm``), the control
arm's judged real rows, and how many units train side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.atomic import save_npz
from pipeline.config import AugmentConfig
from pipeline.digest import digest
from pipeline.runs import (
    StageError,
    read_json,
    run_mapped_stage,
    run_unit,
)
from pipeline.stages.inputs import dataset_for, load_tokens, round_root, split_for, ssl_rel
from pipeline.stages.keys import ssl_unit_key, stage_keys
from pipeline.stages.pseudo import load_pseudo_labels


def run_ssl_arm(run_dir: Path, config: AugmentConfig, arm: str, seed: int) -> dict:
    """One classifier: ``pipeline.ssl.run_arm`` in ``ssl/<arm>/seed-<s>`` (resumes in place)."""
    keys = stage_keys(config)
    rel = ssl_rel(arm, seed)

    def body(unit_dir: Path, device: str) -> dict:
        from pipeline.data.shard_format import manifest_path
        from pipeline.ssl import run_arm
        from pipeline.ssl.arm_names import base_arm

        scfg = config.ssl.component(seed=seed, device=device)
        shard_dir = {"augmented": run_dir / "shards", "control": run_dir / "shards",
                     "supervised+synthetic": run_dir / "shards",
                     "augmented-r2": round_root(run_dir, 2) / "shards"}.get(base_arm(arm))
        if shard_dir is not None and not manifest_path(shard_dir).exists():
            raise StageError(f"{shard_dir} has no manifest; run the shards stage first")
        extra_rows, pool_exclude, info = None, None, {}
        if arm == "control":
            extra_rows, pool_exclude, info = control_rows_for(run_dir, config, shard_dir, device)
            shard_dir = None
        if arm == "selftrain":  # the round's pseudo-labeled real images, as extra rows
            chosen = load_pseudo_labels(round_root(run_dir, 2))
            extra_rows = (dataset_for(config).train_images[chosen.train_idx], chosen.labels)
            pool_exclude = chosen.train_idx
            info = {"selftrain_rows": len(chosen.labels)}
        # Real extra rows leave the unlabeled pool: no image is both a labeled row and an
        # unlabeled one (with conflicting targets where the judge was wrong).
        metrics_path = run_arm(arm, dataset_for(config), split_for(run_dir), unit_dir, scfg,
                               shard_dir=shard_dir, progress=config.progress,
                               synthetic=extra_rows, pool_exclude=pool_exclude)
        metrics = read_json(metrics_path) or {}
        return {**{k: v for k, v in metrics.items()
                   if isinstance(v, (int, float, str, type(None)))}, **info}

    return run_unit(run_dir, rel, ssl_unit_key(config, keys, arm, seed), config, body)


def control_rows_for(run_dir: Path, config: AugmentConfig, shard_dir: Path, device: str):
    """The control arm's (images, labels), their training-set indices, and what the judge did
    (``control_precision``: the share of judged labels that are right, for the report, over
    the rows whose label is known; ``pipeline.data.pool_labels`` when the pool has none).

    As many real unlabeled images per class as the shards hold synthetic rows of that class,
    labeled by the filter's prototype judge in the run's encoder (``pipeline.evaluate.control``).
    """
    from anl_core.encoders import load_encoder
    from pipeline.data.shards import read_shards
    from pipeline.data.splits import capped_pool
    from pipeline.evaluate.control import control_rows, judge_pool

    keys = stage_keys(config)
    key = digest({"shards": keys["shards"], "encode": keys["encode"],
                   "margin": config.filter.margin, "seed": config.sampling.seed,
                   "pool": config.ssl.control_pool,
                   **({"cap": config.ssl.unlabeled_pool}
                      if config.ssl.unlabeled_pool is not None else {})})[:16]
    cached = run_dir / "ssl" / "control" / f"judged-{key}.npz"
    if cached.exists():  # every seed of the control arm reads the same rows: judge once
        with np.load(cached) as z:
            return (z["images"], z["labels"]), z["train_idx"], json.loads(str(z["info"]))
    tok = load_tokens(run_dir)
    encoder = load_encoder(config.encoder, device=device)
    if encoder.encoder_id != tok["encoder_id"]:
        raise StageError(f"the condition tokens were made by {tok['encoder_id']} but the "
                         f"config names {encoder.encoder_id}; rerun the encode stage")
    ds, split = dataset_for(config), split_for(run_dir)
    synth_labels = read_shards(shard_dir, verify=True).labels
    counts = {int(c): int(n) for c, n in enumerate(np.bincount(synth_labels)) if n}

    def judge(images):
        return judge_pool(encoder, tok["tokens"], split.labeled_labels, images, device)

    pool = capped_pool(split, config.ssl.unlabeled_pool)  # the pool the arm trains on
    rows = control_rows(ds.train_images, ds.train_labels, pool, counts, judge,
                        config.ssl.control_pool, config.sampling.seed, config.filter.margin)
    if not len(rows.labels):
        raise StageError(f"the judge kept none of the {config.ssl.control_pool} unlabeled images "
                         "for the control arm; raise ssl.control_pool or lower filter.margin")
    info = {"control_rows": len(rows.labels), **rows.scored_precision.record("control_precision"),
            "control_shortfall": int(sum(rows.shortfall.values()))}
    cached.parent.mkdir(parents=True, exist_ok=True)
    save_npz(cached, images=rows.images, labels=rows.labels, train_idx=rows.train_idx,
              info=np.array(json.dumps(info)))
    return (rows.images, rows.labels), rows.train_idx, info


def run_ssl(run_dir: Path, config: AugmentConfig) -> dict:
    """The units, then the run's classifier out (``pipeline.stages.classifier``): outside
    the stage's key, so choosing another arm to export retrains nothing."""
    from pipeline.stages.classifier import export_run_classifier, note_export

    record = run_mapped_stage(
        run_dir, config, "ssl", stage_keys(config)["ssl"],
        lambda: {ssl_rel(a, s): run_ssl_arm(run_dir, config, a, s)
                 for a in config.ssl.arms for s in config.ssl.seeds},
        lambda done: ({"ssl": list(done)}, {"arms": list(config.ssl.arms),
                                            "seeds": list(config.ssl.seeds)}))
    if not config.export.enabled:
        return record
    return note_export(run_dir, record, export_run_classifier(run_dir, config))


def arms_at_once(run_dir: Path, config: AugmentConfig, units: list[tuple[str, int]]) -> int:
    """How many of ``units`` (arm, seed) to train side by side (``config.arms_at_once``);
    for ``"auto"`` on CUDA, one unit's peak memory is measured first (a few steps)."""
    from pipeline.ssl.capacity import free_bytes_now, measure_arm_peak_bytes, units_at_once

    device = config.resolved_device()
    peak = free = None
    if config.arms_at_once == "auto" and device == "cuda" and len(units) > 1:

        # An arm without extra rows: extra rows add k labeled rows per batch and a few
        # thousand small images to the store, noise against the unlabeled batch's share.
        arm = next((a for a, _ in units if a in ("baseline", "supervised")), "baseline")
        scfg = config.ssl.component(seed=units[0][1], device=device)
        peak = measure_arm_peak_bytes(arm, dataset_for(config), split_for(run_dir), scfg)
        free = free_bytes_now()
    n = units_at_once(config.arms_at_once, len(units), device, peak, free)
    if peak is not None:
        print(f"arms side by side: {n} (one unit peaks at {peak / 2**30:.2f} GiB, "
              f"{free / 2**30:.1f} GiB free)")
    return n
