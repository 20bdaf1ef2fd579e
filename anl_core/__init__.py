"""anl_core: ANL adapters on a frozen diffusers U-Net (the method; no files, no Prefect).

    encoder = load_encoder("efficientnet-lite0")          # images -> tokens (B, N, D)
    model = attach_anl(unet, ANLConfig.for_encoder(encoder))
    tune_adapter(model, scheduler, images, encoder.encode(images), TuneConfig(steps=1000))
    samples = masked_sample(model, scheduler, tokens, num_per_condition=8, mask_ratio=0.3,
                            guidance=2.0, num_inference_steps=50, seed=0)
"""

from anl_core.anl import ANLBlock
from anl_core.encoders import ConditionEncoder, EncoderError, load_encoder
from anl_core.inject import (
    AdapterMismatchError,
    ANLConfig,
    ANLUNet,
    attach_anl,
    base_fingerprint,
    load_adapter,
    save_adapter,
)
from anl_core.sampling import image_generators, image_seed, masked_sample
from anl_core.tuning import TuneConfig, TuneResult, denoising_loss, tune_adapter

__all__ = [
    "ANLBlock", "ANLConfig", "ANLUNet", "AdapterMismatchError", "ConditionEncoder",
    "EncoderError", "TuneConfig", "TuneResult", "attach_anl", "base_fingerprint",
    "denoising_loss", "image_generators", "image_seed", "load_adapter", "load_encoder",
    "masked_sample", "save_adapter", "tune_adapter",
]
