"""``augment init DIR``: a preset for one's own data, sized to finish within a stated budget.

A minimal YAML of one's own inherits the library defaults (2^20 SSL steps, 1,000 tuning steps:
days on a CPU). This writes every size explicitly instead: the split from the smallest
class, the image size of the base model, and tuning and SSL steps from rates timed on this
machine (``pipeline.estimate``) so that the whole run fits ``CPU_BUDGET_S`` on the CPU, with a
comment beside each value saying why.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml

from pipeline.atomic import atomic_write_text
from pipeline.config import AugmentConfig, ConfigError, validate_config
from pipeline.data.datasets import DatasetError, available_datasets, load_dataset
from pipeline.estimate import OTHER_STAGES_S, ssl_rate, unet_rates
from pipeline.models import resolve_base_model
from pipeline.preflight import fits_without_resize

CPU_BUDGET_S = 15 * 60  # the aim: report and classifier in 15 min on 2 cores
# The default base (grey, 32x32; 28x28 images padded): pretrained on all of Fashion-MNIST's
# training images, the better of the two shipped small bases for data of one's own.
SHIPPED_BASE = AugmentConfig.model_fields["base_model"].default
# Shares of the budget left after the untimed stages: SSL trains three classifiers, tuning
# one adapter per class, sampling is cheap at 10 DDIM steps.
SHARES = {"tune": 0.4, "sample": 0.1, "ssl": 0.5}
CPU_ARMS = ["supervised", "baseline", "augmented"]  # the comparison the report is about
GPU_ARMS = ["supervised", "baseline", "augmented", "control"]  # + the real-rows control


def _dataset_kind(root: Path) -> str:
    """A saved Hugging Face dataset or Parquet files where that loader is registered, else an
    image folder."""
    hf = (root / "dataset_dict.json").is_file() or (root / "dataset_info.json").is_file() \
        or any(root.glob("*.parquet"))
    return "hf-dataset" if hf and "hf-dataset" in available_datasets() else "image-folder"


def _split_sizes(per_class: list[int], has_unlabeled: bool) -> tuple[int, int, str]:
    """(labels_per_class, validation_per_class, why) from the smallest class."""
    m = min(per_class)
    # A fifth of the smallest class (at most 100) to choose settings on; none below 10
    # images, where each held-out image is a label the classifier would miss more.
    val = min(100, m // 5) if m >= 10 else 0
    if has_unlabeled:  # the labeled folders are the labels: train on all but validation
        return m - val, val, (f"every labeled image of the smallest class ({m}) but the "
                              "validation ones; the unlabeled folder is the pool")
    labels = max(1, min(40, (m - val) // 4))
    return labels, val, (f"a quarter of the smallest class ({m}) after validation, at most "
                         "40; the rest of each class is the unlabeled pool (labels hidden)")


def _pow2_at_most(x: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, 2 ** int(math.log2(max(x, 1)))))


def _load_fitting(kind: str, root: Path, size: int):
    """(the dataset as the run will read it, whether it needs ``resize: true``): images of
    mixed sizes, larger than the base's ``size`` or smaller than half of it are resized to
    it, as pre-flight would otherwise refuse them."""
    try:
        ds = load_dataset(kind, root)
        if fits_without_resize(*ds.image_shape[:2], size):
            return ds, False
    except DatasetError as e:
        if "resize" not in str(e):  # not a size problem: nothing init can choose fixes it
            raise ConfigError(f"{root}: {e}") from None
    try:
        return load_dataset(kind, root, image_size=size), True
    except DatasetError as e:
        raise ConfigError(f"{root}: {e}") from None


def preset_text(root: str | Path, gpu: bool = False) -> str:
    """The preset YAML (with comments) for the data in ``root``."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder; pass the folder holding one sub-folder "
                          "per class (and unlabeled/ for unlabeled images)")
    kind = _dataset_kind(root)
    unet_dir = resolve_base_model(SHIPPED_BASE)
    base = yaml.safe_load((unet_dir / "config.json").read_text())
    size, base_ch = int(base["sample_size"]), int(base["in_channels"])
    ds, resize = _load_fitting(kind, root, size)
    labels = np.asarray(ds.train_labels)
    per_class = [int((labels == c).sum()) for c in range(ds.num_classes)]
    if not per_class or min(per_class) == 0:
        empty = [n for n, k in zip(ds.class_names, per_class) if k == 0]
        raise ConfigError(f"{root}: no labeled images in class folder(s) {', '.join(empty)}; "
                          "every class needs at least one")
    n_unlabeled = int((labels < 0).sum())
    lpc, vpc, split_why = _split_sizes(per_class, n_unlabeled > 0)
    h, w, c = ds.image_shape
    lines = [(f"# Written by `augment init {root}` for {len(per_class)} classes "
             f"({', '.join(f'{n} {k}' for n, k in zip(ds.class_names, per_class))}), "
             f"{n_unlabeled} unlabeled images, {len(ds.test_labels)} test images, {h}x{w}x{c}."),
             (f"# Sized for {'one GPU' if gpu else f'{CPU_BUDGET_S // 60} min on this CPU'}; "
             "`augment run THIS.yaml --dry-run` prints the estimate per stage."),
             f"dataset: {kind}",
             (f"dataset_root: {yaml.safe_dump(str(root)).splitlines()[0]}   # absolute: the "
             "same folder from any directory"),
             f"labels_per_class: {lpc}   # {split_why}",
             f"validation_per_class: {vpc}   # held out to choose settings on, never trained on",
             "split_seed: 0",
             (f"image_size: {size}   # the base model's size (images are padded or resized "
             "to it)")]
    if resize:
        lines.append(f"resize: true   # the images are not {size}x{size} (or not all one size): "
                     "each is resized to it as it is read")
    if c != base_ch:
        lines += [(f"# The shipped base model is {base_ch}-channel and the data {c}-channel: "
                  "pretrain a base on the pool in the run (below, hours on a CPU and not in "
                  "the budget), or set base_model to a folder of a matching DDPM U-Net."),
                  "pretrain: {}"]
    else:
        lines.append(f"base_model: {SHIPPED_BASE}   # shipped, {base_ch}-channel, trained on "
                     "Fashion-MNIST; the report's domain-fit figure says whether it fits")
    lines.append("encoder: efficientnet-lite0@128   # packaged weights: offline")
    sizes = _gpu_sizes() if gpu else _cpu_sizes(root, lines, ds.image_shape, len(per_class),
                                                lpc)
    return "\n".join(lines + sizes) + "\n"


def _gpu_sizes() -> list[str]:
    return [
        "# GPU sizes: not timed here (no GPU needed to write them); about an hour on one",
        "# recent card. Run --dry-run on the GPU machine for its estimate.",
        "tuning:",
        "  steps: 300          # the adapters settle by 300 steps (bench/RESULTS.md)",
        "  batch_size: 16",
        "sampling:",
        "  per_condition: 16",
        "  num_inference_steps: 50",
        "  guidance: 1.0       # guidance 3 lowered consistency (bench/RESULTS.md, F5)",
        "  batch_size: 256",
        "ssl:",
        f"  arms: {GPU_ARMS}".replace("'", ""),
        "  seeds: [0]",
        "  steps: 16384        # 2^14: far below USB's 2^20, which is days even on a GPU",
        "  eval_every: 1024",
        "  checkpoint_every: 2048",
        "device: cuda"]


def _cpu_sizes(root: Path, head: list[str], shape: tuple[int, int, int], k: int,
               lpc: int) -> list[str]:
    """Tuning, sampling and SSL sized from rates timed now on this CPU."""
    draft = validate_config({**yaml.safe_load("\n".join(head)), "device": "cpu",
                             "tuning": {"steps": 10, "batch_size": 16},
                             "sampling": {"batch_size": 64},
                             "ssl": {"recipe": "cpu-short", "arms": CPU_ARMS}})
    left = CPU_BUDGET_S - OTHER_STAGES_S
    if draft.pretrains_base:  # no U-Net to time before pretraining: the demo's sizes
        tune_steps, per_cond = 80, 8
    else:
        rates = unet_rates(draft, "cpu")
        tune_steps = int(max(20, min(300, SHARES["tune"] * left / (k * rates["tune_step_s"]))))
        tune_steps -= tune_steps % 10
        batches_per_cond = lpc * k / draft.sampling.batch_size * 10  # x 10 DDIM steps
        per_cond = int(max(2, min(16, SHARES["sample"] * left /
                                  (batches_per_cond * rates["sample_batch_step_s"]))))
    fix = ssl_rate(draft, shape, k, "cpu", fixmatch=True)
    sup = ssl_rate(draft, shape, k, "cpu", fixmatch=False)
    ssl_steps = _pow2_at_most(SHARES["ssl"] * left / (2 * fix + sup), 256, 8192)
    return [
        (f"# Sizes from rates timed now on this CPU: the budget minus {OTHER_STAGES_S / 60:.0f}"
        " min for the untimed stages, shared tuning "
        f"{SHARES['tune']:.0%}, sampling {SHARES['sample']:.0%}, SSL {SHARES['ssl']:.0%}."),
        "tuning:",
        f"  steps: {tune_steps}   # one adapter per class; the demo tunes 80",
        "  batch_size: 16",
        "  warmup_steps: 10",
        "sampling:",
        f"  per_condition: {per_cond}   # images per labeled image",
        "  num_inference_steps: 10   # DDIM: the demo's CPU setting",
        "  guidance: 1.0   # one pass; guidance 3 lowered consistency (bench/RESULTS.md, F5)",
        "  batch_size: 64",
        "ssl:",
        f"  arms: {CPU_ARMS}".replace("'", "") + "   # control left out: a fourth classifier",
        "  seeds: [0]",
        "  recipe: cpu-short   # warm-up + cosine to 0, cnn-small width 16: made for CPU budgets",
        f"  steps: {ssl_steps}   # a power of two that fits; USB's default 2^20 is days here",
        f"  eval_every: {max(1, ssl_steps // 8)}",
        f"  checkpoint_every: {max(1, ssl_steps // 4)}",
        "quality:",
        "  reference: {epochs: 2, max_train: 10000}   # the demo's: a minute on 2 cores",
        "  max_real_per_class: 100",
        "device: cpu"]


def write_preset(root: str | Path, out: str | Path, gpu: bool = False,
                 force: bool = False) -> tuple[Path, AugmentConfig]:
    """Write the preset for ``root`` to ``out`` (refused when it exists, unless ``force``);
    the text is validated as a config before it is written."""
    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it or --out another file")
    text = preset_text(root, gpu)
    data = yaml.safe_load(text)
    data.setdefault("preset", out.stem)
    config = validate_config(data)
    atomic_write_text(out, text)
    return out, config
