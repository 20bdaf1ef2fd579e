"""The arms of the comparison, from one config and seed, written to one directory.

``supervised``  labeled images only (cross-entropy), same net, schedule and seed;
``supervised+synthetic``  the labeled images plus the synthetic rows (as augmented adds
                them), no unlabeled pool: the few-shot augmentation setting (DA-Fusion);
``baseline``    the SSL algorithm (FixMatch) on the real labeled + unlabeled images;
``augmented``   the same plus synthetic images read from Parquet shards, either as extra
                labeled rows (loss weight ``synthetic_weight``) or as extra unlabeled rows;
``replay``      the same as augmented, but the extra rows are the real labeled images drawn
                again (same share and weight): what k extra rows per batch do by themselves.
``control``     the same as augmented, but the extra rows are real unlabeled images labeled
                by the encoder's prototype judge (``pipeline.evaluate.control``), taken out
                of the unlabeled pool: a gain of augmented over control is the generated
                images' own, not the encoder's.
``augmented-r2`` the augmented arm on the second round's shards (``pipeline.generate.pseudo_labels``);
``selftrain``   its control: the round's pseudo-labeled real images as the extra rows (taken
                out of the unlabeled pool, as control's).
``pool-oracle`` an evaluation arm: the baseline given the base model's pretraining images
                (``split.base_idx``) as extra unlabeled images, what the generator's knowledge
                would be worth as real data. It reads images the task does not have.
``baseline-2x``, ``augmented-2x`` (and ``supervised-2x``, ``supervised+synthetic-2x``)
                the baseline and augmented (supervised) arms at twice the steps (and
                twice the evaluation and checkpoint spacing): the doubling rule's other half
                (``pipeline.evaluate.paired.doubling_check``).

All arms share the split, the network initialisation (drawn from ``config.seed`` alone),
the schedule, the random stream of the real rows (``trainer.py``) and the clean images the
EMA model's BN statistics are recomputed on, so the difference between baseline and
augmented is the synthetic data. With a validation split, the
learning curve is scored on the validation images and ``metrics.json`` holds both the
validation error (for choosing settings) and the test error (for the final figures).
Outputs in ``out_dir``: checkpoint.pt, learning_curve.parquet, metrics.json (written last;
a rerun that finds it for the same run returns at once).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from anl_core.precision import autocast_for, uses_bf16
from pipeline.atomic import atomic_write
from pipeline.data.datasets import ImageDataset
from pipeline.data.pool_labels import check_class_labels
from pipeline.data.splits import LabeledSplit, capped_pool
from pipeline.devices import resolve_device
from pipeline.digest import digest

from .algorithms import get_algorithm
from .arm_names import ARMS, DOUBLED_ARMS, EXTRA_ROW_ARMS, SUPERVISED_ARMS, base_arm
from .config import SSLConfig
from .nets import build_net, resolve_net_name
from .randaugment import to_unit
from .trainer import TrainData, Trainer


def arm_config(arm: str, config: SSLConfig) -> SSLConfig:
    """The trainer config ``arm`` runs: twice the steps and spacing for a doubled arm."""
    if arm not in DOUBLED_ARMS:
        return config
    return config.model_copy(update={"steps": 2 * config.steps,
                                     "eval_every": 2 * config.eval_every,
                                     "checkpoint_every": 2 * config.checkpoint_every})
METRICS = "metrics.json"
CURVE = "learning_curve.parquet"
CHECKPOINT = "checkpoint.pt"


class ArmError(ValueError):
    """run_arm cannot run as asked; the message says what to change."""




def _hash_arrays(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:16]


def channel_stats(images: np.ndarray, max_images: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] units, from a fixed subsample (enough for 3 decimals)."""
    if len(images) > max_images:
        images = images[np.random.default_rng(0).choice(len(images), max_images, replace=False)]
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return x.mean(axis=0).tolist(), np.maximum(x.std(axis=0), 1e-3).tolist()


def net_for(config: SSLConfig, dataset: ImageDataset) -> torch.nn.Module:
    """The arm's net as every caller builds it: its name for the data (``net: auto``), its
    width, the training images' channel statistics, weights drawn from ``config.seed``."""
    mean, std = channel_stats(dataset.train_images)
    return build_net(resolve_net_name(config.net, dataset.image_shape), dataset.num_classes,
                     dataset.image_shape, mean, std, config.seed, width=config.net_width)


def load_synthetic(shard_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic (images uint8 NHWC, labels int64) from a finished, verified shard set."""
    from pipeline.data.shards import read_shards

    arrays = read_shards(shard_dir, verify=True)
    return arrays.images, arrays.labels


def build_train_data(dataset: ImageDataset, split: LabeledSplit, config: SSLConfig,
                     device: torch.device,
                     synthetic: tuple[np.ndarray, np.ndarray] | None = None,
                     pool_exclude: np.ndarray | None = None,
                     pool_extra: np.ndarray | None = None) -> TrainData:
    """Move images to the device once, as uint8, and index the labeled/unlabeled pools.

    The unlabeled pool is the split's, capped to ``config.unlabeled_pool``. ``pool_exclude``:
    training-set indices taken out of it (the control arm's judged rows, so that no image is
    both an extra labeled row and an unlabeled one); ``pool_extra``: indices added to it (the
    pool-oracle's base-half images)."""
    n = len(dataset.train_labels)
    images, labels = dataset.train_images, dataset.train_labels
    weights = np.ones(n, dtype=np.float32)
    synth_idx = np.zeros(0, dtype=np.int64)
    if synthetic is not None:
        s_images, s_labels = synthetic
        images = np.concatenate([images, s_images])
        labels = np.concatenate([labels, s_labels.astype(np.int64)])
        weights = np.concatenate([weights, np.full(len(s_labels), config.synthetic_weight,
                                                   dtype=np.float32)])
        synth_idx = np.arange(n, n + len(s_labels), dtype=np.int64)
    labeled_synth = synth_idx if config.synthetic_as == "labeled" else synth_idx[:0]
    # Never the validation images: they are held out of training altogether.
    pool = capped_pool(split, config.unlabeled_pool)
    task_train = np.union1d(split.labeled_idx, pool)  # every task image a classifier may see
    real_unlabeled = task_train if config.include_labeled_in_unlabeled else pool
    if pool_exclude is not None and len(pool_exclude):
        real_unlabeled = np.setdiff1d(real_unlabeled, pool_exclude)
    if pool_extra is not None and len(pool_extra):
        real_unlabeled = np.union1d(real_unlabeled, pool_extra)
    # The same clean images for every arm of a seed (the task's, before any exclusion or
    # addition: the oracle's extra images never set its BN statistics).
    calib = np.random.default_rng(config.seed).permutation(task_train)[:config.bn_calibration]
    unlabeled = real_unlabeled if config.synthetic_as == "labeled" else \
        np.concatenate([real_unlabeled, synth_idx])
    if config.eval_size is not None and config.eval_size < len(dataset.test_labels):
        pick = np.sort(np.random.default_rng(config.seed).permutation(
            len(dataset.test_labels))[:config.eval_size])
    else:
        pick = np.arange(len(dataset.test_labels))

    # Before any training: a labeled row must carry a class, never UNLABELED (the store's
    # labels of unlabeled rows are never read, but an index mix-up would read one).
    try:
        check_class_labels(labels[split.labeled_idx], dataset.num_classes, "labeled images")
        check_class_labels(labels[labeled_synth], dataset.num_classes, "extra labeled rows")
        check_class_labels(labels[split.val_idx], dataset.num_classes, "validation images")
    except ValueError as e:
        raise ArmError(str(e)) from None

    def dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    test_images, test_labels = dev(dataset.test_images), dev(dataset.test_labels)
    val_images = val_labels = None
    if len(split.val_idx):
        val_images = dev(dataset.train_images[split.val_idx])
        val_labels = dev(dataset.train_labels[split.val_idx])
        curve_images, curve_labels, curve_split = val_images, val_labels, "validation"
    else:
        pick_t = dev(pick)
        curve_images, curve_labels, curve_split = test_images[pick_t], test_labels[pick_t], "test"
    return TrainData(
        store=dev(images), labels=dev(labels), weights=dev(weights),
        labeled_real=dev(split.labeled_idx.astype(np.int64)), labeled_synth=dev(labeled_synth),
        unlabeled=dev(np.asarray(unlabeled, dtype=np.int64)),
        test_images=test_images, test_labels=test_labels,
        curve_images=curve_images, curve_labels=curve_labels,
        num_classes=dataset.num_classes, curve_split=curve_split,
        val_images=val_images, val_labels=val_labels, calib_idx=dev(calib.astype(np.int64)),
    )


def _check_inputs(arm: str, dataset: ImageDataset, split: LabeledSplit,
                  synthetic: tuple[np.ndarray, np.ndarray] | None, config: SSLConfig) -> None:
    if arm not in ARMS:
        raise ArmError(f"unknown arm {arm!r}; choose one of {', '.join(ARMS)}")
    if arm == "pool-oracle" and not len(split.base_idx):
        raise ArmError("the pool-oracle arm adds the base model's pretraining half to the "
                       "pool, but this split has none; use task_images: task-half")
    if base_arm(arm) not in SUPERVISED_ARMS and arm != "pool-oracle" and \
            not len(capped_pool(split, config.unlabeled_pool)):
        raise ArmError(f"the {arm} arm trains on unlabeled images but the pool is empty "
                       f"(ssl.unlabeled_pool={config.unlabeled_pool}); run the supervised arms "
                       "only, or allow a pool")
    if len(split.labels) != len(dataset.train_labels) or \
            not np.array_equal(split.labels, dataset.train_labels):
        raise ArmError("the split does not index this dataset's training set (labels differ); "
                       "make the split from dataset.train_labels")
    if arm in EXTRA_ROW_ARMS:
        if synthetic is None:
            raise ArmError(f"the {arm} arm needs its extra rows: pass shard_dir= (a finished "
                           "shard set) or synthetic=(images, labels)")
        s_images, s_labels = synthetic
        if len(s_labels) == 0:
            raise ArmError(f"the {arm} arm's extra rows are empty; it would equal the "
                           "baseline. Generate samples first")
        if tuple(s_images.shape[1:]) != tuple(dataset.image_shape):
            raise ArmError(f"synthetic images are {tuple(s_images.shape[1:])} but the dataset's "
                           f"are {dataset.image_shape}; write shards at the dataset's pixel grid "
                           "(pipeline.data.images.from_model_space(x, shape=(H, W)))")
        if s_labels.min() < 0 or s_labels.max() >= dataset.num_classes:
            raise ArmError(f"synthetic labels span {s_labels.min()}..{s_labels.max()}, outside "
                           f"the dataset's {dataset.num_classes} classes")


def run_fingerprint(arm: str, dataset: ImageDataset, split: LabeledSplit, config: SSLConfig,
                    synthetic: tuple[np.ndarray, np.ndarray] | None,
                    pool_exclude: np.ndarray | None = None,
                    pool_extra: np.ndarray | None = None) -> str:
    """What decides a run's result: config, arm, dataset, labeled split and synthetic data."""
    extra = arm in EXTRA_ROW_ARMS
    parts = {
        "config": config.fingerprint(reads_extra_rows=extra), "arm": arm,
        "dataset": dataset.name,
        "shape": list(dataset.image_shape), "classes": list(dataset.class_names),
        "train": _hash_arrays(dataset.train_labels), "test": _hash_arrays(dataset.test_labels),
        "labeled": _hash_arrays(np.sort(split.labeled_idx)),
        "synthetic": _hash_arrays(*synthetic) if extra and synthetic else None,
    }
    if len(split.val_idx):  # absent without one: runs from before validation keep theirs
        parts["validation"] = _hash_arrays(split.val_idx)
    if pool_exclude is not None and len(pool_exclude):
        parts["pool_exclude"] = _hash_arrays(np.sort(pool_exclude))
    if pool_extra is not None and len(pool_extra):
        parts["pool_extra"] = _hash_arrays(np.sort(pool_extra))
    if config.unlabeled_pool is not None:  # the capped pool, as drawn
        parts["pool"] = _hash_arrays(capped_pool(split, config.unlabeled_pool))
    return digest(parts, spaced=True)[:16]


def run_arm(arm: str, dataset: ImageDataset, split: LabeledSplit, out_dir: str | Path,
            config: SSLConfig, shard_dir: str | Path | None = None, progress: bool = True, *,
            synthetic: tuple[np.ndarray, np.ndarray] | None = None,
            pool_exclude: np.ndarray | None = None,
            on_step: Callable[[int], None] | None = None) -> Path:
    """Train and evaluate one arm; return ``out_dir/metrics.json``.

    ``shard_dir`` (or the in-memory ``synthetic=(images, labels)``) is read by the
    augmented and control arms only (for control: its judged real rows); ``replay`` draws
    its extra rows from the split's labeled images. ``pool_exclude`` (training-set indices)
    takes the extra rows' own images out of the unlabeled pool (control, selftrain). A finished run is
    not redone; an interrupted one resumes from ``checkpoint.pt``. ``on_step(step)`` is called after every training step (raising
    from it stops the run; the last checkpoint stays).
    """
    out_dir = Path(out_dir)
    config = arm_config(arm, config)
    if arm == "replay":
        synthetic = (dataset.train_images[split.labeled_idx],
                     dataset.train_labels[split.labeled_idx].astype(np.int64))
    if arm in EXTRA_ROW_ARMS and synthetic is None and shard_dir is not None:
        synthetic = load_synthetic(shard_dir)
    _check_inputs(arm, dataset, split, synthetic, config)
    if arm not in EXTRA_ROW_ARMS:
        synthetic = None
    pool_extra = split.base_idx if arm == "pool-oracle" else None
    fingerprint = run_fingerprint(arm, dataset, split, config, synthetic, pool_exclude,
                                  pool_extra)
    metrics_path = out_dir / METRICS
    if metrics_path.exists():
        done = json.loads(metrics_path.read_text())
        if done.get("fingerprint") == fingerprint:
            return metrics_path
        raise ArmError(f"{metrics_path} holds a finished run with different inputs (fingerprint "
                       f"{done.get('fingerprint')} != {fingerprint}); use another out_dir or "
                       "delete that one to rerun")
    out_dir.mkdir(parents=True, exist_ok=True)

    device = resolve_device(config.device)
    data = build_train_data(dataset, split, config, device, synthetic, pool_exclude, pool_extra)
    net_name = resolve_net_name(config.net, dataset.image_shape)
    net = net_for(config, dataset)
    algorithm_name = "supervised" if base_arm(arm) in SUPERVISED_ARMS else config.algorithm
    algorithm = get_algorithm(algorithm_name)(config, dataset.num_classes)
    trainer = Trainer(net, algorithm, data, config, device, out_dir / CHECKPOINT, fingerprint,
                      progress=progress, label=f"{arm} seed {config.seed}")
    resumed_from = trainer.step if trainer.load_checkpoint() else None
    trainer.fit(on_step=on_step)
    t0 = time.perf_counter()
    # The final figures: the mean over the last final_points evaluations (fit read the test
    # split at each); per-class accuracy and confusion are the last point's.
    result, test_error, curve_error = trainer.final_result()
    eval_s = time.perf_counter() - t0
    val_error = curve_error if data.curve_split == "validation" else None

    curve = pd.DataFrame(trainer.curve)
    atomic_write(out_dir / CURVE, lambda tmp: curve.to_parquet(tmp, index=False))
    n_synth = 0 if synthetic is None else len(synthetic[1])
    metrics = {
        "arm": arm, "algorithm": algorithm_name, "seed": config.seed, "steps": trainer.step,
        "dataset": dataset.name, "net": net_name,
        "num_params": sum(p.numel() for p in net.parameters()),
        "top1_error": test_error, "top1_accuracy": 1.0 - test_error,
        "val_error": val_error, "final_points": len(trainer.final_evals),
        "final_evals": trainer.final_evals, "last_top1_error": result.top1_error,
        "num_validation": len(split.val_idx), "curve_split": data.curve_split,
        # None for a class absent from the test split (strict JSON has no NaN).
        "per_class_accuracy": {name: (None if np.isnan(acc) else acc) for name, acc in
                               zip(dataset.class_names, result.per_class_accuracy, strict=True)},
        "confusion_matrix": result.confusion.tolist(), "class_names": list(dataset.class_names),
        "num_test": len(dataset.test_labels),
        "num_labeled": len(split.labeled_idx), "num_unlabeled": len(data.unlabeled),
        "num_synthetic": n_synth, "synthetic_as": config.synthetic_as if n_synth else None,
        "train_time_s": trainer.train_time_s, "wall_time_s": trainer.wall_time_s + eval_s,
        "steps_per_s": trainer.step / trainer.train_time_s if trainer.train_time_s else None,
        "device": str(device), "bf16": trainer.amp, "channels_last": trainer.channels_last,
        "resumed_from_step": resumed_from,
        "fingerprint": fingerprint, "config": config.to_dict(),
    }
    atomic_write(metrics_path, lambda tmp: Path(tmp).write_text(
        json.dumps(metrics, indent=1)))
    return metrics_path


@torch.no_grad()
def predict_probs(arm_dir: str | Path, dataset: ImageDataset, images: np.ndarray,
                  device: str = "cpu", batch_size: int = 1024) -> np.ndarray:
    """Softmax probabilities of a finished arm's EMA classifier on uint8 NHWC ``images``.

    The net is rebuilt as ``run_arm`` built it (name, width, dataset channel statistics) and
    loaded with the EMA weights of ``checkpoint.pt`` and the BN statistics recomputed for them
    at the last step, the model its last test figure was measured on.
    """
    arm_dir = Path(arm_dir)
    metrics_path, ckpt = arm_dir / METRICS, arm_dir / CHECKPOINT
    if not metrics_path.exists() or not ckpt.exists():
        raise ArmError(f"{arm_dir} has no finished classifier ({METRICS} and {CHECKPOINT}); "
                       "run that arm first")
    metrics = json.loads(metrics_path.read_text())
    dev = resolve_device(device)
    config = SSLConfig(**metrics["config"])
    net = net_for(config, dataset)
    state = torch.load(ckpt, map_location=dev, weights_only=True)
    if state.get("ema_calibrated_step") != state["step"]:
        raise ArmError(f"{ckpt} holds EMA weights without BN statistics recomputed for them "
                       "(written before evaluation recomputed them); rerun that arm (delete its folder)")
    net.load_state_dict(state["ema"])
    net.to(dev).eval()
    amp = uses_bf16(dev, config.amp, cpu=True)  # the trainer's rule: as the arm was scored
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(dev)
        with autocast_for(dev, amp, cpu=True):
            logits = net(to_unit(x))
        out.append(torch.softmax(logits.float(), dim=-1).cpu().double().numpy())
    return np.concatenate(out) if out else np.zeros((0, dataset.num_classes))
