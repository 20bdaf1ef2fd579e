"""Generation paths a user reaches with one config line, each checked against something
computed another way: a shared adapter (``adapter.scope: shared``), a base pretrained on the
pool inside the run (``pretrain:``), v-prediction and x0 ("sample") prediction targets, and
the ``augment pretrain`` command. Tiny models on the ``flow_*`` setup: seconds on CPU.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from flow_fixtures import rerecord_unit
from safetensors.torch import load_file, save_file
from torch_helpers import anl_make_unet, anl_one_thread

from anl_core.inject import ANLConfig, ANLUNet, attach_anl, base_fingerprint
from anl_core.sampling import image_seed, masked_sample
from pipeline import stages
from pipeline.config import with_overrides
from pipeline.generate.sample import part_name
from pipeline.runs import init_run_dir, read_json
from pipeline.stages.inputs import dataset_for, load_run_base, load_tokens
from pipeline.stages.keys import stage_keys
from pipeline.stages.pretrain import run_pretrain


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models are op-overhead bound; one thread is faster on the shared 2-core machine and
    # keeps the stage and the hand computation on the same kernels.
    with anl_one_thread():
        yield


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _sha256_pool(images: np.ndarray) -> str:
    """The pool fingerprint training.json records: sha256 of the shape text, then the pixels."""
    h = hashlib.sha256(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def _alpha_bar(n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM's linear schedule by hand (float64): alpha_bar_t = prod_{s<=t} (1 - beta_s)."""
    return np.cumprod(1.0 - np.linspace(beta_start, beta_end, n, dtype=np.float64))


# --------------------------------------------------------------------------- shared adapter


def test_shared_scope_tunes_one_adapter_on_every_class(flow_cfg, monkeypatch):
    cfg = with_overrides(flow_cfg, {"adapter.scope": "shared"})
    run_dir = init_run_dir(cfg)
    # Record what the tune stage hands to the tuner: which images and which token sets.
    from anl_core import tuning

    calls = []
    real_tune = tuning.tune_adapter

    def recording_tune(model, scheduler, images, tokens, *args, **kwargs):
        calls.append((images.detach().clone(), tokens.detach().clone()))
        return real_tune(model, scheduler, images, tokens, *args, **kwargs)

    monkeypatch.setattr(tuning, "tune_adapter", recording_tune)
    records = stages.run_all(run_dir, cfg, until="tune")

    # Exactly one adapter, named "shared", and no per-class ones.
    assert sorted(p.name for p in (run_dir / "adapters").iterdir()) == ["shared"]
    assert records["tune"]["outputs"] == {"adapters": ["adapters/shared"]}
    assert records["tune"]["metrics"]["adapters"] == 1
    assert len(calls) == 1

    # Its tuning set is every labeled image of both classes, each with its own tokens.
    from pipeline.data.images import to_model_space

    tok = load_tokens(run_dir)
    ds = dataset_for(cfg)
    labeled = tok["index"].numpy()
    assert np.bincount(ds.train_labels[labeled], minlength=2).tolist() == [2, 2]
    images, tokens = calls[0]
    torch.testing.assert_close(images, to_model_space(ds.train_images[labeled], size=32),
                               atol=0, rtol=0)
    torch.testing.assert_close(tokens, tok["tokens"], atol=0, rtol=0)
    tune = read_json(run_dir / "adapters/shared/tune.json")
    assert tune["class"] is None and tune["images"] == 4


def test_shared_adapter_samples_every_class(flow_cfg, flow_tiny_base):
    """Every class's images come from the one shared adapter: re-sampled here from that
    adapter they match pixel for pixel, and the bare base would give other pixels."""
    from pipeline.data.images import from_model_space
    from pipeline.data.shards import read_shards

    cfg = with_overrides(flow_cfg, {"adapter.scope": "shared"})
    run_dir = init_run_dir(cfg)
    stages.run_all(run_dir, cfg, until="tune")
    # Two tuning steps barely move the zero-initialised output layers, so another adapter (or
    # none) would give the same pixels. Make the shared adapter clearly conditional on disk.
    weights = run_dir / "adapters/shared/adapter_model.safetensors"
    state = load_file(weights)
    gen = torch.Generator().manual_seed(0)
    for k in state:
        if k.endswith(("to_out.weight", "proj_out.weight")):
            state[k] = 0.3 * torch.randn(state[k].shape, generator=gen)
    save_file(state, weights, metadata={"format": "pt"})
    rerecord_unit(weights.parent)
    stages.run_all(run_dir, cfg, until="shards")

    s = cfg.sampling
    tok = load_tokens(run_dir)
    sched = DDPMScheduler.from_pretrained(flow_tiny_base / "scheduler")

    def base():
        return UNet2DModel.from_pretrained(flow_tiny_base / "unet", low_cpu_mem_usage=False).eval()

    shared = ANLUNet.from_pretrained(base(), run_dir / "adapters/shared")
    bare = attach_anl(base(), ANLConfig(token_dim=tok["token_dim"], num_tokens=tok["num_tokens"],
                                        context_dim=32, head_dim=16))  # identity blocks

    def sample(model, row):
        x = masked_sample(model, sched, tok["tokens"][row:row + 1], s.per_condition,
                          mask_ratio=s.mask_ratios[0], guidance=s.guidance,
                          num_inference_steps=s.num_inference_steps, seed=s.seed,
                          condition_ids=tok["index"][row:row + 1].numpy(), progress=False)
        return from_model_space(x, shape=(28, 28)).astype(int)

    for c in (0, 1):
        rows = torch.nonzero(tok["labels"] == c).flatten().tolist()
        assert len(rows) == 2
        for ci, row in enumerate(rows):  # chunk_conditions=1: one part file per condition
            stored = np.load(run_dir / f"samples/class-{c:02d}" / part_name(0, ci))
            assert stored["condition_id"].tolist() == [int(tok["index"][row])] * s.per_condition
            images = stored["images"].astype(int)
            # 1 level: uint8 rounding of float sums that may differ in the last bit.
            np.testing.assert_allclose(images, sample(shared, row), atol=1, rtol=0)
            assert np.abs(images - sample(bare, row)).max() > 20
    # Provenance: every synthetic row of both classes names the shared adapter.
    frame = read_shards(run_dir / "shards").frame
    assert set(frame["adapter_id"]) == {"shared"}
    assert frame.groupby("label").size().to_dict() == {0: 4, 1: 4}


# --------------------------------------------------------------------------- pretrain stage

TINY_PRETRAIN = {"block_out_channels": [8, 16], "attention_levels": [], "steps": 2,
                 "attention_head_dim": 8,  # the mid block always has attention (16 wide)
                 "batch_size": 4, "warmup_steps": 0, "checkpoint_every": 2, "sample_steps": 1}


def test_pretrain_stage_builds_the_base_the_tune_stage_uses(flow_cfg, flow_tiny_base):
    cfg = with_overrides(flow_cfg, {"pretrain": TINY_PRETRAIN})
    run_dir = init_run_dir(cfg)
    records = stages.run_all(run_dir, cfg, until="tune")
    assert records["pretrain"]["key"] == stage_keys(cfg)["pretrain"]
    assert records["pretrain"]["outputs"] == {"base": "base"}

    # Trained on the unlabeled pool only: the 20 training images minus the 4 labeled ones.
    ds = dataset_for(cfg)
    labeled = load_tokens(run_dir)["index"].numpy()
    pool = np.setdiff1d(np.arange(len(ds.train_labels)), labeled)
    training = read_json(run_dir / "base/training.json")
    assert training["steps"] == 2 and training["num_images"] == 16 == len(pool)
    assert training["data_sha256"] == _sha256_pool(ds.train_images[pool])
    assert training["config"]["block_out_channels"] == [8, 16]
    assert training["config"]["sample_size"] == cfg.image_size

    # Both adapters sit on the pretrained base, not on base_model (which is still set).
    pretrained = UNet2DModel.from_pretrained(run_dir / "base/unet", torch_dtype=torch.float32,
                                             low_cpu_mem_usage=False)
    assert list(pretrained.config.block_out_channels) == [8, 16]
    given = UNet2DModel.from_pretrained(flow_tiny_base / "unet", low_cpu_mem_usage=False)
    assert base_fingerprint(pretrained) != base_fingerprint(given)
    for c in (0, 1):
        saved = json.loads((run_dir / f"adapters/class-{c:02d}/adapter_config.json").read_text())
        assert saved["base_fingerprint"] == base_fingerprint(pretrained), c
        assert saved["base_model"] == str(run_dir / "base/unet"), c  # where it was loaded from
        assert saved["block_channels"]["mid"] == 16  # the pretrained base's widths

    # A rerun of the same config does nothing: every stage skipped, no file touched.
    before = _mtimes(run_dir)
    again = stages.run_all(run_dir, cfg, until="tune")
    assert set(again) == {"split", "pretrain", "fit", "encode", "tune"}
    assert all(r.get("skipped") for r in again.values())
    assert _mtimes(run_dir) == before


def test_pretrain_key_follows_its_config_and_replaces_base_model(flow_cfg):
    cfg = with_overrides(flow_cfg, {"pretrain": TINY_PRETRAIN})
    keys = stage_keys(cfg)
    assert stage_keys(flow_cfg)["pretrain"] is None  # no pretrain section: no stage
    assert run_pretrain(init_run_dir(flow_cfg), flow_cfg) is None
    for change in ({"pretrain.steps": 3}, {"pretrain.block_out_channels": [8, 8]},
                   {"pretrain.seed": 1}, {"image_size": 64}):
        other = stage_keys(with_overrides(cfg, change))
        assert other["pretrain"] != keys["pretrain"], change
        assert other["tune"] != keys["tune"], change  # a new base means new adapters
    # Settings the pretrain stage does not read leave its key alone (the tune key follows
    # its own settings).
    same = stage_keys(with_overrides(cfg, {"sampling.guidance": 3.0,
                                                  "tuning.steps": 5}))
    assert same["pretrain"] == keys["pretrain"] and same["tune"] != keys["tune"]
    # With a pretrained base, base_model is not read: not even a missing one changes a key.
    moved = stage_keys(with_overrides(cfg, {"base_model": "/no/such/base"}))
    assert moved["tune"] == keys["tune"]


# --------------------------------------------------------------------------- prediction types


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_training_target_by_hand(kind):
    from anl_core.tuning import training_target

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    a = torch.tensor(_alpha_bar()[t.numpy()], dtype=torch.float32)[:, None, None, None]
    hand = {"epsilon": eps,
            "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0,
            "sample": x0}[kind]
    torch.testing.assert_close(training_target(sched, x0, eps, t), hand, atol=2e-6, rtol=1e-5)


def test_unknown_prediction_type_is_refused():
    from anl_core.tuning import training_target

    sched = DDPMScheduler(num_train_timesteps=10)
    sched.register_to_config(prediction_type="flow")
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="flow"):
        training_target(sched, x, x, torch.tensor([1]))


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_tuning_and_denoising_losses_regress_onto_the_target(kind, monkeypatch):
    """The first tuning loss and the fixed-draw loss are the MSE between the model's output and
    the hand-computed target of the very (x0, noise, t) the scheduler noised."""
    from anl_core.tuning import TuneConfig, denoising_loss, tune_adapter

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)
    seen = []
    real_add_noise = sched.add_noise

    def recording_add_noise(x0, noise, t):
        seen.append((x0.clone(), noise.clone(), t.clone()))
        return real_add_noise(x0, noise, t)

    monkeypatch.setattr(sched, "add_noise", recording_add_noise)
    unet = anl_make_unet(seed=1)
    model = attach_anl(unet, ANLConfig(token_dim=8, num_tokens=4, context_dim=16, head_dim=8))
    g = torch.Generator().manual_seed(2)
    images = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    tokens = torch.randn(4, 4, 8, generator=g)

    def hand_loss(x0, noise, t):
        a = torch.tensor(_alpha_bar()[t.numpy()], dtype=torch.float32)[:, None, None, None]
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if kind == "v_prediction" else x0
        with torch.no_grad():  # a fresh adapter is the identity: the bare U-Net's output
            pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample
        return F.mse_loss(pred, target).item(), F.mse_loss(pred, noise).item()

    got = denoising_loss(model, sched, images, tokens, draws=1, adapter=False)
    want, as_epsilon = hand_loss(*seen.pop())
    assert got == pytest.approx(want, rel=1e-4)
    assert abs(as_epsilon - want) > 0.05 * want  # the target matters at this precision

    result = tune_adapter(model, sched, images, tokens,
                          TuneConfig(steps=1, batch_size=4, cond_dropout=0.0, hflip=False,
                                     use_ema=False), progress=False)
    want, as_epsilon = hand_loss(*seen.pop())
    assert result.loss_history[0] == pytest.approx(want, rel=1e-4)
    assert abs(as_epsilon - want) > 0.05 * want
    assert not seen


def _conditional(seed: int):
    """A tiny base plus an adapter whose zero-initialised output layers are set at random,
    so the conditional and the null prediction differ (guidance has an effect)."""
    model = attach_anl(anl_make_unet(seed=4), ANLConfig(token_dim=8, num_tokens=4,
                                                        context_dim=16, head_dim=8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("to_out.weight", "proj_out.weight")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def _hand_ddim(model, tokens, k, guidance, steps, seed, kind):
    """Deterministic DDIM (eta 0) from its formulas on DDPM's linear schedule: 'leading'
    timesteps t_i = i * 1000 // steps, x0 clipped to [-1, 1], alpha_bar = 1 after the last
    step. ``kind`` says how the model output is read."""
    abar = _alpha_bar()
    ratio = 1000 // steps
    gens = [torch.Generator().manual_seed(image_seed(seed, i, j))
            for i in range(len(tokens)) for j in range(k)]
    x = torch.cat([torch.randn((1, 1, 8, 8), generator=g) for g in gens])
    cond = model.context(tokens.repeat_interleave(k, dim=0))  # mask ratio 0: every token
    null = model.context(None, batch_size=len(x))
    for t in reversed(range(0, steps * ratio, ratio)):
        a = float(abar[t])
        a_prev = float(abar[t - ratio]) if t - ratio >= 0 else 1.0
        with torch.no_grad():
            out_null = model(x, torch.tensor(t), context=null)
            out = out_null + guidance * (model(x, torch.tensor(t), context=cond) - out_null)
        if kind == "v_prediction":
            x0 = a ** 0.5 * x - (1 - a) ** 0.5 * out
            eps = a ** 0.5 * out + (1 - a) ** 0.5 * x
        elif kind == "sample":
            x0 = out
            eps = (x - a ** 0.5 * x0) / (1 - a) ** 0.5
        else:
            x0 = (x - (1 - a) ** 0.5 * out) / a ** 0.5
            eps = out
        x = a_prev ** 0.5 * x0.clamp(-1, 1) + (1 - a_prev) ** 0.5 * eps
    return x.clamp(-1, 1)


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_masked_sampling_reads_the_prediction_type(kind):
    model = _conditional(seed=1)
    base = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)
    tokens = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(3))
    ours = masked_sample(model, base, tokens, num_per_condition=2, mask_ratio=0.0, guidance=2.0,
                         num_inference_steps=3, seed=5, progress=False)
    hand = _hand_ddim(model, tokens, 2, 2.0, 3, seed=5, kind=kind)
    torch.testing.assert_close(ours, hand, atol=1e-4, rtol=0)
    # Read as noise, the same outputs give other images: the check above can tell.
    assert (_hand_ddim(model, tokens, 2, 2.0, 3, seed=5, kind="epsilon") - hand).abs().max() > 0.1


def test_stage_base_keeps_its_saved_prediction_type(flow_cfg, flow_tiny_base, tmp_path):
    """load_run_base, which the tune and sample stages both call, keeps the scheduler saved with
    the base (here v-prediction on another schedule) instead of a default epsilon DDPM."""
    import shutil

    base = tmp_path / "v-base"
    shutil.copytree(flow_tiny_base / "unet", base / "unet")
    DDPMScheduler(num_train_timesteps=500, prediction_type="v_prediction",
                  beta_schedule="squaredcos_cap_v2").save_pretrained(base / "scheduler")
    cfg = with_overrides(flow_cfg, {"base_model": str(base)})
    _, sched = load_run_base(init_run_dir(cfg), cfg, "cpu")
    assert sched.config.prediction_type == "v_prediction"
    assert sched.config.num_train_timesteps == 500
    assert sched.config.beta_schedule == "squaredcos_cap_v2"


# --------------------------------------------------------------------------- augment pretrain


def test_augment_pretrain_command_writes_a_diffusers_base(flow_image_folder, tmp_path, capsys):
    from flows.cli import main
    from pipeline.report.model_card import training_pool

    out = tmp_path / "base"
    argv = ["pretrain", "--dataset", "image-folder", "--root", str(flow_image_folder),
            "--labels-per-class", "3", "--split-seed", "1", "--out", str(out),
            "--set", "block_out_channels=[8, 16]",  # a value with a space: quoted in the record
            "--set", "attention_levels=[1]", "--set", "attention_head_dim=8",
            "--set", "sample_size=16", "--set", "num_train_timesteps=200",
            "--set", "beta_schedule=squaredcos_cap_v2", "--set", "steps=3",
            "--set", "batch_size=4", "--set", "warmup_steps=0", "--set", "checkpoint_every=2",
            "--set", "sample_steps=2", "--threads", "1", "--no-progress"]
    assert main(argv) == 0
    assert f"base model written to {out}" in capsys.readouterr().out

    # diffusers loads it as asked: architecture, schedule, and the whole pipeline.
    unet = UNet2DModel.from_pretrained(out / "unet")
    assert unet.config.sample_size == 16 and unet.config.in_channels == 1
    assert list(unet.config.block_out_channels) == [8, 16]
    assert list(unet.config.down_block_types) == ["DownBlock2D", "AttnDownBlock2D"]
    assert list(unet.config.up_block_types) == ["AttnUpBlock2D", "UpBlock2D"]
    sched = DDPMScheduler.from_pretrained(out / "scheduler")
    assert sched.config.num_train_timesteps == 200
    assert sched.config.beta_schedule == "squaredcos_cap_v2"
    pipe = DDPMPipeline.from_pretrained(out)
    assert pipe.unet.config.sample_size == 16
    # The exported weights are the EMA of training (stored fp16), not the last raw step.
    ckpt = torch.load(out / "checkpoints/last.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 3
    saved = [p.detach() for p in unet.parameters()]
    ema = [p.half().float() for p in ckpt["ema"]["shadow_params"]]
    raw = [p.half().float() for p in ckpt["unet"].values()]
    assert len(saved) == len(ema) == len(raw)
    for s_, e in zip(saved, ema, strict=True):
        torch.testing.assert_close(s_, e, atol=0, rtol=0)
    assert any(not torch.equal(s_, r) for s_, r in zip(saved, raw, strict=True))

    # training.json records what was asked, and the pool it trained on: the training images
    # minus the 3 labeled per class (split seed 1), nothing else.
    training = read_json(out / "training.json")
    cfg = training["config"]
    assert (cfg["block_out_channels"], cfg["attention_levels"], cfg["sample_size"]) == \
        ([8, 16], [1], 16)
    assert (cfg["num_train_timesteps"], cfg["beta_schedule"], cfg["steps"], cfg["batch_size"]) \
        == (200, "squaredcos_cap_v2", 3, 4)
    assert training["steps"] == 3 and len(training["loss_every_50"]) == 1
    from pipeline.data.datasets import load_dataset
    from pipeline.data.splits import make_split

    ds = load_dataset("image-folder", flow_image_folder)
    labeled = make_split(ds.train_labels, 3, seed=1).labeled_idx
    assert len(labeled) == 6
    pool = np.setdiff1d(np.arange(len(ds.train_labels)), labeled)
    assert training["num_images"] == 14 == len(pool)
    assert training["data_sha256"] == _sha256_pool(ds.train_images[pool])
    weights = (out / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    assert training["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    # The command is recorded exactly (for people), and the pool as a record (for the model
    # card, which rebuilds the pool from it and checks its hash).
    assert training["command"] == "augment pretrain " + shlex.join(argv[1:])
    assert training_pool(training) == {"dataset": "image-folder", "root": str(flow_image_folder),
                                       "labels_per_class": 3, "split_seed": 1}

    # Rerun: the same arguments reuse the model; other values are refused, naming the change
    # (not a silent return of the model trained with steps=3).
    record = (out / "training.json").read_bytes()
    assert main(argv) == 0 and (out / "training.json").read_bytes() == record
    capsys.readouterr()
    assert main([*argv, "--set", "steps=4"]) == 2
    err = capsys.readouterr().err
    assert "trained differently (steps: 3 -> 4)" in err and "another --out" in err
    assert (out / "training.json").read_bytes() == record


def test_a_pretrain_checkpoint_resumes_with_a_weights_only_load(tmp_path, monkeypatch):
    """The resume checkpoint (U-Net, EMA, optimiser, schedule, generator, losses) is tensors
    and plain numbers: read back with weights_only=True, so the file can never run code."""

    from pipeline.generate.pretrain import pretrain
    from pipeline.generate.pretrain_config import PretrainConfig

    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
    cfg = {**TINY_PRETRAIN, "sample_size": 8, "checkpoint_every": 1, "device": "cpu"}
    out = pretrain(images, tmp_path / "base", PretrainConfig(**cfg), progress=False, fp16=False)
    (out / "training.json").unlink()  # as if killed after its last checkpoint
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    pretrain(images, out, PretrainConfig(**{**cfg, "steps": 3}), progress=False, fp16=False)
    assert loads and all(k.get("weights_only") is True for k in loads)
    assert json.loads((out / "training.json").read_text())["steps"] == 3  # 2 resumed + 1
