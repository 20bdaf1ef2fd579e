"""Reference classifier: a small CNN trained on a dataset's real training labels.

It answers one question about synthetic images: does a classifier that has only seen
real data agree with the label each synthetic image inherited from its condition?
It is trained once per dataset (and config) and cached on disk, because every run on
that dataset needs the same judge; its test accuracy is stored with it, since label
consistency can only be read against what the judge gets right on real test images.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from anl_core.precision import autocast_for
from anl_core.progress import progress_bar
from pipeline.atomic import atomic_write
from pipeline.data.datasets import ImageDataset
from pipeline.data.images import to_model_space
from pipeline.data.pool_labels import has_label

CACHE_VERSION = 1
MODEL_FILE = "model.safetensors"
INFO_FILE = "reference.json"  # written last: its presence marks a finished cache entry


class ReferenceError(RuntimeError):
    """The reference classifier cannot be trained or loaded; the message says what to do."""


@dataclass(frozen=True)
class ReferenceConfig:
    width: int = 16
    epochs: int = 1
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    seed: int = 0
    max_train: int | None = None  # cap on training images (tests); None = the whole training set
    size: int = 32  # model-space side; 28x28 images are padded, as for the diffusion model

    def to_dict(self) -> dict:
        return asdict(self)


class ReferenceCNN(nn.Module):
    """Three conv stages, a hidden layer and a linear head; ``features`` is the hidden layer.

    Sized for CPUs (about 2.6M multiply-adds per 32x32 image at width 16): the judge must
    train in minutes where there is no GPU, and ~90% on Fashion-MNIST is enough to judge.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, size: int = 32):
        super().__init__()

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(c_out), nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.body = nn.Sequential(stage(in_channels, width), stage(width, 2 * width),
                                  stage(2 * width, 4 * width), nn.Flatten())
        self.feature_dim = 8 * width
        # Flatten, not global pooling: where a part of the garment is matters to its class.
        self.hidden = nn.Sequential(nn.Linear(4 * width * (size // 8) ** 2, self.feature_dim),
                                    nn.ReLU(inplace=True))
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class ReferenceClassifier:
    """A trained ReferenceCNN plus what it was trained on and how well it does on real test data."""

    model: ReferenceCNN
    info: dict = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    path: Path | None = None

    @property
    def test_accuracy(self) -> float:
        return float(self.info["test_accuracy"])

    @property
    def per_class_test_accuracy(self) -> list[float]:
        return list(self.info["per_class_test_accuracy"])

    @property
    def reference_id(self) -> str:
        return str(self.info.get("reference_id", "reference-cnn"))

    @torch.no_grad()
    def _run(self, images: np.ndarray, fn, batch_size: int = 512) -> np.ndarray:
        self.model.eval()
        size = int(self.info["config"]["size"])
        out = []
        for i in range(0, len(images), batch_size):
            x = to_model_space(images[i:i + batch_size], size=size, device=self.device)
            with autocast_for(self.device):
                out.append(fn(x).float().cpu())
        if not out:
            return np.zeros((0, self.model.feature_dim), dtype=np.float32)
        return torch.cat(out).numpy()

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) -> float32 logits (N, num_classes)."""
        return self._run(images, self.model)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.logits(images).argmax(axis=1).astype(np.int64)

    def features(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) -> penultimate features (N, 4*width); a fallback feature space."""
        return self._run(images, self.model.features)


def dataset_fingerprint(dataset: ImageDataset) -> str:
    """Hash of the training and test arrays: a cache entry is only reused for identical data."""
    h = hashlib.sha256()
    h.update(dataset.name.encode())
    for arr in (dataset.train_images, dataset.train_labels,
                dataset.test_images, dataset.test_labels):
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()


def cache_key(dataset: ImageDataset, config: ReferenceConfig,
              exclude: np.ndarray | None = None) -> str:
    parts = {"version": CACHE_VERSION, "data": dataset_fingerprint(dataset),
             "config": config.to_dict()}
    if exclude is not None and len(exclude):  # absent when empty: older entries keep their key
        parts["exclude"] = hashlib.sha256(np.sort(np.asarray(exclude, np.int64)).tobytes()
                                          ).hexdigest()
    payload = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def train_reference(dataset: ImageDataset, config: ReferenceConfig | None = None,
                    device: torch.device | str | None = None,
                    progress: bool = True, exclude: np.ndarray | None = None
                    ) -> ReferenceClassifier:
    """Train on the real training set (every image with a label), then score on the test set.

    An evaluation instrument only (it reads the unlabeled pool's labels): it judges synthetic
    images, it never chooses settings. ``exclude`` (a run's validation indices) is left out
    of its training images, so the validation split stays unseen by anything trained.
    Truly unlabeled images (``UNLABELED``) are left out too, and counted in its info: with a
    pool that has no labels it is trained on the labeled images alone, a weaker judge.
    """
    config = config or ReferenceConfig()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    x_all, y_all = dataset.train_images, dataset.train_labels
    keep_mask = has_label(y_all)
    if exclude is not None and len(exclude):
        keep_mask[np.asarray(exclude, np.int64)] = False
    unlabeled_left_out = int((~has_label(y_all)).sum())
    if not keep_mask.any():
        raise ReferenceError(f"{dataset.name} has no labeled training image outside the "
                             "validation split to train the reference classifier on")
    if not keep_mask.all():
        x_all, y_all = x_all[keep_mask], y_all[keep_mask]
    if config.max_train is not None and config.max_train < len(y_all):
        keep = torch.randperm(len(y_all), generator=gen)[:config.max_train].numpy()
        x_all, y_all = x_all[keep], y_all[keep]
    # Whole training set in model space up front: Fashion-MNIST/CIFAR-10 are < 1 GB as float32.
    x_all = to_model_space(x_all, size=config.size, device=device)
    y_all = torch.as_tensor(y_all, device=device)
    model = ReferenceCNN(dataset.image_shape[2], dataset.num_classes, config.width,
                         config.size).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = max(1, len(y_all) // config.batch_size)
    total = steps_per_epoch * config.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total,
                                                pct_start=0.15)
    start = time.perf_counter()
    model.train()
    bar = progress_bar(total=total, desc="reference classifier", enabled=progress, leave=False,
                       unit="step", logger=__name__)
    for _ in range(config.epochs):
        order = torch.randperm(len(y_all), generator=gen).to(device)
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            x = x_all[idx]
            # Random horizontal flips: the garments and CIFAR objects are left/right symmetric.
            flip = torch.rand(len(idx), device=device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            with autocast_for(device):
                loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    train_s = time.perf_counter() - start
    ref = ReferenceClassifier(model, {"config": config.to_dict()}, device)
    pred = ref.predict(dataset.test_images)
    correct = pred == dataset.test_labels
    per_class = [float(correct[dataset.test_labels == c].mean()) if (dataset.test_labels == c).any()
                 else float("nan") for c in range(dataset.num_classes)]
    ref.info.update({
        "reference_id": f"reference-cnn-w{config.width}",
        "dataset": dataset.name,
        "class_names": list(dataset.class_names),
        "in_channels": int(dataset.image_shape[2]),
        "num_classes": dataset.num_classes,
        "train_images": len(y_all),
        "excluded_images": 0 if exclude is None else len(exclude),
        # Only when there were any: a benchmark's cached info stays as it was.
        **({"unlabeled_left_out": unlabeled_left_out} if unlabeled_left_out else {}),
        "test_images": len(dataset.test_labels),
        "test_accuracy": float(correct.mean()),
        "per_class_test_accuracy": per_class,
        "train_s": round(train_s, 3),
        "device": str(device),
        "cache_version": CACHE_VERSION,
    })
    return ref


def save_reference(ref: ReferenceClassifier, directory: str | Path) -> Path:
    """Weights first, then reference.json (atomically) as the completion marker."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in ref.model.state_dict().items()
             if v.dtype.is_floating_point}
    state.update({k: v.cpu() for k, v in ref.model.state_dict().items()
                  if not v.dtype.is_floating_point})
    atomic_write(directory / MODEL_FILE, lambda tmp: save_file(state, tmp))
    atomic_write(directory / INFO_FILE,
            lambda tmp: Path(tmp).write_text(json.dumps(ref.info, indent=2, sort_keys=True)))
    ref.path = directory
    return directory


def load_reference(directory: str | Path, device: torch.device | str | None = None,
                   ) -> ReferenceClassifier:
    directory = Path(directory)
    info_path, model_path = directory / INFO_FILE, directory / MODEL_FILE
    if not info_path.exists() or not model_path.exists():
        raise ReferenceError(f"no finished reference classifier in {directory} "
                             f"(need {INFO_FILE} and {MODEL_FILE}); train it with "
                             "pipeline.evaluate.reference.load_or_train_reference(dataset, cache_dir)")
    info = json.loads(info_path.read_text())
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = ReferenceCNN(info["in_channels"], info["num_classes"], info["config"]["width"],
                         info["config"]["size"])
    model.load_state_dict(load_file(str(model_path)))
    return ReferenceClassifier(model.to(device).eval(), info, device, directory)


def load_or_train_reference(dataset: ImageDataset, cache_dir: str | Path,
                            config: ReferenceConfig | None = None,
                            device: torch.device | str | None = None,
                            progress: bool = True, exclude: np.ndarray | None = None
                            ) -> ReferenceClassifier:
    """The cached classifier for this dataset+config under ``cache_dir/<dataset>-<hash>/``.

    A rerun with the same data and config loads it; a different dataset or config trains
    a new entry beside it.
    """
    config = config or ReferenceConfig()
    safe_name = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in dataset.name)
    directory = Path(cache_dir) / f"{safe_name}-{cache_key(dataset, config, exclude)}"
    if (directory / INFO_FILE).exists():
        return load_reference(directory, device)
    ref = train_reference(dataset, config, device, progress, exclude)
    save_reference(ref, directory)
    return ref

