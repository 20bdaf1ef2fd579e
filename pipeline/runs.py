"""Run directories: naming, the resolved config file, and listing runs with their status.

A run directory is ``<runs_dir>/<preset>-<confighash8>``: the same config always maps to
the same directory, so rerunning it resumes and skips finished stages.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.atomic import atomic_write_json, atomic_write_text  # noqa: F401  (re-exported)
from pipeline.config import REPO_ROOT, AugmentConfig, config_hash

STAGE_ORDER = ("split", "pretrain", "encode", "tune", "sample", "shards", "quality", "ssl", "loop",
               "report")
LOCK_NAME = "running.json"


def read_json(path: str | Path) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_name(config: AugmentConfig) -> str:
    return f"{config.preset}-{config_hash(config)[:8]}"


def run_dir_for(config: AugmentConfig) -> Path:
    return config.runs_root() / run_name(config)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    import diffusers
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "git_commit": _git_commit()}


def init_run_dir(config: AugmentConfig) -> Path:
    """Create the run directory and write ``config.json`` (resolved config + hash + versions)."""
    run_dir = run_dir_for(config)
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    record = config.model_dump(mode="json")
    record.update(config_hash=config_hash(config), preset=config.preset, versions=versions())
    atomic_write_json(run_dir / "config.json", record)
    return run_dir


def load_run_config(run_dir: str | Path) -> AugmentConfig:
    data = read_json(Path(run_dir) / "config.json")
    if data is None:
        raise FileNotFoundError(f"{run_dir} has no config.json; is it a run directory?")
    for k in ("config_hash", "versions"):
        data.pop(k, None)
    return AugmentConfig.model_validate(data)


# --------------------------------------------------------------------------- liveness


def mark_running(run_dir: Path) -> Path:
    return atomic_write_json(run_dir / "stages" / LOCK_NAME,
                             {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})


def clear_running(run_dir: Path) -> None:
    lock = run_dir / "stages" / LOCK_NAME
    info = read_json(lock)
    if info and info.get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


def _is_alive(info: dict | None) -> bool:
    if not info or info.get("host") != socket.gethostname():
        return bool(info)  # another host: trust the lock
    try:
        os.kill(int(info["pid"]), 0)
        return True
    except (OSError, ValueError, KeyError):
        return False


# --------------------------------------------------------------------------- listing


@dataclass
class RunInfo:
    path: Path
    preset: str
    config_hash: str
    status: str  # complete | running | incomplete | failed | empty
    stages_done: list[str] = field(default_factory=list)
    modified: float = 0.0
    wall_s: float = 0.0
    error: str | None = None


def run_status(run_dir: str | Path) -> RunInfo:
    run_dir = Path(run_dir)
    cfg = read_json(run_dir / "config.json") or {}
    stages_dir = run_dir / "stages"
    records = {p.stem: read_json(p) for p in stages_dir.glob("*.json") if p.name != LOCK_NAME}
    done = [s for s in STAGE_ORDER if records.get(s)]
    failure = read_json(stages_dir / "failed.json")
    if "report" in done:
        status = "complete"
    elif _is_alive(read_json(stages_dir / LOCK_NAME)):
        status = "running"
    elif failure:
        status = "failed"
    else:
        status = "incomplete" if done else "empty"
    mtimes = [p.stat().st_mtime for p in [run_dir, *stages_dir.glob("*.json")] if p.exists()]
    return RunInfo(run_dir, cfg.get("preset", run_dir.name.rsplit("-", 1)[0]),
                   cfg.get("config_hash", ""), status, done, max(mtimes, default=0.0),
                   sum(float(r.get("wall_s", 0.0)) for s, r in records.items() if s in STAGE_ORDER
                       and r),
                   failure.get("error") if failure and status == "failed" else None)


def list_runs(runs_root: str | Path) -> list[RunInfo]:
    """Every run directory under ``runs_root`` (newest first)."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    runs = [run_status(p) for p in root.iterdir()
            if p.is_dir() and not p.name.startswith(("_", ".")) and (p / "config.json").exists()]
    return sorted(runs, key=lambda r: r.modified, reverse=True)
