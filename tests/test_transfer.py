"""Few-shot generative transfer (pipeline.transfer, the `transfer` flow, `augment transfer`).

A tiny grey 32x32 base (flow_tiny_base) adapted to 24 real Fashion-MNIST trousers written as a
folder of PNGs: every mode runs end to end in seconds.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.models import load_base_unet, resolve_base_model
from pipeline.runs import read_json
from pipeline.transfer import config as tconfig
from pipeline.transfer import metrics as tmetrics
from pipeline.transfer import model as tmodel
from pipeline.transfer import run as trun
from pipeline.transfer import steps as tsteps
from pipeline.transfer import target as ttarget

SHOTS, POOL = 4, 24


@pytest.fixture(scope="module")
def trousers(tmp_path_factory, data_fashion_mnist):
    """A folder of 24 real Fashion-MNIST trousers (28x28 grey PNGs)."""
    ds = data_fashion_mnist
    folder = tmp_path_factory.mktemp("trousers")
    for i, idx in enumerate(np.flatnonzero(ds.train_labels == 1)[:POOL]):
        Image.fromarray(ds.train_images[idx, ..., 0]).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture()
def cfg(tmp_path, flow_tiny_base, trousers):
    """Seconds per run: 3 steps, 2 DDIM steps, a narrow adapter; 20 samples, 20 held out."""
    return tconfig.transfer_config({
        "base_model": str(flow_tiny_base), "target": str(trousers), "shots": SHOTS, "steps": 3,
        "batch_size": 4, "samples": POOL - SHOTS, "num_inference_steps": 2, "context_dim": 32,
        "head_dim": 16, "kid_subsets": 3, "runs_dir": str(tmp_path / "runs"), "progress": False,
        "device": "cpu"})


def _shots(config):
    pool = ttarget.target_pool(config, 1)
    return pool[ttarget.draw_shots(len(pool), config.shots, config.max_held_out, config.seed)[0]]


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- what each mode trains


def test_anl_trains_only_the_adapter_and_leaves_every_base_weight_bit_identical(cfg):
    from anl_core.encoders import load_encoder

    unet, scheduler = load_base_unet(resolve_base_model(cfg.base_model), "cpu")
    before = _state(unet)
    encoder = load_encoder(cfg.encoder, device="cpu")
    shots = _shots(cfg)
    model = tmodel.build_model(cfg, unet, encoder)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    tmodel.fit(cfg, model, scheduler, shots, tmodel.shot_tokens(encoder, shots))
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    changed = {n for n, p in model.named_parameters() if not torch.equal(start[n], p)}
    adapter = {f"adapter.{n}" for n, _ in model.adapter.named_parameters()}
    assert changed and changed <= adapter
    # The count the run records is the adapter's size, and smaller than the base.
    count = tmodel.trainable_count(model)
    assert count == sum(p.numel() for n, p in model.named_parameters() if n in adapter)
    assert 0 < count < sum(v.numel() for v in before.values())


def test_anl_run_records_the_saved_adapters_parameter_count(cfg):
    from safetensors.numpy import load_file

    run = trun.run_transfer(cfg)
    saved = load_file(str(run / "model" / "adapter_model.safetensors"))
    assert {k.split(".")[0] for k in saved} == {"condition", "blocks"}  # not the base again
    metrics = read_json(run / "eval" / "metrics.json")
    assert metrics["trained_params"] == sum(v.size for v in saved.values())
    assert read_json(run / "stages" / "tune.json")["metrics"]["trained_params"] == \
        metrics["trained_params"]


def test_full_fine_tuning_changes_the_base_weights(cfg):
    config = cfg.model_copy(update={"mode": "full"})
    unet, scheduler = load_base_unet(resolve_base_model(config.base_model), "cpu")
    before = _state(unet)
    model = tmodel.build_model(config, unet)
    tmodel.fit(config, model, scheduler, _shots(config), None)
    changed = [k for k, v in unet.state_dict().items() if not torch.equal(before[k], v)]
    assert len(changed) > 0.9 * len(before)  # all but what got no gradient in 3 steps
    assert tmodel.trainable_count(model) == sum(v.numel() for v in before.values())


def test_scratch_starts_from_fresh_weights_of_the_base_config(cfg):
    config = cfg.model_copy(update={"mode": "scratch"})
    unet, _ = load_base_unet(resolve_base_model(config.base_model), "cpu")
    net = tmodel.build_model(config, unet).net
    assert dict(net.config) == dict(unet.config)
    base, fresh = unet.state_dict(), net.state_dict()
    assert {k: v.shape for k, v in base.items()} == {k: v.shape for k, v in fresh.items()}
    # Every tensor a random init draws (not a constant like a norm's ones) is new.
    drawn = [k for k, v in base.items() if v.numel() > 1 and v.std() > 0]
    assert drawn and all(not torch.equal(base[k], fresh[k]) for k in drawn)
    again = tmodel.build_model(config, unet).net.state_dict()  # seeded: the same fresh weights
    assert all(torch.equal(fresh[k], again[k]) for k in fresh)


# --------------------------------------------------------------------------- runs and their outputs


@pytest.mark.parametrize("mode", ["anl", "full", "scratch"])
def test_each_mode_writes_readable_shards_metrics_and_a_report(cfg, mode):
    config = cfg.model_copy(update={"mode": mode, "samples": 6})
    run = trun.run_transfer(config)
    frame = pd.concat(pd.read_parquet(p) for p in sorted((run / "shards").glob("*.parquet")))
    assert len(frame) == 6
    assert set(frame["label"]) == {0} and set(frame["label_name"]) == {ttarget.target_name(config)}
    images = [np.asarray(Image.open(io.BytesIO(b["bytes"]))) for b in frame["image"]]
    assert {im.shape for im in images} == {(28, 28)}
    shot_index = set(trun.load_target(run)["shot_index"].tolist())
    if mode == "anl":  # 6 samples over 4 shots: one of each shot before a second of any
        assert set(frame["condition_id"]) == shot_index
        assert sorted(frame["condition_id"].value_counts()) == [1, 1, 2, 2]
        assert set(frame["mask_ratio"]) == {config.mask_ratio}
    else:
        assert frame["condition_id"].isna().all() and frame["mask_ratio"].isna().all()
    metrics = read_json(run / "eval" / "metrics.json")
    assert (metrics["n_samples"], metrics["n_shots"], metrics["n_held_out"]) == (6, 4, 20)
    html = (run / "report.html").read_text()
    assert 'src="data:image/png;base64,' in html and 'src="http' not in html
    assert f"{metrics['trained_params']:,}" in html and config.mode in html
    assert "![shots and samples](grid.png)" in (run / "report.md").read_text()
    assert (run / "grid.png").read_bytes().startswith(b"\x89PNG")


def test_fewer_samples_than_shots_take_one_each_of_the_first_shots(cfg):
    run = trun.run_transfer(cfg.model_copy(update={"samples": 3}))
    frame = pd.read_parquet(next((run / "shards").glob("*.parquet")))
    assert list(frame["condition_id"]) == list(trun.load_target(run)["shot_index"][:3])


def test_unconditional_anl_samples_through_the_null_token_only(cfg):
    cfg = cfg.model_copy(update={"steps": 20})  # enough for the adapter to read its tokens
    run = trun.run_transfer(cfg.model_copy(update={"samples": 4}))
    model, scheduler, tokens = trun.load_trained(run, cfg, "cpu")
    ids = trun.load_target(run)["shot_index"]
    other = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1))
    for unconditional, same in ((True, True), (False, False)):
        config = cfg.model_copy(update={"samples": 4, "unconditional": unconditional})
        a, _ = tmodel.generate(config, model, scheduler, (28, 28), tokens, ids)
        b, _ = tmodel.generate(config, model, scheduler, (28, 28), other, ids)
        assert np.array_equal(a, b) == same  # the shots' tokens matter only when conditioned


def _records(run):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (run / "stages").iterdir()}


def test_rerun_skips_every_step_and_a_changed_sample_count_reruns_only_sampling(
        cfg, monkeypatch):
    run = trun.run_transfer(cfg)
    before = _records(run)
    assert sorted(before) == [f"{s}.json" for s in sorted(tsteps.STEPS)]

    def never(*a, **k):
        raise AssertionError("a finished step ran again")

    for name in ("fit", "generate", "transfer_metrics"):
        monkeypatch.setattr(trun, name, never)
    assert trun.run_transfer(cfg) == run
    assert _records(run) == before
    monkeypatch.undo()
    monkeypatch.setattr(trun, "fit", never)  # the model is reused, not trained again
    other = trun.run_transfer(cfg.model_copy(update={"samples": 5}))
    assert other != run and _records(run) == before
    for step in ("target", "tune"):
        rec = read_json(other / "stages" / f"{step}.json")
        assert rec.pop("adopted_from") == run.name
        assert rec == read_json(run / "stages" / f"{step}.json")
    for step in ("sample", "evaluate", "report"):
        rec = read_json(other / "stages" / f"{step}.json")
        assert "adopted_from" not in rec and rec["key"] != read_json(
            run / "stages" / f"{step}.json")["key"]
    assert read_json(other / "eval" / "metrics.json")["n_samples"] == 5
    weights = "model/adapter_model.safetensors"
    assert (other / weights).stat().st_ino == (run / weights).stat().st_ino  # linked


def test_step_keys_follow_the_parts_each_step_reads(cfg):
    keys = tsteps.step_keys(cfg)
    guided = tsteps.step_keys(cfg.model_copy(update={"guidance": 3.0}))
    assert [s for s in tsteps.STEPS if keys[s] != guided[s]] == ["sample", "evaluate", "report"]
    lr = tsteps.step_keys(cfg.model_copy(update={"lr": 1e-4}))
    assert [s for s in tsteps.STEPS if keys[s] != lr[s]] == ["tune", "sample", "evaluate", "report"]
    # Sampling settings that full fine-tuning does not read leave its keys alone.
    full = cfg.model_copy(update={"mode": "full"})
    assert tsteps.step_keys(full) == tsteps.step_keys(full.model_copy(update={"guidance": 3.0}))
    # Runtime fields change neither the keys nor the run directory.
    moved = cfg.model_copy(update={"progress": True, "device": "auto"})
    assert tsteps.step_keys(moved) == keys and trun.transfer_run_dir(moved) == trun.transfer_run_dir(cfg)


# --------------------------------------------------------------------------- evaluation figures


def _nearest_rmse(queries, pool):
    q = queries.reshape(len(queries), -1).astype(np.float64) / 255
    p = pool.reshape(len(pool), -1).astype(np.float64) / 255
    return np.array([np.sqrt(((p - x) ** 2).mean(axis=1)).min() for x in q])


def test_near_copy_share_counts_planted_copies(cfg):
    target = ttarget.target_pool(cfg, 1)
    shot_idx, held_idx = ttarget.draw_shots(len(target), SHOTS, 500, 0)
    shots, held = target[shot_idx], target[held_idx]
    assert tmetrics.near_copy_share(np.repeat(shots, 3, axis=0), shots, held)[0] == 1.0
    # Three copies and five real held-out images against a threshold computed by hand: the
    # 5th percentile by linear interpolation between order statistics.
    d = np.sort(_nearest_rmse(held, shots))
    pos = 0.05 * (len(d) - 1)
    threshold = d[int(pos)] + (pos - int(pos)) * (d[int(pos) + 1] - d[int(pos)])
    mixed = np.concatenate([shots[:3], held[:5]])
    share, got = tmetrics.near_copy_share(mixed, shots, held)
    assert got == pytest.approx(threshold, rel=1e-5)
    assert share == (3 + (_nearest_rmse(held[:5], shots) < threshold).sum()) / 8


def test_kid_and_diversity_match_an_independent_computation(cfg):
    """The run's figures from the shards and held-out images it wrote, recomputed another way:
    images decoded with pandas + Pillow, the unbiased MMD^2 written out, sklearn's distances."""
    from sklearn.metrics.pairwise import cosine_distances

    from anl_core.encoders import load_encoder
    from pipeline.data.images import to_model_space

    run = trun.run_transfer(cfg)  # 20 samples, 20 held out: one KID subset, all of both
    frame = pd.concat(pd.read_parquet(p) for p in sorted((run / "shards").glob("*.parquet")))
    samples = np.stack([np.asarray(Image.open(io.BytesIO(b["bytes"]))) for b in frame["image"]])
    held = trun.load_target(run)["held_out"]
    encoder = load_encoder(cfg.encoder, device="cpu")

    def feats(x):
        return encoder.encode(to_model_space(x.reshape(len(x), 28, 28, 1))).mean(1).double()

    a, b = feats(samples), feats(held)
    n = len(a)

    def kernel(x, y):
        return (x @ y.T / x.shape[1] + 1) ** 3

    def off_diagonal_mean(m):
        return (m.sum() - m.diagonal().sum()) / (n * (n - 1))

    mmd = float(off_diagonal_mean(kernel(a, a)) + off_diagonal_mean(kernel(b, b))
                - 2 * kernel(a, b).mean())
    metrics = read_json(run / "eval" / "metrics.json")
    assert metrics["kid"] == pytest.approx(mmd, rel=1e-4, abs=1e-6)
    assert metrics["kid_std"] == 0.0
    for key, f in (("diversity_samples", a), ("diversity_real", b)):
        d = cosine_distances(f.numpy())
        assert metrics[key] == pytest.approx(d.sum() / (n * (n - 1)), rel=1e-5)
    assert metrics["diversity_over_real"] == pytest.approx(
        metrics["diversity_samples"] / metrics["diversity_real"])


# --------------------------------------------------------------------------- targets and errors


def test_builtin_targets_and_a_registered_class_load_as_documented():
    from sklearn.datasets import load_digits

    mnist = ttarget.target_pool(tconfig.transfer_config({"target": "mnist-foolbox"}), 1)
    assert mnist.shape == (20, 28, 28, 1) and mnist.dtype == np.uint8
    digits = ttarget.target_pool(tconfig.transfer_config({"target": "sklearn-digits"}), 1)
    assert digits.shape == (1797, 28, 28, 1)
    # Upscaled into the centred 20x20 box, black around it, as MNIST centres its digits.
    assert digits[:, :4].max() == 0 and digits[:, 24:].max() == 0 and digits.max() == 255
    sevens = ttarget.target_pool(tconfig.transfer_config({"target": "sklearn-digits",
                                                "target_class": 7}), 3)
    assert len(sevens) == (load_digits().target == 7).sum() and sevens.shape[-1] == 3
    trousers = ttarget.target_pool(tconfig.transfer_config({"target": "fashion-mnist",
                                                  "target_class": "Trouser"}), 1)
    assert len(trousers) == 7000  # 6000 train + 1000 test
    # One seed: the 10 shots are among the 100, and both hold out the same images.
    s10, h10 = ttarget.draw_shots(1797, 10, 500, 0)
    s100, h100 = ttarget.draw_shots(1797, 100, 500, 0)
    assert set(s10) <= set(s100) and np.array_equal(h10, h100) and len(h10) == 500
    assert not set(s100) & set(h100)


@pytest.mark.parametrize("over, named", [
    ({"target": "/no/such/folder"}, "target='/no/such/folder': no such folder"),
    ({"shots": POOL - 1}, f"lower --shots to at most {POOL - 2}"),
    ({"mode": "lora"}, "mode='lora': Input should be 'anl', 'full' or 'scratch'"),
    ({"target": "sklearn-digits", "target_class": "12"}, "use one of 0, 1, 2"),
    ({"target_class": "3"}, "is a folder without classes"),
    ({"base_model": "/no/such/base"}, "base_model='/no/such/base'"),
    ({"not_a_field": 1}, "unknown parameter 'not_a_field'"),
])
def test_bad_inputs_are_named_errors_and_the_cli_exits_2(cfg, capsys, over, named):
    from flows.cli import main

    with pytest.raises(tconfig.TransferError) as err:
        trun.check_transfer(tconfig.transfer_config({**cfg.model_dump(), **over}))
    assert named in str(err.value)
    args = ["transfer", "--runs-dir", cfg.runs_dir]
    for key, value in {"base_model": cfg.base_model, "target": cfg.target, **over}.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 2
    assert named in capsys.readouterr().err
    assert not trun.resolve_path(cfg.runs_dir).exists()  # nothing written


@pytest.mark.slow  # the Prefect harness starts a temporary API (about 15 s)
def test_cli_runs_the_transfer_flow_and_writes_the_report(flow_prefect, cfg, capsys):
    from flows.cli import main

    rc = main(["transfer", "--base-model", cfg.base_model, "--target", cfg.target,
               "--shots", "4", "--mode", "full", "--steps", "2", "--samples", "6",
               "--set", "num_inference_steps=2", "--set", "device=cpu",
               "--runs-dir", cfg.runs_dir, "--no-progress"])
    assert rc == 0
    config = tconfig.transfer_config({  # what the flags and --set say, the rest the defaults
        "base_model": cfg.base_model, "target": cfg.target, "shots": 4, "mode": "full",
        "steps": 2, "samples": 6, "num_inference_steps": 2, "device": "cpu",
        "runs_dir": cfg.runs_dir, "progress": False})
    report = trun.transfer_run_dir(config) / "report.html"
    assert report.is_file() and f"report: {report}" in capsys.readouterr().out
    assert all(read_json(report.parent / "stages" / f"{s}.json") for s in tsteps.STEPS)
