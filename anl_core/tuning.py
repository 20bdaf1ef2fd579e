"""Tune an ANL adapter on a few condition images with the base model's noise-prediction loss.

Each image is paired with a token set: its own (the condition is the image itself) or, for
extra targets such as unlabeled neighbours, the tokens of the condition they stand for. Condition
dropout replaces all tokens by the null token so the same adapter also learns the null branch
used by classifier-free guidance; optional random token masking matches the masks seen at
sampling time. Only adapter parameters are optimised (AdamW) and an EMA of them is kept.
All randomness comes from one CPU generator, so a seed gives the same run on CPU.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F

from anl_core.config import TuneConfig
from anl_core.inject import ANLUNet
from anl_core.precision import autocast_for
from anl_core.progress import progress_bar


@dataclasses.dataclass
class TuneResult:
    loss_history: list[float]
    steps: int
    seconds: float
    steps_per_second: float
    peak_memory_bytes: int | None  # CUDA only
    ema_state: dict[str, torch.Tensor] | None


class AdapterEMA:
    """Exponential moving average of the adapter parameters (the base is frozen, never copied)."""

    def __init__(self, model: ANLUNet, decay: float):
        self.decay = decay
        self.params = dict(_adapter_named_params(model))
        self.shadow = {k: p.detach().clone().float() for k, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for k, p in self.params.items():
            p.copy_(self.shadow[k].to(p.dtype))


def _adapter_named_params(model: ANLUNet):
    """What ``adapter_parameters()`` trains, by its name in ``model``: picked by identity, as
    a model that is not an ``ANLUNet`` (a whole U-Net tuned in its place) names them otherwise."""
    trained = {id(p) for p in model.adapter_parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in trained]


def training_target(scheduler, sample: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net predicts under the scheduler's ``prediction_type``."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(sample, noise, timesteps)
    if kind == "sample":
        return sample
    raise ValueError(f"unsupported scheduler prediction_type {kind!r}")


def _random_masks(batch: int, num_tokens: int, max_ratio: float, dropout: float,
                  gen: torch.Generator) -> torch.Tensor | None:
    """Per-sample token masks (True = null token): dropout rows fully, others a random fraction."""
    if max_ratio <= 0 and dropout <= 0:
        return None
    drop = torch.rand(batch, generator=gen) < dropout
    ratio = torch.rand(batch, generator=gen) * max_ratio
    mask = torch.rand(batch, num_tokens, generator=gen) < ratio[:, None]
    return mask | drop[:, None]




def tune_adapter(model: ANLUNet, scheduler, images: torch.Tensor, tokens: torch.Tensor,
                 config: TuneConfig | None = None, progress: bool = True,
                 weights: torch.Tensor | None = None) -> TuneResult:
    """Tune ``model``'s adapter on ``images`` (N, C, H, W) in [-1, 1] paired with ``tokens``.

    ``scheduler`` is the base model's training noise scheduler (e.g. its ``DDPMScheduler``).
    Pairs are drawn uniformly, or in proportion to ``weights`` (N,) when given. The model
    ends with the EMA weights loaded when ``config.use_ema``.
    """
    config = config or TuneConfig()
    if images.shape[0] != tokens.shape[0] or images.shape[0] == 0:
        raise ValueError(f"need one token set per image: got {images.shape[0]} images and "
                         f"{tokens.shape[0]} token sets")
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=torch.float64).cpu()
        if weights.shape != (images.shape[0],) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {images.shape[0]} non-negative numbers with a "
                             f"positive sum, one per image; got shape {tuple(weights.shape)}")
    device = model.device
    gen = torch.Generator().manual_seed(config.seed)
    images = images.to(device, torch.float32)
    tokens = tokens.to(device, torch.float32)
    num_train_t = scheduler.config.num_train_timesteps

    params = model.adapter_parameters()
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warm = max(1, config.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    ema = AdapterEMA(model, config.ema_decay)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    history: list[float] = []
    start = time.perf_counter()
    bar = progress_bar(range(config.steps), desc="tune adapter", enabled=progress, leave=False,
                       unit="step", logger=__name__)
    try:
        for step in bar:
            b = config.batch_size
            idx = (torch.randint(images.shape[0], (b,), generator=gen) if weights is None
                   else torch.multinomial(weights, b, replacement=True, generator=gen))
            x0, tok = images[idx.to(device)], tokens[idx.to(device)]
            if config.hflip:
                flip = (torch.rand(b, generator=gen) < 0.5).to(device)
                x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.randint(num_train_t, (b,), generator=gen).to(device)
            mask = _random_masks(b, tok.shape[1], config.train_mask_ratio,
                                 config.cond_dropout, gen)
            noisy = scheduler.add_noise(x0, noise, t)
            with autocast_for(device):
                pred = model(noisy, t, tokens=tok,
                             token_mask=None if mask is None else mask.to(device))
            loss = F.mse_loss(pred.float(), training_target(scheduler, x0, noise, t))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            sched.step()
            ema.update()
            if step % config.log_every == 0:
                history.append(loss.item())
                bar.set_postfix(loss=f"{history[-1]:.4f}", refresh=False)  # read already
    finally:
        model.eval()
    seconds = time.perf_counter() - start
    if config.use_ema and config.steps:
        ema.copy_to_model()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return TuneResult(loss_history=history, steps=config.steps, seconds=seconds,
                      steps_per_second=config.steps / seconds if seconds else 0.0,
                      peak_memory_bytes=peak, ema_state=ema.shadow)


@torch.no_grad()
def denoising_loss(model: ANLUNet, scheduler, images: torch.Tensor,
                   tokens: torch.Tensor | None, draws: int = 8, seed: int = 0,
                   batch_size: int = 256, adapter: bool = True) -> float:
    """Mean noise-prediction loss over ``draws`` fixed (noise, timestep) draws per image.

    The same seed gives the same draws, so two calls compare models on identical noise:
    ``adapter=False`` measures the frozen base model (the hooks stay out of the way).
    """
    gen = torch.Generator().manual_seed(seed)
    device = model.device
    n = images.shape[0]
    num_train_t = scheduler.config.num_train_timesteps
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for _ in range(draws):
            noise_all = torch.randn(images.shape, generator=gen)
            t_all = torch.randint(num_train_t, (n,), generator=gen)
            for s in range(0, n, batch_size):
                x0 = images[s:s + batch_size].to(device, torch.float32)
                noise = noise_all[s:s + batch_size].to(device)
                t = t_all[s:s + batch_size].to(device)
                noisy = scheduler.add_noise(x0, noise, t)
                with autocast_for(device):
                    if adapter:
                        tok = None if tokens is None else tokens[s:s + batch_size].to(device)
                        pred = model(noisy, t, tokens=tok)
                    else:
                        pred = model.unet(noisy, t, return_dict=False)[0]
                target = training_target(scheduler, x0, noise, t)
                total += F.mse_loss(pred.float(), target, reduction="sum").item()
                count += target.numel()
    finally:
        model.train(was_training)
    return total / count
