"""The pipeline's stages: one function per stage, ``run_<stage>(run_dir, config) -> record``,
bound here (``STAGE_FUNCTIONS``) to the stages ``pipeline.stage_graph`` declares.

The generation stages live in ``pipeline.generate`` (encode, tune, sample, to_shards and the
second round's pseudo), the classifier stage in ``pipeline.evaluate.classifiers``; what they
all read from a run is ``pipeline.stage_inputs``, their keys ``pipeline.keys``. This module
holds the small stages (split, pretrain, quality, loop, report) and ``run_all``.

Every stage reads paths and writes paths inside the run directory and ends by writing its
completion record ``stages/<stage>.json`` (atomically, last). A stage whose record exists
with the same key returns it without doing anything: the key hashes the config parts the
stage reads plus its upstream keys (:func:`pipeline.config.stage_key`), never a run id.

Reuse across runs: when another run directory under the same ``runs_dir`` already finished
a stage (or one class's adapter or samples) with the same key, its outputs are hard-linked
into this run instead of recomputed (the bookkeeping is ``pipeline.runs``). So a changed
sampling parameter gives a new run directory but reruns only sampling and what follows it.

Per-class work (tuning, sampling) is split into units, ``run_tune_class`` and
``run_sample_class``, which a task runner may run in parallel; ``run_tune`` and
``run_sample`` run any missing units and then write the stage record.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.config import AugmentConfig, stage_key
from pipeline.evaluate.classifiers import run_ssl, run_ssl_arm
from pipeline.generate.encode import run_encode
from pipeline.generate.pseudo import ROUND_TWO_ARMS, round_two_grids, run_pseudo
from pipeline.generate.sample import run_sample
from pipeline.generate.to_shards import run_shards
from pipeline.generate.tune import run_tune
from pipeline.keys import stage_keys
from pipeline.runs import (
    ROUND_TWO,
    aggregate_units,
    finished_record,
    read_json,
    run_stage,
)
from pipeline.stage_graph import STAGE_ORDER
from pipeline.stage_inputs import dataset_for, split_for, ssl_rel

# --------------------------------------------------------------------------- split


def run_split(run_dir: Path, config: AugmentConfig) -> dict:
    from pipeline.data.splits import make_split, save_split

    def body(device: str) -> tuple[dict, dict]:
        ds = dataset_for(config)
        split = make_split(ds.train_labels, config.labels_per_class, config.split_seed,
                           ds.num_classes, val_per_class=config.validation_per_class,
                           half_seed=config.half_seed if config.task_images == "task-half"
                           else None)
        save_split(split, Path(run_dir) / "split.parquet")
        return ({"split": "split.parquet"},
                {"labeled": len(split.labeled_idx), "unlabeled": len(split.unlabeled_idx),
                 "validation": len(split.val_idx), "base_half": len(split.base_idx),
                 "num_classes": ds.num_classes})

    return run_stage(run_dir, config, "split", stage_key(config, "split"), body)


# --------------------------------------------------------------------------- pretrain


def run_pretrain(run_dir: Path, config: AugmentConfig) -> dict | None:
    """Pretrain the base model, when the config asks for it: on the unlabeled pool, or with
    ``task_images: task-half`` on the base half (never a task image)."""
    if not config.pretrains_base:
        return None
    keys = stage_keys(config)

    def body(device: str) -> tuple[dict, dict]:
        from pipeline.generate.pretrain import pretrain

        ds, split = dataset_for(config), split_for(Path(run_dir))
        pcfg = config.pretrain.for_run(config.image_size, device)
        disjoint = config.task_images == "task-half"
        seen = split.base_idx if disjoint else split.unlabeled_idx
        source = {"dataset": config.dataset, "root": config.dataset_root,
                  **({"half": "base", "half_seed": config.half_seed} if disjoint else
                     {"labels_per_class": config.labels_per_class,
                      "split_seed": config.split_seed})}
        out = pretrain(ds.train_images[seen], Path(run_dir) / "base", pcfg,
                       progress=config.progress, source=source)
        info = read_json(out / "training.json") or {}
        return ({"base": "base"},
                {k: info.get(k) for k in ("steps", "steps_per_s", "final_loss", "params")})

    return run_stage(run_dir, config, "pretrain", keys["pretrain"], body)


# --------------------------------------------------------------------------- quality


def run_quality(run_dir: Path, config: AugmentConfig) -> dict:
    keys = stage_keys(config)

    def body(device: str) -> tuple[dict, dict]:
        if not config.quality.enabled:
            return {}, {"enabled": False}
        from pipeline.evaluate.quality import evaluate_run_quality

        qcfg = config.quality.component()
        out = evaluate_run_quality(Path(run_dir), dataset_for(config), qcfg,
                                   encoder=config.encoder, device=device,
                                   progress=config.progress)
        summary = read_json(out) or {}
        return {"quality": "quality"}, summary.get("overall", {})

    return run_stage(run_dir, config, "quality", keys["quality"], body)


# --------------------------------------------------------------------------- loop (round 2)


def run_loop(run_dir: Path, config: AugmentConfig) -> dict | None:
    """The second round (``loop.rounds: 2``): pseudo-labels, then round 2's encode, tune,
    sample and shards in ``round-2/``, then its two arms for every seed. None when off.

    The flow runs the same steps as tasks (the per-class ones on its task runner); this
    function then only writes the record.
    """
    if config.loop.rounds == 1:
        return None
    keys = stage_keys(config)
    rec = finished_record(Path(run_dir), "loop", keys["loop"])
    if rec is not None:
        return {**rec, "skipped": True}
    pseudo = run_pseudo(run_dir, config)
    run_encode(run_dir, config, loop_round=2)
    run_tune(run_dir, config, loop_round=2)
    run_sample(run_dir, config, loop_round=2)
    shards = run_shards(run_dir, config, loop_round=2)
    units = {ssl_rel(a, s): run_ssl_arm(run_dir, config, a, s)
             for a in ROUND_TWO_ARMS for s in config.ssl.seeds}
    grids = round_two_grids(Path(run_dir), config)
    return aggregate_units(Path(run_dir), config, "loop", keys["loop"], units,
                            {"round": ROUND_TWO, "ssl": list(units), "grids": grids},
                            {"pseudo": pseudo["metrics"], "rows": shards["metrics"]["rows"],
                             "kept_share": shards["metrics"].get("kept_share"),
                             "class_names": list(dataset_for(config).class_names),
                             "arms": list(ROUND_TWO_ARMS), "seeds": list(config.ssl.seeds)})


# --------------------------------------------------------------------------- report


def run_report(run_dir: Path, config: AugmentConfig) -> dict:
    keys = stage_keys(config)

    def body(device: str) -> tuple[dict, dict]:
        from pipeline.report.build import write_report

        paths = write_report(Path(run_dir))
        rels = {Path(p).suffix.lstrip("."): str(Path(p).relative_to(run_dir)) for p in paths}
        return rels, {}

    # The report reads this run's own records (wall times, devices), so it is never adopted.
    return run_stage(run_dir, config, "report", keys["report"], body, adopt=False)


STAGE_FUNCTIONS: dict[str, Callable[[Path, AugmentConfig], dict | None]] = {
    "split": run_split, "pretrain": run_pretrain, "encode": run_encode, "tune": run_tune,
    "sample": run_sample, "shards": run_shards, "quality": run_quality, "ssl": run_ssl,
    "loop": run_loop, "report": run_report,
}
assert tuple(STAGE_FUNCTIONS) == STAGE_ORDER


def run_all(run_dir: Path, config: AugmentConfig, until: str | None = None) -> dict[str, dict]:
    """Every stage in order in this process (no Prefect): the reference the flow must match."""
    records = {}
    for name, fn in STAGE_FUNCTIONS.items():
        rec = fn(Path(run_dir), config)
        if rec is not None:
            records[name] = rec
        if name == until:
            break
    return records
