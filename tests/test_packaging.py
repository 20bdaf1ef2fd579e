"""``pip install .`` outside the checkout: the wheel carries every code package and the shipped
data (presets, sweep specs, base models) as ``anl_augment_data``, and an installed
``augment run demo --dry-run`` run from elsewhere finds the preset and the base model."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

from pipeline import paths
from pipeline.paths import DATA_PACKAGE

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("presets", "sweeps", "models")  # data/ folders an installed run reads


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def _tracked(folder: str) -> set[str]:
    """Files git tracks under data/<folder> (ignored ones, e.g. a model's checkpoints/, are
    no part of a release), relative to data/."""
    out = subprocess.run(["git", "ls-files", f"data/{folder}"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    return {str(Path(p).relative_to("data")) for p in out}


def test_every_code_package_is_in_the_wheel():
    listed = set(_setuptools()["packages"])
    found = set(find_packages(str(REPO), include=["anl_core*", "pipeline*", "flows*"]))
    assert found <= listed, ("packages missing from pyproject.toml [tool.setuptools] packages "
                             f"(the wheel would lack them): {sorted(found - listed)}")
    assert listed - found == {DATA_PACKAGE}
    assert _setuptools()["package-dir"] == {DATA_PACKAGE: "data"}


def test_the_package_data_patterns_cover_every_shipped_file():
    patterns = _setuptools()["package-data"][DATA_PACKAGE]
    data = REPO / "data"
    matched = {str(p.relative_to(data)) for pat in patterns for p in data.glob(pat) if p.is_file()}
    for folder in SHIPPED:
        tracked = _tracked(folder)
        assert tracked, f"nothing tracked under data/{folder}"
        assert tracked <= matched, f"not in the wheel: {sorted(tracked - matched)}"
    assert "models/fashion-mnist-ddpm-32/unet/diffusion_pytorch_model.safetensors" in matched
    assert "presets/demo.yaml" in matched


def test_installed_a_shipped_data_path_is_the_packaged_file_and_others_the_cwd(
        tmp_path, monkeypatch):
    shipped = tmp_path / "site" / DATA_PACKAGE
    (shipped / "models" / "m").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(paths, "IN_CHECKOUT", False)
    monkeypatch.setattr(paths, "DATA_DIR", shipped)
    assert paths.resolve_path("data/models/m") == shipped / "models" / "m"
    assert paths.resolve_path("runs") == work / "runs"  # not inside site-packages
    assert paths.resolve_path("data/mine") == work / "data" / "mine"  # not shipped: the user's
    assert paths.resolve_path(tmp_path / "abs") == tmp_path / "abs"


def test_in_the_checkout_paths_stay_relative_to_the_repository():
    assert paths.IN_CHECKOUT and paths.DATA_DIR == REPO / "data"
    assert paths.resolve_path("data/models/fashion-mnist-ddpm-32") == \
        REPO / "data" / "models" / "fashion-mnist-ddpm-32"


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_runs_the_demo_dry_run(tmp_path):
    """Build the wheel, install it (no dependencies: this venv has them) into a folder of its
    own, and run ``augment`` from a directory outside the checkout with only that folder on
    the path."""
    wheels, target, cwd = tmp_path / "wheels", tmp_path / "target", tmp_path / "elsewhere"
    cwd.mkdir()
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(wheels)], check=True, cwd=REPO)
    (wheel,) = wheels.glob("*.whl")
    subprocess.run(pip + ["install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    code = ("import sys, pipeline.paths as p; print('code', p.__file__); "
            "from flows.cli import main; sys.exit(main(sys.argv[1:]))")
    run = subprocess.run([sys.executable, "-c", code, "run", "demo", "--dry-run"], check=False, cwd=cwd,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"code {target}" in run.stdout  # the installed copy, not the checkout
    base = target / DATA_PACKAGE / "models" / "fashion-mnist-ddpm-32-disjoint"  # the demo's
    assert f"base {base}" in run.stdout
    assert f"run directory {cwd / 'runs'}" in run.stdout  # the working directory's runs/
    presets = subprocess.run([sys.executable, "-c", code, "presets"], check=False, cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=300)
    assert presets.returncode == 0 and "demo" in presets.stdout, presets.stderr
