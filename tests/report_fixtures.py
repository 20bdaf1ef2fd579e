"""A tiny real run directory for the quality and report tests (no tests in this module).

Everything in it is made by the project's own writers on real Fashion-MNIST: the split
(``save_split``), synthetic shards (``ShardWriter``), SSL arms (``pipeline.ssl.run_arm``
with the tiny CNN for a few steps, two seeds), quality (``evaluate_run_quality``) and stage
records in the layout ``pipeline.stages`` writes. The "synthetic" images are real images
standing in for samples, chosen so the quality figures have known answers:
mask ratio 0.2 -> lightly noised copies of the condition image (memorised, not diverse);
mask ratio 0.6 -> other real images of the same class (diverse, correctly labelled).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from torch_helpers import anl_one_thread as one_thread

N_PER_CLASS = 4
PER_CONDITION = 2
MASK_RATIOS = (0.2, 0.6)
SEEDS = (0, 1)
TINY_REFERENCE = {"epochs": 2, "width": 8}


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def stage_record(run_dir: Path, stage: str, wall_s: float, outputs: dict, metrics: dict) -> None:
    now = time.time()
    write_json(run_dir / "stages" / f"{stage}.json",
               {"stage": stage, "key": f"key-{stage}", "started": now - wall_s, "finished": now,
                "wall_s": wall_s, "peak_mem_mb": 100.0 + wall_s, "device": "cpu (2 cores)",
                "outputs": outputs, "metrics": metrics})


def synthetic_stand_ins(dataset, split, rng):
    """(images, labels, condition_id, mask_ratio) per the module docstring."""
    images, labels, conds, ratios = [], [], [], []
    unlabeled = np.setdiff1d(np.arange(len(dataset.train_labels)), split.labeled_idx)
    for c, idx in split.class_subsets().items():
        pool = unlabeled[dataset.train_labels[unlabeled] == c]
        for cond in idx:
            for r in MASK_RATIOS:
                if r < 0.5:
                    base = np.repeat(dataset.train_images[cond][None], PER_CONDITION, 0)
                    noise = rng.integers(-6, 7, base.shape)
                    imgs = np.clip(base.astype(np.int64) + noise, 0, 255).astype(np.uint8)
                else:
                    imgs = dataset.train_images[rng.choice(pool, PER_CONDITION, replace=False)]
                images.append(imgs)
                labels += [c] * PER_CONDITION
                conds += [int(cond)] * PER_CONDITION
                ratios += [r] * PER_CONDITION
    return (np.concatenate(images), np.asarray(labels, np.int64), np.asarray(conds, np.int64),
            np.asarray(ratios))


def build_tiny_run(root: Path, dataset, reference, *, preset: str = "report-test",
                   ssl: bool = True, quality: bool = True, overrides: dict | None = None) -> Path:
    from pipeline.config import config_hash, validate_config
    from pipeline.data.shards import ShardWriter
    from pipeline.data.splits import make_split, save_split
    from pipeline.evaluate.quality import QualityConfig, evaluate_run_quality
    from pipeline.ssl import run_arm

    data = {"preset": preset, "dataset": "fashion-mnist", "labels_per_class": N_PER_CLASS,
            "encoder": "efficientnet-lite0@128",
            "sampling": {"per_condition": PER_CONDITION, "mask_ratios": list(MASK_RATIOS)},
            "ssl": {"arms": ["supervised", "baseline", "augmented"], "seeds": list(SEEDS),
                    "net": "cnn-tiny", "steps": 6, "batch_size": 8, "mu": 2,
                    "eval_every": 3, "eval_size": 200, "checkpoint_every": 100},
            **(overrides or {})}
    config = validate_config(data)
    h = config_hash(config)
    run_dir = root / f"{preset}-{h[:8]}"
    record = config.model_dump(mode="json")
    record.update(config_hash=h, preset=preset,
                  versions={"python": "3.11", "torch": "2.x", "git_commit": "abc1234def"})
    write_json(run_dir / "config.json", record)

    split = make_split(dataset.train_labels, N_PER_CLASS, 0, dataset.num_classes)
    save_split(split, run_dir / "split.parquet")
    stage_record(run_dir, "split", 0.2, {"split": "split.parquet"},
                 {"labeled": len(split.labeled_idx), "unlabeled": len(split.unlabeled_idx),
                  "num_classes": dataset.num_classes})
    stage_record(run_dir, "encode", 1.5, {"tokens": "conditions/tokens.safetensors"},
                 {"images": 40, "images_per_s": 26.7, "encoder_id": "efficientnet-lite0@128"})
    rng = np.random.default_rng(0)
    for c in range(dataset.num_classes):
        loss = list(0.2 * np.exp(-np.arange(60) / 30) + 0.05 + 0.01 * rng.random(60))
        write_json(run_dir / f"adapters/class-{c:02d}/tune.json",
                   {"class": c, "images": N_PER_CLASS, "loss_history": loss, "steps": 60,
                    "steps_per_s": 3.2, "wall_s": 18.7,
                    "param_counts": {"adapter": 120_000, "base": 1_100_000,
                                     "trainable": 120_000, "total": 1_220_000}})
    stage_record(run_dir, "tune", 187.0, {"adapters": [f"adapters/class-{c:02d}" for c in
                                                       range(dataset.num_classes)]},
                 {"adapters": dataset.num_classes, "steps_per_s": 3.2})
    images, labels, conds, ratios = synthetic_stand_ins(dataset, split, rng)
    stage_record(run_dir, "sample", 41.0, {"samples": ["samples/class-00"]},
                 {"rows": len(labels), "images_per_s": 3.9})
    with ShardWriter(run_dir / "shards", dataset.class_names, rows_per_shard=64,
                     row_group_rows=32) as w:
        w.write(images, labels, source="synthetic", condition_id=conds, adapter_id="class",
                seed=0, mask_ratio=ratios, guidance=2.0, steps=25)
    stage_record(run_dir, "shards", 0.8, {"shards": "shards"}, {"rows": len(labels)})
    if quality:
        evaluate_run_quality(run_dir, dataset, QualityConfig(max_real_per_class=60),
                             encoder=None, reference=reference, progress=False)
        stage_record(run_dir, "quality", 4.0, {"quality": "quality"}, {})
    if ssl:
        for arm in config.ssl.arms:
            for seed in config.ssl.seeds:
                scfg = config.ssl.component(seed=seed, device="cpu").model_copy(
                    update={"amp": False, "channels_last": False})
                run_arm(arm, dataset, split, run_dir / f"ssl/{arm}/seed-{seed}", scfg,
                        shard_dir=run_dir / "shards" if arm == "augmented" else None,
                        progress=False)
        stage_record(run_dir, "ssl", 12.0, {"ssl": ["ssl"]},
                     {"arms": list(config.ssl.arms), "seeds": list(config.ssl.seeds)})
    return run_dir


def small_fashion_mnist(full, train_per_class: int = 200, test_per_class: int = 50):
    """A balanced real subset of Fashion-MNIST (2000 train, 500 test) as an ImageDataset."""
    from pipeline.data.datasets import ImageDataset

    def pick(labels, n, seed):
        rng = np.random.default_rng(seed)
        return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), n, replace=False)
                                       for c in range(full.num_classes)]))

    tr, te = pick(full.train_labels, train_per_class, 0), pick(full.test_labels, test_per_class, 1)
    return ImageDataset(full.name, full.class_names, full.train_images[tr], full.train_labels[tr],
                        full.test_images[te], full.test_labels[te])


@pytest.fixture(scope="session")
def report_dataset(data_fashion_mnist):
    return small_fashion_mnist(data_fashion_mnist)


@pytest.fixture(scope="session")
def report_reference(report_dataset, tmp_path_factory):
    """A small reference classifier trained on the 2000 real training images (cached)."""
    from pipeline.evaluate.reference import ReferenceConfig, load_or_train_reference

    cache = tmp_path_factory.mktemp("reference-cache")
    with one_thread():
        return load_or_train_reference(report_dataset, cache, ReferenceConfig(**TINY_REFERENCE),
                                       device="cpu", progress=False)


@pytest.fixture(scope="session")
def report_run(report_dataset, report_reference, tmp_path_factory):
    """The tiny complete run (do not modify; copy it with ``report_run_copy``)."""
    root = tmp_path_factory.mktemp("runs")
    with one_thread():
        return build_tiny_run(root, report_dataset, report_reference)


@pytest.fixture
def report_run_copy(report_run, tmp_path):
    dst = tmp_path / "runs" / report_run.name
    shutil.copytree(report_run, dst)
    return dst


# --------------------------------------------------------------------------- fabricated arms
# For the report's wording: metrics.json files with chosen errors (no training), so each
# case (1, 2, 3 seeds; baseline better or worse than supervised; flat or falling curve) has
# a known answer computed by hand in the test.


def write_arm_seed(run_dir: Path, arm: str, seed: int, top1_error: float, *,
                   val_error: float | None = None, curve: list[tuple[int, float]] | None = None,
                   curve_split: str | None = None) -> Path:
    """One ``ssl/<arm>/seed-<s>/`` as ``pipeline.ssl.run_arm`` lays it out (the fields the
    report reads); ``curve``: (step, error fraction) rows of learning_curve.parquet."""
    import pandas as pd

    out = run_dir / "ssl" / arm / f"seed-{seed}"
    acc = 1.0 - top1_error
    write_json(out / "metrics.json", {
        "arm": arm, "algorithm": "supervised" if arm == "supervised" else "fixmatch",
        "seed": seed, "steps": 100, "net": "cnn-tiny", "top1_error": top1_error,
        "top1_accuracy": acc, "per_class_accuracy": {"T-shirt/top": acc, "Trouser": acc},
        "class_names": ["T-shirt/top", "Trouser"], "num_test": 500,
        "val_error": val_error, "num_validation": None if val_error is None else 200,
        "steps_per_s": 10.0})
    if curve is not None:
        frame = pd.DataFrame({"step": [s for s, _ in curve], "test_error": [e for _, e in curve]})
        if curve_split is not None:
            frame["curve_split"] = curve_split
        frame.to_parquet(out / "learning_curve.parquet", index=False)
    return out


def fabricated_run(root: Path, errors: dict[str, list[float]], *, name: str = "fab-00000000",
                   config_extra: dict | None = None, **seed_kwargs) -> Path:
    """A run directory whose arms have the given per-seed test errors (seeds 0, 1, ...)."""
    run_dir = root / name
    arms = list(errors)
    seeds = list(range(max(len(v) for v in errors.values())))
    write_json(run_dir / "config.json", {
        "preset": "fab", "config_hash": name.rsplit("-", 1)[-1] * 8, "dataset": "fashion-mnist",
        "labels_per_class": 4, "split_seed": 0,
        "ssl": {"algorithm": "fixmatch", "arms": arms, "seeds": seeds, "steps": 100},
        **(config_extra or {})})
    for arm, errs in errors.items():
        for seed, err in enumerate(errs):
            write_arm_seed(run_dir, arm, seed, err, **seed_kwargs)
    return run_dir
