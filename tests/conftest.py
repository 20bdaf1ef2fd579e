"""Shared test setup: offline, CPU-sized, no telemetry.

Helpers' fixtures are grouped by prefix (anl_, data_, ...) so they never collide.
"""

import os

# Set before any test imports huggingface_hub / prefect: both read these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

# Fixture modules shared by every test module (test modules never import from each other).
pytest_plugins = ["flow_fixtures", "report_fixtures"]


# --------------------------------------------------------------------------- data_ fixtures
# Real data only: the Debian Fashion-MNIST files and the 20 real CIFAR-10 test images that
# ship inside the PyPI package foolbox (foolbox/data/cifar10_{index}_{label}.png).

import importlib.util as _data_importlib_util
import pickle as _data_pickle
from pathlib import Path as _DataPath

import numpy as _data_np
import pytest as _data_pytest


@_data_pytest.fixture(scope="session")
def data_fashion_mnist():
    """The full Fashion-MNIST dataset (60k + 10k, ~0.4 s to load), loaded once per session."""
    from pipeline.data.datasets import load_dataset

    return load_dataset("fashion-mnist")


@_data_pytest.fixture(scope="module")
def ssl_one_thread():
    """One torch thread for a module of tiny-net SSL tests: on a shared CPU, OpenMP
    spin-waiting with 2 threads is 5-10x slower than 1 thread for these nets."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@_data_pytest.fixture(scope="session")
def ssl_fm_subset(data_fashion_mnist):
    """3000 real Fashion-MNIST training images and 500 test images (seeded)."""
    from pipeline.data.datasets import ImageDataset

    ds = data_fashion_mnist
    rng = _data_np.random.default_rng(0)
    tr = _data_np.sort(rng.choice(len(ds.train_labels), 3000, replace=False))
    te = _data_np.sort(rng.choice(len(ds.test_labels), 500, replace=False))
    return ImageDataset("fashion-mnist-subset", ds.class_names, ds.train_images[tr],
                        ds.train_labels[tr], ds.test_images[te], ds.test_labels[te])


@_data_pytest.fixture(scope="session")
def data_foolbox_cifar10():
    """The 20 real CIFAR-10 test images in foolbox: (uint8 (20, 32, 32, 3), int64 labels)."""
    from PIL import Image

    spec = _data_importlib_util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        _data_pytest.fail("foolbox is not installed: pip install -e .[dev]")
    files = sorted((_DataPath(spec.submodule_search_locations[0]) / "data").glob("cifar10_*.png"))
    assert len(files) == 20, f"expected 20 foolbox CIFAR-10 images, found {len(files)}"
    images = _data_np.stack([_data_np.asarray(Image.open(p).convert("RGB")) for p in files])
    labels = _data_np.array([int(p.stem.split("_")[2]) for p in files], dtype=_data_np.int64)
    return images, labels


def _data_write_cifar_batch(path, images, labels, batch_label="fabricated"):
    """One batch in the real cifar-10-batches-py pickle layout (rows of 3072 CHW bytes)."""
    entry = {
        "batch_label": batch_label,
        "labels": [int(v) for v in labels],
        "data": _data_np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1),
        "filenames": [f"img_{i:05d}.png" for i in range(len(images))],
    }
    with open(path, "wb") as f:
        _data_pickle.dump(entry, f, protocol=2)


@_data_pytest.fixture(scope="session")
def data_cifar10_root(tmp_path_factory, data_foolbox_cifar10):
    """A small cifar-10-batches-py archive: test_batch = the 20 real foolbox images;
    data_batch_1..5 = 20 each, made from the same images flipped and shifted (labels kept).

    Returns (root, train_images, train_labels, test_images, test_labels).
    """
    from pipeline.data.datasets import CIFAR10_CLASSES

    images, labels = data_foolbox_cifar10
    root = tmp_path_factory.mktemp("cifar")
    base = root / "cifar-10-batches-py"
    base.mkdir()
    train_x, train_y = [], []
    for b in range(1, 6):
        x = _data_np.roll(images[:, :, ::-1] if b % 2 else images, shift=b, axis=2)
        _data_write_cifar_batch(base / f"data_batch_{b}", x, labels, f"training batch {b} of 5")
        train_x.append(x)
        train_y.append(labels)
    _data_write_cifar_batch(base / "test_batch", images, labels, "testing batch 1 of 1")
    with open(base / "batches.meta", "wb") as f:
        _data_pickle.dump({"num_cases_per_batch": 20, "label_names": list(CIFAR10_CLASSES),
                           "num_vis": 3072}, f, protocol=2)
    return (root, _data_np.concatenate(train_x), _data_np.concatenate(train_y), images, labels)


# --------------------------------------------------------------------------- anl_ fixtures
# Tiny diffusers U-Nets (8x8 grey, ~170k parameters) so that tuning and sampling run in
# seconds on CPU. One base is briefly pretrained on real Fashion-MNIST (downsampled to 8x8)
# and one adapter tuned on four of its images; both are shared by the tuning and sampling tests.

import torch as _anl_torch
from torch_helpers import FixedLogits, anl_make_unet, anl_one_thread  # noqa: F401


@_data_pytest.fixture(autouse=True)
def _restore_torch_global_state():
    """Each test leaves torch's process-wide state as it found it, so no equality test
    depends on which tests ran before it (thread count changes kernels' reduction order)."""
    threads = _anl_torch.get_num_threads()
    dtype = _anl_torch.get_default_dtype()
    grad = _anl_torch.is_grad_enabled()
    deterministic = _anl_torch.are_deterministic_algorithms_enabled()
    rng = _anl_torch.random.get_rng_state()
    yield
    _anl_torch.set_num_threads(threads)
    _anl_torch.set_default_dtype(dtype)
    _anl_torch.set_grad_enabled(grad)
    _anl_torch.use_deterministic_algorithms(deterministic)
    _anl_torch.random.set_rng_state(rng)


@_data_pytest.fixture
def anl_unet_factory():
    """``make(seed=0, sample_size=8, channels=1)`` -> a fresh tiny UNet2DModel."""
    return anl_make_unet


@_data_pytest.fixture
def anl_single_thread():
    with anl_one_thread():
        yield


@_data_pytest.fixture(scope="session")
def anl_tuned(data_fashion_mnist):
    """A briefly pretrained tiny base plus an adapter tuned on 4 images with random tokens.

    Returns a dict: model (ANLUNet, EMA weights loaded), scheduler (DDPM), conds (4, 1, 8, 8),
    tokens (4, 4, 16), base_loss / tuned_loss (fixed-draw denoising loss), result (TuneResult).
    """
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from anl_core.inject import ANLConfig, attach_anl
    from anl_core.tuning import TuneConfig, denoising_loss, tune_adapter
    from pipeline.data.images import to_model_space

    with anl_one_thread():
        unet = anl_make_unet(seed=0)
        scheduler = DDPMScheduler(num_train_timesteps=1000)
        pool = to_model_space(data_fashion_mnist.train_images[:512], size=8)
        gen = _anl_torch.Generator().manual_seed(0)
        opt = _anl_torch.optim.AdamW(unet.parameters(), lr=2e-3)
        unet.train()
        for _ in range(120):  # a rough garment prior, enough for samples to have structure
            x0 = pool[_anl_torch.randint(len(pool), (32,), generator=gen)]
            noise = _anl_torch.randn(x0.shape, generator=gen)
            t = _anl_torch.randint(1000, (32,), generator=gen)
            loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
        unet.eval()
        conds = pool[:4].clone()
        tokens = _anl_torch.randn(4, 4, 16, generator=_anl_torch.Generator().manual_seed(1))
        config = ANLConfig(token_dim=16, num_tokens=4, context_dim=32, head_dim=16,
                           encoder_id="test-tokens")
        model = attach_anl(unet, config)
        base_loss = denoising_loss(model, scheduler, conds, tokens, draws=16, adapter=False)
        result = tune_adapter(model, scheduler, conds, tokens,
                              TuneConfig(steps=250, batch_size=16, lr=1e-3, cond_dropout=0.2),
                              progress=False)
        tuned_loss = denoising_loss(model, scheduler, conds, tokens, draws=16)
    return {"model": model, "scheduler": scheduler, "conds": conds, "tokens": tokens,
            "base_loss": base_loss, "tuned_loss": tuned_loss, "result": result}


@_data_pytest.fixture
def log_records():
    """``with log_records("pipeline.x") as records:`` the records that logger emits (INFO and
    up), caught by a handler on that very logger: neither propagation to the root logger nor
    Prefect's logging setup, which an earlier test in the process may have run, can hide one.
    """
    import contextlib
    import logging

    class _Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.records: list[logging.LogRecord] = []

        def emit(self, record):
            self.records.append(record)

    @contextlib.contextmanager
    def catch(name: str):
        logger, handler = logging.getLogger(name), _Keep()
        level, disabled = logger.level, logger.disabled
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.disabled = False
        try:
            yield handler.records
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.disabled = disabled

    return catch
