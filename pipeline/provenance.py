"""Provenance of recorded work: the code (git commit), the library versions, what device ran
it, and how long and how much memory it took.
"""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from pathlib import Path
from typing import Self

from pipeline.paths import REPO_ROOT


def git_commit(repo: Path = REPO_ROOT, dirty_paths: tuple[str, ...] = ()) -> str | None:
    """HEAD of the git checkout at ``repo`` (None outside one), with "+dirty" when any of
    ``dirty_paths`` differs from it (the code a recorded artifact depends on)."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                             check=False, timeout=30)
        return out.stdout.strip() if out.returncode == 0 else ""
    try:
        head = git("rev-parse", "HEAD")
        dirty = bool(dirty_paths) and bool(git("status", "--porcelain", "--", *dirty_paths))
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def versions() -> dict[str, str | None]:
    import diffusers
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "git_commit": git_commit()}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Meter:
    """Wall time and peak memory of a block: CUDA peak allocation, else sampled RSS growth."""

    def __init__(self, device: str):
        self.device = device
        self.peak_mb = 0.0

    def __enter__(self) -> Self:
        self.started = time.time()
        self._t0 = time.perf_counter()
        self._rss0 = self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.wall_s = time.perf_counter() - self._t0
        self.finished = time.time()
        if self.device == "cuda":
            import torch

            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak_mb = max(self._peak, _rss_bytes()) - self._rss0
            self.peak_mb = max(0.0, self.peak_mb / 2**20)


def device_label(device) -> str:
    """What ran the work, for records and reports: the GPU's name, or the CPU's core and
    torch thread counts."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
