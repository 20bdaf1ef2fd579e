"""Pre-flight checks the data against the base U-Net (channels, size) before any work, and
every refusal names the config key that fixes it; `augment run` exits with code 2."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from flows.cli import main
from pipeline.models import PreflightError
from pipeline.preflight import base_shape, check_fit

RNG = np.random.default_rng(1)


def _folder(root, size=28, modes=("L",) * 6):
    """Two classes of ``len(modes)`` images each, the i-th image in Pillow mode modes[i]."""
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i, mode in enumerate(modes):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(RNG.integers(0, 256, shape, dtype=np.uint8), mode).save(
                root / cls / f"{i}.png")
    return root


def _run(cfg, tmp_path, *sets):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return main(["run", str(path), "--dry-run", *[a for s in sets for a in ("--set", s)]])


def test_rgb_folder_with_a_grey_base_ends_before_work_naming_image_mode(
        flow_cfg, flow_tiny_base, tmp_path, capsys):
    from pipeline.config import with_overrides

    folder = _folder(tmp_path / "rgb", modes=("RGB",) * 6)
    cfg = with_overrides(flow_cfg, [f"dataset_root={folder}"])
    assert _run(cfg, tmp_path) == 2
    err = capsys.readouterr()
    text = err.out + err.err
    assert "image_mode: grey" in text and "pretrain:" in text
    assert "Traceback" not in text
    assert _run(cfg, tmp_path, "image_mode=grey") == 0  # the named fix works
    assert not cfg.runs_root().exists()


def test_a_folder_mixing_rgb_and_grey_is_refused_in_pre_flight_not_mid_run(
        flow_cfg, tmp_path, capsys):
    from pipeline.config import with_overrides

    # First file RGB, the rest grey: read as RGB throughout (no crash), then refused against
    # the grey base with the key that converts it.
    folder = _folder(tmp_path / "mixed", modes=("RGB",) + ("L",) * 5)
    cfg = with_overrides(flow_cfg, [f"dataset_root={folder}"])
    assert _run(cfg, tmp_path) == 2
    out = capsys.readouterr()
    assert "RGB (3 channels)" in out.out + out.err and "image_mode: grey" in out.out + out.err
    assert _run(cfg, tmp_path, "image_mode=grey") == 0


def test_large_images_need_resize(flow_cfg, tmp_path, capsys):
    from pipeline.config import with_overrides

    folder = _folder(tmp_path / "big", size=64)
    cfg = with_overrides(flow_cfg, [f"dataset_root={folder}"])
    assert _run(cfg, tmp_path) == 2
    out = capsys.readouterr()
    assert "resize: true" in out.out + out.err
    assert _run(cfg, tmp_path, "resize=true") == 0


def test_check_fit_names_each_fix(flow_cfg, flow_tiny_base):
    from pipeline.config import with_overrides

    unet = flow_tiny_base / "unet"
    assert base_shape(unet) == (1, 32)
    check_fit(flow_cfg, (28, 28, 1), unet)  # the shipped shape: padded 28 -> 32, fits
    with pytest.raises(PreflightError, match="image_mode: grey"):
        check_fit(flow_cfg, (28, 28, 3), unet)
    with pytest.raises(PreflightError, match="resize: true"):
        check_fit(flow_cfg, (64, 64, 1), unet)
    with pytest.raises(PreflightError, match="resize: true"):
        check_fit(flow_cfg, (8, 8, 1), unet)  # a speck in the corner of the canvas
    with pytest.raises(PreflightError, match="image_size: 32"):
        check_fit(with_overrides(flow_cfg, ["image_size=16"]), (16, 16, 1), unet)
    # A run that pretrains its own base builds it for the data: only the size is checked.
    pre = with_overrides(flow_cfg, ["pretrain={}"])
    check_fit(pre, (32, 32, 3), None)
    with pytest.raises(PreflightError, match="resize: true"):
        check_fit(pre, (64, 64, 3), None)


def test_an_rgb_base_names_image_mode_rgb(flow_cfg, tmp_path):
    import json

    unet = tmp_path / "rgb-base"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"in_channels": 3, "sample_size": 32}))
    with pytest.raises(PreflightError, match="image_mode: rgb"):
        check_fit(flow_cfg, (28, 28, 1), unet)


def test_a_gpu_budget_on_the_cpu_is_refused_naming_the_keys(tmp_path, capsys):
    """A preset of one's own inherits USB's 2^20 SSL steps: ten hours per arm here."""
    rc = main(["run", "demo", "--set", "device=cpu", "--set", "ssl.steps=1048576",
               "--runs-dir", str(tmp_path / "runs")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "ssl.steps=1048576 on the CPU" in err and "augment init" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
