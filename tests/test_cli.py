"""The ``augment`` command: listing, dry runs, and invalid parameters failing before any work."""

from __future__ import annotations

import os

import pytest
import yaml

from flows.cli import main
from pipeline.runs import finished_record, init_run_dir
from pipeline.stages.inputs import dataset_for
from pipeline.stages.keys import stage_keys
from pipeline.stages.split import run_split


def _preset_file(cfg, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_dry_run_validates_and_preflights(flow_cfg, tmp_path, capsys):
    from pipeline.runs import run_dir_for

    assert main(["run", str(_preset_file(flow_cfg, tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    # The run directory the config hashes to, and what pre-flight found: the folder's
    # 28x28 grey images, the base's unet/ folder and the configured encoder.
    assert f"preset {flow_cfg.preset}: run directory {run_dir_for(flow_cfg)}" in out
    ds = dataset_for(flow_cfg)
    assert ds.image_shape == (28, 28, 1)
    assert (f"pre-flight ok: {ds.name} [28, 28, 1], device cpu, base {flow_cfg.base_model}/unet, "
            f"encoder {flow_cfg.encoder}") in out
    assert not flow_cfg.runs_root().exists()  # nothing written


@pytest.mark.parametrize("flags", [["--runs-dir", "rel"], ["--set", "runs_dir=rel"]])
def test_a_relative_runs_dir_on_the_command_line_is_the_working_directorys(
        tmp_path, capsys, monkeypatch, flags):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "demo", *flags, "--dry-run"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "run directory" in ln)
    assert line.startswith(f"preset demo: run directory {tmp_path / 'rel'}{os.sep}demo-")
    assert not (tmp_path / "rel").exists()  # a dry run writes nothing


@pytest.mark.parametrize("override, named", [
    ("sampling.mask_ratios=[0.5, 1.5]", "sampling.mask_ratios[1]=1.5"),
    ("labels_per_class=-2", "labels_per_class=-2"),
    ("sampling.not_a_key=3", "sampling.not_a_key"),
    ("base_model=nobody/no-such-ddpm", "base_model='nobody/no-such-ddpm' cannot be found offline"),
    ("base_model=/no/such/dir", "base_model='/no/such/dir'"),
    ("encoder=nobody/no-such-clip", "encoder='nobody/no-such-clip'"),
    ("labels_per_class=500", "labels_per_class=500"),
])
def test_invalid_parameters_fail_before_any_work(flow_cfg, tmp_path, capsys,
                                                 override, named):
    rc = main(["run", str(_preset_file(flow_cfg, tmp_path)), "--set", override])
    assert rc == 2
    assert named in capsys.readouterr().err
    assert not flow_cfg.runs_root().exists()


def test_gpu_presets_fail_fast_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = main(["run", "cifar10-250labels", "--runs-dir", str(tmp_path / "runs")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "require_gpu=true" in err and "--set require_gpu=false" in err


def test_missing_dataset_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CIFAR10_ROOT", raising=False)
    rc = main(["run", "cifar10-250labels", "--set", "require_gpu=false", "--set", "device=cpu",
               "--runs-dir", str(tmp_path / "runs")])
    assert rc == 2
    assert "dataset='cifar10'" in capsys.readouterr().err


def test_runs_lists_run_directories_with_status(flow_cfg, capsys):
    run_dir = init_run_dir(flow_cfg)
    run_split(run_dir, flow_cfg)
    assert main(["runs", "--runs-dir", str(flow_cfg.runs_root())]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if run_dir.name in ln)
    # name, status, the stages with records (split only), their summed wall time, modified
    name, status, done, compute = line.split()[:4]
    assert (name, status, done) == (run_dir.name, "incomplete", "split")
    split_rec = finished_record(run_dir, "split", stage_keys(flow_cfg)["split"])
    assert compute == f"{split_rec['wall_s']:.0f}s"


def test_presets_deployments_and_datasets_are_listed(capsys):
    assert main(["presets"]) == 0
    assert main(["deployments"]) == 0
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "augment/cifar10-250labels", "augment/fashion-mnist-40labels",
                 "augment/demo", "benchmark/nightly", "0 2 * * *"):
        assert name in out
    assert "fashion-mnist" in out and "available: 60000 train" in out


def test_pretrain_set_uses_the_main_parser_and_names_the_field(tmp_path, capsys):
    """`augment pretrain --set` takes YAML values and fails like `augment run --set`."""
    from flows.cli import main

    out = tmp_path / "base"
    assert main(["pretrain", "--out", str(out), "--set", "steps=-1", "--set", "stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "steps=-1: Input should be greater than or equal to 1" in err
    assert "unknown parameter 'stepz'" in err
    assert not out.exists()
