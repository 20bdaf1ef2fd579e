"""Masked sampling: k images per condition, each with a fresh random token mask.

For sample j of condition i a random fraction ``mask_ratio`` of the condition's tokens is
replaced by the null token, then classifier-free guidance with scale w mixes the conditional
and the null prediction: ``eps = eps_null + w * (eps_cond - eps_null)``; both passes run as one
doubled batch. ``w == 1`` needs only the conditional pass and ``w == 0`` or ``mask_ratio == 1``
only the null pass (unconditional sampling).

Reproducibility: the initial noise (and any per-step noise, eta > 0) of sample j of condition
i comes from its own CPU generator seeded from ``(seed, condition_id, j)``, and its mask from a
second one, so an image does not depend on the batch size or on the other conditions in its
batch.

Speed (``compile=True``): the adapted U-Net's step is ``torch.compile``d once per model and
reused for every later call (per class, per chunk). Every batch has the same shape, the last
one padded with zero rows that are dropped after (images never interact across the batch:
GroupNorm and attention are per image), so nothing recompiles; on CUDA the step also runs
in bf16, channels_last, and under CUDA graphs (``mode="reduce-overhead"``), which DDIM's fixed
shapes allow. The noise is drawn exactly as diffusers' pipelines draw it from a list of generators
(one ``randn((1, C, H, W))`` per image), which is what lets a zero-initialised adapter
reproduce ``DDIMPipeline`` image for image.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler

from anl_core.inject import ANLUNet
from anl_core.precision import autocast_for
from anl_core.progress import progress_bar

NOISE_STREAM, MASK_STREAM = 0, 1


def image_seed(seed: int, condition_id: int, index: int, stream: int = NOISE_STREAM) -> int:
    """Seed for one image's generator: a hash of (seed, condition, index, stream), in [0, 2^63)."""
    state = np.random.SeedSequence([seed, condition_id, index, stream]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def image_generators(seed: int, condition_id: int, indices, stream: int = NOISE_STREAM
                     ) -> list[torch.Generator]:
    """CPU generators for images ``indices`` of one condition (pass to a diffusers pipeline)."""
    return [torch.Generator().manual_seed(image_seed(seed, condition_id, j, stream))
            for j in indices]


def sampling_scheduler(scheduler, ddim: bool = True):
    """A private copy of the scheduler to sample with; a DDIM one built from its config by default."""
    if ddim and not isinstance(scheduler, DDIMScheduler):
        return DDIMScheduler.from_config(scheduler.config)
    return copy.deepcopy(scheduler)


def compiled_forward(model: ANLUNet, cuda_graphs: bool, backend: str | Callable = "inductor"):
    """``model``'s compiled forward, built on first use and cached on the model, so a model
    sampled per class and per chunk compiles once (``dynamic=False``: one fixed shape)."""
    cache = model.__dict__.setdefault("_compiled_forwards", {})  # not a registered submodule
    key = (backend, cuda_graphs)
    if key not in cache:
        cache[key] = torch.compile(model, dynamic=False, backend=backend,
                                   mode="reduce-overhead" if cuda_graphs else None)
    return cache[key]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def _random_mask(num_tokens: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    mask = torch.zeros(num_tokens, dtype=torch.bool)
    count = round(ratio * num_tokens)
    if count:
        mask[torch.randperm(num_tokens, generator=gen)[:count]] = True
    return mask


@torch.no_grad()
def masked_sample(model: ANLUNet, scheduler, tokens: torch.Tensor, num_per_condition: int,
                  mask_ratio: float = 0.5, guidance: float = 1.0, num_inference_steps: int = 50,
                  seed: int = 0, batch_size: int = 256, condition_ids=None,
                  progress: bool = True, eta: float = 0.0, ddim: bool = True,
                  compile: bool | str | Callable = False) -> torch.Tensor:
    """Sample ``num_per_condition`` images for each of the C conditions in ``tokens`` (C, N, D).

    Returns float32 (C * k, ch, H, W) in [-1, 1] on the CPU, condition-major (row i * k + j is
    sample j of condition i). ``condition_ids`` (default 0..C-1) name the conditions for
    seeding, so a condition keeps its images when sampled alongside others. ``batch_size``
    counts images; with guidance the U-Net sees twice that. ``scheduler`` is the base model's
    scheduler: sampling uses a DDIM scheduler from its config unless ``ddim=False``, in which
    case any diffusers scheduler is used as given. ``compile`` runs the compiled step (module
    doc; ``True`` compiles with inductor, a backend name or callable is passed to
    ``torch.compile``, e.g. ``"aot_eager"`` to debug); images equal eager ones up to float rounding.
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (conditions, tokens, dim), got {tuple(tokens.shape)}")
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    num_cond, num_tokens = tokens.shape[:2]
    ids = list(range(num_cond)) if condition_ids is None else [int(c) for c in condition_ids]
    if len(ids) != num_cond or min(ids, default=0) < 0:
        raise ValueError(f"condition_ids must be {num_cond} non-negative ints, got {ids[:8]}...")

    device = model.device
    unet_cfg = model.unet.config
    size = unet_cfg.sample_size
    shape = (unet_cfg.in_channels, *((size, size) if isinstance(size, int) else size))
    uncond_only = mask_ratio >= 1.0 or guidance == 0.0
    cond_only = guidance == 1.0 and not uncond_only
    sched = sampling_scheduler(scheduler, ddim)
    step_params = inspect.signature(sched.step).parameters
    cuda = device.type == "cuda"
    net = model
    if cuda:
        model.unet.to(memory_format=torch.channels_last)
    if compile:
        backend = "inductor" if compile is True else compile
        # CUDA graphs only with inductor (other backends do not build them).
        net = compiled_forward(model, cuda_graphs=cuda and backend == "inductor", backend=backend)
    model.eval()
    fixed = batch_size  # the one batch shape when compiled (every call: no recompiles)

    items = [(pos, cid, j) for pos, cid in enumerate(ids) for j in range(num_per_condition)]
    batches = [items[s:s + batch_size] for s in range(0, len(items), batch_size)]
    bar = progress_bar(total=len(batches) * num_inference_steps, desc="masked sampling",
                       enabled=progress, leave=False, unit="step", logger=__name__)
    out = []
    for batch in batches:
        b = len(batch)
        gens = [torch.Generator().manual_seed(image_seed(seed, cid, j)) for _, cid, j in batch]
        x = torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).to(device)
        sched.set_timesteps(num_inference_steps, device=device)  # init_noise_sigma depends on it
        x = x * sched.init_noise_sigma
        null_ctx = model.context(None, batch_size=b)
        if uncond_only:
            ctx = null_ctx
        else:
            masks = torch.stack([
                _random_mask(num_tokens, mask_ratio,
                             torch.Generator().manual_seed(image_seed(seed, cid, j, MASK_STREAM)))
                for _, cid, j in batch])
            rows = torch.tensor([pos for pos, _, _ in batch])
            cond_ctx = model.context(tokens[rows].to(device), masks.to(device))
            ctx = cond_ctx if cond_only else torch.cat([cond_ctx, null_ctx])
        kwargs = {}
        if "generator" in step_params:
            kwargs["generator"] = gens
        if "eta" in step_params:
            kwargs["eta"] = eta
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t)
            if not (cond_only or uncond_only):
                inp = torch.cat([inp, inp])
            if cuda:
                inp = inp.contiguous(memory_format=torch.channels_last)
            with autocast_for(device):
                if compile:
                    rows_in = inp.shape[0]
                    pad = fixed * rows_in // b
                    # clone: a CUDA graph's output buffer is overwritten by the next replay.
                    eps = net(_pad_rows(inp, pad), t, context=_pad_rows(ctx, pad))[:rows_in]
                    eps = eps.float().clone()
                else:
                    eps = net(inp, t, context=ctx).float()
            if not (cond_only or uncond_only):
                eps_cond, eps_null = eps.chunk(2)
                eps = eps_null + guidance * (eps_cond - eps_null)
            x = sched.step(eps, t, x, **kwargs).prev_sample
            bar.update(1)
        out.append(x.clamp(-1, 1).float().cpu())
    bar.close()
    if not out:
        return torch.empty(0, *shape)
    return torch.cat(out)
