"""Attach ANL blocks to a frozen diffusers ``UNet2DModel``; save and load adapters.

``UNet2DModel`` has no cross-attention and passes nothing extra to its blocks, so the adapter
works through forward hooks on the chosen blocks. The wrapper ``ANLUNet`` projects the
condition tokens once per call, holds the result while the U-Net runs and clears it afterwards;
a hook with no condition set is a no-op, so the bare U-Net keeps computing its base output.

Down blocks return ``(hidden, residuals)`` and the last residual *is* the hidden output (the
tensor the up path later receives as its deepest skip at that level). The hook adapts the
hidden output and substitutes it for that last residual, so the ANL block behaves exactly like
a layer appended inside the block. The earlier residuals (outputs of inner resnets) are left
alone: adapting them would need a block per resnet for little gain.

The trainable part is a module of its own, ``ANLAdapter`` (the condition projection and the
blocks); ``ANLUNet`` holds it beside the frozen base and owns the hooks. An adapter is saved
in PEFT's layout: ``adapter_config.json`` (the ``ANLConfig``) and ``adapter_model.safetensors``
(the ``ANLAdapter``'s state dict, nothing of the base), one pair per directory. Adapters saved
before as ``anl_config.json`` + ``adapter.safetensors`` still load: their weights carry the
same key names, only the file names differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from safetensors.torch import save_file
from torch import nn

from anl_core.adapter_files import (  # noqa: F401 - re-exported: the adapter's public names
    CONFIG_NAME,
    LEGACY_CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    AdapterWeightsError,
    adapter_files,
    atomic_write,
    check_adapter_weights,
)
from anl_core.anl import ANLBlock
from anl_core.config import ANLConfig


class AdapterMismatchError(ValueError):
    """An adapter was loaded onto a base model or encoder it was not trained for."""


def base_fingerprint(unet: nn.Module, samples_per_tensor: int = 1024) -> str:
    """sha256 of the U-Net config and a strided sample of every weight tensor.

    Sampling keeps it cheap for large models (constant work per tensor) while any two
    differently trained or initialised bases differ in the sampled values. Values are hashed as
    float32 on CPU, so the fingerprint does not depend on the device the model sits on.
    """
    h = hashlib.sha256()
    config = dict(getattr(unet, "config", {}))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(unet.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _base_name(unet: nn.Module) -> str:
    """The hub id or path diffusers recorded when it loaded ``unet``; "" for one built in memory."""
    return str(dict(getattr(unet, "config", {})).get("_name_or_path") or "")


def _describe_base(name: str, fingerprint: str) -> str:
    return f"{name or '(id not recorded)'} [fingerprint {fingerprint[:12]}...]"


def _resolve_indices(spec: Any, count: int, path: str) -> list[int]:
    if spec in (None, False):
        return []
    if spec in ("all", True):
        return list(range(count))
    indices = sorted({int(i) for i in spec})
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise ValueError(f"placement[{path!r}] has block indices {bad}; this U-Net has {count} "
                         f"{path} blocks (valid: 0..{count - 1} or 'all')")
    return indices


def _out_channels(block: nn.Module) -> int:
    return block.resnets[-1].out_channels


def placement_slots(placement: dict[str, Any], n_down: int, n_up: int,
                    has_mid: bool = True) -> list[str]:
    """The adapter slots ('down.0', 'mid', 'up.2', ...) ``placement`` selects on a U-Net with
    these block counts; ValueError naming the bad index. Needs only the counts (a U-Net's
    config.json has them), so a run checks its placement before loading any weights."""
    unknown = set(placement) - {"down", "mid", "up"}
    if unknown:
        raise ValueError(f"placement keys must be 'down', 'mid', 'up'; got {sorted(unknown)}")
    slots = [f"down.{i}" for i in _resolve_indices(placement.get("down"), n_down, "down")]
    slots += ["mid"] if placement.get("mid") and has_mid else []
    slots += [f"up.{i}" for i in _resolve_indices(placement.get("up"), n_up, "up")]
    if not slots:
        raise ValueError("placement selects no U-Net blocks; use e.g. "
                         "{'down': 'all', 'mid': True, 'up': 'all'}")
    return slots


def _placed_blocks(unet: UNet2DModel, placement: dict[str, Any]) -> dict[str, nn.Module]:
    """Map adapter slot name ('down.0', 'mid', 'up.2', ...) -> the U-Net block it follows."""
    blocks = {"mid": unet.mid_block,
              **{f"down.{i}": b for i, b in enumerate(unet.down_blocks)},
              **{f"up.{i}": b for i, b in enumerate(unet.up_blocks)}}
    return {slot: blocks[slot] for slot in placement_slots(
        placement, len(unet.down_blocks), len(unet.up_blocks), unet.mid_block is not None)}


def _module_key(slot: str) -> str:
    return slot.replace(".", "_")  # ModuleDict keys cannot contain '.': 'down_0' for 'down.0'


class ConditionProjection(nn.Module):
    """Encoder tokens (B, N, D) -> context (B, N, Dc), with a learned null token for masking."""

    def __init__(self, token_dim: int, context_dim: int, num_tokens: int, positional: bool):
        super().__init__()
        self.norm = nn.LayerNorm(token_dim)
        self.proj = nn.Linear(token_dim, context_dim)
        # The null token lives in context space so it does not depend on encoder statistics.
        self.null_token = nn.Parameter(torch.randn(context_dim) * 0.02)
        # Zero-init: positions start indistinguishable and are learned only if they help.
        self.pos_embed = nn.Parameter(torch.zeros(num_tokens, context_dim)) if positional else None
        self.num_tokens = num_tokens

    def forward(self, tokens: torch.Tensor | None, token_mask: torch.Tensor | None = None,
                batch_size: int | None = None) -> torch.Tensor:
        """``token_mask``: bool (B, N), True where a token is masked (replaced by the null token).

        ``tokens=None`` gives the all-null (unconditional) context for ``batch_size`` samples.
        """
        if tokens is None:
            if batch_size is None:
                raise ValueError("pass batch_size for an unconditional (tokens=None) context")
            ctx = self.null_token.expand(batch_size, self.num_tokens, -1)
        else:
            if tokens.ndim != 3 or tokens.shape[1] != self.num_tokens:
                raise ValueError(f"expected tokens (B, {self.num_tokens}, D), got "
                                 f"{tuple(tokens.shape)}: was the adapter built for this encoder?")
            ctx = self.proj(self.norm(tokens.to(self.proj.weight.dtype)))
            if token_mask is not None:
                ctx = torch.where(token_mask.to(ctx.device)[..., None],
                                  self.null_token.to(ctx.dtype), ctx)
        if self.pos_embed is not None:
            ctx = ctx + self.pos_embed
        return ctx


class ANLAdapter(nn.Module):
    """The trainable part: the condition projection and one ANL block per adapted U-Net block.

    Its state dict (``condition.*``, ``blocks.<slot>.*``) is what an adapter file holds; these
    are the key names adapters were always saved with, so older files load as they are.
    """

    def __init__(self, config: ANLConfig):
        super().__init__()
        # Built in this order (projection, then blocks) so a seed gives the weights it always gave.
        self.condition = ConditionProjection(config.token_dim, config.context_dim,
                                             config.num_tokens, config.positional)
        self.blocks = nn.ModuleDict({
            _module_key(slot): ANLBlock(ch, config.context_dim, config.head_dim, config.ff_mult)
            for slot, ch in config.block_channels.items()
        })

    @property
    def device(self) -> torch.device:
        return self.condition.proj.weight.device


class ANLUNet(nn.Module):
    """A frozen ``UNet2DModel`` plus an ``ANLAdapter``; call like the U-Net with condition tokens.

    ``model(sample, timestep, tokens=None, token_mask=None)`` returns the noise prediction
    tensor. ``tokens=None`` (or ``token_mask`` all True) is the null condition used for
    classifier-free guidance. A precomputed ``context=model.context(tokens, mask)`` may be
    passed instead of tokens to skip re-projecting them at every denoising step.
    """

    def __init__(self, unet: UNet2DModel, config: ANLConfig):
        super().__init__()
        self.unet = unet
        self.config = config
        slots = _placed_blocks(unet, config.placement)
        config.block_channels = {name: _out_channels(b) for name, b in slots.items()}
        self.adapter = ANLAdapter(config)
        self._context: torch.Tensor | None = None
        for slot, block in slots.items():
            block.register_forward_hook(self._make_hook(_module_key(slot)))
        self.freeze_base()

    # -- base / adapter bookkeeping ---------------------------------------------------------
    def freeze_base(self) -> None:
        """Base weights never train; eval mode turns off any dropout in the base."""
        self.unet.requires_grad_(False)
        self.unet.eval()

    def train(self, mode: bool = True) -> ANLUNet:
        super().train(mode)
        self.unet.eval()  # the frozen base stays in eval mode whatever the adapter does
        return self

    def adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.adapter.parameters())

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return self.adapter.state_dict()

    def param_counts(self) -> dict[str, int]:
        """Trainable (adapter) vs frozen (base) vs total parameter counts."""
        adapter = sum(p.numel() for p in self.adapter.parameters())
        base = sum(p.numel() for p in self.unet.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"adapter": adapter, "base": base, "trainable": trainable, "total": adapter + base}

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    # -- forward ------------------------------------------------------------------------------
    def _make_hook(self, key: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            ctx = self._context
            if ctx is None:
                return None  # bare U-Net call: leave the output alone
            block = self.adapter.blocks[key]
            if isinstance(output, torch.Tensor):  # mid block
                return block(output, ctx)
            hidden = output[0]
            adapted = block(hidden, ctx)
            rest = list(output[1:])
            # Down block: keep the deepest skip consistent with the adapted main path.
            if rest and isinstance(rest[0], tuple) and rest[0] and rest[0][-1] is hidden:
                rest[0] = rest[0][:-1] + (adapted,)
            return (adapted, *rest)
        return hook

    def context(self, tokens: torch.Tensor | None, token_mask: torch.Tensor | None = None,
                batch_size: int | None = None) -> torch.Tensor:
        """Projected condition (B, N, context_dim); ``tokens=None`` gives the null condition."""
        return self.adapter.condition(tokens, token_mask, batch_size)

    @contextlib.contextmanager
    def conditioned(self, context: torch.Tensor):
        """Hold ``context`` for the hooks during the block; always cleared after."""
        self._context = context
        try:
            yield
        finally:
            self._context = None

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float,
                tokens: torch.Tensor | None = None, token_mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            context = self.context(tokens, token_mask, batch_size=sample.shape[0])
        if context.shape[0] != sample.shape[0]:
            raise ValueError(f"{sample.shape[0]} samples but {context.shape[0]} conditions")
        with self.conditioned(context):
            return self.unet(sample, timestep, return_dict=False)[0]

    # -- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``adapter_model.safetensors`` then ``adapter_config.json`` (last: its presence
        means the pair is complete). Only the adapter is written, never the base."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.adapter_state_dict().items()}
        atomic_write(out / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
        atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(self.config.to_json()))
        return out

    @classmethod
    def from_pretrained(cls, unet: UNet2DModel, directory: str | os.PathLike, *,
                        encoder_id: str | None = None) -> ANLUNet:
        """Rebuild the adapter saved in ``directory`` (either layout) on ``unet``.

        Refuses (``AdapterMismatchError``) a base U-Net whose fingerprint differs from the one
        the adapter was tuned on, and, when ``encoder_id`` is given, a different condition
        encoder. The recorded base id or path is not compared: the same weights may live
        anywhere, and the fingerprint is what identifies them.
        """
        config_file, weights_file = adapter_files(Path(directory))
        model = cls._attached(unet, _checked_config(config_file, unet, encoder_id))
        model.adapter.load_state_dict(_checked_weights(weights_file, model))
        return model

    @classmethod
    def _attached(cls, unet: UNet2DModel, config: ANLConfig) -> ANLUNet:
        """The model with its adapter on the U-Net's device and dtype; ``config`` checked."""
        model = cls(unet, config)
        param = next(unet.parameters())
        model.adapter.to(device=param.device, dtype=param.dtype)
        return model


def attach_anl(unet: UNet2DModel, config: ANLConfig, *,
               base_model: str | None = None) -> ANLUNet:
    """Freeze ``unet`` and attach fresh (identity) ANL blocks per ``config.placement``.

    ``base_model``: the base's hub id or path, recorded in the config so a reader knows what
    the adapter fits (the fingerprint, not this, is what loading checks); by default the
    config's own, else the one diffusers recorded when it loaded ``unet``. The returned
    model's adapter sits on the U-Net's device and dtype.
    """
    config = config.model_copy(deep=True)  # the caller's config is left as it was
    fingerprint = base_fingerprint(unet)
    if config.base_fingerprint and config.base_fingerprint != fingerprint:
        raise AdapterMismatchError(
            "this ANLConfig was made for a different base U-Net "
            f"({_describe_base(config.base_model, config.base_fingerprint)}; this U-Net is "
            f"{_describe_base(_base_name(unet), fingerprint)}); attach to the base it was made "
            "for, or clear config.base_fingerprint")
    config.base_fingerprint = fingerprint
    config.base_model = base_model or config.base_model or _base_name(unet)
    return ANLUNet._attached(unet, config)


def _checked_config(path: Path, unet: UNet2DModel, encoder_id: str | None) -> ANLConfig:
    """The saved config, refused for another encoder or another base (by fingerprint)."""
    config = ANLConfig.from_json(path.read_text())
    if encoder_id is not None and config.encoder_id and encoder_id != config.encoder_id:
        raise AdapterMismatchError(
            f"adapter in {path.parent} was tuned on tokens of encoder {config.encoder_id!r}, "
            f"not {encoder_id!r}; load the encoder it was tuned with")
    fingerprint = base_fingerprint(unet)
    if fingerprint != config.base_fingerprint:
        raise AdapterMismatchError(
            f"adapter in {path.parent} was tuned on a different base U-Net: "
            f"{_describe_base(config.base_model, config.base_fingerprint)}, but the given U-Net "
            f"is {_describe_base(_base_name(unet), fingerprint)}; load the base model the "
            "adapter was tuned on")
    # Older adapters did not record the base; the fingerprint just proved it is this one.
    config.base_model = config.base_model or _base_name(unet)
    return config


def _checked_weights(path: Path, model: ANLUNet) -> dict[str, torch.Tensor]:
    expected = {k: tuple(v.shape) for k, v in model.adapter_state_dict().items()}
    state = check_adapter_weights(path, expected, device=str(model.device))
    if set(state) != set(expected):
        raise AdapterMismatchError(
            f"adapter weights in {path} do not match its config: missing "
            f"{sorted(set(expected) - set(state))[:5]}, "
            f"unexpected {sorted(set(state) - set(expected))[:5]}")
    return state
