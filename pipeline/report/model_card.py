"""Model card of a pretrained base model: measure its samples, write card.json and README.md.

Reads what ``pipeline.generate.pretrain`` left in the model directory (``training.json``, the diffusers
``unet/`` and ``scheduler/``), draws ``num_samples`` seeded DDIM samples, and measures them
against real data the model never saw in training:

* KID between the samples and real *test* images in a pretrained encoder's feature space
  (pooled condition-encoder tokens, :func:`pipeline.evaluate.quality.encoder_features`), beside the KID
  of as many real *training* images against the same test images: the floor a perfect model
  would reach at this sample size;
* the share of samples that the reference classifier (:mod:`pipeline.evaluate.reference`, trained on
  real labels) assigns to some class with probability above ``confidence``, beside the same
  share for real test images; and the class histogram of those assignments (mode coverage).

FID is not reported: with a few hundred samples and 1280-dimensional features its covariance
estimate is singular and its bias dominates; KID is unbiased at any sample size.

``card.json`` is written last (atomically) and marks a finished card; a rerun with the same
weights and settings only re-renders README.md from it (:mod:`pipeline.report.model_card_readme`,
which reads nothing but the card). Run it as
``python -m pipeline.report.model_card data/models/fashion-mnist-ddpm-32``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_write_json, atomic_write_text, finite
from pipeline.devices import resolve_device
from pipeline.digest import file_sha256
from pipeline.generate.pretrain import data_hash
from pipeline.models import sample_base
from pipeline.paths import REPO_ROOT
from pipeline.provenance import device_label, git_commit
from pipeline.report.model_card_readme import render_readme

CARD_FILE = "card.json"
README_FILE = "README.md"
WEIGHTS_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"
CARD_FORMAT = "anl-augment-model-card"
CARD_VERSION = 1
# The code a card's model depends on: the card says "+dirty" when it differs from HEAD.
PRETRAIN_CODE = ("pipeline/generate/pretrain.py", "pipeline/data/images.py")


class ModelCardError(RuntimeError):
    """The model directory cannot be described; the message says what is missing."""


@dataclass(frozen=True)
class CardConfig:
    """How the card's figures are measured (stored in card.json: figures depend on it)."""

    num_samples: int = 500
    sample_steps: int = 50  # DDIM steps, as for the pretrain stage's sample grid
    sample_batch: int = 125
    seed: int = 1234
    encoder: str = "efficientnet-lite0@128"  # the demo preset's encoder; 128 px keeps CPUs fast
    num_real: int = 1000  # real test images (and as many training images for the floor)
    confidence: float = 0.9
    kid_subsets: int = 20
    kid_subset_size: int = 500
    reference: dict = field(default_factory=dict)  # pipeline.evaluate.reference.ReferenceConfig fields

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- sampling


def load_pipeline_unet(model_dir: str | Path, device: torch.device | str = "cpu"):
    """(UNet2DModel in float32, its DDPMScheduler) from a diffusers pipeline directory."""
    from pipeline.models import load_base_unet

    model_dir = Path(model_dir)
    if not (model_dir / WEIGHTS_FILE).exists():
        raise ModelCardError(f"{model_dir} has no {WEIGHTS_FILE}; train it first with "
                             "`augment pretrain --out " + str(model_dir) + "`")
    # fp16 on disk; sample in fp32 (CPU) or under bf16 autocast (CUDA).
    return load_base_unet(model_dir / "unet", device)


# --------------------------------------------------------------------------- figures


def confident_assignments(probs: np.ndarray, threshold: float) -> dict:
    """Share of rows whose top class probability exceeds ``threshold``, and which classes."""
    top = probs.max(axis=1)
    pred = probs.argmax(axis=1)
    confident = top > threshold
    hist = np.bincount(pred[confident], minlength=probs.shape[1])
    share = hist / max(1, hist.sum())
    return {
        "confident_share": float(confident.mean()) if len(probs) else float("nan"),
        "confident_histogram": hist.tolist(),
        # A class counts as covered when it gets at least a fifth of a uniform share.
        "classes_covered": int((share >= 0.2 / probs.shape[1]).sum()),
        "argmax_histogram": np.bincount(pred, minlength=probs.shape[1]).tolist(),
    }


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def measure_samples(samples: np.ndarray, dataset, features, reference,
                    config: CardConfig) -> dict:
    """The card's quality figures for uint8 ``samples`` against ``dataset``'s real images."""
    from pipeline.evaluate.quality import kid

    rng = np.random.default_rng(config.seed)
    test_idx = rng.choice(len(dataset.test_labels), min(config.num_real, len(dataset.test_labels)),
                          replace=False)
    train_idx = rng.choice(len(dataset.train_labels),
                           min(config.num_samples, len(dataset.train_labels)), replace=False)
    f_test = features(dataset.test_images[test_idx])
    f_samples = features(samples)
    f_train = features(dataset.train_images[train_idx])
    kid_s, kid_s_std = kid(f_samples, f_test, config.kid_subsets, config.kid_subset_size,
                           config.seed)
    kid_r, kid_r_std = kid(f_train, f_test, config.kid_subsets, config.kid_subset_size,
                           config.seed)
    synth = confident_assignments(_softmax(reference.logits(samples)), config.confidence)
    real = confident_assignments(_softmax(reference.logits(dataset.test_images[test_idx])),
                                 config.confidence)
    return {
        "kid": kid_s, "kid_std": kid_s_std,
        "kid_real_train_vs_test": kid_r, "kid_real_train_vs_test_std": kid_r_std,
        "n_samples": len(samples), "n_real_test": len(test_idx),
        "samples": synth,
        "real_test_confident_share": real["confident_share"],
        "real_test_confident_histogram": real["confident_histogram"],
        # Brightness bias (a common flaw of short DDPM training) shows up here first.
        "mean_intensity": float(samples.mean() / 255),
        "real_test_mean_intensity": float(dataset.test_images[test_idx].mean() / 255),
        "reference_test_accuracy": reference.test_accuracy,
        "reference_id": reference.reference_id,
        "reference_config": reference.info.get("config"),
    }


# --------------------------------------------------------------------------- provenance


def training_pool(training: dict) -> dict:
    """Where the model's training images came from (dataset, root, and a half and its seed or
    the labeled split's labels_per_class and split_seed), as ``augment pretrain`` records it
    in training.json."""
    pool = training.get("pool")
    if not isinstance(pool, dict) or "dataset" not in pool or not (
            {"half", "half_seed"} <= set(pool) or {"labels_per_class", "split_seed"} <= set(pool)):
        raise ModelCardError("training.json has no `pool` record (dataset and split of the "
                             "training images); retrain with `augment pretrain`, which writes it")
    return pool


def _card_identity(weights_sha: str, config: CardConfig) -> dict:
    return {"weights_sha256": weights_sha, "card_config": config.to_dict()}


# --------------------------------------------------------------------------- the card


def build_card(model_dir: str | Path, config: CardConfig | None = None, *, dataset=None,
               reference=None, features=None, cache_dir: str | Path | None = None,
               device: str | None = None, progress: bool = True) -> dict:
    """Measure the model in ``model_dir`` and return the card's content (nothing written)."""
    from pipeline.evaluate.quality import resolve_features
    from pipeline.evaluate.reference import ReferenceConfig, load_or_train_reference

    model_dir = Path(model_dir)
    config = config or CardConfig()
    training_path = model_dir / "training.json"
    if not training_path.exists():
        raise ModelCardError(f"{training_path} is missing: the model is not finished (or was not "
                             "made by `augment pretrain`)")
    training = json.loads(training_path.read_text())
    pool = training_pool(training)
    dev = resolve_device(device or "auto")
    if dataset is None:
        from pipeline.data.datasets import load_dataset

        dataset = load_dataset(pool["dataset"], pool.get("root"))
    from pipeline.data.splits import pretraining_indices

    seen = pretraining_indices(dataset.train_labels, pool, dataset.num_classes)
    recomputed_hash = data_hash(dataset.train_images[seen])
    if reference is None:
        from pipeline.paths import resolve_path

        cache = Path(cache_dir) if cache_dir else resolve_path("runs") / "_cache" / "reference"
        reference = load_or_train_reference(dataset, cache, ReferenceConfig(**config.reference),
                                            dev, progress)
    space, features = (features.__name__, features) if features is not None else \
        resolve_features(config.encoder, str(dev), reference)

    unet, scheduler = load_pipeline_unet(model_dir, dev)
    start = time.perf_counter()
    samples = sample_base(unet, scheduler, config.num_samples, config.sample_steps, config.seed,
                          config.sample_batch, dataset.image_shape[:2], progress)
    sample_s = time.perf_counter() - start
    quality = measure_samples(samples, dataset, features, reference, config)
    quality.update(feature_space=space, sampling_s=round(sample_s, 1),
                   sampling_device=device_label(dev))

    weights = model_dir / WEIGHTS_FILE
    unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
    return {
        "format": CARD_FORMAT, "version": CARD_VERSION, "name": model_dir.name,
        "location": _repo_relative(model_dir),
        **_card_identity(file_sha256(weights), config),
        "weights_bytes": weights.stat().st_size,
        "weights_dtype": "/".join(sorted(_safetensors_dtypes(weights))),
        "unet_config": {k: v for k, v in unet_config.items() if not k.startswith("_")},
        "scheduler_config": {k: v for k, v in
                             json.loads((model_dir / "scheduler" / "scheduler_config.json")
                                        .read_text()).items() if not k.startswith("_")},
        "command": training["command"],
        # pretrain may record its own commit; else the code's commit when the card is written.
        "git_commit": training.get("git_commit")
        or git_commit(REPO_ROOT, PRETRAIN_CODE) or "uncommitted",
        "git_commit_source": "training" if training.get("git_commit") else "card",
        "dataset": dataset.name, "class_names": list(dataset.class_names),
        "pool": {k: v for k, v in pool.items() if k not in ("dataset", "root")},
        "num_images": training.get("num_images"), "data_sha256": training.get("data_sha256"),
        "data_sha256_verified": recomputed_hash == training.get("data_sha256"),
        "steps": training.get("steps"), "wall_s": training.get("wall_s"),
        "steps_per_s": training.get("steps_per_s"), "device": training.get("device"),
        "params": training.get("params"), "final_loss": training.get("final_loss"),
        "stopped_by_time_limit": bool(training.get("stopped_by_time_limit")),
        "pretrain_config": training.get("config"),
        "training_weights_sha256": training.get("weights_sha256"),
        "quality": quality,
    }


def _repo_relative(path: Path) -> str:
    root = REPO_ROOT
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return path.name


def _safetensors_dtypes(path: Path) -> set[str]:
    # The safetensors header: 8 bytes little-endian length, then JSON {name: {dtype, ...}}.
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
    return {names.get(v["dtype"], v["dtype"]) for k, v in header.items() if k != "__metadata__"}


# --------------------------------------------------------------------------- writing


def write_model_card(model_dir: str | Path, config: CardConfig | None = None, *,
                     force: bool = False, **kwargs) -> Path:
    """Write README.md and then card.json into ``model_dir``; returns card.json's path.

    An existing card.json for the same weights and settings is reused (README re-rendered).
    """
    model_dir = Path(model_dir)
    config = config or CardConfig()
    path = model_dir / CARD_FILE
    card = None
    if path.exists() and not force and (model_dir / WEIGHTS_FILE).exists():
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in ("weights_sha256", "card_config")} == \
                _card_identity(file_sha256(model_dir / WEIGHTS_FILE), config):
            card = old
            # Facts about training (not measured figures) are read again from training.json,
            # so a card written before a field existed renders correctly.
            training = json.loads((model_dir / "training.json").read_text())
            card["stopped_by_time_limit"] = bool(training.get("stopped_by_time_limit"))
    if card is None:
        card = build_card(model_dir, config, **kwargs)
    atomic_write_text(model_dir / README_FILE, render_readme(card))
    atomic_write_json(path, finite(card))
    return path


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipeline.report.model_card", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="directory written by `augment pretrain`")
    defaults = CardConfig()
    p.add_argument("--num-samples", type=int, default=defaults.num_samples)
    p.add_argument("--sample-steps", type=int, default=defaults.sample_steps)
    p.add_argument("--sample-batch", type=int, default=defaults.sample_batch)
    p.add_argument("--encoder", default=defaults.encoder, help="feature space for KID")
    p.add_argument("--num-real", type=int, default=defaults.num_real)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--cache-dir", default=None, help="reference classifier cache "
                   "(default <repo>/runs/_cache/reference)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--force", action="store_true", help="re-measure even if card.json matches")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    config = CardConfig(num_samples=a.num_samples, sample_steps=a.sample_steps,
                        sample_batch=a.sample_batch, encoder=a.encoder, num_real=a.num_real,
                        seed=a.seed)
    path = write_model_card(a.model_dir, config, force=a.force, cache_dir=a.cache_dir,
                            device=a.device, progress=not a.no_progress)
    q = json.loads(path.read_text())["quality"]
    print(f"{path}: KID {q['kid']:.4f} (real floor {q['kid_real_train_vs_test']:.4f}), "
          f"confident {q['samples']['confident_share']:.1%} "
          f"(real test {q['real_test_confident_share']:.1%}), "
          f"{q['samples']['classes_covered']} classes covered")


if __name__ == "__main__":
    main()
