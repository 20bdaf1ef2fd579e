"""The base model: finding it (a local folder or a Hugging Face hub id, offline first),
identifying it, loading it and sampling it, in one place for the stages, the transfer feature,
the model card, pretraining and the benches.

Identity: ``base_model_fingerprint`` is the sha256 of the U-Net's config and weight files,
exact and cheap (files are hashed once per size and mtime); stage keys use it. anl_core has
its own ``base_fingerprint`` over a loaded module's tensors because it knows no files: a
saved adapter records it, and attaching checks it. The two answer different questions (which
files? which weights is this adapter for?) and are kept apart on purpose.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.digest import file_sha256
from pipeline.paths import resolve_path

if TYPE_CHECKING:
    import numpy as np

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class PreflightError(RuntimeError):
    """An input of the run is missing; the message names the parameter and how to provide it.
    (Raised here for the base model and by ``pipeline.preflight`` for every other input.)"""


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true")


def _unet_dir(root: Path) -> Path | None:
    """The folder holding a UNet2DModel: the root itself, or ``unet/`` of a pipeline."""
    for cand in (root / "unet", root):
        if (cand / "config.json").is_file() and any((cand / w).is_file() for w in WEIGHT_NAMES):
            return cand
    return None


def _hub_snapshot(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        if _offline():
            raise
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise FileNotFoundError(str(e)) from e


def _not_found_why(spec: str, err: Exception) -> str:
    """Where the model was looked for: the cache folder, and whether the hub was asked."""
    from huggingface_hub import constants

    hub = ("HF_HUB_OFFLINE=1, so the hub was not asked" if _offline()
           else "the Hugging Face hub could not be reached")
    return (f"({type(err).__name__}): {spec} is not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} and {hub}")


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def resolve_base_model(spec: str) -> Path:
    """Local folder of the base UNet2DModel named by ``base_model`` (a path or a hub id)."""
    path = resolve_path(spec)
    if path.exists():
        found = _unet_dir(path)
        if found is None:
            raise PreflightError(
                f"base_model={spec!r}: {path} holds no diffusers UNet2DModel (needs config.json and "
                f"{' or '.join(WEIGHT_NAMES)} at its root or in unet/); save one with "
                "UNet2DModel.save_pretrained or `augment pretrain --out DIR`")
        return found
    if not _looks_like_hub_id(spec):
        raise PreflightError(f"base_model={spec!r}: no such directory ({path}); give a local "
                             "diffusers model folder or a Hugging Face hub id such as "
                             "google/ddpm-cifar10-32")
    try:
        snap = _hub_snapshot(spec, ["*.json", "*.safetensors", "*.bin"])
    except Exception as e:  # noqa: BLE001 - every failure here means "not available"
        raise PreflightError(
            f"base_model={spec!r} cannot be found offline {_not_found_why(spec, e)}. Provide it "
            f"one of two ways: (1) cache it by id: run `hf download {spec}` where the hub is "
            "reachable, with HF_HOME set to a folder this machine reads (or copy that folder "
            "here and set HF_HOME to it); or (2) give a local copy: a folder saved with "
            "DDPMPipeline/UNet2DModel.save_pretrained, passed as --set base_model=/path/to/it. "
            "(For a run without downloads, a base the project ships: "
            "base_model=data/models/fashion-mnist-ddpm-32.)") from None
    found = _unet_dir(snap)
    if found is None:
        raise PreflightError(f"base_model={spec!r}: the hub snapshot {snap} holds no "
                             "UNet2DModel weights")
    return found


def resolve_scheduler_config(unet_dir: Path) -> Path | None:
    """The scheduler config saved next to the U-Net (pipeline layout or flat hub layout)."""
    for cand in (unet_dir.parent / "scheduler" / "scheduler_config.json",
                 unet_dir / "scheduler_config.json",
                 unet_dir / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return cand
    return None


@functools.lru_cache(maxsize=8)
def _fingerprint_cached(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def base_model_fingerprint(unet_dir: Path) -> str:
    """sha256 of the base U-Net's config and weights: identifies the base in stage keys."""
    h = hashlib.sha256((unet_dir / "config.json").read_bytes())
    for name in WEIGHT_NAMES:
        p = unet_dir / name
        if p.is_file():
            st = p.stat()
            h.update(_fingerprint_cached(str(p), st.st_size, st.st_mtime_ns).encode())
    return h.hexdigest()


def load_base_unet(unet_dir: Path, device="cpu"):
    """(UNet2DModel in float32, eval; its DDPM training scheduler) from a U-Net folder found
    by ``resolve_base_model``. Weights may be stored in fp16: computation here is float32 on
    the CPU, or bf16 autocast on CUDA, never the stored dtype. A folder without a scheduler
    config gets diffusers' DDPM default (1000 steps, linear betas)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(unet_dir, torch_dtype=torch.float32,
                                       low_cpu_mem_usage=False).to(device).eval()
    sched = resolve_scheduler_config(Path(unet_dir))
    scheduler = (DDPMScheduler.from_pretrained(sched.parent) if sched
                 else DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear"))
    return unet, scheduler


def sample_base(unet, scheduler, n: int, steps: int = 50, seed: int = 0, batch_size: int = 125,
                shape: tuple[int, int] | None = None, progress: bool = True) -> np.ndarray:
    """``n`` seeded DDIM samples of an unconditional U-Net as uint8 (n, H, W, C).

    Sample i starts from noise drawn by its own generator, seeded by (seed, i), so a sample
    does not depend on the batch size or the device's batching. ``shape`` centre-crops back to
    the data's size (e.g. 28x28 out of the padded 32x32).
    """
    import numpy as np
    import torch
    from diffusers import DDIMScheduler

    from anl_core.precision import autocast_for
    from anl_core.progress import progress_bar
    from pipeline.data.images import from_model_space

    device = unet.device
    size, channels = unet.config.sample_size, unet.config.in_channels
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps, device=device)
    starts = range(0, n, batch_size)
    bar = progress_bar(total=len(starts) * steps, desc="base samples", enabled=progress,
                       leave=False, unit="step", logger=__name__)
    out = []
    with torch.no_grad():
        for start in starts:
            seeds = [int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
                     for i in range(start, min(n, start + batch_size))]
            x = torch.cat([torch.randn((1, channels, size, size),
                                       generator=torch.Generator().manual_seed(s)) for s in seeds])
            x = x.to(device)
            for t in ddim.timesteps:
                with autocast_for(device):
                    eps = unet(x, t).sample.float()
                x = ddim.step(eps, t, x).prev_sample
                bar.update(1)
            out.append(from_model_space(x, shape))
    bar.close()
    if not out:
        h, w = shape or (size, size)
        return np.zeros((0, h, w, channels), np.uint8)
    return np.concatenate(out)
