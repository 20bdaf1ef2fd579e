"""Injection into a diffusers UNet2DModel: identity at init, frozen base, save/load checks."""


import pytest
import torch
from diffusers import DDPMScheduler

from anl_core.inject import (
    AdapterMismatchError,
    ANLConfig,
    attach_anl,
    base_fingerprint,
    load_adapter,
    save_adapter,
)
from anl_core.tuning import TuneConfig, tune_adapter

CONFIG = ANLConfig(token_dim=12, num_tokens=5, context_dim=16, head_dim=8, encoder_id="enc-a")

pytestmark = pytest.mark.usefixtures("anl_single_thread")  # tiny models: 1 thread is faster


def _inputs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 8, 8, generator=g), torch.randint(1000, (n,), generator=g),
            torch.randn(n, 5, 12, generator=g))


def test_fresh_adapter_is_bitwise_identity_then_one_step_changes_it(anl_unet_factory):
    unet = anl_unet_factory()
    x, t, tokens = _inputs()
    with torch.no_grad():
        base_out = unet(x, t).sample
    model = attach_anl(unet, CONFIG)
    assert set(model.config.block_channels) == {"down.0", "down.1", "mid", "up.0", "up.1"}
    with torch.no_grad():
        assert torch.equal(model(x, t, tokens=tokens), base_out)
        assert torch.equal(model(x, t), base_out)  # null condition too
        mask = torch.rand(3, 5) < 0.5
        assert torch.equal(model(x, t, tokens=tokens, token_mask=mask), base_out)

    base_before = {k: v.clone() for k, v in unet.state_dict().items()}
    tune_adapter(model, DDPMScheduler(num_train_timesteps=1000), x, tokens,
                 TuneConfig(steps=1, batch_size=3, lr=1e-3, warmup_steps=1, use_ema=False),
                 progress=False)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, tokens=tokens), base_out)
        # the hooks are inert outside ANLUNet calls: the bare U-Net is still the base
        assert torch.equal(unet(x, t).sample, base_out)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, base_before[k]), f"base weight {k} changed during tuning"


def test_only_adapter_parameters_train(anl_unet_factory):
    model = attach_anl(anl_unet_factory(), CONFIG)
    counts = model.param_counts()
    assert counts["trainable"] == counts["adapter"] > 0
    assert counts["total"] == counts["adapter"] + counts["base"]
    assert not any(p.requires_grad for p in model.unet.parameters())
    model.train()
    assert not model.unet.training and model.blocks.training


def test_placement_selects_blocks_and_rejects_bad_indices(anl_unet_factory):
    cfg = CONFIG.model_copy(update={"placement": {"down": [1], "mid": False, "up": []}})
    model = attach_anl(anl_unet_factory(), cfg)
    assert list(model.config.block_channels) == ["down.1"]
    assert list(model.blocks) == ["down_1"]
    with pytest.raises(ValueError, match="valid: 0..1"):
        attach_anl(anl_unet_factory(), CONFIG.model_copy(update={"placement": {"down": [2]}}))
    with pytest.raises(ValueError, match="selects no U-Net blocks"):
        attach_anl(anl_unet_factory(), CONFIG.model_copy(update={"placement": {"mid": False}}))


def test_down_block_skip_gets_the_adapted_output(anl_unet_factory):
    unet = anl_unet_factory()
    model = attach_anl(unet, CONFIG.model_copy(update={"placement": {"down": [1]}}))
    torch.nn.init.normal_(model.blocks["down_1"].to_out.weight, std=0.5)
    seen = {}
    unet.down_blocks[1].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    x, t, tokens = _inputs()
    with torch.no_grad():
        model(x, t, tokens=tokens)
    # our hook runs first; later hooks see its result: hidden and deepest skip are one tensor
    hidden, residuals = seen["out"]
    assert residuals[-1] is hidden


def test_fingerprint_depends_on_weights_not_just_config(anl_unet_factory):
    a, b = anl_unet_factory(seed=0), anl_unet_factory(seed=1)
    assert a.config == b.config
    assert base_fingerprint(a) == base_fingerprint(anl_unet_factory(seed=0))
    assert base_fingerprint(a) != base_fingerprint(b)


def test_save_load_round_trip_and_refusals(anl_unet_factory, tmp_path):
    model = attach_anl(anl_unet_factory(), CONFIG)
    for p in model.adapter_parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, tokens = _inputs()
    with torch.no_grad():
        want = model(x, t, tokens=tokens)
    save_adapter(model, tmp_path / "adapter")
    assert sorted(f.name for f in (tmp_path / "adapter").iterdir()) == [
        "adapter.safetensors", "anl_config.json"]

    loaded = load_adapter(anl_unet_factory(), tmp_path / "adapter", encoder_id="enc-a")
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(x, t, tokens=tokens), want)

    with pytest.raises(AdapterMismatchError, match="different base U-Net"):
        load_adapter(anl_unet_factory(seed=1), tmp_path / "adapter")
    with pytest.raises(AdapterMismatchError, match="encoder 'enc-a'"):
        load_adapter(anl_unet_factory(), tmp_path / "adapter", encoder_id="enc-b")
    with pytest.raises(FileNotFoundError, match="not a saved ANL adapter"):
        load_adapter(anl_unet_factory(), tmp_path / "missing")


def test_config_json_round_trip():
    cfg = CONFIG.model_copy(update={"placement": {"down": [0, 1], "mid": True, "up": "all"}})
    assert ANLConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown ANLConfig fields"):
        ANLConfig.from_json('{"token_dim": 1, "num_tokens": 1, "colour": 3}')


def test_wrong_token_shape_is_a_clear_error(anl_unet_factory):
    model = attach_anl(anl_unet_factory(), CONFIG)
    x, t, _ = _inputs()
    with pytest.raises(ValueError, match=r"expected tokens \(B, 5, D\)"):
        model(x, t, tokens=torch.randn(3, 7, 12))
