"""The ``flow_*`` fixtures: a tiny real setup on which every stage runs in seconds on CPU.

Two Fashion-MNIST classes as an image folder, a tiny U-Net base saved in diffusers layout and
the packaged EfficientNet-Lite0 encoder at 64 px. Loaded for every test module by conftest's
``pytest_plugins``; ``flow_config`` is a plain helper for tests that need their own runs dir.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import validate_config, with_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def flow_image_folder(tmp_path_factory, data_fashion_mnist):
    """Two Fashion-MNIST classes (T-shirt, Trouser): 10 train + 5 test real images each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    ds = data_fashion_mnist
    for part, images, labels, n in (("train", ds.train_images, ds.train_labels, 10),
                                    ("test", ds.test_images, ds.test_labels, 5)):
        for c, name in enumerate(("a-tshirt", "b-trouser")):
            d = root / part / name
            d.mkdir(parents=True)
            for i, idx in enumerate(np.flatnonzero(labels == c)[:n]):
                Image.fromarray(images[idx, ..., 0]).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def flow_tiny_base(tmp_path_factory):
    """A tiny grey 32x32 UNet2DModel + DDPM scheduler in diffusers pipeline layout."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    root = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    unet.save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    return root


def flow_config(runs_dir: Path, base: Path, folder: Path, **overrides):
    """A config that runs every stage in seconds on CPU."""
    data = {
        "preset": "tiny", "dataset": "image-folder", "dataset_root": str(folder),
        "labels_per_class": 2, "base_model": str(base), "encoder": "efficientnet-lite0@64",
        "adapter": {"context_dim": 32, "head_dim": 16},
        "tuning": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
        "sampling": {"per_condition": 2, "num_inference_steps": 2, "chunk_conditions": 1,
                     "batch_size": 8},
        "ssl": {"steps": 4, "batch_size": 4, "mu": 1, "eval_every": 2, "checkpoint_every": 2,
                "net": "cnn-small"},
        "quality": {"enabled": False},
        "fit": {"samples": 16, "steps": 2, "pool": 16},
        "runs_dir": str(runs_dir), "progress": False, "device": "cpu",
    }
    cfg = validate_config(data)
    return with_overrides(cfg, overrides) if overrides else cfg


@pytest.fixture()
def flow_cfg(tmp_path, flow_tiny_base, flow_image_folder):
    return flow_config(tmp_path / "runs", flow_tiny_base, flow_image_folder)


@pytest.fixture(scope="session")
def flow_prefect(tmp_path_factory):
    """Prefect with its own home and a temporary database; no server, no analytics. Started
    once for every flow test (about 15 s)."""
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: str(home)}), \
            prefect_test_harness(server_startup_timeout=120):
        yield


def rerecord_unit(unit_dir: Path) -> None:
    """A test that edits a finished unit's files on purpose (to plant a case) records the edit
    as the unit's own, as if the unit had written it: else the integrity check on reuse
    (pipeline.integrity) rightly refuses the altered files."""
    import json

    from pipeline.integrity import unit_hashes

    marker_path = unit_dir / "unit.json"
    marker = json.loads(marker_path.read_text())
    marker["files"] = unit_hashes(unit_dir)
    marker_path.write_text(json.dumps(marker))
