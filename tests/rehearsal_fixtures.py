"""Stand-ins for what the real CIFAR-10 deployment downloads, in the layouts the real ones use.

The preset ``cifar10-250labels`` needs ``google/ddpm-cifar10-32``, ``openai/clip-vit-base-patch32``
and the CIFAR-10 archive; none can be fetched here. These builders make tiny models with the
real architectures' structure and the CIFAR-10 archive's file format, and place the models in
a Hugging Face cache under the real ids, so the preset can run unchanged (by id, offline)
with only its sizes overridden.

* ``build_ddpm_pipeline``: a ``DDPMPipeline`` whose ``UNet2DModel`` has the real model's block
  types, depth and embedding settings at tiny widths, with the real linear-beta scheduler.
* ``build_clip_vision`` / ``build_clip_full``: a tiny ``CLIPVisionModelWithProjection`` (as
  one would save a local copy) and a tiny full ``CLIPModel`` (what the hub repo holds: text
  and vision towers in one checkpoint), each with its ``CLIPImageProcessor``.
* ``place_in_hub_cache``: a saved folder -> ``<cache>/models--org--name/{blobs,snapshots,refs}``
  exactly as ``huggingface_hub`` writes it, so ``snapshot_download(id, local_files_only=True)``
  and ``from_pretrained(id)`` find it with ``HF_HUB_OFFLINE=1``.
* ``build_cifar10_root``: ``cifar-10-batches-py`` pickles (5 train batches, a test batch,
  ``batches.meta``) holding the 20 real CIFAR-10 images shipped in the ``foolbox`` package and
  variants of them, a few hundred per split, every class present.

Plain functions (no pytest), so a script or benchmark can build the same stand-ins.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import shutil
from pathlib import Path

import numpy as np

DDPM_ID = "google/ddpm-cifar10-32"
CLIP_ID = "openai/clip-vit-base-patch32"
# A fixed, made-up commit hash: the cache layout needs one, its value does not matter.
STAND_IN_COMMIT = "0123456789abcdef0123456789abcdef01234567"

# google/ddpm-cifar10-32's UNet2DModel config, except block_out_channels (128, 256, 256, 256)
# and norm_num_groups 32, scaled down so a CPU runs it in milliseconds.
DDPM_UNET_CONFIG = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": (16, 32, 32, 32), "norm_num_groups": 8,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": None, "downsample_padding": 0, "flip_sin_to_cos": False,
    "freq_shift": 1, "norm_eps": 1e-6, "act_fn": "silu", "time_embedding_type": "positional",
    "center_input_sample": False,
}
DDPM_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                         "beta_schedule": "linear", "variance_type": "fixed_small",
                         "clip_sample": True}
# ViT-B/32 is 224 px, patch 32 -> 7x7 + 1 = 50 tokens of projection_dim 512. The stand-in keeps
# the token layout (patch grid + image embedding) at 32 px, patch 8 -> 4x4 + 1 = 17 tokens of 16.
CLIP_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 2, "projection_dim": 16}
CLIP_TOKENS = (CLIP_VISION["image_size"] // CLIP_VISION["patch_size"]) ** 2 + 1


# --------------------------------------------------------------------------- models


def build_ddpm_pipeline(out_dir: str | Path, seed: int = 0, safe_serialization: bool = True
                        ) -> Path:
    """A tiny DDPMPipeline saved with ``save_pretrained`` (model_index.json, unet/, scheduler/)."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**DDPM_UNET_CONFIG).eval()
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**DDPM_SCHEDULER_CONFIG))
    pipe.save_pretrained(out_dir, safe_serialization=safe_serialization)
    return Path(out_dir)


def _clip_processor():
    from transformers import CLIPImageProcessor

    size = CLIP_VISION["image_size"]
    return CLIPImageProcessor(size={"shortest_edge": size},
                              crop_size={"height": size, "width": size})


def build_clip_vision(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny ``CLIPVisionModelWithProjection`` + ``CLIPImageProcessor`` (a local copy's layout)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION)).eval()
    model.save_pretrained(out_dir)
    _clip_processor().save_pretrained(out_dir)
    return Path(out_dir)


def build_clip_full(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny full ``CLIPModel`` + processor: the hub repo's layout (one checkpoint with the text
    tower, the vision tower and both projections), which the encoder reads the vision half of."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 0,
            "eos_token_id": 1, "pad_token_id": 1}
    # As in the real config.json, the vision sub-config repeats projection_dim: that is what
    # CLIPVisionModelWithProjection reads when it loads the vision half of the checkpoint.
    config = CLIPConfig(text_config=text, vision_config=dict(CLIP_VISION),
                        projection_dim=CLIP_VISION["projection_dim"])
    CLIPModel(config).eval().save_pretrained(out_dir)
    _clip_processor().save_pretrained(out_dir)
    return Path(out_dir)


def place_in_hub_cache(saved: str | Path, repo_id: str, hub_cache: str | Path,
                       commit: str = STAND_IN_COMMIT) -> Path:
    """Copy a saved folder into a Hugging Face hub cache as the snapshot of ``repo_id@main``.

    Layout (as ``huggingface_hub`` writes it): ``models--{org}--{name}/blobs/<hash>`` holds the
    file contents, ``snapshots/<commit>/<path>`` are relative symlinks to the blobs, and
    ``refs/main`` holds the commit. Returns the snapshot folder.
    """
    saved = Path(saved)
    repo = Path(hub_cache) / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    for src in sorted(p for p in saved.rglob("*") if p.is_file()):
        data = src.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / src.relative_to(saved)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def build_hub_cache(hf_home: str | Path, work_dir: str | Path) -> dict[str, Path]:
    """``HF_HOME`` with both stand-ins cached under the real ids; returns their snapshots.

    The DDPM pipeline is cached with ``.bin`` weights (the format the real repository has had
    from the start), the CLIP model with ``model.safetensors``.
    """
    hub = Path(hf_home) / "hub"
    work_dir = Path(work_dir)
    ddpm = build_ddpm_pipeline(work_dir / "ddpm-pipeline-bin", safe_serialization=False)
    clip = build_clip_full(work_dir / "clip-full")
    return {DDPM_ID: place_in_hub_cache(ddpm, DDPM_ID, hub),
            CLIP_ID: place_in_hub_cache(clip, CLIP_ID, hub)}


# --------------------------------------------------------------------------- CIFAR-10


def foolbox_cifar10() -> tuple[np.ndarray, np.ndarray]:
    """The 20 real CIFAR-10 test images in foolbox: (uint8 (20, 32, 32, 3), int64 labels)."""
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("foolbox is not installed: pip install -e .[dev]")
    files = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("cifar10_*.png"))
    if len(files) != 20:
        raise RuntimeError(f"expected 20 foolbox CIFAR-10 images, found {len(files)}")
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    labels = np.array([int(p.stem.split("_")[2]) for p in files], dtype=np.int64)
    return images, labels


def _variant(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A different image of the same content: flip, shift (reflect-padded crop), brightness."""
    x = image[:, ::-1] if rng.random() < 0.5 else image
    dy, dx = rng.integers(-4, 5, size=2)
    x = np.pad(x, ((4, 4), (4, 4), (0, 0)), mode="reflect")[4 + dy:36 + dy, 4 + dx:36 + dx]
    scale = rng.uniform(0.7, 1.3)
    return np.clip(x.astype(np.float32) * scale, 0, 255).astype(np.uint8)


def _class_sources(images: np.ndarray, labels: np.ndarray, num_classes: int = 10
                   ) -> dict[int, np.ndarray]:
    """Real images of each class; a class foolbox lacks (bird, deer) gets colour-permuted
    images of another class, so that every class has its own, distinct content."""
    sources = {c: images[labels == c] for c in range(num_classes)}
    donors = [c for c in range(num_classes) if len(sources[c])]
    for i, c in enumerate(c for c in range(num_classes) if not len(sources[c])):
        donor = sources[donors[i % len(donors)]]
        sources[c] = donor[..., [2, 0, 1] if i % 2 == 0 else [1, 2, 0]].copy()
    return sources


def _write_batch(path: Path, images: np.ndarray, labels: np.ndarray, batch_label: str) -> None:
    """One batch in the real cifar-10-batches-py pickle layout (rows of 3072 CHW bytes)."""
    entry = {"batch_label": batch_label, "labels": [int(v) for v in labels],
             "data": np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1),
             "filenames": [f"stand_in_{i:05d}.png" for i in range(len(images))]}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def build_cifar10_root(root: str | Path, train_per_class: int = 40, test_per_class: int = 20,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """``root/cifar-10-batches-py`` with ``train_per_class`` x 10 training images in five batches
    and ``test_per_class`` x 10 test images; the test batch starts with the 20 real foolbox
    images unchanged. Returns the arrays written (train_images, train_labels, test_*)."""
    from pipeline.data.datasets import CIFAR10_CLASSES

    real, real_labels = foolbox_cifar10()
    sources = _class_sources(real, real_labels)
    rng = np.random.default_rng(seed)

    def make(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for c, src in sources.items():
            xs += [_variant(src[i % len(src)], rng) for i in range(per_class)]
            ys += [c] * per_class
        order = rng.permutation(len(ys))
        return np.stack(xs)[order], np.array(ys, np.int64)[order]

    train_x, train_y = make(train_per_class)
    test_x, test_y = make(test_per_class)
    n_real = len(real)
    test_x = np.concatenate([real, test_x[n_real:]])
    test_y = np.concatenate([real_labels, test_y[n_real:]])

    base = Path(root) / "cifar-10-batches-py"
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    for b, (x, y) in enumerate(zip(np.array_split(train_x, 5), np.array_split(train_y, 5),
                                   strict=True), start=1):
        _write_batch(base / f"data_batch_{b}", x, y, f"training batch {b} of 5")
    _write_batch(base / "test_batch", test_x, test_y, "testing batch 1 of 1")
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"num_cases_per_batch": len(train_y) // 5,
                     "label_names": list(CIFAR10_CLASSES), "num_vis": 3072}, f, protocol=2)
    return {"train_images": train_x, "train_labels": train_y,
            "test_images": test_x, "test_labels": test_y}
