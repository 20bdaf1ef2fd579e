"""Adapter tuning: lowers the loss on its condition images, deterministic, EMA, frozen base."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from anl_core.inject import ANLConfig, attach_anl
from anl_core.tuning import TuneConfig, tune_adapter

CONFIG = ANLConfig(token_dim=6, num_tokens=3, context_dim=16, head_dim=8)

pytestmark = pytest.mark.usefixtures("anl_single_thread")  # tiny models: 1 thread is faster


def test_tuning_lowers_loss_on_condition_images_below_frozen_base(anl_tuned):
    base, tuned = anl_tuned["base_loss"], anl_tuned["tuned_loss"]
    assert tuned < 0.85 * base, f"tuned loss {tuned:.4f} vs frozen base {base:.4f}"
    history = anl_tuned["result"].loss_history
    assert len(history) == 250 and all(math.isfinite(v) for v in history)
    assert sum(history[-50:]) < sum(history[:50])


def _run(unet_factory, seed, steps=4, **kw):
    model = attach_anl(unet_factory(), CONFIG)
    g = torch.Generator().manual_seed(123)
    images, tokens = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 3, 6, generator=g)
    cfg = TuneConfig(steps=steps, batch_size=4, lr=1e-3, seed=seed, train_mask_ratio=0.5, **kw)
    result = tune_adapter(model, DDPMScheduler(num_train_timesteps=1000), images, tokens, cfg,
                          progress=False)
    return model, result


def test_tuning_is_deterministic_with_a_seed(anl_unet_factory, anl_single_thread):
    a, ra = _run(anl_unet_factory, seed=7)
    b, rb = _run(anl_unet_factory, seed=7)
    c, _ = _run(anl_unet_factory, seed=8)
    assert ra.loss_history == rb.loss_history
    for (name, pa), pb in zip(a.adapter_state_dict().items(), b.adapter_state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in
               zip(a.adapter_state_dict().values(), c.adapter_state_dict().values()))


def test_ema_weights_are_loaded_at_the_end(anl_unet_factory, anl_single_thread):
    model, result = _run(anl_unet_factory, seed=0, steps=3)
    state = dict(model.named_parameters())
    for name, shadow in result.ema_state.items():
        assert torch.equal(state[name].detach(), shadow), name
    raw, _ = _run(anl_unet_factory, seed=0, steps=3, use_ema=False)
    assert not torch.equal(raw.adapter.blocks["mid"].to_out.weight,
                           model.adapter.blocks["mid"].to_out.weight)


def test_bad_inputs_are_clear_errors(anl_unet_factory):
    model = attach_anl(anl_unet_factory(), CONFIG)
    with pytest.raises(ValueError, match="one token set per image"):
        tune_adapter(model, DDPMScheduler(), torch.zeros(3, 1, 8, 8), torch.zeros(2, 3, 6))
    with pytest.raises(ValueError, match=r"cond_dropout\n.*less than or equal to 1"):
        TuneConfig(cond_dropout=1.5)


def test_weights_choose_which_pairs_are_drawn(anl_unet_factory):
    """A zero-weight pair is never drawn: its NaN image would make every loss NaN."""
    model = attach_anl(anl_unet_factory(), CONFIG)
    g = torch.Generator().manual_seed(0)
    images, tokens = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 3, 6, generator=g)
    images[2] = float("nan")
    cfg = TuneConfig(steps=6, batch_size=4, lr=1e-3, use_ema=False)
    sched = DDPMScheduler(num_train_timesteps=1000)
    result = tune_adapter(model, sched, images, tokens, cfg, progress=False,
                          weights=torch.tensor([0.5, 0.5, 0.0]))
    assert all(math.isfinite(v) for v in result.loss_history)
    drawn = tune_adapter(attach_anl(anl_unet_factory(), CONFIG), sched, images, tokens, cfg,
                         progress=False, weights=torch.tensor([0.0, 0.0, 1.0]))
    assert all(math.isnan(v) for v in drawn.loss_history)
    for bad in (torch.tensor([1.0, -1.0, 1.0]), torch.zeros(3), torch.ones(2)):
        with pytest.raises(ValueError, match="weights must be 3 non-negative"):
            tune_adapter(model, sched, images, tokens, cfg, progress=False, weights=bad)
