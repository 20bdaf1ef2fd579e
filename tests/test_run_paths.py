"""Paths a user hits between runs: reuse of the label-only arms across a sampling change, the
augmented arm's resume, soft pseudo-labels, the benchmark flow and the ``augment report`` CLI.

Expected values come from the files a run wrote (read here with ``json``/``pandas``) or from
numbers fixed by hand, never from the function under test.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from report_fixtures import fabricated_run
from torch_helpers import FixedLogits, anl_one_thread

from pipeline import stages
from pipeline.config import with_overrides
from pipeline.runs import init_run_dir, read_json
from pipeline.stages.inputs import dataset_for, split_for, ssl_rel
from pipeline.stages.keys import ssl_unit_key, stage_keys

LABEL_ONLY_ARMS = ("supervised", "baseline")
T_975_DF2 = 4.302653  # two-sided 95% t quantile for 3 paired seeds (df = 2)


def _metrics(run_dir: Path, arm: str, seed: int = 0) -> dict:
    return json.loads((run_dir / ssl_rel(arm, seed) / "metrics.json").read_text())


def _model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["model"]


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- 1. arm reuse


def test_sampling_change_reuses_label_only_arms_and_retrains_augmented(flow_cfg, tmp_path):
    """A new guidance makes a new run directory with new shards. Supervised and baseline never
    read the shards, so they are hard-linked from the first run (same unit key, same files);
    augmented reads them, so it is trained again, on the new shards."""
    from pipeline.data.shards import read_shards
    from pipeline.ssl import run_arm

    cfg = with_overrides(flow_cfg, {"ssl.arms": ["supervised", "baseline", "augmented"]})
    with anl_one_thread():  # the direct rerun below must see the same kernels
        first = init_run_dir(cfg)
        stages.run_all(first, cfg, until="ssl")
        changed = with_overrides(cfg, {"sampling.guidance": 3.0})
        second = init_run_dir(changed)
        assert second != first and second.parent == first.parent
        records = stages.run_all(second, changed, until="ssl")

        # The shards really changed: otherwise retraining augmented would prove nothing.
        old, new = read_shards(first / "shards"), read_shards(second / "shards")
        assert set(new.frame["guidance"]) == {3.0} and set(old.frame["guidance"]) != {3.0}
        assert not np.array_equal(old.images, new.images)
        assert "adopted_from" not in records["ssl"]  # the ssl stage key follows the shards

        for arm in LABEL_ONLY_ARMS:
            a, b = first / ssl_rel(arm, 0), second / ssl_rel(arm, 0)
            assert read_json(b / "unit.json")["key"] == read_json(a / "unit.json")["key"], arm
            for name in ("metrics.json", "checkpoint.pt", "learning_curve.parquet"):
                # Same inode: linked from the first run, not trained a second time.
                assert (a / name).stat().st_ino == (b / name).stat().st_ino, (arm, name)

        a, b = first / ssl_rel("augmented", 0), second / ssl_rel("augmented", 0)
        assert read_json(b / "unit.json")["key"] != read_json(a / "unit.json")["key"]
        assert (a / "metrics.json").stat().st_ino != (b / "metrics.json").stat().st_ino
        assert _metrics(second, "augmented")["num_synthetic"] == len(new.labels) == 8
        retrained = _model_state(b / "checkpoint.pt")
        assert not _same_tensors(retrained, _model_state(a / "checkpoint.pt"))
        # Trained on the second run's shards: the same arm run by hand on them agrees bit
        # for bit (the stage passes the config's trainer fields and device cpu).
        scfg = changed.ssl.component(seed=0, device="cpu")
        run_arm("augmented", dataset_for(changed), split_for(second),
                tmp_path / "by-hand", scfg, shard_dir=second / "shards", progress=False)
        assert _same_tensors(retrained, _model_state(tmp_path / "by-hand" / "checkpoint.pt"))


# --------------------------------------------------------------------------- 2. resume


def test_augmented_arm_resumes_bit_identically_with_its_extra_row_stream(report_dataset,
                                                                       tmp_path):
    """Crash an augmented run after its step-4 checkpoint: the resumed run ends with the
    uninterrupted run's weights, EMA, curve and both generator states. The extra (synthetic)
    rows come from their own generator, so it must be checkpointed and restored as well."""
    from pipeline.data.shards import ShardWriter
    from pipeline.data.splits import make_split
    from pipeline.ssl import SSLConfig, run_arm
    from pipeline.ssl.arms import CHECKPOINT, CURVE, METRICS
    from pipeline.ssl.trainer import EXTRA_STREAM

    ds = report_dataset
    rows = np.arange(1000, 1200)  # real images standing in for synthetic rows
    with ShardWriter(tmp_path / "shards", ds.class_names, rows_per_shard=64) as w:
        w.write(ds.train_images[rows], ds.train_labels[rows], source="synthetic", seed=0)
    split = make_split(ds.train_labels, 4, seed=0)
    cfg = SSLConfig(net="cnn-tiny", steps=12, batch_size=8, mu=2, eval_every=3,
                    checkpoint_every=4, eval_size=100, synthetic_batch_share=0.5, seed=0,
                    device="cpu")

    class Crash(Exception):
        pass

    at_crash = {}

    def crash_at_7(step):
        if step == 7:  # the checkpoint of step 4 is on disk; steps 5-7 are lost
            at_crash.update(torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False))
            raise Crash

    with anl_one_thread():
        run_arm("augmented", ds, split, tmp_path / "straight", cfg, tmp_path / "shards",
                progress=False)
        with pytest.raises(Crash):
            run_arm("augmented", ds, split, tmp_path / "resumed", cfg, tmp_path / "shards",
                    progress=False, on_step=crash_at_7)
        assert not (tmp_path / "resumed" / METRICS).exists()
        m = json.loads(run_arm("augmented", ds, split, tmp_path / "resumed", cfg,
                               tmp_path / "shards", progress=False).read_text())

    # The extra stream had moved on by step 4: restarting it from its seed would differ.
    assert at_crash["step"] == 4
    fresh = torch.Generator().manual_seed(cfg.seed + EXTRA_STREAM).get_state()
    assert not torch.equal(at_crash["extra_generator"], fresh)
    assert m["resumed_from_step"] == 4 and m["num_synthetic"] == 200 and m["steps"] == 12
    a = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=False)
    b = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)
    for key in ("generator", "extra_generator"):
        assert torch.equal(a[key], b[key]), f"{key} state differs after resume"
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    straight = json.loads((tmp_path / "straight" / METRICS).read_text())
    assert m["top1_error"] == straight["top1_error"]
    assert m["confusion_matrix"] == straight["confusion_matrix"]
    drop = ["train_time_s"]
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "straight" / CURVE).drop(columns=drop),
        pd.read_parquet(tmp_path / "resumed" / CURVE).drop(columns=drop))


# --------------------------------------------------------------------------- 3. soft labels


def _fixmatch_step(hard_labels: bool):
    """One FixMatch step on preset logits: 1 labeled row, 2 unlabeled rows, 3 classes.

    Every row is the log of a probability vector, so its softmax is that vector:
      labeled     (0.25, 0.5, 0.25), label 1               -> CE = ln 2
      weak  u0    (0.8, 0.1, 0.1)    max 0.8 >= tau 0.7      -> kept
      weak  u1    (0.5, 0.3, 0.2)    max 0.5 <  tau          -> masked out
      strong u0   (0.5, 0.25, 0.25)
      strong u1   (0.1, 0.1, 0.8)    (masked: must not count)
    """
    from pipeline.ssl import SSLConfig
    from pipeline.ssl.algorithms import Batch, FixMatch

    probs = [[0.25, 0.5, 0.25], [0.8, 0.1, 0.1], [0.5, 0.3, 0.2], [0.5, 0.25, 0.25],
             [0.1, 0.1, 0.8]]
    logits = torch.tensor(probs, dtype=torch.float64).log().float().requires_grad_(True)
    cfg = SSLConfig(hard_labels=hard_labels, tau=0.7, lambda_u=2.0, T=0.5, device="cpu")
    batch = Batch(x_lb=torch.zeros(1, 1, 2, 2), y_lb=torch.tensor([1]), w_lb=torch.ones(1),
                  x_ulb_w=torch.zeros(2, 1, 2, 2), x_ulb_s=torch.zeros(2, 1, 2, 2))
    out = FixMatch(cfg, 3).train_step(FixedLogits(logits), batch)
    return out, logits


def test_soft_pseudo_labels_give_the_hand_computed_unsupervised_loss():
    ln2 = math.log(2)
    # Soft target = the weak view's probabilities as they are (FixMatch never applies T):
    # u0: -(0.8 ln 0.5 + 0.1 ln 0.25 + 0.1 ln 0.25) = 1.2 ln 2; u1 masked; mean over 2 rows.
    soft, logits = _fixmatch_step(hard_labels=False)
    assert float(soft.terms["unsup_loss"]) == pytest.approx(0.6 * ln2, rel=1e-5)
    assert float(soft.terms["sup_loss"]) == pytest.approx(ln2, rel=1e-5)
    assert float(soft.terms["mask_ratio"]) == 0.5
    assert float(soft.loss.detach()) == pytest.approx(ln2 + 2.0 * 0.6 * ln2, rel=1e-5)
    # Targets are fixed numbers, not a path for gradients into the weak view.
    soft.loss.backward()
    assert torch.equal(logits.grad[1:3], torch.zeros(2, 3))
    assert logits.grad[3:].abs().sum() > 0
    # A temperature of 0.5 would sharpen u0's target to (64, 1, 1) / 66: another value.
    sharpened = -(64 * math.log(0.5) + 2 * math.log(0.25)) / 66 / 2
    assert abs(float(soft.terms["unsup_loss"]) - sharpened) > 1e-3

    # Hard target = argmax (class 0): u0 -> -ln 0.5 = ln 2, mean over 2 rows.
    hard, _ = _fixmatch_step(hard_labels=True)
    assert float(hard.terms["unsup_loss"]) == pytest.approx(0.5 * ln2, rel=1e-5)
    assert float(hard.terms["unsup_loss"]) != pytest.approx(float(soft.terms["unsup_loss"]))


def test_soft_label_setting_reaches_the_trainer_and_its_fingerprint(flow_cfg):

    soft = with_overrides(flow_cfg, {"ssl.hard_labels": False})
    scfg = soft.ssl.component(seed=0)
    assert scfg.hard_labels is False
    assert scfg.fingerprint() != flow_cfg.ssl.component(seed=0).fingerprint()
    # Every arm that trains with FixMatch is a different classifier with soft labels.
    k1, k2 = stage_keys(flow_cfg), stage_keys(soft)
    assert ssl_unit_key(flow_cfg, k1, "baseline", 0) != \
        ssl_unit_key(soft, k2, "baseline", 0)


# --------------------------------------------------------------------------- 4. benchmark


@pytest.mark.slow  # ~25 s: Prefect's test server starts, then the whole tiny pipeline runs
def test_benchmark_flow_runs_fresh_and_appends_the_runs_figures(flow_prefect, flow_cfg,
                                                                tmp_path):
    from flows.augment import benchmark

    overrides = ["ssl.seeds=[0, 1]", "ssl.arms=[supervised, baseline, augmented]"]
    cfg = with_overrides(flow_cfg, overrides)
    # A sibling that already finished split and encode with the same keys: a fresh benchmark
    # must measure every stage anew rather than adopt them.
    earlier = init_run_dir(cfg)
    stages.run_all(earlier, cfg, until="encode")
    history = tmp_path / "bench" / "history.parquet"

    with anl_one_thread():
        out = benchmark(config=flow_cfg, overrides=overrides, history=str(history))
    assert out == str(history)

    (stamp,) = (flow_cfg.runs_root() / "benchmark").iterdir()
    (run_dir,) = [p for p in stamp.iterdir() if p.is_dir()]
    assert run_dir.name == earlier.name  # same config, only the runs_dir moved
    for stage in ("split", "encode", "tune", "sample", "shards", "ssl", "report"):
        rec = read_json(run_dir / "stages" / f"{stage}.json")
        assert rec is not None and "adopted_from" not in rec, stage

    table = pd.read_parquet(history)
    assert len(table) == 1
    row = table.iloc[0]
    assert row["run"] == run_dir.name and row["preset"] == "tiny"
    errors = {arm: [_metrics(run_dir, arm, s)["top1_error"] for s in (0, 1)]
              for arm in ("supervised", "baseline", "augmented")}
    for arm, errs in errors.items():
        assert row[f"error_{arm}_pct"] == pytest.approx(100 * sum(errs) / 2, abs=1e-9), arm
        assert row[f"seeds_{arm}"] == 2
    assert pd.isna(row["error_control_pct"]) and row["seeds_control"] == 0
    diffs = [a - b for a, b in zip(errors["augmented"], errors["baseline"], strict=True)]
    assert row["delta_n"] == 2
    assert row["delta_pp"] == pytest.approx(100 * sum(diffs) / 2, abs=1e-4)
    for stage in ("split", "encode", "tune", "sample", "shards", "ssl"):
        assert row[f"wall_{stage}_s"] == read_json(run_dir / "stages" / f"{stage}.json")["wall_s"]
    assert "tiny" in (history.parent / "history.html").read_text()


# --------------------------------------------------------------------------- 5. report CLI

# Per-seed test errors chosen so that no two arms (and no two runs) share a mean.
RUNS = {
    1.0: {"supervised": [0.50, 0.52, 0.51], "baseline": [0.40, 0.42, 0.38],
          "augmented": [0.35, 0.36, 0.34]},
    2.0: {"supervised": [0.49, 0.53, 0.50], "baseline": [0.41, 0.39, 0.40],
          "augmented": [0.44, 0.37, 0.40]},
}


def _fabricated(root: Path) -> dict[float, Path]:
    return {g: fabricated_run(root, errs, name=f"fab-{int(g)}{int(g)}{int(g)}{int(g)}0000",
                              config_extra={"sampling": {"guidance": g}})
            for g, errs in RUNS.items()}


def _paired(errs: dict[str, list[float]]) -> tuple[float, float, float]:
    """Mean augmented - baseline in points, and its 95% CI (t with df 2), by hand."""
    d = [a - b for a, b in zip(errs["augmented"], errs["baseline"], strict=True)]
    mean, sem = statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d))
    return 100 * mean, 100 * (mean - T_975_DF2 * sem), 100 * (mean + T_975_DF2 * sem)


def test_report_cli_history_and_ablation_hold_the_metrics_files_numbers(tmp_path, capsys):
    from flows.cli import main

    runs = _fabricated(tmp_path / "runs")
    hist = tmp_path / "out" / "history.parquet"
    assert main(["report", *map(str, runs.values()), "--history", "--out", str(hist)]) == 0
    assert "history page:" in capsys.readouterr().out
    table = pd.read_parquet(hist).set_index("run")
    assert sorted(table.index) == sorted(p.name for p in runs.values())
    for g, run in runs.items():
        row = table.loc[run.name]
        for arm, errs in RUNS[g].items():
            assert row[f"error_{arm}_pct"] == pytest.approx(100 * statistics.mean(errs),
                                                            abs=1e-9), (g, arm)
            assert row[f"std_{arm}_pct"] == pytest.approx(100 * statistics.stdev(errs),
                                                          abs=1e-9), (g, arm)
            assert row[f"seeds_{arm}"] == 3
        mean, lo, hi = _paired(RUNS[g])
        assert row["delta_n"] == 3
        assert row["delta_pp"] == pytest.approx(mean, abs=1e-3)
        assert row["delta_ci_low_pp"] == pytest.approx(lo, abs=1e-3)
        assert row["delta_ci_high_pp"] == pytest.approx(hi, abs=1e-3)
        assert bool(row["budget_short"]) is False  # baseline beats supervised in both
    assert (hist.parent / "history.html").read_text().count("<img") >= 2

    ablation = tmp_path / "out" / "ablation"
    assert main(["report", *map(str, runs.values()), "--ablation", "--out", str(ablation)]) == 0
    assert capsys.readouterr().out.strip() == f"ablation: {ablation / 'ablation.html'}"
    rows = list(csv.DictReader((ablation / "ablation.csv").open()))
    assert [float(r["sampling.guidance"]) for r in rows] == [1.0, 2.0]
    for row, (g, run) in zip(rows, runs.items(), strict=True):
        assert row["run"] == run.name
        for arm, errs in RUNS[g].items():
            assert float(row[f"{arm}_error_pct"]) == pytest.approx(
                100 * statistics.mean(errs), abs=1e-4), (g, arm)
            assert row[f"{arm}_seeds"] == "3"
        mean, lo, hi = _paired(RUNS[g])
        assert float(row["delta_pp"]) == pytest.approx(mean, abs=1e-3)
        assert float(row["delta_ci_low_pp"]) == pytest.approx(lo, abs=1e-3)
        assert float(row["delta_ci_high_pp"]) == pytest.approx(hi, abs=1e-3)

    # Without a flag: each run's own report.md, with its per-seed errors.
    run = runs[2.0]
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.split() == [str(run / "report.html"), str(run / "report.md")]
    md = (run / "report.md").read_text()
    for arm, errs in RUNS[2.0].items():
        for seed, err in enumerate(errs):
            assert f"| {arm} | {seed} | {100 * err:.2f}% |" in md, (arm, seed)


@pytest.mark.parametrize("flag", [[], ["--history"], ["--ablation"]])
def test_report_cli_names_a_missing_run_directory_and_writes_nothing(tmp_path, capsys, flag):
    from flows.cli import main

    good = fabricated_run(tmp_path / "runs", {"baseline": [0.4], "augmented": [0.3]})
    typo = tmp_path / "runs" / "fab-0000000"
    out = tmp_path / "out" / ("history.parquet" if flag == ["--history"] else "ablation")
    rc = main(["report", str(good), str(typo), *flag, *(["--out", str(out)] if flag else [])])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(typo) in err and "augment: error:" in err
    # Checked before any work: the good run's report or row is not written either.
    assert not out.exists() and not (good / "report.md").exists()
