"""Masked sampling of one chunk of conditions: the sample stage's work, shared with the
benches; and the seeds and file names that make a resumed stage write what an uninterrupted
one would.
"""

from __future__ import annotations

import numpy as np


def ratio_seed(seed: int, mask_idx: int) -> int:
    """The sampling seed of the ``mask_idx``-th mask ratio.

    Each ratio gets its own noise and masks: with one shared seed, the images of two ratios
    of one condition started from the same noise and nested masks (the 0.25 mask a subset
    of the 0.5 one), near-duplicate pairs the copy filter does not see. The first ratio
    keeps ``seed`` itself, so one-ratio runs draw what they always drew.
    """
    if mask_idx == 0:
        return seed
    state = np.random.SeedSequence([seed, mask_idx, 0x4D41534B]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def part_name(mask_idx: int, chunk_idx: int) -> str:
    return f"part-{mask_idx:02d}-{chunk_idx:05d}.npz"


def sample_images(model, scheduler, tokens, condition_ids: np.ndarray, per_condition: int,
                  sampling, *, mask_ratio: float, seed: int, image_shape: tuple[int, int],
                  guidance: float | None = None, num_inference_steps: int | None = None,
                  ) -> np.ndarray:
    """uint8 (len(tokens) * per_condition, H, W, C): masked samples of the given condition
    tokens, in data space. The sample stage's work for one chunk; benches sweeping guidance
    or steps call it with those overridden (``sampling`` is the run's ``sampling:`` section).
    """
    from anl_core.sampling import masked_sample
    from pipeline.data.images import from_model_space

    x = masked_sample(model, scheduler, tokens, per_condition, mask_ratio=mask_ratio,
                      guidance=sampling.guidance if guidance is None else guidance,
                      num_inference_steps=num_inference_steps or sampling.num_inference_steps,
                      seed=seed, batch_size=sampling.batch_size, condition_ids=condition_ids,
                      progress=False, eta=sampling.eta, compile=sampling.compile)
    return from_model_space(x, shape=image_shape)
