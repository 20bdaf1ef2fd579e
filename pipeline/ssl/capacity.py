"""How many arm units fit on one card at once.

One FixMatch arm at USB's batch on WRN-28-2 fills a few GiB of a 80-140 GiB card and is
bound by kernel launches and per-image augmentation more than by the card's arithmetic, so
independent units (arm x seed x repetition) run side by side, one process each. How many is
decided from a measured peak: :func:`measure_arm_peak_bytes` trains one unit for a few steps
on the card and reads ``torch.cuda.max_memory_allocated``; :func:`units_at_once` divides the
card's free memory by that peak plus each process's own CUDA context.

Side by side changes nothing in what a unit computes: every unit draws from its own
generator seeded by its own config, in its own process (checked on CPU by
``tests/test_arms_side_by_side.py``).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch

# What each extra process costs on the card beyond its tensors: the CUDA context, cuBLAS /
# cuDNN workspaces and the caching allocator's slack (measured about 0.5 GiB on H100/H200).
CONTEXT_BYTES = 768 * 2**20
# Leave this share of the free memory unused: fragmentation, evaluation's larger batches.
HEADROOM = 0.15


def units_at_once(requested: int | str, n_units: int, device: str,
                  peak_bytes: int | None = None, free_bytes: int | None = None) -> int:
    """How many units to run at once: ``requested`` (a number, or ``"auto"``), never more
    than there are units. ``"auto"`` on the CPU is one (one unit already uses every core); a
    number is honoured on the CPU too (a many-core machine, or a test of the side-by-side path).

    ``"auto"`` on CUDA needs ``peak_bytes`` (one unit's measured peak) and ``free_bytes`` (the card's
    free memory now): ``floor(free * (1 - HEADROOM) / (peak + CONTEXT_BYTES))``, at least 1.
    """
    if requested != "auto":
        if not isinstance(requested, int) or requested < 1:
            raise ValueError(f"arms_at_once={requested!r}: give a number >= 1 or 'auto'")
        return max(1, min(requested, n_units))
    if n_units <= 1 or not device.startswith("cuda"):
        return 1
    if peak_bytes is None or free_bytes is None:
        raise ValueError("arms_at_once='auto' needs one unit's measured peak memory and the "
                         "card's free memory")
    fit = math.floor(free_bytes * (1.0 - HEADROOM) / (peak_bytes + CONTEXT_BYTES))
    return max(1, min(n_units, fit))


def measure_arm_peak_bytes(arm: str, dataset, split, config,
                           synthetic: tuple[np.ndarray, np.ndarray] | None = None,
                           steps: int = 3) -> int:
    """Peak CUDA memory of one unit of ``arm``: its data on the card and a few training
    steps at the config's batch sizes, on the current CUDA device. Nothing is written.
    (Evaluation runs in batches no larger than training's, so training sets the peak.)"""
    from pipeline.ssl.algorithms import get_algorithm
    from pipeline.ssl.arm_names import EXTRA_ROW_ARMS
    from pipeline.ssl.arms import build_train_data, net_for
    from pipeline.ssl.trainer import Trainer

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    data = build_train_data(dataset, split, config, device,
                            synthetic if arm in EXTRA_ROW_ARMS else None)
    net = net_for(config, dataset)
    algorithm = get_algorithm("supervised" if arm == "supervised" else config.algorithm)(
        config, dataset.num_classes)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(net, algorithm, data, config, device, Path(tmp) / "probe.pt",
                          "probe", progress=False)
        for _ in range(steps):
            trainer.train_step(trainer.sample_batch())
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    del trainer, data, net
    torch.cuda.empty_cache()
    return int(peak)


def free_bytes_now() -> int:
    free, _total = torch.cuda.mem_get_info()
    return int(free)
