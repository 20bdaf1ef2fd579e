"""Pretrain an unconditional DDPM base model on a dataset's unlabeled pool.

The output is a plain diffusers ``DDPMPipeline`` directory (``unet/``, ``scheduler/``,
``model_index.json``), so ``UNet2DModel.from_pretrained(out / "unet")`` and
``DDPMPipeline.from_pretrained(out)`` load it unchanged. The saved weights are the EMA
weights. Training checkpoints live in ``out/checkpoints/`` and a rerun resumes from the
last one; a finished directory (``training.json`` present) is not retrained.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from anl_core.precision import autocast_for, uses_bf16
from anl_core.progress import progress_bar
from pipeline.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_json
from pipeline.data.grids import tile_png
from pipeline.data.images import to_model_space
from pipeline.devices import resolve_device
from pipeline.digest import file_sha256
from pipeline.generate.pretrain_config import PretrainConfig
from pipeline.models import sample_base
from pipeline.provenance import device_label


def build_unet(config: PretrainConfig, channels: int):
    from diffusers import UNet2DModel

    levels = range(len(config.block_out_channels))
    down = tuple("AttnDownBlock2D" if i in config.attention_levels else "DownBlock2D" for i in levels)
    up = tuple("AttnUpBlock2D" if i in config.attention_levels else "UpBlock2D" for i in reversed(levels))
    return UNet2DModel(
        sample_size=config.sample_size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
        down_block_types=down, up_block_types=up, attention_head_dim=config.attention_head_dim,
        norm_num_groups=min(32, min(config.block_out_channels)),
    )


def build_scheduler(config: PretrainConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps,
                         beta_schedule=config.beta_schedule)


def data_hash(images: np.ndarray) -> str:
    """sha256 of the training pool's pixels and shape: the model card's data fingerprint."""
    h = hashlib.sha256(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def pretrain(images: np.ndarray, out_dir: str | Path, config: PretrainConfig | None = None,
             progress: bool = True, fp16: bool = True, command: str | None = None,
             source: dict | None = None) -> Path:
    """Train a DDPM on ``images`` (uint8 N,H,W,C: the unlabeled pool only) into ``out_dir``.

    ``source`` names where the images came from (dataset, root, split); it is recorded as
    ``pool`` in ``training.json``, so the model card can rebuild the pool and check its hash."""
    from diffusers import DDIMScheduler, DDPMPipeline
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    config = config or PretrainConfig()
    out_dir = Path(out_dir)
    if (out_dir / "training.json").exists():
        _check_finished(out_dir, config, images)
        return out_dir
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"pretrain needs uint8 (N, H, W, C) images, got {images.dtype} {images.shape}")
    if len(images) < config.batch_size:
        raise ValueError(f"pretrain pool has {len(images)} images, fewer than batch_size={config.batch_size}")
    device = resolve_device(config.device)
    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    channels = images.shape[-1]
    unet = build_unet(config, channels).to(device)
    scheduler = build_scheduler(config)
    ema = EMAModel(unet.parameters(), decay=config.ema_max_decay, use_ema_warmup=True,
                   inv_gamma=1.0, power=3 / 4)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    lr_sched = get_cosine_schedule_with_warmup(opt, config.warmup_steps, config.steps)
    # The pool lives on the device in model space: one copy, indexed per batch.
    pool = to_model_space(images, config.sample_size, device=device)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    step, losses, wall = 0, [], 0.0

    ckpt_path = ckpt_dir / "last.pt"
    if ckpt_path.exists():
        # Tensors and plain numbers only (the EMA, optimiser and schedule states are dicts of
        # them): a checkpoint file can never run code when it is read.
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        lr_sched.load_state_dict(state["lr_sched"])
        gen.set_state(state["gen"].cpu())  # a CPU generator, whatever map_location moved
        step, losses, wall = state["step"], state["losses"], state["wall_s"]

    unet.train()
    bar = progress_bar(total=config.steps, initial=step, desc="pretrain", enabled=progress,
                       unit="step", logger=__name__)
    t0 = time.perf_counter()

    pending: list[torch.Tensor] = []  # losses not yet read back: one sync per 50 steps, not per step

    def flush_losses() -> None:
        if pending:
            losses.extend(torch.stack(pending).float().cpu().tolist())
            pending.clear()

    def save_checkpoint() -> None:
        flush_losses()
        atomic_torch_save({
            "unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "lr_sched": lr_sched.state_dict(), "gen": gen.get_state(), "step": step,
            "losses": losses, "wall_s": wall + time.perf_counter() - t0,
        }, ckpt_path)

    stopped_early = False
    while step < config.steps:
        if config.time_limit_s is not None and wall + time.perf_counter() - t0 >= config.time_limit_s:
            stopped_early = True
            save_checkpoint()
            break
        idx = torch.randint(len(pool), (config.batch_size,), generator=gen)
        x0 = pool[idx.to(device)]
        if config.hflip:
            flip = (torch.rand(config.batch_size, generator=gen) < 0.5).to(device)
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch_size,), generator=gen)
        t = t.to(device)
        xt = scheduler.add_noise(x0, noise, t)
        with autocast_for(device, cpu=True):  # bf16 on CUDA and on CPUs with native bf16
            pred = unet(xt, t).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        step += 1
        pending.append(loss.detach())
        bar.update(1)
        if step % 50 == 0:
            flush_losses()
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_checkpoint()
    bar.close()
    flush_losses()
    wall += time.perf_counter() - t0

    ema.copy_to(unet.parameters())
    unet.eval()
    # A sheet of seeded DDIM samples beside the weights: a glance tells a broken model apart.
    grid = sample_base(unet, scheduler, 64, config.sample_steps, config.seed + 1, progress=False)

    # Write the pipeline into a temp dir, then move its parts in; training.json marks done.
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".export-"))
    try:
        export = unet.to(torch.float16) if fp16 else unet
        DDPMPipeline(unet=export, scheduler=scheduler).save_pretrained(tmp)
        for name in ("unet", "scheduler", "model_index.json"):
            dest = out_dir / name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(tmp / name, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_bytes(out_dir / "samples.png", tile_png(grid))
    record = {
        "config": config.to_dict(), "steps": step, "wall_s": round(wall, 1),
        "stopped_by_time_limit": stopped_early,
        "steps_per_s": round(step / max(wall, 1e-9), 3), "device": device_label(device),
        "precision": "bf16" if uses_bf16(device, True, cpu=True) else "fp32",
        "num_images": len(images), "data_sha256": data_hash(images),
        "params": sum(p.numel() for p in unet.parameters()),
        "final_loss": float(np.mean(losses[-200:])) if losses else None,
        "loss_every_50": [float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)],
        "weights_sha256": file_sha256(out_dir / "unet" / "diffusion_pytorch_model.safetensors"),
        "command": command, "pool": source, "sample_scheduler": DDIMScheduler.__name__,
    }
    atomic_write_json(out_dir / "training.json", record)
    return out_dir


def pretrain_on_dataset(dataset_name: str, out_dir: str | Path, pool: dict,
                        config: PretrainConfig, root: str | None = None, progress: bool = True,
                        command: str | None = None) -> Path:
    """Pretrain on the training images ``pool`` names (never test images, never labels): the
    base half of a disjoint halving (``{"half": "base", "half_seed": s}``), or the unlabeled
    pool of a labeled split (``{"labels_per_class": n, "split_seed": s}``)."""
    from pipeline.data.datasets import load_dataset
    from pipeline.data.splits import pretraining_indices

    ds = load_dataset(dataset_name, root)
    idx = pretraining_indices(ds.train_labels, pool, ds.num_classes)
    source = {"dataset": dataset_name, "root": root, **pool}
    return pretrain(ds.train_images[idx], out_dir, config, progress=progress,
                    command=command, source=source)


class PretrainError(ValueError):
    """The output folder holds a model trained with another config or pool."""


def _check_finished(out_dir: Path, config: PretrainConfig, images: np.ndarray) -> None:
    """A finished model is reused only for the same config and pool; anything else is an
    error, not a silent return of a model trained another way."""
    done = json.loads((out_dir / "training.json").read_text())
    want = {k: v for k, v in config.to_dict().items() if k != "device"}
    have = {k: v for k, v in (done.get("config") or {}).items() if k != "device"}
    changed = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    if changed or done.get("data_sha256") != data_hash(images):
        what = ", ".join(f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in changed) or \
            "the training images differ"
        raise PretrainError(f"{out_dir} holds a model trained differently ({what}); pass another "
                         "--out, or delete that folder to retrain")
