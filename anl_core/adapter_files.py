"""An adapter's files: their names (PEFT's, and the legacy ones that still load), an atomic
writer that leaves them readable (0644 under umask 022), and the weight check every load and
every reuse runs (finite, and of the shapes the config builds)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# The layout before PEFT's names: finished runs hold hundreds of adapters saved this way.
LEGACY_CONFIG_NAME = "anl_config.json"
LEGACY_WEIGHTS_NAME = "adapter.safetensors"


class AdapterWeightsError(ValueError):
    """Saved adapter weights are damaged: unreadable, non-finite, or of the wrong shape."""


def adapter_files(src: Path) -> tuple[Path, Path]:
    """(config, weights) of the adapter saved in ``src``: PEFT's names, else the legacy ones."""
    for config_name, weights_name in ((CONFIG_NAME, WEIGHTS_NAME),
                                      (LEGACY_CONFIG_NAME, LEGACY_WEIGHTS_NAME)):
        if (src / config_name).is_file() and (src / weights_name).is_file():
            return src / config_name, src / weights_name
    raise FileNotFoundError(f"{src} is not a saved ANL adapter (needs {CONFIG_NAME} and "
                            f"{WEIGHTS_NAME}); save one with model.save_pretrained(dir)")


def check_adapter_weights(path: str | os.PathLike,
                          shapes: dict[str, tuple[int, ...]] | None = None,
                          device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors saved in ``path``, refused (``AdapterWeightsError``, naming the file and
    tensor) when unreadable, not finite (a NaN adapter samples all-black images), or, given
    ``shapes``, of another shape than the config builds."""
    try:
        state = load_file(path, device=device)
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise AdapterWeightsError(f"adapter weights {path} are unreadable ({e})") from e
    for name, tensor in state.items():
        if shapes is not None and name in shapes and tuple(tensor.shape) != tuple(shapes[name]):
            raise AdapterWeightsError(f"adapter weights {path}: {name} is "
                                      f"{tuple(tensor.shape)}, its config builds "
                                      f"{tuple(shapes[name])}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterWeightsError(f"adapter weights {path}: {name} holds {bad} NaN or "
                                      "infinite values")
    return state


def _new_file_mode() -> int:
    """0o666 less the umask, as ``open()`` would give (anl_core cannot use pipeline.atomic)."""
    umask = os.umask(0o022)  # the only way to read it; 022 (not 0) while another thread looks
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _new_file_mode())  # mkstemp makes 0600; adapters are shared files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
