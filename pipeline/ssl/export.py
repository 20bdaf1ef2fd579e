"""A trained classifier out of its unit: two files that rebuild it without the run.

``export_classifier(unit_dir, out_dir, ...)`` writes

* ``model.safetensors``: the EMA weights of ``checkpoint.pt`` exactly as the unit's last
  evaluation used them, BatchNorm statistics recomputed for them included, and the net's
  ``normalize.mean`` / ``normalize.std`` buffers (the training images' channel statistics);
* ``classifier_config.json`` (written last): the net and its constructor arguments, the
  classes, the input the net expects, the preprocessing, the precision the evaluation ran at,
  the arm, seed and errors from ``metrics.json``, the weights' sha256 and the provenance.

``load_classifier(path)`` rebuilds the net from those two files alone; ``predict`` applies
the evaluation's own preprocessing (``randaugment.to_unit``: uint8 NHWC -> float NCHW in
[0, 1]; the net normalises inside) at the evaluation's precision (``evaluate.evaluate``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anl_core.precision import autocast_for, uses_bf16
from pipeline.atomic import atomic_write, atomic_write_json
from pipeline.devices import resolve_device
from pipeline.digest import file_sha256

from .nets import build_net
from .randaugment import to_unit

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "classifier_config.json"
FORMAT = "anl-classifier/1"
# How Pillow turns a user's file into the net's input, by channel count (as the image-folder
# loader does for training images: convert, then a bicubic resize to the training size).
PIL_MODES = {1: "L", 3: "RGB"}


class ExportError(ValueError):
    """A classifier cannot be exported or loaded as asked; the message says what to change."""


def _finished_unit(unit_dir: Path) -> tuple[dict, dict]:
    """(metrics.json, the EMA state dict on the CPU) of a finished unit, checked to belong
    together and to hold BN statistics recomputed for the final EMA weights."""
    from .arms import CHECKPOINT, METRICS

    metrics_path, ckpt = unit_dir / METRICS, unit_dir / CHECKPOINT
    if not metrics_path.exists() or not ckpt.exists():
        raise ExportError(f"{unit_dir} has no finished classifier ({METRICS} and {CHECKPOINT}); "
                          "run its ssl unit first")
    metrics = json.loads(metrics_path.read_text())
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != metrics.get("fingerprint") or \
            state.get("step") != metrics.get("steps"):
        raise ExportError(f"{ckpt} is not the checkpoint {METRICS} was measured on (fingerprint "
                          f"or step differ); rerun that unit (delete its folder)")
    if state.get("ema_calibrated_step") != state["step"]:
        raise ExportError(f"{ckpt} holds EMA weights without BN statistics recomputed for them "
                          "(written before evaluation recomputed them); rerun that unit")
    ema = {k: v.detach().cpu().contiguous() for k, v in state["ema"].items()}
    return metrics, ema


def export_matches(out_dir: str | Path, unit_dir: str | Path) -> bool:
    """Does ``out_dir`` hold a complete export of this very unit (same run fingerprint and
    step, weights file unchanged since)?"""
    out_dir, unit_dir = Path(out_dir), Path(unit_dir)
    try:
        config = json.loads((out_dir / CONFIG_FILE).read_text())
        metrics = json.loads((unit_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    source = config.get("source", {})
    return (source.get("fingerprint") == metrics.get("fingerprint")
            and source.get("step") == metrics.get("steps")
            and (out_dir / MODEL_FILE).exists()
            and config.get("weights", {}).get("sha256") == file_sha256(out_dir / MODEL_FILE))


def export_classifier(unit_dir: str | Path, out_dir: str | Path, *, class_names: list[str],
                      provenance: dict[str, Any], image_shape: tuple[int, int, int],
                      check: tuple[np.ndarray, np.ndarray] | None = None,
                      device: str = "cpu") -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/classifier_config.json`` (last) from
    the finished unit ``unit_dir``; return ``out_dir``. An export of the same unit already
    there is kept as it is.

    ``image_shape`` (H, W, C): the training images' size, which the checkpoint does not hold.
    ``check=(images, labels)``: score the exported files on these images (the test split)
    and record the error beside the one the unit's evaluation measured."""
    from safetensors.torch import save_file

    unit_dir, out_dir = Path(unit_dir), Path(out_dir)
    if export_matches(out_dir, unit_dir):
        return out_dir
    metrics, ema = _finished_unit(unit_dir)
    names = list(class_names)
    if metrics.get("class_names") not in (None, names):
        raise ExportError(f"class names {names} differ from the unit's {metrics['class_names']}; "
                          "pass the run's dataset's class names")
    h, w, c = (int(v) for v in image_shape)
    if c not in PIL_MODES or ema["normalize.mean"].numel() != c:
        raise ExportError(f"image_shape {image_shape} does not match the net's "
                          f"{ema['normalize.mean'].numel()} input channels")
    model_path = atomic_write(out_dir / MODEL_FILE,
                              lambda tmp: save_file(ema, tmp, metadata={"format": "pt"}))
    ssl_config = metrics.get("config", {})
    config = {
        "format": FORMAT,
        "net": {"name": metrics["net"], "width": ssl_config.get("net_width")},
        "num_classes": len(names), "class_names": names,
        "input": {"height": h, "width": w, "channels": c, "pil_mode": PIL_MODES[c],
                  "resize": "bicubic", "dtype": "uint8", "layout": "NHWC"},
        # Read from the net's own buffers: what the trainer computed from its training images.
        "preprocessing": {"scale": "x / 255", "normalised_inside_net": True,
                          "mean": ema["normalize.mean"].flatten().tolist(),
                          "std": ema["normalize.std"].flatten().tolist()},
        # The precision the evaluation ran at (metrics.json's bf16 / channels_last), used
        # again wherever the device supports it.
        "inference": {"bf16_autocast": bool(metrics.get("bf16", False)),
                      "channels_last": bool(metrics.get("channels_last", False))},
        "arm": metrics["arm"], "seed": metrics["seed"], "algorithm": metrics.get("algorithm"),
        "steps": metrics["steps"], "dataset": metrics.get("dataset"),
        "val_error": metrics.get("val_error"), "top1_error": metrics.get("top1_error"),
        "last_top1_error": metrics.get("last_top1_error"),
        "final_points": metrics.get("final_points"), "num_test": metrics.get("num_test"),
        "num_validation": metrics.get("num_validation"),
        "bn_calibration_images": ssl_config.get("bn_calibration"),
        "source": {"unit_dir": str(unit_dir.resolve()), "fingerprint": metrics["fingerprint"],
                   "step": metrics["steps"]},
        "weights": {"file": MODEL_FILE, "sha256": file_sha256(model_path),
                    "num_params": metrics.get("num_params")},
        "provenance": provenance,
    }
    if check is not None:
        images, labels = check
        model = _model_from(config, _read_weights(model_path), resolve_device(device))
        pred = predict(model, config, images).argmax(axis=1)
        correct = int(np.sum(pred == np.asarray(labels)))
        config["check"] = {"images": len(labels), "device": str(resolve_device(device)),
                           # evaluate()'s formula, so equal counts give equal floats
                           "top1_error": 1.0 - correct / len(labels),
                           "evaluation_top1_error": metrics.get("last_top1_error")}
    atomic_write_json(out_dir / CONFIG_FILE, config)
    return out_dir


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _uses(config: dict, device: torch.device) -> tuple[bool, bool]:
    """(bf16 autocast, channels_last) on ``device``: the trainer's rule for the precision the
    evaluation ran at."""
    inference = config.get("inference", {})
    amp = uses_bf16(device, inference.get("bf16_autocast", False), cpu=True)
    return amp, bool(inference.get("channels_last")) and (device.type == "cuda" or amp)


def _model_from(config: dict, weights: dict[str, torch.Tensor],
                device: torch.device) -> torch.nn.Module:
    inp, pre = config["input"], config["preprocessing"]
    net = build_net(config["net"]["name"], config["num_classes"],
                    (inp["height"], inp["width"], inp["channels"]), pre["mean"], pre["std"],
                    seed=0, width=config["net"].get("width"))
    _, channels_last = _uses(config, device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(device, memory_format=fmt)
    net.load_state_dict(weights, strict=True)
    return net.eval().requires_grad_(False)


def load_classifier(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """(the net in eval mode on ``device``, its config) from an export folder (or its
    ``classifier_config.json``); nothing else is read."""
    path = Path(path)
    folder = path.parent if path.name == CONFIG_FILE else path
    config_path, model_path = folder / CONFIG_FILE, folder / MODEL_FILE
    if not config_path.exists() or not model_path.exists():
        raise ExportError(f"{folder} is not an exported classifier (needs {CONFIG_FILE} and "
                          f"{MODEL_FILE}); write one with `augment export RUN_DIR --out DIR`")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT:
        raise ExportError(f"{config_path} has format {config.get('format')!r}, not {FORMAT!r}; "
                          "export it again with this version")
    if file_sha256(model_path) != config["weights"]["sha256"]:
        raise ExportError(f"{model_path} is not the file {CONFIG_FILE} describes (sha256 "
                          "differs: an export was interrupted or the file replaced); export again")
    try:
        dev = resolve_device(device)
    except RuntimeError as e:  # cuda asked for on a machine without it
        raise ExportError(str(e)) from None
    return _model_from(config, _read_weights(model_path), dev), config


@torch.no_grad()
def predict(model: torch.nn.Module, config: dict, images: np.ndarray,
            batch_size: int = 1024) -> np.ndarray:
    """Class probabilities (N, num_classes), float64, of uint8 (N, H, W, C) ``images``,
    preprocessed and at the precision as the unit's evaluation (``evaluate.evaluate``)."""
    inp = config["input"]
    want = (inp["height"], inp["width"], inp["channels"])
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise ExportError(f"expected uint8 images of shape (N, {want[0]}, {want[1]}, {want[2]}), "
                          f"got {images.dtype} {images.shape}; read files with "
                          "pipeline.data.image_files.read_images")
    device = next(model.parameters()).device
    amp, channels_last = _uses(config, device)
    out = []
    for start in range(0, len(images), batch_size):
        x = to_unit(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
                    .to(device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, amp, cpu=True):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=-1).cpu().double().numpy())
    return np.concatenate(out) if out else np.zeros((0, config["num_classes"]))
