"""pipeline.ssl: config, GPU-style augmentation, arms, shards, resume. CPU, tiny nets, seconds."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from pipeline.data.splits import make_split
from pipeline.ssl import BUDGETS, ArmError, SSLConfig, SSLConfigError, build_net, run_arm
from pipeline.ssl import randaugment as aug
from pipeline.ssl.arms import CHECKPOINT, CURVE, METRICS
from pipeline.ssl.evaluate import evaluate

pytestmark = pytest.mark.usefixtures("ssl_one_thread")


def tiny_config(**kw) -> SSLConfig:
    base = {"net": "cnn-tiny", "steps": 150, "batch_size": 32, "mu": 1, "eval_every": 50,
            "checkpoint_every": 50, "seed": 0, "device": "cpu"}
    return SSLConfig(**{**base, **kw})


# --------------------------------------------------------------------------- config


def test_config_round_trip_budgets_and_errors():
    cfg = SSLConfig.from_budget("steps-8192", net="cnn-small", synthetic_as="unlabeled")
    assert cfg.steps == 8192 and cfg.eval_every == BUDGETS["steps-8192"]["eval_every"]
    assert SSLConfig.model_validate_json(cfg.model_dump_json()) == cfg
    assert BUDGETS["steps-1048576"]["steps"] == 2**20
    assert all(name == f"steps-{b['steps']}" for name, b in BUDGETS.items())
    # USB defaults
    d = SSLConfig()
    assert (d.batch_size, d.mu, d.tau, d.lr, d.ema, d.nesterov) == (64, 7, 0.95, 0.03, 0.999, True)
    # device does not change the fingerprint, the seed does
    assert SSLConfig(device="cpu").fingerprint() == SSLConfig(device="cuda").fingerprint()
    assert SSLConfig(seed=1).fingerprint() != SSLConfig(seed=2).fingerprint()
    # Bounds are declared once, on the model: a bad value names its field.
    with pytest.raises(ValidationError, match="synthetic_as"):
        SSLConfig(synthetic_as="both")
    with pytest.raises(ValidationError, match="stepz"):
        SSLConfig(stepz=3)
    with pytest.raises(ValidationError, match=r"tau\n.*less than or equal to 1"):
        SSLConfig(tau=1.5)
    with pytest.raises(SSLConfigError, match="steps-"):
        SSLConfig.from_budget("short")


def test_wrn_28_2_matches_usb_size():
    net = build_net("wrn-28-2", 10, (32, 32, 3), [0.5] * 3, [0.25] * 3, seed=0)
    assert sum(p.numel() for p in net.parameters()) == 1_467_626  # USB: stem conv has a bias
    again = build_net("wrn-28-2", 10, (32, 32, 3), [0.5] * 3, [0.25] * 3, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                 again.state_dict().values(), strict=True))
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)


# --------------------------------------------------------------------------- augmentation


def test_weak_augment_crop_flip_reflect():
    g = torch.Generator().manual_seed(0)
    store = torch.randint(0, 256, (20, 32, 32, 3), dtype=torch.uint8)
    idx = torch.tensor([3, 3, 7, 0])
    plain = aug.weak_from_store(store, idx, g, pad=0, flip=False)
    assert torch.equal(plain, aug.to_unit(store[idx]))
    # With padding, every output row is a (reflected, maybe flipped) row of the source:
    # a crop never invents pixel values, and the padded crop differs across draws.
    out = aug.weak_from_store(store, idx.repeat(8), g)
    assert out.shape == (32, 3, 32, 32) and out.dtype == torch.float32
    src = aug.to_unit(store[3:4])
    vals = set((src * 255).round().flatten().tolist())
    assert set((out[0] * 255).round().flatten().tolist()) <= vals
    assert len({tuple(o.flatten()[:64].tolist()) for o in out[::4]}) > 1


def test_strong_augment_per_image_deterministic_and_in_range():
    x = torch.rand(64, 3, 32, 32)
    a = aug.strong_augment(x, torch.Generator().manual_seed(5))
    b = aug.strong_augment(x, torch.Generator().manual_seed(5))
    c = aug.strong_augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    # Dense and grouped batching give the same images.
    dense = aug.strong_augment(x, torch.Generator().manual_seed(5), grouped=False)
    assert torch.allclose(dense, a, atol=1e-6)
    # Identity round is exact; each op, drawn by the whole batch, changes the images.
    assert torch.equal(aug._apply_round(x, torch.zeros(64, dtype=torch.long), torch.rand(64)), x)
    for i, name in enumerate(aug.OPS[1:], start=1):
        y = aug._apply_round(x, torch.full((64,), i), torch.rand(64))
        assert (y - x).abs().mean() > 1e-4, name
    # Per image: one image repeated gets different op sequences (kornia's RandAugment would
    # give the whole batch one op sequence). Cutout off to compare ops only.
    same = aug.strong_augment(x[:1].repeat(64, 1, 1, 1), torch.Generator().manual_seed(1),
                              cutout_frac=0.0)
    distinct = {tuple(v) for v in (same.flatten(1)[:, ::97] * 1000).round().tolist()}
    assert len(distinct) > 32
    grey = aug.strong_augment(torch.rand(16, 1, 28, 28), torch.Generator().manual_seed(0))
    assert grey.shape == (16, 1, 28, 28)


def test_evaluate_confusion_and_per_class():
    class Always2(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((len(x),), 2), 4).float()

    images = torch.zeros(6, 8, 8, 1, dtype=torch.uint8)
    labels = torch.tensor([2, 2, 0, 1, 1, 2])
    r = evaluate(Always2(), images, labels, num_classes=4, batch_size=4)
    assert r.top1_error == pytest.approx(0.5)
    assert r.per_class_accuracy[2] == 1.0 and r.per_class_accuracy[0] == 0.0
    assert np.isnan(r.per_class_accuracy[3])
    assert r.confusion[:, 2].tolist() == [1, 2, 3, 0] and r.confusion.sum() == 6


# --------------------------------------------------------------------------- arms


def test_supervised_arm_beats_chance_and_writes_outputs(ssl_fm_subset, tmp_path):
    split = make_split(ssl_fm_subset.train_labels, 20, seed=0)
    path = run_arm("supervised", ssl_fm_subset, split, tmp_path, tiny_config(), progress=False)
    m = json.loads(path.read_text())
    assert m["top1_accuracy"] > 0.5, m["top1_accuracy"]  # chance is 0.1
    assert m["num_labeled"] == 200 and m["steps"] == 150 and m["algorithm"] == "supervised"
    assert len(m["confusion_matrix"]) == 10 and sum(map(sum, m["confusion_matrix"])) == 500
    assert set(m["per_class_accuracy"]) == set(ssl_fm_subset.class_names)
    curve = pd.read_parquet(tmp_path / CURVE)
    assert curve["step"].tolist() == [50, 100, 150]
    assert curve["test_error"].iloc[-1] < curve["test_error"].iloc[0]
    assert (tmp_path / CHECKPOINT).exists()
    # A rerun finds metrics.json for the same inputs and returns without training.
    stamp = path.stat().st_mtime_ns
    assert run_arm("supervised", ssl_fm_subset, split, tmp_path, tiny_config(),
                   progress=False) == path
    assert path.stat().st_mtime_ns == stamp
    with pytest.raises(ArmError, match="different inputs"):
        run_arm("supervised", ssl_fm_subset, split, tmp_path, tiny_config(seed=1), progress=False)


def test_fixmatch_arm_learns_with_unlabeled_terms(ssl_fm_subset, tmp_path):
    split = make_split(ssl_fm_subset.train_labels, 10, seed=1)
    cfg = tiny_config(steps=60, batch_size=16, mu=2, eval_every=30, tau=0.7)
    m = json.loads(run_arm("baseline", ssl_fm_subset, split, tmp_path, cfg,
                           progress=False).read_text())
    assert m["algorithm"] == "fixmatch" and m["num_unlabeled"] == 3000
    assert m["top1_accuracy"] > 0.3
    curve = pd.read_parquet(tmp_path / CURVE)
    assert {"sup_loss", "unsup_loss", "mask_ratio"} <= set(curve.columns)
    assert curve["mask_ratio"].iloc[-1] > 0  # pseudo-labels passed the threshold


def _write_shards(out_dir, images, labels, class_names):
    from pipeline.data.shards import ShardWriter

    with ShardWriter(out_dir, class_names, rows_per_shard=256) as w:
        w.write(images, labels, source="synthetic", seed=0)
    return out_dir


def test_augmented_arm_trains_on_shard_labels(ssl_fm_subset, tmp_path):
    """Synthetic rows carry deliberately shifted labels (y+1 mod 10). If those labels reach
    the loss, the classifier learns the shift: it predicts y+1 on the real test images."""
    ds = ssl_fm_subset
    rows = np.arange(1000, 2000)
    shifted = (ds.train_labels[rows] + 1) % 10
    shard_dir = _write_shards(tmp_path / "shards", ds.train_images[rows], shifted, ds.class_names)
    split = make_split(ds.train_labels, 1, seed=0)
    # 4 synthetic rows on top of each real one: the shifted labels dominate. (The weight's
    # own effect is checked exactly in test_method_maths.py.)
    cfg = tiny_config(steps=120, batch_size=32, mu=1, eval_every=60, synthetic_batch_share=4.0,
                      synthetic_weight=2.0, lambda_u=0.0)
    out = tmp_path / "augmented"
    m = json.loads(run_arm("augmented", ds, split, out, cfg, shard_dir=shard_dir,
                           progress=False).read_text())
    assert m["num_synthetic"] == 1000 and m["synthetic_as"] == "labeled"
    cm = np.asarray(m["confusion_matrix"])
    shifted_acc = sum(cm[y, (y + 1) % 10] for y in range(10)) / cm.sum()
    assert shifted_acc > 0.4, shifted_acc
    assert m["top1_accuracy"] < 0.2
    # As extra unlabeled data instead: the pool grows by the synthetic rows.
    cfg_u = tiny_config(steps=4, batch_size=8, mu=1, eval_every=4, synthetic_as="unlabeled")
    m_u = json.loads(run_arm("augmented", ds, split, tmp_path / "aug-u", cfg_u,
                             shard_dir=shard_dir, progress=False).read_text())
    assert m_u["num_unlabeled"] == 3000 + 1000 and m_u["synthetic_as"] == "unlabeled"
    with pytest.raises(ArmError, match="needs its extra rows"):
        run_arm("augmented", ds, split, tmp_path / "none", cfg_u, progress=False)


def test_class_balanced_synthetic_draws(ssl_fm_subset, tmp_path):
    """Synthetic rows 9:1 between two classes: row-uniform draws follow that ratio, class-
    balanced draws give each class half, and the real part of the batch is untouched."""
    from pipeline.ssl.algorithms import get_algorithm
    from pipeline.ssl.arms import build_train_data
    from pipeline.ssl.trainer import Trainer, class_balanced_probs

    probs = class_balanced_probs(torch.tensor([3, 3, 3, 5]))
    assert torch.allclose(probs, torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2]))
    ds = ssl_fm_subset
    split = make_split(ds.train_labels, 4, seed=0)
    synth = (ds.train_images[:100], np.r_[np.zeros(90, np.int64), np.ones(10, np.int64)])
    share = {}
    for balance in (False, True):
        cfg = tiny_config(batch_size=32, synthetic_batch_share=0.5,
                          synthetic_class_balance=balance)
        data = build_train_data(ds, split, cfg, torch.device("cpu"), synth)
        net = build_net("cnn-tiny", 10, ds.image_shape, [0.5], [0.5], 0)
        trainer = Trainer(net, get_algorithm("supervised")(cfg, 10), data, cfg,
                          torch.device("cpu"), tmp_path / f"ckpt-{balance}.pt", "x", False)
        drawn = torch.stack([trainer._extra_indices() for _ in range(200)])  # (200, 16)
        assert drawn.shape == (200, 16)
        assert bool(torch.isin(drawn, data.labeled_synth).all())
        share[balance] = float((data.labels[drawn] == 1).float().mean())
    assert abs(share[False] - 0.1) < 0.03, share
    assert abs(share[True] - 0.5) < 0.05, share
    with pytest.raises(ValidationError, match="synthetic_batch_share"):
        tiny_config(synthetic_batch_share=5.0)
    # The arms without extra rows do not read these fields: their fingerprint ignores them.
    a, b = SSLConfig(synthetic_batch_share=0.5), SSLConfig(synthetic_batch_share=2.0,
                                                           synthetic_class_balance=True)
    assert a.fingerprint(reads_extra_rows=False) == b.fingerprint(reads_extra_rows=False)
    assert a.fingerprint() != b.fingerprint()


def _trainer(ds, split, cfg, synth, path, algorithm="fixmatch"):
    from pipeline.ssl.algorithms import get_algorithm
    from pipeline.ssl.arms import build_train_data
    from pipeline.ssl.trainer import Trainer

    data = build_train_data(ds, split, cfg, torch.device("cpu"), synth)
    net = build_net("cnn-tiny", 10, ds.image_shape, [0.5], [0.5], cfg.seed)
    return Trainer(net, get_algorithm(algorithm)(cfg, 10), data, cfg, torch.device("cpu"),
                   path, "x", False)


def test_extra_rows_are_added_on_top_of_the_baselines_real_rows(ssl_fm_subset, tmp_path):
    """Like for like: with no extra rows the augmented trainer is the baseline bit for bit;
    with them, every real row (labeled and unlabeled, and its augmentation) is still the
    baseline's, the k extra rows come after them, and the real rows keep their loss scale."""
    ds = ssl_fm_subset
    split = make_split(ds.train_labels, 4, seed=0)
    cfg = tiny_config(steps=6, batch_size=8, mu=2, synthetic_batch_share=0.5,
                      synthetic_weight=3.0)
    empty = (ds.train_images[:0], np.zeros(0, np.int64))
    synth = (ds.train_images[2000:2100], ds.train_labels[2000:2100])
    base = _trainer(ds, split, cfg, None, tmp_path / "a.pt")
    none = _trainer(ds, split, cfg, empty, tmp_path / "b.pt")
    aug = _trainer(ds, split, cfg, synth, tmp_path / "c.pt")
    for _ in range(3):
        bb, ba = base.sample_batch(), aug.sample_batch()
        assert torch.equal(bb.x_lb, ba.x_lb[:8]) and torch.equal(bb.y_lb, ba.y_lb[:8])
        assert torch.equal(bb.x_ulb_w, ba.x_ulb_w) and torch.equal(bb.x_ulb_s, ba.x_ulb_s)
        assert len(ba.y_lb) == 8 + 4
        # weighted_ce is a mean over the 12 rows: x 12/8 makes it the sum over the 8 real.
        assert torch.allclose(ba.w_lb, torch.tensor([1.0] * 8 + [3.0] * 4) * 12 / 8)
        assert not torch.equal(ba.x_lb[8:], bb.x_lb[:4])
    base = _trainer(ds, split, cfg, None, tmp_path / "a.pt")  # fresh streams
    base.fit()
    none.fit()
    for (k, v), (k2, v2) in zip(base.model.state_dict().items(),
                                none.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    aug = _trainer(ds, split, cfg, synth, tmp_path / "c.pt")
    aug.fit()
    assert not torch.equal(next(iter(aug.model.parameters())),
                           next(iter(base.model.parameters())))


def test_validation_split_is_held_out_and_scores_the_curve(ssl_fm_subset, tmp_path):
    from pipeline.data.splits import load_split, save_split
    from pipeline.ssl.arms import build_train_data

    ds = ssl_fm_subset
    plain = make_split(ds.train_labels, 4, seed=3)
    split = make_split(ds.train_labels, 4, seed=3, val_per_class=20)
    assert np.array_equal(plain.labeled_idx, split.labeled_idx)  # validation adds, keeps
    assert len(split.val_idx) == 200
    assert np.bincount(split.val_labels, minlength=10).tolist() == [20] * 10
    assert not set(split.val_idx) & (set(split.labeled_idx) | set(split.unlabeled_idx))
    assert len(split.labeled_idx) + len(split.unlabeled_idx) + 200 == len(ds.train_labels)
    again = load_split(save_split(split, tmp_path / "split.parquet"))
    assert np.array_equal(again.val_idx, split.val_idx) and again.val_per_class == 20
    cfg = tiny_config(steps=4, batch_size=8, mu=1, eval_every=2)
    data = build_train_data(ds, split, cfg, torch.device("cpu"))
    assert not bool(torch.isin(data.unlabeled, torch.from_numpy(split.val_idx)).any())
    assert data.curve_split == "validation" and len(data.curve_labels) == 200
    m = json.loads(run_arm("baseline", ds, split, tmp_path / "arm", cfg,
                           progress=False).read_text())
    assert m["num_validation"] == 200 and 0.0 <= m["val_error"] <= 1.0
    assert m["curve_split"] == "validation"
    curve = pd.read_parquet(tmp_path / "arm" / CURVE)
    assert (curve["curve_split"] == "validation").all() and (curve["eval_images"] == 200).all()
    # The final validation figure is the last curve point (same EMA weights, same images).
    assert curve["test_error"].iloc[-1] == pytest.approx(m["val_error"])


def test_control_rows_follow_the_judge_and_the_counts():
    from pipeline.evaluate.control import control_rows

    images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1)
    true = np.arange(100) % 3
    judged = np.where(np.arange(100) % 5 == 0, 2, np.arange(100) % 3)  # some judged wrong
    margin = np.where(np.arange(100) % 7 == 0, -0.1, 0.3)               # some not kept

    def judge(x):
        idx = x[:, 0, 0, 0].astype(int)
        return judged[idx], margin[idx]

    unlabeled = np.arange(10, 100)
    rows = control_rows(images, true, unlabeled, {0: 5, 1: 5, 2: 200}, judge, pool_size=90,
                        seed=0)
    idx = rows.train_idx
    assert np.bincount(rows.labels).tolist() == [5, 5, len(idx) - 10]
    assert set(idx) <= set(unlabeled.tolist()) and len(set(idx)) == len(idx)
    assert (judged[idx] == rows.labels).all() and (margin[idx] > 0).all()
    assert np.array_equal(rows.images[:, 0, 0, 0], idx)
    n2 = int(((judged[unlabeled] == 2) & (margin[unlabeled] > 0)).sum())
    assert rows.shortfall == {2: 200 - n2}
    assert rows.precision == pytest.approx(float((true[idx] == rows.labels).mean()))
    assert rows.precision < 1.0  # the judge's mistakes are kept, as the filter keeps them


def test_resume_after_interrupt_gives_identical_weights(ssl_fm_subset, tmp_path):
    split = make_split(ssl_fm_subset.train_labels, 4, seed=0)
    cfg = tiny_config(steps=12, batch_size=8, mu=2, eval_every=3, checkpoint_every=4)
    run_arm("baseline", ssl_fm_subset, split, tmp_path / "straight", cfg, progress=False)

    class Crash(Exception):
        pass

    def crash_at_7(step):
        if step == 7:  # after the checkpoint at step 4; steps 5-7 are lost
            raise Crash

    with pytest.raises(Crash):
        run_arm("baseline", ssl_fm_subset, split, tmp_path / "resumed", cfg, progress=False,
                on_step=crash_at_7)
    assert not (tmp_path / "resumed" / METRICS).exists()
    m = json.loads(run_arm("baseline", ssl_fm_subset, split, tmp_path / "resumed", cfg,
                           progress=False).read_text())
    assert m["resumed_from_step"] == 4
    a = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=False)
    b = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    drop = ["train_time_s"]
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "straight" / CURVE).drop(columns=drop),
        pd.read_parquet(tmp_path / "resumed" / CURVE).drop(columns=drop))


@pytest.mark.parametrize("channels", [1, 3])
def test_grouped_augmentation_equals_dense_and_runs_each_op_on_its_images_only(channels,
                                                                                monkeypatch):
    """Grouped RandAugment (each op on the images that drew it) gives the dense result for
    several seeds; an op gets exactly the images that drew it, and an op nobody drew never
    runs."""
    x = torch.rand(48, channels, 16, 16)
    for seed in range(4):
        grouped = aug.strong_augment(x, torch.Generator().manual_seed(seed))
        dense = aug.strong_augment(x, torch.Generator().manual_seed(seed), grouped=False)
        torch.testing.assert_close(grouped, dense, atol=1e-6, rtol=0)

    seen = {}
    for name, fn in list(aug._PHOTOMETRIC.items()):
        def counted(xs, ms, name=name, fn=fn):
            seen[name] = seen.get(name, 0) + len(xs)
            return fn(xs, ms)
        monkeypatch.setitem(aug._PHOTOMETRIC, name, counted)
    op = torch.tensor([aug._OP_ID[n] for n in ("brightness", "brightness", "rotate", "identity",
                                                "solarize", "shear_x")])
    aug._apply_round(torch.rand(6, channels, 8, 8), op, torch.rand(6))
    assert seen == {"brightness": 2, "solarize": 1}


def test_producing_the_next_batch_ahead_changes_no_draw(ssl_fm_subset, tmp_path):
    """fit() produces batch k+1 before step k is done; its weights equal those of a plain
    loop that draws each batch right before its step, and a checkpoint taken mid-run holds
    the generators' state from before the batch produced ahead."""
    split = make_split(ssl_fm_subset.train_labels, 4, seed=0)
    cfg = tiny_config(steps=6, batch_size=8, mu=2, eval_every=6, checkpoint_every=6)
    ahead = _trainer(ssl_fm_subset, split, cfg, None, tmp_path / "a.pt")
    ahead.fit()
    plain = _trainer(ssl_fm_subset, split, cfg, None, tmp_path / "b.pt")
    states = []
    for _ in range(cfg.steps):
        states.append(plain.generator.get_state())
        plain.train_step(plain.sample_batch())
    for name, tensor in ahead.model.state_dict().items():
        assert torch.equal(tensor, plain.model.state_dict()[name]), name

    seen = []
    mid = _trainer(ssl_fm_subset, split, cfg, None, tmp_path / "c.pt")
    with pytest.raises(StopIteration):
        mid.fit(on_step=lambda step: (seen.append(mid.state_dict()["generator"]),
                                      step == 3 and next(iter(()))))
    assert torch.equal(seen[0], states[1]) and torch.equal(seen[2], states[3])
