"""anl_core: ANL adapters on a frozen diffusers U-Net (the method; no files, no Prefect).

    encoder = load_encoder("efficientnet-lite0")          # images -> tokens (B, N, D)
    model = attach_anl(unet, ANLConfig.for_encoder(encoder))
    tune_adapter(model, scheduler, images, encoder.encode(images), TuneConfig(steps=1000))
    samples = masked_sample(model, scheduler, tokens, num_per_condition=8, mask_ratio=0.3,
                            guidance=2.0, num_inference_steps=50, seed=0)

Names are imported on first use (PEP 562), so reading the settings (``anl_core.config``)
does not import torch.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "anl": ("ANLBlock",),
    "config": ("ANLConfig", "AdapterShape", "TuneConfig"),
    "encoders": ("ConditionEncoder", "EncoderError", "load_encoder"),
    "inject": ("AdapterMismatchError", "AdapterWeightsError", "ANLAdapter", "ANLUNet",
               "attach_anl", "base_fingerprint", "check_adapter_weights"),
    "sampling": ("image_generators", "image_seed", "masked_sample"),
    "tuning": ("TuneResult", "denoising_loss", "tune_adapter"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = [name for names in _HOMES.values() for name in names]


def __getattr__(name: str):
    if name not in _HOME_OF:
        raise AttributeError(f"module 'anl_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME_OF[name]}", __name__), name)
    globals()[name] = value  # once
    return value
