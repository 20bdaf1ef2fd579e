"""Tampered artifacts (issue 32, items 2 and 7): each kind of output a rerun reuses or a
report reads is damaged on a tiny real run; the rerun (or report) must refuse it naming the
file and the ``--redo`` command, ``augment run RUN_DIR --redo STAGE`` must then succeed, and
the damaged file must be in ``RUN_DIR/.trash/``, not lost.

One finished run (every stage, ``stages.run_all``) is made per module and copied per test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.cli import main
from pipeline import stages
from pipeline.config import with_overrides
from pipeline.data.shard_format import MANIFEST
from pipeline.integrity import IntegrityError
from pipeline.runs import init_run_dir, read_json
from pipeline.stages.redo import redo, with_downstream


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, flow_tiny_base, flow_image_folder):
    from flow_fixtures import flow_config

    runs = tmp_path_factory.mktemp("runs") / "runs"
    cfg = flow_config(runs, flow_tiny_base, flow_image_folder)
    cfg = with_overrides(cfg, {"ssl.arms": ["supervised", "augmented"]})
    run_dir = init_run_dir(cfg)
    stages.run_all(run_dir, cfg)
    return cfg, run_dir


@pytest.fixture()
def run(finished_run, tmp_path):
    """A private copy of the finished run (its own runs dir, so no sibling to adopt from)."""
    cfg, src = finished_run
    cfg = with_overrides(cfg, {"runs_dir": str(tmp_path / "runs")})
    dst = tmp_path / "runs" / src.name
    shutil.copytree(src, dst)
    (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()),
                                                 "runs_dir": str(tmp_path / "runs")}))
    return cfg, dst


def _flip(path: Path, at: int = 100, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, at + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _nan_adapter(path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    name = min(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, path, metadata={"format": "pt"})


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# (name, damage(run_dir), the file named, the stage --redo takes)
CASES = {
    "shard bytes flipped": (lambda d: _flip(next((d / "shards").glob("shard-*.parquet"))),
                            "shard-00000.parquet", "shards"),
    "manifest num_rows edited": (lambda d: _edit_json(d / "shards" / MANIFEST, num_rows=9999),
                                 MANIFEST, "shards"),
    "adapter weights NaN": (lambda d: _nan_adapter(
        d / "adapters/class-00/adapter_model.safetensors"), "adapter_model.safetensors", "tune"),
    "metrics.json edited": (lambda d: _edit_json(d / "ssl/augmented/seed-0/metrics.json",
                                                 top1_error=0.01, top1_accuracy=0.99),
                            "ssl/augmented/seed-0/metrics.json", "ssl"),
    "metrics.json truncated": (lambda d: (d / "ssl/augmented/seed-0/metrics.json").write_text(
        (d / "ssl/augmented/seed-0/metrics.json").read_text()[:200]),
        "ssl/augmented/seed-0/metrics.json", "ssl"),
    "split.parquet corrupted": (lambda d: _flip(d / "split.parquet", at=40), "split.parquet",
                                "split"),
    "sample part altered": (lambda d: _flip(next((d / "samples/class-01").glob("*.npz")),
                                            at=300), "samples/class-01", "sample"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_tampered_artifact_is_refused_then_redone(run, case, capsys):
    cfg, run_dir = run
    damage, named, stage = CASES[case]
    damage(run_dir)
    bad = sorted(p for p in run_dir.rglob("*") if p.is_file() and named in str(p))

    with pytest.raises(IntegrityError) as caught:
        stages.run_all(run_dir, cfg)
    message = str(caught.value)
    assert named in message and f"--redo {stage}" in message, message

    # The CLI's way out: the stage's outputs (and downstream ones) go to .trash/, then rerun.
    trash, todo, _moved = redo(run_dir, [stage])
    assert stage in todo and "report" in todo
    for path in bad:
        kept = trash / path.relative_to(run_dir)
        assert kept.is_file(), f"{path} was lost, not moved to {trash}"
    records = stages.run_all(run_dir, cfg)  # makes them again, and passes its checks
    assert not records[stage].get("skipped")
    assert stages.run_all(run_dir, cfg)["report"].get("skipped")  # and reuses them after


def test_report_says_corrupt_not_not_run_and_exits_2(run, capsys):
    _cfg, run_dir = run
    metrics = run_dir / "ssl/augmented/seed-0/metrics.json"
    metrics.write_text(metrics.read_text()[:150])
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert str(metrics) in err and "--redo" in err
    md = (run_dir / "report.md").read_text()
    assert f"corrupt: {metrics}" in md

    _edit_json(run_dir / "shards" / MANIFEST, num_rows=9999)
    assert main(["report", str(run_dir)]) == 2
    assert "num_rows=9999" in capsys.readouterr().err


def test_an_edited_metrics_value_in_schema_is_caught_by_the_marker_hash(run):
    from pipeline.report.data import load_run

    _cfg, run_dir = run
    assert not load_run(run_dir).corrupt
    _edit_json(run_dir / "ssl/augmented/seed-0/metrics.json", top1_error=0.0,
               top1_accuracy=1.0)
    run_data = load_run(run_dir)
    assert "augmented" not in run_data.arms
    assert "sha256" in run_data.corrupt["augmented"]


def test_redo_on_the_command_line_moves_aside_and_reruns(run, capsys, monkeypatch):
    _cfg, run_dir = run
    _flip(next((run_dir / "shards").glob("shard-*.parquet")))
    # --dry-run says what would move and moves nothing
    assert main(["run", str(run_dir), "--redo", "shards", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would move" in out and "shards" in out and not (run_dir / ".trash").exists()
    ran = {}
    monkeypatch.setattr("flows.augment.augment",
                        lambda config: ran.setdefault("report", stages.run_all(
                            run_dir, config)["report"]["outputs"]["html"]))
    assert main(["run", str(run_dir), "--redo", "shards"]) == 0
    assert len(list((run_dir / ".trash").glob("shards-*/shards/shard-*.parquet"))) == 1
    assert read_json(run_dir / "stages" / "shards.json")


def test_redo_takes_every_downstream_stage():
    assert with_downstream(["shards"]) == ["shards", "quality", "ssl", "loop", "report"]
    assert with_downstream(["report"]) == ["report"]
    with pytest.raises(ValueError, match="no stage bogus"):
        with_downstream(["bogus"])


def test_a_damaged_sibling_is_not_adopted(finished_run, tmp_path):
    """A hard-linked shard shares its bytes with the run it came from: a run adopting from a
    damaged sibling must make its own instead."""
    cfg, src = finished_run
    runs = tmp_path / "runs"
    sibling = runs / "sibling"
    shutil.copytree(src, sibling)
    _flip(next((sibling / "shards").glob("shard-*.parquet")))
    cfg = with_overrides(cfg, {"runs_dir": str(runs)})
    run_dir = init_run_dir(cfg)
    records = stages.run_all(run_dir, cfg, until="shards")
    assert records["split"].get("adopted_from") == "sibling"
    assert not records["shards"].get("adopted_from")  # made here, not linked from the sibling
    got = stages.run_all(run_dir, cfg, until="shards")["shards"]
    assert got.get("skipped")


def test_nan_adapter_is_refused_on_load(finished_run, tmp_path):
    from anl_core.inject import AdapterWeightsError, ANLUNet
    from pipeline.stages.inputs import load_run_base

    cfg, src = finished_run
    adapter = tmp_path / "adapter"
    shutil.copytree(src / "adapters/class-00", adapter)
    _nan_adapter(adapter / "adapter_model.safetensors")
    unet, _ = load_run_base(src, cfg, "cpu")
    with pytest.raises(AdapterWeightsError, match=r"adapter_model\.safetensors.*NaN"):
        ANLUNet.from_pretrained(unet, adapter)
