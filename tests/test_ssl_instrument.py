"""The SSL instrument: EMA models scored with BN statistics recomputed for their own
weights, the CPU bf16 fast path, the short-budget recipe (warm-up, cosine to 0, mean of the
last evaluations), the replay and doubled arms, and the control rows kept out of the pool."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from anl_core.precision import cpu_has_native_bf16, uses_bf16
from pipeline.data.splits import make_split
from pipeline.ssl import SSLConfig, build_net, run_arm
from pipeline.ssl.algorithms import get_algorithm
from pipeline.ssl.arms import CHECKPOINT, METRICS, build_train_data, predict_probs
from pipeline.ssl.evaluate import recalibrate_bn
from pipeline.ssl.randaugment import to_unit
from pipeline.ssl.schedules import eval_steps, lr_schedule
from pipeline.ssl.trainer import Trainer

pytestmark = pytest.mark.usefixtures("ssl_one_thread")


def tiny(**kw) -> SSLConfig:
    base = {"net": "cnn-tiny", "steps": 30, "batch_size": 16, "mu": 1, "eval_every": 10,
            "checkpoint_every": 10, "seed": 0, "device": "cpu", "bn_calibration": 200}
    return SSLConfig(**{**base, **kw})


def trainer_for(ds, split, cfg, tmp_path, synthetic=None):
    data = build_train_data(ds, split, cfg, torch.device("cpu"), synthetic)
    net = build_net(cfg.net, 10, ds.image_shape, [0.3], [0.3], cfg.seed, width=cfg.net_width)
    return Trainer(net, get_algorithm("fixmatch")(cfg, 10), data, cfg, torch.device("cpu"),
                   tmp_path / "ckpt.pt", "x", False)


# --------------------------------------------------------------------------- BN statistics


def test_ema_bn_statistics_are_recomputed_for_the_ema_weights(ssl_fm_subset, tmp_path):
    """After training, the EMA model's first BN holds the mean and variance of its own first
    conv over the calibration images (one batch of 200: exact), not the raw model's running
    buffers; and corrupting the raw model's buffers changes no EMA evaluation."""
    ds = ssl_fm_subset
    split = make_split(ds.train_labels, 4, seed=0)
    cfg = tiny(amp=False)
    t = trainer_for(ds, split, cfg, tmp_path)
    t.fit()
    calib = t.calibration_images()
    assert len(calib) == 200
    # The calibration images: real training images (labeled + unlabeled), never validation.
    assert set(t.data.calib_idx.tolist()) <= set(split.train_idx.tolist())
    before = t.evaluate_ema("test")
    with torch.no_grad():
        x = t.ema.normalize(to_unit(calib))
        y = t.ema.features[0](x)
    bn = t.ema.features[1]
    torch.testing.assert_close(bn.running_mean, y.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, y.var(dim=(0, 2, 3), unbiased=True),
                               rtol=1e-3, atol=1e-5)
    raw = t.model.features[1]
    assert not torch.allclose(bn.running_mean, raw.running_mean, atol=1e-3)
    assert bn.momentum == raw.momentum == 0.1  # restored after the cumulative average
    # The copied-buffer behaviour would make the EMA evaluation depend on these.
    with torch.no_grad():
        for m in t.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(5.0)
                m.running_var.mul_(9.0)
    t.step += 1  # as after another step: the EMA is recalibrated again
    t._update_ema()
    after = t.evaluate_ema("test")
    t2 = trainer_for(ds, split, cfg, tmp_path)  # the same run, its raw buffers untouched
    t2.fit()
    t2.step += 1
    t2._update_ema()
    assert after.top1_error == t2.evaluate_ema("test").top1_error
    assert 0.0 <= before.top1_error <= 1.0


def test_recalibrate_bn_is_a_plain_average_and_keeps_weights():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3))
    images = torch.randint(0, 256, (300, 8, 8, 1), dtype=torch.uint8)
    weights = [p.clone() for p in net.parameters()]
    assert recalibrate_bn(net, images, batch_size=100) == 1
    with torch.no_grad():
        means = [net[0](to_unit(images[i:i + 100])).mean(dim=(0, 2, 3)) for i in (0, 100, 200)]
    torch.testing.assert_close(net[1].running_mean, sum(means) / 3, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters(), strict=True))
    assert net[1].momentum == 0.3 and net.training


def test_finished_arm_loads_with_its_recalibrated_statistics(ssl_fm_subset, tmp_path):
    """predict_probs (round 2's pseudo-labels) gives the figures the arm's last test point was
    measured with: the saved EMA has BN statistics recomputed at the last step."""
    ds = ssl_fm_subset
    split = make_split(ds.train_labels, 4, seed=0)
    cfg = tiny(steps=20)  # bf16 where the CPU has it: predict_probs must follow the trainer
    m = json.loads(run_arm("baseline", ds, split, tmp_path / "arm", cfg,
                           progress=False).read_text())
    probs = predict_probs(tmp_path / "arm", ds, ds.test_images)
    err = float((probs.argmax(1) != ds.test_labels).mean())
    assert err == pytest.approx(m["last_top1_error"], abs=1e-9)
    state = torch.load(tmp_path / "arm" / CHECKPOINT, weights_only=True)
    assert state["ema_calibrated_step"] == state["step"] == 20


# --------------------------------------------------------------------------- CPU fast path


def test_cpu_bf16_is_detected_and_can_be_turned_off(monkeypatch):
    from anl_core import precision

    assert not uses_bf16("cpu", True, cpu=False)  # the other callers stay fp32 on the CPU
    assert not uses_bf16("cpu", False, cpu=True)
    assert uses_bf16("cpu", True, cpu=True) == cpu_has_native_bf16()
    precision.cpu_has_native_bf16.cache_clear()
    monkeypatch.setenv(precision.CPU_BF16_ENV, "0")
    try:
        assert not precision.cpu_has_native_bf16()
    finally:
        precision.cpu_has_native_bf16.cache_clear()


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_bf16_channels_last_training_agrees_with_fp32(ssl_fm_subset, tmp_path):
    """The same tiny FixMatch run in fp32 and in bf16 autocast + channels_last on the CPU:
    the first step's loss agrees within 2% and the final errors within 5 points (the stated
    tolerance: bf16 rounds activations to 8 bits of mantissa, and 60 steps amplify it)."""
    ds = ssl_fm_subset
    split = make_split(ds.train_labels, 4, seed=0, val_per_class=20)
    out = {}
    for amp in (False, True):
        cfg = tiny(steps=60, eval_every=20, amp=amp, channels_last=amp)
        t = trainer_for(ds, split, cfg, tmp_path / str(amp))
        assert t.amp == amp and t.channels_last == amp
        first = t.train_step(t.sample_batch())
        t.fit()
        out[amp] = (float(first["loss"]), t.final_result()[1])
    assert out[True][0] == pytest.approx(out[False][0], rel=0.02)
    assert abs(out[True][1] - out[False][1]) <= 0.05, out


def test_net_width_sets_the_cnn_width_only():
    small = build_net("cnn-small", 10, (28, 28, 1), [0.5], [0.5], 0, width=16)
    assert small.fc.in_features == 64
    assert build_net("cnn-small", 10, (28, 28, 1), [0.5], [0.5], 0).fc.in_features == 128
    with pytest.raises(ValueError, match="net_width"):
        build_net("wrn-28-2", 10, (32, 32, 3), [0.5] * 3, [0.5] * 3, 0, width=16)
    with pytest.raises(ValidationError, match="net_width"):
        SSLConfig(net_width=0)


# --------------------------------------------------------------------------- recipe


def test_warmup_cosine_schedule_and_recipe():
    cfg = SSLConfig(steps=1000, schedule="warmup-cosine", warmup=0.1)
    f = lr_schedule(cfg)
    assert f(0) == pytest.approx(0.01) and f(99) == pytest.approx(1.0)
    assert f(100) == pytest.approx(1.0) and f(550) == pytest.approx(0.5)
    assert f(1000) == pytest.approx(0.0, abs=1e-12)
    usb = lr_schedule(SSLConfig(steps=1000))
    assert usb(1000) == pytest.approx(np.cos(7 * np.pi / 16))  # USB's floor, ~0.2
    assert eval_steps(SSLConfig(steps=1000, eval_every=300)) == [300, 600, 900, 1000]
    from pipeline.config import AugmentConfig

    c = AugmentConfig(ssl={"recipe": "cpu-short", "lr": 0.01}).ssl.component(seed=0)
    assert (c.schedule, c.final_points, c.net, c.net_width, c.lr) == \
        ("warmup-cosine", 3, "cnn-small", 16, 0.01)  # explicit fields beat the recipe
    with pytest.raises(ValidationError, match="recipe"):
        AugmentConfig(ssl={"recipe": "fast"})


def test_final_figure_is_the_mean_of_the_last_points(ssl_fm_subset, tmp_path):
    ds = ssl_fm_subset
    split = make_split(ds.train_labels, 4, seed=0, val_per_class=20)
    cfg = tiny(steps=30, eval_every=5, final_points=3)
    m = json.loads(run_arm("baseline", ds, split, tmp_path / "arm", cfg,
                           progress=False).read_text())
    evals = m["final_evals"]
    assert [e["step"] for e in evals] == [20, 25, 30] and m["final_points"] == 3
    assert m["top1_error"] == pytest.approx(np.mean([e["test_error"] for e in evals]))
    assert m["val_error"] == pytest.approx(np.mean([e["curve_error"] for e in evals]))
    assert evals[-1]["test_error"] == pytest.approx(m["last_top1_error"])


# --------------------------------------------------------------------------- arms


def test_replay_arm_draws_its_extra_rows_from_the_labeled_images(ssl_fm_subset, tmp_path):
    ds = ssl_fm_subset
    split = make_split(ds.train_labels, 4, seed=0)
    cfg = tiny(steps=10, synthetic_batch_share=0.5, synthetic_weight=2.0)
    m = json.loads(run_arm("replay", ds, split, tmp_path / "replay", cfg,
                           progress=False).read_text())
    assert m["num_synthetic"] == len(split.labeled_idx) == 40
    replayed = (ds.train_images[split.labeled_idx], ds.train_labels[split.labeled_idx])
    t = trainer_for(ds, split, cfg, tmp_path, replayed)
    data = t.data
    batch = t.sample_batch()
    assert len(batch.y_lb) == 16 + 8
    assert torch.allclose(batch.w_lb[16:], torch.full((8,), 2.0 * 24 / 16))
    labeled = torch.from_numpy(ds.train_images[split.labeled_idx])
    labels = torch.from_numpy(ds.train_labels[split.labeled_idx])
    for i in t._extra_indices():  # each extra row is one of the 40 labeled images, its label
        match = [j for j in range(40) if torch.equal(data.store[i], labeled[j])]
        assert match and int(data.labels[i]) == int(labels[match[0]])


def test_control_rows_leave_the_unlabeled_pool(ssl_fm_subset, tmp_path):
    ds = ssl_fm_subset
    split = make_split(ds.train_labels, 4, seed=0)
    cfg = tiny(steps=4)
    judged = split.unlabeled_idx[:50]
    rows = (ds.train_images[judged], ds.train_labels[judged])
    data = build_train_data(ds, split, cfg, torch.device("cpu"), rows, pool_exclude=judged)
    pool = set(data.unlabeled.tolist())
    assert not pool & set(judged.tolist())
    assert len(pool) == len(split.train_idx) - 50
    full = build_train_data(ds, split, cfg, torch.device("cpu"), rows)
    assert torch.equal(data.calib_idx, full.calib_idx)  # the same clean images for both
    a = run_arm("control", ds, split, tmp_path / "a", cfg, progress=False, synthetic=rows,
                pool_exclude=judged)
    b = run_arm("control", ds, split, tmp_path / "b", cfg, progress=False, synthetic=rows)
    ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ma["fingerprint"] != mb["fingerprint"]
    assert ma["num_unlabeled"] == mb["num_unlabeled"] - 50


def test_doubled_arm_runs_twice_the_steps(ssl_fm_subset, tmp_path):
    ds = ssl_fm_subset
    split = make_split(ds.train_labels, 4, seed=0)
    cfg = tiny(steps=8, eval_every=4, checkpoint_every=4)
    m = json.loads(run_arm("baseline-2x", ds, split, tmp_path / "b2", cfg,
                           progress=False).read_text())
    assert m["steps"] == 16 and m["algorithm"] == "fixmatch"
    assert m["config"]["eval_every"] == 8 and (tmp_path / "b2" / METRICS).exists()


def test_recipe_and_budget_named_in_an_override_fill_their_fields():
    """with_overrides (the flows' --set path) dumps every field; a recipe or budget named there
    must still set its fields, and a field given beside it still wins."""
    from pinned_presets import FROZEN_DEMO  # names no recipe

    from pipeline.config import load_config, with_overrides

    demo = load_config(FROZEN_DEMO)
    c = with_overrides(demo, {"ssl.recipe": "cpu-short"}).ssl
    assert (c.schedule, c.lr, c.net_width, c.final_points) == ("warmup-cosine", 0.1, 16, 3)
    assert with_overrides(demo, ["ssl.recipe=cpu-short", "ssl.lr=0.01"]).ssl.lr == 0.01
    assert with_overrides(demo, {"ssl.budget": "steps-256"}).ssl.steps == 256
    with pytest.raises(ValidationError, match="warmup"):
        SSLConfig(warmup=0.1)  # no effect under USB's schedule: refused, not hashed
    from pipeline.config import ConfigError

    with pytest.raises((ValueError, ConfigError), match="net_width"):
        with_overrides(demo, {"dataset": "cifar10", "ssl.net_width": 16})


def test_resume_inside_the_final_window_gives_the_same_figures(ssl_fm_subset, tmp_path):
    ds = ssl_fm_subset
    split = make_split(ds.train_labels, 4, seed=0, val_per_class=20)
    cfg = tiny(steps=30, eval_every=5, checkpoint_every=5, final_points=3)
    straight = json.loads(run_arm("baseline", ds, split, tmp_path / "a", cfg,
                                  progress=False).read_text())

    class Crash(Exception):
        pass

    def crash(step):
        if step == 27:  # after the checkpoint at 25, inside the final window (20, 25, 30)
            raise Crash

    with pytest.raises(Crash):
        run_arm("baseline", ds, split, tmp_path / "b", cfg, progress=False, on_step=crash)
    resumed = json.loads(run_arm("baseline", ds, split, tmp_path / "b", cfg,
                                 progress=False).read_text())
    assert resumed["resumed_from_step"] == 25
    assert resumed["final_evals"] == straight["final_evals"]
    assert resumed["top1_error"] == straight["top1_error"]
    assert resumed["val_error"] == straight["val_error"]
