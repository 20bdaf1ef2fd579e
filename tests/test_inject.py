"""Injection into a diffusers UNet2DModel: identity at init, frozen base, save/load checks."""

import json
import os

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from anl_core.inject import (
    AdapterMismatchError,
    ANLConfig,
    ANLUNet,
    attach_anl,
    base_fingerprint,
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
    assert not model.unet.training and model.adapter.training


def test_placement_selects_blocks_and_rejects_bad_indices(anl_unet_factory):
    cfg = CONFIG.model_copy(update={"placement": {"down": [1], "mid": False, "up": []}})
    model = attach_anl(anl_unet_factory(), cfg)
    assert list(model.config.block_channels) == ["down.1"]
    assert list(model.adapter.blocks) == ["down_1"]
    with pytest.raises(ValueError, match="valid: 0..1"):
        attach_anl(anl_unet_factory(), CONFIG.model_copy(update={"placement": {"down": [2]}}))
    with pytest.raises(ValueError, match="selects no U-Net blocks"):
        attach_anl(anl_unet_factory(), CONFIG.model_copy(update={"placement": {"mid": False}}))


def test_down_block_skip_gets_the_adapted_output(anl_unet_factory):
    unet = anl_unet_factory()
    model = attach_anl(unet, CONFIG.model_copy(update={"placement": {"down": [1]}}))
    torch.nn.init.normal_(model.adapter.blocks["down_1"].to_out.weight, std=0.5)
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


def _tuned_model(unet):
    """An adapter with non-zero weights, so a wrong load would change the outputs."""
    model = attach_anl(unet, CONFIG)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _outputs(model):
    x, t, tokens = _inputs()
    with torch.no_grad():
        return model(x, t, tokens=tokens)


def test_the_adapter_module_holds_exactly_the_trainable_parameters(anl_unet_factory):
    model = attach_anl(anl_unet_factory(), CONFIG)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in model.adapter.parameters()} == trainable
    assert {id(p) for p in model.adapter_parameters()} == trainable
    assert model.adapter_state_dict().keys() == model.adapter.state_dict().keys()
    assert not trainable & {id(p) for p in model.unet.parameters()}


def test_save_writes_the_peft_layout_and_only_the_adapter(anl_unet_factory, tmp_path):
    model = _tuned_model(anl_unet_factory())
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(f.name for f in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(tmp_path / "adapter/adapter_model.safetensors")
    assert saved.keys() == model.adapter.state_dict().keys()
    assert sum(v.numel() for v in saved.values()) == model.param_counts()["adapter"]
    assert not any(k in saved for k in model.unet.state_dict())  # no base weight by any name


def test_saved_adapter_files_are_0644_under_umask_022(anl_unet_factory, tmp_path):
    model = attach_anl(anl_unet_factory(), CONFIG)
    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "adapter")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "adapter").iterdir()}
    assert modes == {"adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}


def test_save_load_round_trip_gives_identical_outputs(anl_unet_factory, tmp_path):
    model = _tuned_model(anl_unet_factory())
    model.save_pretrained(tmp_path / "adapter")
    loaded = ANLUNet.from_pretrained(anl_unet_factory(), tmp_path / "adapter", encoder_id="enc-a")
    assert loaded.config == model.config
    assert torch.equal(_outputs(loaded), _outputs(model))


def test_the_config_records_the_base_id(anl_unet_factory, tmp_path):
    unet = anl_unet_factory()
    unet.save_pretrained(tmp_path / "base")
    loaded_base = UNet2DModel.from_pretrained(tmp_path / "base", low_cpu_mem_usage=False)
    # Recorded from where diffusers loaded the base from, unless the caller names it.
    assert attach_anl(loaded_base, CONFIG).config.base_model == str(tmp_path / "base")
    model = attach_anl(unet, CONFIG, base_model="org/tiny-ddpm")
    assert model.config.base_model == "org/tiny-ddpm"
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert saved["base_model"] == "org/tiny-ddpm"
    assert saved["base_fingerprint"] == base_fingerprint(unet)
    # The same weights under another name load: the fingerprint is the check, not the name.
    assert ANLUNet.from_pretrained(loaded_base, tmp_path / "adapter").config.base_model == \
        "org/tiny-ddpm"


def test_load_refuses_a_wrong_base_or_encoder_naming_both(anl_unet_factory, tmp_path):
    _tuned_model(anl_unet_factory()).save_pretrained(tmp_path / "adapter")
    other = anl_unet_factory(seed=1)
    other.save_pretrained(tmp_path / "other-base")
    other = UNet2DModel.from_pretrained(tmp_path / "other-base", low_cpu_mem_usage=False)
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    with pytest.raises(AdapterMismatchError, match="different base U-Net") as e:
        ANLUNet.from_pretrained(other, tmp_path / "adapter")
    assert config["base_fingerprint"][:12] in str(e.value)
    assert str(tmp_path / "other-base") in str(e.value)
    assert base_fingerprint(other)[:12] in str(e.value)
    with pytest.raises(AdapterMismatchError, match="encoder 'enc-a'"):
        ANLUNet.from_pretrained(anl_unet_factory(), tmp_path / "adapter", encoder_id="enc-b")
    with pytest.raises(FileNotFoundError, match="not a saved ANL adapter"):
        ANLUNet.from_pretrained(anl_unet_factory(), tmp_path / "missing")


def _write_legacy_adapter(model, directory):
    """The layout adapters had before PEFT's names, written as that code wrote it: the config
    without ``base_model`` in ``anl_config.json``, the ANLUNet's non-base weights in
    ``adapter.safetensors`` under their names then ('condition.*', 'blocks.<slot>.*')."""
    directory.mkdir(parents=True)
    config = model.config.model_dump()
    del config["base_model"]
    (directory / "anl_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    state = {}
    for name, value in model.adapter.condition.state_dict().items():
        state[f"condition.{name}"] = value.contiguous()
    for slot, block in model.adapter.blocks.items():
        for name, value in block.state_dict().items():
            state[f"blocks.{slot}.{name}"] = value.contiguous()
    save_file(state, directory / "adapter.safetensors", metadata={"format": "pt"})
    return state


def test_an_adapter_in_the_legacy_layout_loads_with_identical_outputs(anl_unet_factory,
                                                                       tmp_path):
    model = _tuned_model(anl_unet_factory())
    state = _write_legacy_adapter(model, tmp_path / "old")
    assert "condition.proj.weight" in state and "blocks.mid.to_out.weight" in state
    loaded = ANLUNet.from_pretrained(anl_unet_factory(), tmp_path / "old", encoder_id="enc-a")
    assert torch.equal(_outputs(loaded), _outputs(model))
    assert loaded.config.base_fingerprint == model.config.base_fingerprint
    with pytest.raises(AdapterMismatchError, match="different base U-Net"):
        ANLUNet.from_pretrained(anl_unet_factory(seed=1), tmp_path / "old")
    # Saved again, it is in the new layout only.
    loaded.save_pretrained(tmp_path / "new")
    assert sorted(f.name for f in (tmp_path / "new").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]


def test_attach_refuses_a_config_made_for_another_base(anl_unet_factory):
    config = attach_anl(anl_unet_factory(), CONFIG, base_model="base-a").config
    with pytest.raises(AdapterMismatchError, match="base-a"):
        attach_anl(anl_unet_factory(seed=1), config)


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
