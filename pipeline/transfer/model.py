"""The three ways to adapt (anl adapter, full fine-tuning, scratch), their training loop and
sampling.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.transfer.config import SAMPLE_BATCH, TransferConfig, TransferError


def base_dir(config: TransferConfig) -> Path:
    """The folder of the base UNet2DModel (a pipeline's ``unet/`` or the folder itself)."""
    from pipeline.models import resolve_base_model
    from pipeline.preflight import PreflightError

    try:
        return resolve_base_model(config.base_model)
    except PreflightError as e:
        raise TransferError(str(e)) from None


def base_channels(config: TransferConfig) -> int:
    return int(json.loads((base_dir(config) / "config.json").read_text())["in_channels"])


@functools.lru_cache(maxsize=2)
def condition_encoder(name: str, device: str):
    """The image encoder, loaded once per name and device (tune and evaluate both use it)."""
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
    from pipeline.models import sample_base

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
