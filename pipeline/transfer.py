"""Few-shot generative transfer: adapt a pretrained diffusion model to a new image domain.

The method's second half. A frozen base ``UNet2DModel`` (e.g. the shipped Fashion-MNIST DDPM)
gets ONE shared ANL adapter, tuned on a few images ("shots") of a target domain, each shot
conditioned on its own encoder tokens; masked sampling conditioned on the shots' tokens then
draws new images of the domain. Two references at equal steps: ``full`` fine-tunes the whole
U-Net with the same denoising loss (unconditional), ``scratch`` trains a U-Net of the same
config from fresh weights on the shots. The shots are a seeded draw from the target's images;
the rest are held out, and the samples are measured against them only.

A run lives in ``<runs_dir>/<mode>-<target>-<confighash>/``; its steps run in order and each
writes its outputs atomically, then ``stages/<step>.json`` last, keyed by the config parts it
reads plus its upstream keys:

| step | writes |
| --- | --- |
| target | ``target/target.npz``: the shots and the held-out images (uint8 NHWC) |
| tune | ``model/``: the adapter (anl) or the whole U-Net (full, scratch), ``tune.json`` |
| sample | ``shards/``: the samples as Parquet shards (label 0, class name = target name) |
| evaluate | ``eval/metrics.json``: KID, diversity, near-copy share, cost |
| report | ``report.html`` (self-contained), ``report.md``, ``grid.png`` |

A rerun skips finished steps; a changed setting gives a new run directory, into which the
finished steps of a sibling run with the same keys are hard-linked instead of recomputed, so
a changed sampling setting reruns only sample, evaluate and report.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from pipeline.atomic import atomic_write, atomic_write_json, atomic_write_text
from pipeline.config import apply_overrides, parse_overrides, resolve_path
from pipeline.runs import read_json

BUILTIN_TARGETS = ("mnist-foolbox", "sklearn-digits")
DIGITS = tuple(str(d) for d in range(10))
STEPS = ("target", "tune", "sample", "evaluate", "report")
RUNTIME_FIELDS = frozenset({"runs_dir", "progress", "device"})  # where and how, not what
NEAR_COPY_PERCENTILE = 5.0
SAMPLE_BATCH = 64  # images per sampling batch; every image has its own seed, so no effect
Ratio = Annotated[float, Field(ge=0.0, le=1.0)]


class TransferError(ValueError):
    """A transfer run's input is unusable; the message names the parameter and the fix."""


class TransferConfig(BaseModel):
    """Everything one transfer run depends on; validated strictly (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str = "data/models/fashion-mnist-ddpm-32"
    # A folder of images, a built-in target (BUILTIN_TARGETS) or a registered dataset name.
    target: str = "mnist-foolbox"
    target_class: str | None = None  # a class name or index; None: every image of the target
    target_root: str | None = None  # root= of a registered dataset
    shots: int = Field(10, ge=1)
    max_held_out: int = Field(500, ge=2)  # held-out images evaluated against (KID cost)
    seed: int = 0
    encoder: str = "efficientnet-lite0@64"
    mode: Literal["anl", "full", "scratch"] = "anl"
    steps: int = Field(300, ge=0)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    hflip: bool = False  # off: digits and text are not mirror-symmetric
    context_dim: int = Field(128, ge=1)  # anl: projected token width
    head_dim: int = Field(32, ge=1)  # anl: attention head width
    cond_dropout: Ratio = 0.1  # anl: share of steps that train the null condition
    train_mask_ratio: Ratio = 0.3  # anl: tokens masked per step, up to this share
    samples: int = Field(100, ge=1)
    mask_ratio: Ratio = 0.3  # anl: tokens replaced by the null token per sample
    guidance: float = Field(2.0, ge=0)
    num_inference_steps: int = Field(25, ge=1)
    unconditional: bool = False  # anl: sample through the null token only
    kid_subsets: int = Field(20, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    runs_dir: str = "runs/transfer"
    progress: bool = True

    def resolved_device(self) -> str:
        """The device steps run on (``auto``: CUDA when visible)."""
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    @field_validator("target_class", mode="before")
    @classmethod
    def _class_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v  # --class 3 and --class '3' are one class


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown parameter {loc!r}: remove it or check its spelling "
                         f"(parameters: {', '.join(TransferConfig.model_fields)})")
        else:
            lines.append(f"{loc}={e.get('input')!r}: {e['msg'].replace('Value error, ', '')}")
    return "invalid transfer configuration:\n  " + "\n  ".join(lines)


def transfer_config(values: dict[str, Any] | None = None,
                    overrides: list[str] | dict[str, Any] | None = None) -> TransferConfig:
    """A validated config from ``values`` plus ``key=value`` overrides (values are YAML)."""
    data = apply_overrides(dict(values or {}), parse_overrides(overrides))
    try:
        return TransferConfig.model_validate(data)
    except ValidationError as e:
        raise TransferError(_explain(e)) from None


# --------------------------------------------------------------------------- the target


def foolbox_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 20 real MNIST digits in foolbox/data/mnist_{index}_{label}.png: uint8 (20, 28, 28, 1)."""
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")
    files = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("mnist_*.png")) \
        if spec and spec.submodule_search_locations else []
    if not files:
        raise TransferError("target='mnist-foolbox' needs the PyPI package foolbox (pip install "
                            "foolbox), or use target='sklearn-digits'")
    images = np.stack([np.asarray(Image.open(p).convert("L")) for p in files])[..., None]
    return images, np.array([int(p.stem.split("_")[2]) for p in files], np.int64)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as uint8 (N, 28, 28, 1): each upscaled with Pillow to a
    20x20 box centred in 28x28, where MNIST centres its digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    small = np.round(data.images / 16.0 * 255).astype(np.uint8)
    out = np.zeros((len(small), 28, 28, 1), np.uint8)
    for i, im in enumerate(small):
        out[i, 4:24, 4:24, 0] = np.asarray(Image.fromarray(im).resize((20, 20), Image.BILINEAR))
    return out, data.target.astype(np.int64)


def folder_images(folder: Path) -> np.ndarray:
    """Every image file directly in ``folder`` (sorted by name) as uint8 (N, H, W, C)."""
    from PIL import Image, UnidentifiedImageError

    from pipeline.data.datasets import IMAGE_SUFFIXES

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    images = []
    for p in files:
        try:
            with Image.open(p) as im:
                images.append(np.asarray(im.convert("RGB" if im.mode in ("RGB", "RGBA", "P")
                                                    else "L")))
        except (UnidentifiedImageError, OSError) as e:
            raise TransferError(f"target={str(folder)!r}: cannot read {p.name} ({e}); remove "
                                "it or replace it with a PNG") from None
    if not images:
        raise TransferError(f"target={str(folder)!r}: the folder holds no images (PNG, JPEG, "
                            "...); put the target domain's images directly in it")
    if len({a.shape for a in images}) > 1:
        raise TransferError(f"target={str(folder)!r}: the images differ in size "
                            f"({sorted({a.shape[:2] for a in images})[:3]}...); resize them to "
                            "one size")
    if len({a.ndim for a in images}) > 1:  # grey and colour mixed: colour them all
        images = [np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a for a in images]
    x = np.stack(images)
    return x[..., None] if x.ndim == 3 else x


def _dataset_pool(config: TransferConfig) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from pipeline.data.datasets import DatasetError, load_dataset

    try:
        ds = load_dataset(config.target, config.target_root)
    except DatasetError as e:
        raise TransferError(f"target={config.target!r}: {e}") from None
    return (np.concatenate([ds.train_images, ds.test_images]),
            np.concatenate([ds.train_labels, ds.test_labels]), ds.class_names)


def _raw_target(config: TransferConfig):
    """(images, labels or None, class names) of the whole target, before class selection."""
    from pipeline.data.datasets import available_datasets

    if config.target == "mnist-foolbox":
        return (*foolbox_mnist(), DIGITS)
    if config.target == "sklearn-digits":
        return (*sklearn_digits(), DIGITS)
    if config.target in available_datasets():
        return _dataset_pool(config)
    folder = resolve_path(config.target)
    if not folder.is_dir():
        raise TransferError(
            f"target={config.target!r}: no such folder ({folder}); give a folder of PNG images, "
            f"a built-in target ({', '.join(BUILTIN_TARGETS)}), or a registered dataset "
            f"({', '.join(available_datasets())}) with a class (--class)")
    return folder_images(folder), None, ()


def _select_class(images, labels, names: tuple[str, ...], wanted: str | None, target: str):
    if wanted is None:
        return images
    if labels is None:
        raise TransferError(f"target={target!r} is a folder without classes: drop --class "
                            "(target_class), or point target at the class's own folder")
    if wanted in names:
        index = names.index(wanted)
    elif wanted.isdigit() and int(wanted) < len(names):
        index = int(wanted)
    else:
        raise TransferError(f"target_class={wanted!r} is not a class of {target!r}; use one "
                            f"of {', '.join(names)} (or its index 0..{len(names) - 1})")
    return images[labels == index]


def _to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Grey <-> colour to the base model's channel count (ITU-R 601 luma for colour -> grey)."""
    if images.shape[-1] == channels:
        return images
    if channels == 3:
        return np.repeat(images[..., :1], 3, axis=-1)
    luma = images[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.round(luma)[..., None].astype(np.uint8)


def target_name(config: TransferConfig) -> str:
    """The domain's name: the class name of every sample in the shards."""
    base = config.target if config.target in BUILTIN_TARGETS or "/" not in config.target \
        else resolve_path(config.target).name
    return base if config.target_class is None else f"{base}:{config.target_class}"


def target_pool(config: TransferConfig, channels: int) -> np.ndarray:
    """Every image of the target domain, uint8 (N, H, W, channels)."""
    images, labels, names = _raw_target(config)
    return _to_channels(_select_class(images, labels, names, config.target_class,
                                      config.target), channels)


def draw_shots(n: int, shots: int, max_held_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(shot indices, held-out indices) into a pool of ``n``: one seeded permutation.

    Shots are its head and the held-out images its tail, so with one seed the 10 shots are
    among the 100 shots and both are measured against the same held-out images.
    """
    if n - shots < 2:
        raise TransferError(
            f"shots={shots}: the target has {n} images, and evaluation holds out at least 2 "
            f"beside the shots; lower --shots to at most {max(n - 2, 0)} or add images")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:shots]), np.sort(perm[max(shots, n - max_held_out):])


# --------------------------------------------------------------------------- models


def base_dir(config: TransferConfig) -> Path:
    """The folder of the base UNet2DModel (a pipeline's ``unet/`` or the folder itself)."""
    from pipeline.preflight import PreflightError, resolve_base_model

    try:
        return resolve_base_model(config.base_model)
    except PreflightError as e:
        raise TransferError(str(e)) from None


def base_channels(config: TransferConfig) -> int:
    return int(json.loads((base_dir(config) / "config.json").read_text())["in_channels"])


def load_base(spec: str, device: torch.device | str):
    """The base UNet2DModel (float32, eval) and its training scheduler (DDPM by default)."""
    from diffusers import DDPMScheduler, UNet2DModel

    from pipeline.preflight import resolve_base_model, resolve_scheduler_config

    unet_dir = resolve_base_model(spec)
    unet = UNet2DModel.from_pretrained(unet_dir, torch_dtype=torch.float32,
                                       low_cpu_mem_usage=False).to(device).eval()
    sched = resolve_scheduler_config(unet_dir)
    scheduler = (DDPMScheduler.from_pretrained(sched.parent) if sched
                 else DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear"))
    return unet, scheduler


@functools.lru_cache(maxsize=2)
def _encoder(name: str, device: str):
    from anl_core.encoders import load_encoder

    return load_encoder(name, device=device)


class WholeUNet(nn.Module):
    """A plain U-Net in the interface ``tune_adapter`` trains, so that full fine-tuning and
    training from scratch run the very loop, loss, optimiser, EMA and noise draws ANL tuning
    runs: every weight is trainable and the condition tokens are ignored (unconditional)."""

    def __init__(self, unet):
        super().__init__()
        self.net = unet.requires_grad_(True)

    @property
    def device(self) -> torch.device:
        return self.net.device

    def adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def forward(self, sample, timestep, tokens=None, token_mask=None, context=None):
        return self.net(sample, timestep, return_dict=False)[0]


def build_model(config: TransferConfig, unet, encoder=None) -> nn.Module:
    """What the mode trains: anl = the frozen base plus a fresh adapter; full = the base
    itself; scratch = a U-Net of the base's config with fresh weights (seeded)."""
    from diffusers import UNet2DModel

    from anl_core.inject import ANLConfig, attach_anl

    # Adapter or scratch initialisation. A seed derived from config.seed, not the seed itself:
    # bases are often made with torch.manual_seed(0) from the same config, and "fresh
    # weights" must not be those very weights.
    torch.manual_seed(int(np.random.SeedSequence([config.seed, 0x1A17]).generate_state(1)[0]))
    if config.mode == "anl":
        return attach_anl(unet, ANLConfig.for_encoder(encoder, context_dim=config.context_dim,
                                                      head_dim=config.head_dim))
    if config.mode == "scratch":
        unet = UNet2DModel.from_config(unet.config).to(unet.device)
    return WholeUNet(unet)


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.adapter_parameters())


def fit(config: TransferConfig, model: nn.Module, scheduler, shots: np.ndarray,
        tokens: torch.Tensor | None):
    """Train ``model`` on the shots (uint8 NHWC) with the denoising loss; a ``TuneResult``."""
    from anl_core.tuning import TuneConfig, tune_adapter
    from pipeline.data.images import to_model_space

    anl = config.mode == "anl"
    size = (model.unet if anl else model.net).config.sample_size
    tcfg = TuneConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                      warmup_steps=min(50, config.steps // 10), seed=config.seed,
                      hflip=config.hflip, cond_dropout=config.cond_dropout if anl else 0.0,
                      train_mask_ratio=config.train_mask_ratio if anl else 0.0)
    if tokens is None:  # unconditional: one empty token per image keeps tune_adapter's pairs
        tokens = torch.zeros(len(shots), 1, 1)
    return tune_adapter(model, scheduler, to_model_space(shots, size, device=model.device),
                        tokens, tcfg, progress=config.progress)


def shot_tokens(encoder, shots: np.ndarray) -> torch.Tensor:
    from pipeline.data.images import to_model_space

    return encoder.encode(to_model_space(shots, device=encoder.device)).cpu()


@torch.no_grad()
def generate(config: TransferConfig, model: nn.Module, scheduler, shape: tuple[int, int],
             tokens: torch.Tensor | None = None, condition_ids: np.ndarray | None = None):
    """(uint8 samples (N, H, W, C), condition id per sample or None)."""
    from anl_core.sampling import masked_sample
    from pipeline.data.images import from_model_space
    from pipeline.evaluate.model_card import sample_base

    if config.mode != "anl":
        return sample_base(model.net, scheduler, config.samples, config.num_inference_steps,
                           config.seed, SAMPLE_BATCH, shape, config.progress), None
    n = min(len(tokens), config.samples)  # fewer samples than shots: one each of the first
    tokens, condition_ids = tokens[:n], np.asarray(condition_ids)[:n]
    per = -(-config.samples // n)
    x = masked_sample(model, scheduler, tokens, per, sample_mask_ratio(config), config.guidance,
                      config.num_inference_steps, config.seed, SAMPLE_BATCH,
                      condition_ids=condition_ids, progress=config.progress)
    # Sample j of every shot before sample j + 1 of any, so the cut keeps the shots even.
    order = np.arange(len(x)).reshape(n, per).T.reshape(-1)[:config.samples]
    return from_model_space(x[order], shape), np.repeat(condition_ids, per)[order]


def sample_mask_ratio(config: TransferConfig) -> float:
    return 1.0 if config.unconditional else config.mask_ratio  # 1.0: the null token only


# --------------------------------------------------------------------------- evaluation


def near_copy_share(samples: np.ndarray, shots: np.ndarray, held_out: np.ndarray,
                    percentile: float = NEAR_COPY_PERCENTILE) -> tuple[float, float]:
    """(share of samples nearer a shot than the threshold, the threshold).

    The threshold is the ``percentile``-th percentile of the held-out real images' pixel RMSE
    to their nearest shot: only that share of real images of the domain lie so close to a
    shot, so a sample that close is more likely a copy of it than a new image.
    """
    from pipeline.evaluate.quality import nearest_rmse

    threshold = float(np.percentile(nearest_rmse(held_out, shots), percentile))
    return float((nearest_rmse(samples, shots) < threshold).mean()), threshold


def transfer_metrics(samples: np.ndarray, shots: np.ndarray, held_out: np.ndarray,
                     features: Callable[[np.ndarray], np.ndarray],
                     config: TransferConfig) -> dict[str, float]:
    """Fidelity, diversity and copying of the samples, all against held-out target images."""
    from pipeline.evaluate.quality import kid, mean_pairwise_distance, nearest_rmse

    f_samples, f_real = features(samples), features(held_out)
    k, k_std = kid(f_samples, f_real, config.kid_subsets, config.kid_subset_size, config.seed)
    div_s = mean_pairwise_distance(f_samples, seed=config.seed)
    div_r = mean_pairwise_distance(f_real, seed=config.seed)
    share, threshold = near_copy_share(samples, shots, held_out)
    return {"n_samples": len(samples), "n_held_out": len(held_out), "n_shots": len(shots),
            "kid": k, "kid_std": k_std, "diversity_samples": div_s, "diversity_real": div_r,
            "diversity_over_real": div_s / div_r if div_r else float("nan"),
            "near_copy_share": share, "near_copy_threshold": threshold,
            "nn_shot_rmse_samples": float(nearest_rmse(samples, shots).mean()),
            "nn_shot_rmse_real": float(nearest_rmse(held_out, shots).mean())}


# --------------------------------------------------------------------------- keys and records


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def config_hash(config: TransferConfig) -> str:
    return _digest(config.model_dump(mode="json", exclude=set(RUNTIME_FIELDS)))


def run_dir_for(config: TransferConfig) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", target_name(config)).strip("-").lower() or "target"
    return resolve_path(config.runs_dir) / f"{config.mode}-{slug}-{config_hash(config)[:8]}"


def step_parts(config: TransferConfig) -> dict[str, dict[str, Any]]:
    """The config parts each step reads: a change reruns that step and the ones after it."""
    from pipeline.preflight import base_model_fingerprint

    c = config.model_dump(mode="json")

    def pick(*names: str) -> dict[str, Any]:
        return {n: c[n] for n in names}

    anl = config.mode == "anl"
    tune = pick("mode", "base_model", "steps", "batch_size", "lr", "hflip", "seed")
    # The base's content, not its path, decides the result: a retrained base reruns tuning.
    tune["base_sha256"] = base_model_fingerprint(base_dir(config))
    sample = pick("samples", "num_inference_steps", "seed")
    if anl:
        tune |= pick("encoder", "context_dim", "head_dim", "cond_dropout", "train_mask_ratio")
        sample |= pick("guidance") | {"mask_ratio": sample_mask_ratio(config)}
    return {"target": pick("target", "target_class", "target_root", "shots", "max_held_out",
                           "seed"),
            "tune": tune, "sample": sample,
            "evaluate": pick("encoder", "kid_subsets", "kid_subset_size", "seed"),
            "report": {}}


def step_keys(config: TransferConfig) -> dict[str, str]:
    """Each step's key: its parts plus every earlier step's key (each step reads the last)."""
    keys: dict[str, str] = {}
    for name, parts in step_parts(config).items():
        keys[name] = _digest({"step": name, "parts": parts, "upstream": dict(keys)})[:16]
    return keys


def _record(run_dir: Path, step: str) -> dict | None:
    return read_json(Path(run_dir) / "stages" / f"{step}.json")


def _run_step(run_dir: Path, config: TransferConfig, step: str,
              body: Callable[[str], tuple[dict[str, str], dict[str, Any]]]) -> dict:
    """The run store's frame (``pipeline.runs.run_stage``): skip a step recorded under its
    key, link in a sibling run's finished step with the same key, or run ``body(device)``
    and write ``stages/<step>.json`` last."""
    from pipeline.runs import run_stage

    def recorded(device: str):
        outputs, metrics = body(device)
        # The parts the key hashes, in the record: a reader sees why a step ran again.
        return outputs, {**metrics, "parts": step_parts(config)[step]}

    return run_stage(Path(run_dir), config, step, step_keys(config)[step], recorded)


def _require(run_dir: Path, config: TransferConfig, step: str) -> dict:
    from pipeline.runs import finished_record

    rec = finished_record(Path(run_dir), step, step_keys(config)[step])
    if rec is None:
        raise TransferError(f"{run_dir}: step {step!r} has not finished for this config; run "
                            "the steps in order (run_transfer does)")
    return rec


# --------------------------------------------------------------------------- steps


def check(config: TransferConfig) -> dict[str, Any]:
    """Every input, before any work: base model, target (enough images), encoder, device."""
    from pipeline.preflight import PreflightError, check_encoder

    if config.device == "cuda" and not torch.cuda.is_available():
        raise TransferError("device='cuda' but no CUDA GPU is visible; use device=auto or cpu")
    unet_dir = base_dir(config)
    try:
        check_encoder(config.encoder)
    except PreflightError as e:
        raise TransferError(str(e)) from None
    pool = target_pool(config, base_channels(config))
    shots, held = draw_shots(len(pool), config.shots, config.max_held_out, config.seed)
    return {"base_model": str(unet_dir), "target": target_name(config), "images": len(pool),
            "shots": len(shots), "held_out": len(held), "image_shape": list(pool.shape[1:]),
            "device": config.resolved_device(), "run_dir": str(run_dir_for(config))}


def init_run(config: TransferConfig) -> Path:
    """The run directory, with the config it was made for (``config.json``)."""
    run_dir = run_dir_for(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", config.model_dump(mode="json"))
    return run_dir


def load_target(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(Path(run_dir) / "target" / "target.npz") as f:
        return {k: f[k] for k in f.files}


def run_target(run_dir: Path, config: TransferConfig) -> dict:
    """Draw the shots and hold out the rest: ``target/target.npz``."""

    def body(device: str):
        run = Path(run_dir)
        pool = target_pool(config, base_channels(config))
        shot_idx, held_idx = draw_shots(len(pool), config.shots, config.max_held_out,
                                        config.seed)
        arrays = {"shots": pool[shot_idx], "held_out": pool[held_idx],
                  "shot_index": shot_idx, "held_out_index": held_idx}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                np.savez(f, **arrays)

        atomic_write(run / "target" / "target.npz", write)
        digest = hashlib.sha256(np.ascontiguousarray(pool).tobytes()).hexdigest()
        return {"target": "target/target.npz"}, {
            "name": target_name(config), "pool": len(pool), "shots": len(shot_idx),
            "held_out": len(held_idx), "image_shape": list(pool.shape[1:]),
            "pool_sha256": digest}

    return _run_step(run_dir, config, "target", body)


def _save_model(model: nn.Module, tokens: torch.Tensor | None, out: Path, info: dict) -> None:
    """Write the trained model into a temp dir and swap it in: never a half-saved model."""
    from safetensors.torch import save_file

    from anl_core.inject import save_adapter

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if tokens is None:
        model.net.save_pretrained(tmp)
    else:
        save_adapter(model, tmp)
        save_file({"tokens": tokens.contiguous()}, str(tmp / "condition_tokens.safetensors"))
    atomic_write_json(tmp / "tune.json", info)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def run_tune(run_dir: Path, config: TransferConfig) -> dict:
    """Train what the mode trains on the shots: ``model/``."""

    def body(device: str):
        run = Path(run_dir)
        shots = load_target(run)["shots"]
        unet, scheduler = load_base(config.base_model, device)
        encoder = _encoder(config.encoder, device) if config.mode == "anl" else None
        tokens = shot_tokens(encoder, shots) if encoder is not None else None
        model = build_model(config, unet, encoder)
        result = fit(config, model, scheduler, shots, tokens)
        metrics = {"mode": config.mode, "steps": result.steps,
                   "trained_params": trainable_count(model) if result.steps else 0,
                   "base_params": sum(p.numel() for p in unet.parameters()),
                   "steps_per_s": round(result.steps_per_second, 3) if result.steps else None,
                   "train_s": round(result.seconds, 3),
                   "final_loss": float(np.mean(result.loss_history[-20:]))
                   if result.loss_history else None}
        _save_model(model, tokens, run / "model", {**metrics, "loss": result.loss_history})
        return {"model": "model"}, metrics

    return _run_step(run_dir, config, "tune", body)


def load_trained(run_dir: Path, config: TransferConfig, device: str):
    """(model, scheduler, condition tokens or None) saved by the tune step."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    from anl_core.inject import load_adapter

    unet, scheduler = load_base(config.base_model, device)
    model_dir = Path(run_dir) / "model"
    if config.mode != "anl":
        net = UNet2DModel.from_pretrained(model_dir, torch_dtype=torch.float32,
                                          low_cpu_mem_usage=False).to(device).eval()
        return WholeUNet(net), scheduler, None
    tokens = load_file(str(model_dir / "condition_tokens.safetensors"))["tokens"]
    return load_adapter(unet, model_dir), scheduler, tokens


def run_sample(run_dir: Path, config: TransferConfig) -> dict:
    """Draw the samples and write them as Parquet shards: ``shards/``."""
    from pipeline.data.shards import ShardWriter

    def body(device: str):
        run = Path(run_dir)
        _require(run, config, "tune")
        target = load_target(run)
        model, scheduler, tokens = load_trained(run, config, device)
        started = time.perf_counter()
        images, conds = generate(config, model, scheduler, target["shots"].shape[1:3], tokens,
                                 target["shot_index"])
        seconds = time.perf_counter() - started
        anl = config.mode == "anl"
        with ShardWriter(run / "shards", [target_name(config)], overwrite=True) as writer:
            # Through the null token a sample owes nothing to a shot: no condition recorded.
            writer.write(images, np.zeros(len(images), np.int64),
                         condition_id=None if config.unconditional else conds,
                         adapter_id=f"{config.mode}:{step_keys(config)['tune']}",
                         seed=config.seed, mask_ratio=sample_mask_ratio(config) if anl else None,
                         guidance=config.guidance if anl else None,
                         steps=config.num_inference_steps)
        return {"shards": "shards"}, {"rows": len(images), "sample_s": round(seconds, 3),
                                      "images_per_s": round(len(images) / seconds, 3)}

    return _run_step(run_dir, config, "sample", body)


def run_evaluate(run_dir: Path, config: TransferConfig) -> dict:
    """Measure the shards against the held-out images: ``eval/metrics.json``."""
    from pipeline.data.shards import read_shards
    from pipeline.evaluate.quality import encoder_features

    def body(device: str):
        run = Path(run_dir)
        tune, sample = (_require(run, config, s) for s in ("tune", "sample"))
        target = load_target(run)
        samples = read_shards(run / "shards").images
        features = encoder_features(_encoder(config.encoder, device))
        metrics = transfer_metrics(samples, target["shots"], target["held_out"], features, config)
        records = {s: _record(run, s) for s in ("target", "tune", "sample")}
        metrics |= {"feature_space": config.encoder, "mode": config.mode,
                    "trained_params": tune["metrics"]["trained_params"],
                    "steps": tune["metrics"]["steps"],
                    "steps_per_s": tune["metrics"]["steps_per_s"],
                    "images_per_s": sample["metrics"]["images_per_s"],
                    "wall_s": {s: r["wall_s"] for s, r in records.items()}}
        metrics = _finite(metrics)
        atomic_write_json(run / "eval" / "metrics.json", metrics)
        return {"metrics": "eval/metrics.json"}, {k: metrics[k] for k in (
            "kid", "kid_std", "diversity_over_real", "near_copy_share")}

    return _run_step(run_dir, config, "evaluate", body)


def _finite(obj: Any) -> Any:
    """NaN -> None: strict JSON, and 'not measured' reads as such in the report."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


# --------------------------------------------------------------------------- report


def metric_rows(m: dict[str, Any]) -> list[dict[str, str]]:
    """The report's metrics table: what, value, how to read it."""

    def f(x, spec=".3f", scale=1.0):
        return "—" if x is None else format(scale * x, spec)

    return [
        {"metric": "KID × 100 to held-out target", "value":
            f"{f(m['kid'], '.2f', 100)} ± {f(m['kid_std'], '.2f', 100)}",
         "note": f"{m['n_samples']} samples vs {m['n_held_out']} held-out images, "
                 f"{m['feature_space']} features; ± std over subsets; lower is closer"},
        {"metric": "diversity over real", "value": f(m["diversity_over_real"]),
         "note": f"mean pairwise feature distance, samples {f(m['diversity_samples'])} / "
                 f"held-out real {f(m['diversity_real'])}; 1 = as varied as real images"},
        {"metric": "near-copy share", "value": f(m["near_copy_share"], ".1%"),
         "note": f"samples nearer a shot (pixel RMSE) than {f(m['near_copy_threshold'])}, the "
                 f"{NEAR_COPY_PERCENTILE:g}th percentile of held-out real images' distance"},
        {"metric": "trained parameters", "value": f"{m['trained_params']:,}",
         "note": "updated by the optimiser (anl: the adapter; full: every U-Net weight)"},
        {"metric": "training steps/s", "value": f(m["steps_per_s"], ".2f"),
         "note": f"{m['steps']} steps"},
        {"metric": "sampling images/s", "value": f(m["images_per_s"], ".2f"), "note": ""},
        {"metric": "wall time", "value": f"{sum(m['wall_s'].values()):.1f} s",
         "note": ", ".join(f"{k} {v:.1f} s" for k, v in m["wall_s"].items())},
    ]


def transfer_grid(shots: np.ndarray, samples: np.ndarray, title: str, cols: int = 10) -> bytes:
    """PNG: the shots in the first row, samples below (one per shot first, for anl)."""
    from pipeline.evaluate.quality import class_grid_png

    rows = {i: samples[i * cols:(i + 1) * cols] for i in range(3) if len(samples) > i * cols}
    return class_grid_png(shots, rows, title, cols=cols, real_label="shots",
                          row_label="samples")


def report_markdown(ctx: dict[str, Any]) -> str:
    from pipeline.report.render import md_table

    return (f"# {ctx['title']}\n\nRun `{ctx['run']}`, mode **{ctx['mode']}**, "
            f"{ctx['shots']} shots.\n\n![shots and samples](grid.png)\n\n## Metrics\n\n"
            + md_table(ctx["metrics"], ["metric", "value", "note"])
            + "\n## Steps\n\n" + md_table(ctx["steps"], ["step", "key", "wall_s", "status"])
            + "\n## Configuration\n\n" + md_table(ctx["config"], ["parameter", "value"]))


def _report_context(run: Path, config: TransferConfig) -> dict[str, Any]:
    steps = []
    for s in STEPS[:-1]:
        rec = _record(run, s) or {}
        status = f"reused from {rec['adopted_from']}" if rec.get("adopted_from") else "ran"
        steps.append({"step": s, "key": rec.get("key"), "wall_s": rec.get("wall_s"),
                      "status": status})
    base = Path(config.base_model).name
    return {"title": f"Generative transfer: {base} → {target_name(config)}", "run": run.name,
            "mode": config.mode, "shots": config.shots, "steps": steps,
            "metrics": metric_rows(read_json(run / "eval" / "metrics.json")),
            "config": [{"parameter": k, "value": json.dumps(v)}
                       for k, v in config.model_dump(mode="json").items()]}


def run_report(run_dir: Path, config: TransferConfig) -> dict:
    """``report.html`` (self-contained: the grid is inline), ``report.md`` and ``grid.png``."""
    from pipeline.atomic import atomic_write_bytes
    from pipeline.data.shards import read_shards
    from pipeline.report.plots import data_uri
    from pipeline.report.render import render

    def body(device: str):
        run = Path(run_dir)
        _require(run, config, "evaluate")
        ctx = _report_context(run, config)
        shots, samples = load_target(run)["shots"], read_shards(run / "shards").images
        png = transfer_grid(shots, samples, ctx["title"],
                            cols=min(10, max(len(shots), len(samples))))
        atomic_write_bytes(run / "grid.png", png)
        atomic_write_text(run / "report.md", report_markdown(ctx))
        atomic_write_text(run / "report.html", render("transfer.html.j2", grid=data_uri(png),
                                                      **ctx))
        return {"html": "report.html", "md": "report.md", "grid": "grid.png"}, {}

    return _run_step(run_dir, config, "report", body)


STEP_FUNCTIONS: dict[str, Callable[[Path, TransferConfig], dict]] = {
    "target": run_target, "tune": run_tune, "sample": run_sample, "evaluate": run_evaluate,
    "report": run_report,
}


def run_transfer(config: TransferConfig) -> Path:
    """Check, then run (or resume) every step; returns the run directory."""
    check(config)
    run_dir = init_run(config)
    for step in STEPS:
        STEP_FUNCTIONS[step](run_dir, config)
    return run_dir
