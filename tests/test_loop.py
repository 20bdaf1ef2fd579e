"""The second round (``loop.rounds: 2``, ``pipeline.generate.pseudo_labels``): pseudo-labels chosen from the
classifier's probabilities alone, round-2 stages keyed so a rerun redoes only what a change
touches, warm-started adapters, and the round's two arms reading what they should."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from pipeline import stages
from pipeline.config import ConfigError, with_overrides
from pipeline.generate.pseudo_labels import select_pseudo_labels
from pipeline.runs import ROUND_TWO, init_run_dir, read_json
from pipeline.stages.encode import run_encode
from pipeline.stages.inputs import dataset_for, load_tokens, split_for
from pipeline.stages.keys import stage_keys
from pipeline.stages.pseudo import PSEUDO_FILE, run_pseudo
from pipeline.stages.tune import run_tune_class

LOOP = {"loop.rounds": 2, "loop.threshold": 0.0, "loop.per_class": 3,
        "ssl.arms": ["baseline", "augmented"]}


def test_select_pseudo_labels_by_hand():
    # 6 pool images (training indices 10..15), 3 classes.
    probs = np.array([[0.90, 0.05, 0.05],   # 10 -> 0 @ .90
                      [0.97, 0.02, 0.01],   # 11 -> 0 @ .97
                      [0.10, 0.85, 0.05],   # 12 -> 1 @ .85 (below .9: out)
                      [0.92, 0.04, 0.04],   # 13 -> 0 @ .92
                      [0.02, 0.01, 0.97],   # 14 -> 2 @ .97
                      [0.97, 0.02, 0.01]])  # 15 -> 0 @ .97 (ties 11: lower index first)
    chosen = select_pseudo_labels(probs, np.arange(10, 16), per_class=2, threshold=0.9)
    # class 0: the two most confident of {10, 11, 13, 15}: 11 and 15 (tie at .97, 11 first).
    assert chosen.train_idx.tolist() == [11, 15, 14]
    assert chosen.labels.tolist() == [0, 0, 2]
    np.testing.assert_allclose(chosen.confidence, [0.97, 0.97, 0.97])
    assert chosen.per_class(3) == [2, 0, 1]
    truth = np.zeros(16, np.int64)
    truth[14] = 1  # one wrong pseudo-label of three
    assert chosen.precision(truth) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="per_class"):
        select_pseudo_labels(probs, np.arange(10, 16), per_class=0, threshold=0.9)


def test_round_two_needs_the_baseline_arm(flow_cfg):
    with pytest.raises(ConfigError, match="add 'baseline' to ssl.arms"):
        with_overrides(flow_cfg, {"loop.rounds": 2, "ssl.arms": ["supervised"]})
    # Off, the section is left out of every hash: configs from before it keep their runs.
    assert stage_keys(flow_cfg) == \
        stage_keys(with_overrides(flow_cfg, {"loop.per_class": 7}))


def test_two_rounds_end_to_end_and_a_rerun_skips_everything(flow_cfg):
    cfg = with_overrides(flow_cfg, LOOP)
    run_dir = init_run_dir(cfg)
    records = stages.run_all(run_dir, cfg)
    r2 = run_dir / ROUND_TWO
    pseudo = pd.read_parquet(r2 / PSEUDO_FILE)
    split = split_for(run_dir)
    # Pseudo-labeled images come from the unlabeled pool only, at most K per class.
    assert set(pseudo["train_idx"]) <= set(split.unlabeled_idx.tolist())
    assert pseudo.groupby("label").size().max() <= 3 and len(pseudo) >= 1
    # Round-2 conditions: the labeled images, then the pseudo-labeled ones under their labels.
    tok = load_tokens(r2)
    n_lab = len(split.labeled_idx)
    assert tok["index"][:n_lab].tolist() == split.labeled_idx.tolist()
    assert tok["index"][n_lab:].tolist() == pseudo["train_idx"].tolist()
    assert tok["labels"][n_lab:].tolist() == pseudo["label"].tolist()
    assert tok["pseudo"].tolist() == [0] * n_lab + [1] * len(pseudo)
    # Every condition is sampled per_condition (2) times in the round-2 shards.
    from pipeline.data.shards import read_shards

    rows = read_shards(r2 / "shards").frame
    expected = {int(i): 2 for i in tok["index"]}
    assert rows.groupby("condition_id").size().to_dict() == expected
    assert (rows["label"].to_numpy() ==
            tok["labels"].numpy()[[tok["index"].tolist().index(c) for c in rows["condition_id"]]]
            ).all()
    # The round's arms read the round's data: the shards, and the pseudo-labeled images.
    aug2 = read_json(run_dir / "ssl/augmented-r2/seed-0/metrics.json")
    self2 = read_json(run_dir / "ssl/selftrain/seed-0/metrics.json")
    assert aug2["num_synthetic"] == len(rows)
    assert self2["num_synthetic"] == len(pseudo)
    loop = records["loop"]["metrics"]
    assert loop["rows"] == len(rows) and loop["pseudo"]["pseudo_labeled"] == len(pseudo)
    # Precision is an evaluation figure: the share of pseudo-labels equal to the truth.
    labels = dataset_for(cfg).train_labels
    assert loop["pseudo"]["precision"] == pytest.approx(
        float((labels[pseudo["train_idx"]] == pseudo["label"]).mean()), abs=1e-4)
    # The report lists the round's arms and shows its pseudo-labels and grids.
    md, html = (run_dir / "report.md").read_text(), (run_dir / "report.html").read_text()
    assert "| augmented-r2 |" in md and "| selftrain |" in md and "## Second round" in md
    assert f'data-metric="pseudo_precision" data-value="{loop["pseudo"]["precision"]}"' in html
    grids = records["loop"]["outputs"]["grids"]
    assert grids == [f"round-2/grids/class-{c:02d}.png" for c in (0, 1)]
    assert html.count('alt="round 2 class-') == 2

    again = stages.run_all(run_dir, cfg)
    assert all(rec.get("skipped") for rec in again.values()), \
        {k: v.get("skipped") for k, v in again.items()}


def test_pseudo_labels_never_read_pool_or_test_labels(flow_cfg, monkeypatch):
    cfg = with_overrides(flow_cfg, LOOP)
    run_dir = init_run_dir(cfg)
    stages.run_all(run_dir, cfg, until="ssl")
    first = run_pseudo(run_dir, cfg)
    chosen = pd.read_parquet(run_dir / ROUND_TWO / PSEUDO_FILE)

    # The same images with every unlabeled-pool and test label scrambled: the choice of
    # images and their pseudo-labels must not move (only the precision figure may).
    ds, split = dataset_for(cfg), split_for(run_dir)
    labels = ds.train_labels.copy()
    labels[split.unlabeled_idx] = (labels[split.unlabeled_idx] + 1) % ds.num_classes
    scrambled = dataclasses.replace(ds, train_labels=labels,
                                    test_labels=(ds.test_labels + 1) % ds.num_classes)
    from pipeline.stages import pseudo

    monkeypatch.setattr(pseudo, "dataset_for", lambda config: scrambled)
    (run_dir / ROUND_TWO / "stages" / "pseudo.json").unlink()
    second = run_pseudo(run_dir, cfg)
    assert not second.get("skipped")
    again = pd.read_parquet(run_dir / ROUND_TWO / PSEUDO_FILE)
    pd.testing.assert_frame_equal(chosen, again)
    assert first["metrics"]["precision"] != second["metrics"]["precision"]


def _linked(a, b) -> bool:
    """Every file of unit ``a`` is the same inode in ``b`` (reused by hard link)."""
    files = [p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "unit.json"]
    return bool(files) and all((b / f).exists() and (a / f).stat().st_ino == (b / f).stat().st_ino
                               for f in files)


def test_round_two_keys_rerun_only_what_a_change_touches(flow_cfg):
    cfg = with_overrides(flow_cfg, LOOP)
    first = init_run_dir(cfg)
    stages.run_all(first, cfg, until="loop")

    # A new K: a new run directory; round 1 and the baseline are lent by the first run,
    # round 2 is redone from its pseudo-labels on.
    k2 = with_overrides(cfg, {"loop.per_class": 2})
    second = init_run_dir(k2)
    assert second != first
    recs = stages.run_all(second, k2, until="loop")
    for name in ("split", "encode", "shards"):
        assert recs[name].get("adopted_from") == first.name, name
    for unit in ("adapters/class-00", "adapters/class-01", "samples/class-00",
                 "samples/class-01", "ssl/baseline/seed-0"):
        assert _linked(first / unit, second / unit), unit  # lent (hard links), not redone
    r2 = second / ROUND_TWO
    for name in ("pseudo", "encode", "tune", "sample", "shards"):
        assert "adopted_from" not in read_json(r2 / "stages" / f"{name}.json"), name
    assert pd.read_parquet(r2 / PSEUDO_FILE).groupby("label").size().max() <= 2

    # Round-2 samples per condition only: pseudo-labels and round-2 adapters are lent.
    pc = with_overrides(cfg, {"loop.per_condition": 1})
    third = init_run_dir(pc)
    stages.run_all(third, pc, until="loop")
    r3 = third / ROUND_TWO
    for name in ("pseudo", "encode"):
        assert read_json(r3 / "stages" / f"{name}.json").get("adopted_from") == first.name
    r1 = first / ROUND_TWO
    for c in (0, 1):
        assert _linked(r1 / f"adapters/class-{c:02d}", r3 / f"adapters/class-{c:02d}")
        assert not _linked(r1 / f"samples/class-{c:02d}", r3 / f"samples/class-{c:02d}")
    rows = read_json(r3 / "stages" / "shards.json")["metrics"]["rows"]
    assert rows == len(load_tokens(r3)["index"])  # one sample per condition


def test_warm_start_tunes_from_the_round_one_adapter(flow_cfg, monkeypatch):
    from safetensors.numpy import load_file

    import anl_core.tuning

    # Round 2's tuning starts from the round-1 adapter (warm) or from the fresh
    # initialisation round 1 also started from (cold); no EMA and a large step, so the
    # round-1 adapter is far from that initialisation.
    base = with_overrides(flow_cfg, {**LOOP, "tuning.use_ema": False, "tuning.lr": 1e-2})
    real, seen = anl_core.tuning.tune_adapter, {}

    def spy(model, *args, **kwargs):
        seen["start"] = {k: v.detach().clone().numpy()
                         for k, v in model.adapter_state_dict().items()}
        return real(model, *args, **kwargs)

    for warm in (True, False):
        cfg = with_overrides(base, {"loop.warm_start": warm})
        run_dir = init_run_dir(cfg)
        stages.run_all(run_dir, cfg, until="ssl")
        run_pseudo(run_dir, cfg)
        run_encode(run_dir, cfg, 2)
        monkeypatch.setattr(anl_core.tuning, "tune_adapter", spy)
        run_tune_class(run_dir, cfg, 0, 2)
        monkeypatch.setattr(anl_core.tuning, "tune_adapter", real)
        one = load_file(run_dir / "adapters/class-00/adapter_model.safetensors")
        gap = max(float(np.abs(one[k] - seen["start"][k]).max()) for k in one)
        assert (gap == 0.0) if warm else (gap > 1e-3), (warm, gap)
        two_dir = run_dir / ROUND_TWO / "adapters/class-00"
        assert read_json(two_dir / "tune.json")["warm_start"] is warm


def test_labeled_conditions_sample_from_labeled_images_only(flow_cfg):
    cfg = with_overrides(flow_cfg, {**LOOP, "loop.conditions": "labeled"})
    run_dir = init_run_dir(cfg)
    stages.run_all(run_dir, cfg, until="loop")
    from pipeline.data.shards import read_shards

    rows = read_shards(run_dir / ROUND_TWO / "shards").frame
    labeled = set(split_for(run_dir).labeled_idx.tolist())
    assert set(rows["condition_id"]) == labeled  # every labeled image, no pseudo one
    tuned = [read_json(run_dir / ROUND_TWO / f"adapters/class-{c:02d}/tune.json")
             for c in (0, 1)]
    n_pseudo = len(pd.read_parquet(run_dir / ROUND_TWO / PSEUDO_FILE))
    # ... yet the adapters were tuned on the pseudo-labeled images too.
    assert sum(t["pseudo_labeled"] for t in tuned) == n_pseudo >= 1
