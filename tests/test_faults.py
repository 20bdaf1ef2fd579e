"""The fault battery: a kill at every stage boundary and inside each chunked writer, a full
disk at every write, a SIGKILLed `augment run` (no Prefect server left behind), and the disk
estimate against what a run writes. Each asserts what the user gets: nothing lost or
duplicated after a rerun, the failure recorded for the stage that failed, no temp files.

Two runs at once: tests/test_run_lock.py.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flow_fixtures import REPO

from pipeline import atomic, stages
from pipeline.config import with_overrides
from pipeline.run_lock import run_lock
from pipeline.runs import FAILED, init_run_dir, read_json, run_status, stage_failure_recorded

# Runs the stages (pipeline.stages.run_all, under the run lock like the flow) and dies
# without cleanup (os._exit: no finally, no atexit, like SIGKILL) at a chosen point:
# argv[3] = "stage:<name>" after that stage's record, or "call:<module>:<attr>:<n>" right
# after the n-th call of a writer returns.
DIE = """\
import importlib, os, sys
from pathlib import Path
from pipeline.config import AugmentConfig
from pipeline import stages
from pipeline.run_lock import run_lock
cfg = AugmentConfig.model_validate_json(Path(sys.argv[1]).read_text())
kind, _, where = sys.argv[3].partition(":")
if kind == "stage":
    for name, fn in list(stages.STAGE_FUNCTIONS.items()):
        def wrapped(*a, _fn=fn, _name=name, **k):
            rec = _fn(*a, **k)
            if _name == where:
                os._exit(9)
            return rec
        stages.STAGE_FUNCTIONS[name] = wrapped
else:
    module, attr, n = where.split(":")
    try:
        owner = importlib.import_module(module)
    except ImportError:  # module.Class: patch the method on its class
        module, _, cls = module.rpartition(".")
        owner = getattr(importlib.import_module(module), cls)
    real, calls = getattr(owner, attr), []
    def dying(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) == int(n):
            os._exit(9)
        return out
    setattr(owner, attr, dying)
with run_lock(sys.argv[2]):
    stages.run_all(Path(sys.argv[2]), cfg)
"""


def die_at(cfg, run_dir: Path, where: str, tmp_path: Path) -> int:
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.model_dump_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", DIE, str(cfg_file), str(run_dir), where],
                          cwd=REPO, env=env, timeout=600, check=False).returncode


def fingerprint(run_dir: Path) -> dict:
    """What a finished run must hold whatever happened on the way: each shard's rows (by
    content), the synthetic rows per class, each arm's test error."""
    from pipeline.data.shards import read_shards

    arrays = read_shards(run_dir / "shards")
    frame = arrays.frame
    rows = sorted(hashlib.sha256(im.tobytes()).hexdigest()[:16] for im in arrays.images)
    arms = {p.parent.parent.name: read_json(p)["top1_error"]
            for p in run_dir.glob("ssl/*/seed-*/metrics.json")}
    return {"rows": rows, "per_class": frame.groupby("label").size().to_dict(), "arms": arms}


def temp_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob(".*") if ".tmp-" in p.name or ".adopt-" in p.name]


@pytest.fixture()
def reference(flow_cfg, tmp_path):
    """An uninterrupted run of the same config in a runs dir of its own."""
    cfg = with_overrides(flow_cfg, {"runs_dir": str(tmp_path / "reference")})
    run_dir = init_run_dir(cfg)
    stages.run_all(run_dir, cfg)
    return fingerprint(run_dir)


def test_disk_estimate_is_within_2x_of_what_a_run_writes(flow_cfg):
    from pipeline.models import resolve_base_model
    from pipeline.preflight import estimated_output_bytes

    run_dir = init_run_dir(flow_cfg)
    stages.run_all(run_dir, flow_cfg)
    wrote = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
    planned = estimated_output_bytes(flow_cfg, 2, (28, 28, 1),
                                     resolve_base_model(flow_cfg.base_model))
    assert wrote / 2 <= planned <= 2 * wrote, (planned, wrote)


@pytest.mark.slow
def test_kill_at_every_stage_boundary_loses_and_repeats_nothing(flow_cfg, tmp_path, reference):
    """Each process dies right after the next stage's record: the rerun skips what finished
    (its files untouched) and the last run ends as an uninterrupted one does."""
    run_dir = init_run_dir(flow_cfg)
    # Not pretrain (the base is given) nor loop (one round): they write no record.
    for name in [s for s in stages.STAGE_FUNCTIONS if s not in ("pretrain", "loop")][:-1]:
        assert die_at(flow_cfg, run_dir, f"stage:{name}", tmp_path) == 9, name
        assert read_json(run_dir / "stages" / f"{name}.json"), name
    with run_lock(run_dir):
        records = stages.run_all(run_dir, flow_cfg)
    assert all(r.get("skipped") for s, r in records.items() if s != "report")
    assert fingerprint(run_dir) == reference and not temp_files(run_dir)


# Every writer that writes a stage's output in pieces, killed after its first piece.
CHUNKED_WRITERS = {
    "tune-units": "pipeline.stages.tune:run_tune_class:1",
    "sample-chunks": "pipeline.stages.sample:save_npz:1",
    "shard-files": "pipeline.data.shards.ShardWriter:_finish_shard:1",
    "ssl-checkpoints": "pipeline.ssl.trainer.Trainer:save_checkpoint:1",
    "ssl-arms": "pipeline.stages.ssl:run_ssl_arm:1",
}


@pytest.mark.slow
@pytest.mark.parametrize("writer", list(CHUNKED_WRITERS))
def test_kill_inside_each_chunked_writer_then_rerun(flow_cfg, tmp_path, reference, writer):
    cfg = flow_cfg
    if writer == "shard-files":  # several shard files, so the kill falls between two
        cfg = with_overrides(flow_cfg, {"shards.rows_per_shard": 2})
    run_dir = init_run_dir(cfg)
    assert die_at(cfg, run_dir, f"call:{CHUNKED_WRITERS[writer]}", tmp_path) == 9
    with run_lock(run_dir):  # the next run's start removes the killed writer's temp files
        stages.run_all(run_dir, cfg)
    assert not temp_files(run_dir)
    got = fingerprint(run_dir)
    if writer == "shard-files":  # smaller shards: the same rows, other arms' batches
        got["arms"] = reference["arms"]
    assert got == reference


def test_disk_full_at_every_write_is_recorded_and_resumed(flow_cfg, tmp_path, reference,
                                                          monkeypatch):
    """Each attempt's disk fills at the first write of a file that has not met a full disk
    yet, so every file a run writes atomically meets ENOSPC once. Each failure is
    recorded for the stage that met it, whatever the disk says; no temp file stays; the run
    that finally gets through ends as an uninterrupted one."""
    run_dir = init_run_dir(flow_cfg)
    real, met, calls = atomic.atomic_write, set(), []

    def full_disk(path, *a, **k):
        # The disk fills at the first write of a file that never met a full disk, and
        # stays full for the rest of the attempt.
        if calls or str(path) not in met:
            met.add(str(path))
            calls.append(str(path))
            raise OSError(errno.ENOSPC, "No space left on device (simulated)", str(path))
        return real(path, *a, **k)

    # Modules that bound atomic_write by name get the full disk too.
    for module in [m for name, m in sys.modules.items() if name.startswith("pipeline")]:
        if getattr(module, "atomic_write", None) is real:
            monkeypatch.setattr(module, "atomic_write", full_disk)
    for attempt in range(300):
        calls.clear()
        failed_in = None
        try:
            for name, fn in stages.STAGE_FUNCTIONS.items():
                failed_in = name
                with stage_failure_recorded(run_dir, name):
                    fn(run_dir, flow_cfg)
            break
        except OSError as e:
            assert e.errno == errno.ENOSPC
        info = run_status(run_dir)
        assert info.status == "failed" and "No space left" in info.error, attempt
        assert read_json(run_dir / "stages" / FAILED)["stage"] == failed_in, attempt
        assert not temp_files(run_dir), attempt
    else:
        pytest.fail("the run never got through")
    assert attempt > len(stages.STAGE_FUNCTIONS)  # at least one failure per stage
    monkeypatch.undo()
    (run_dir / "stages" / FAILED).unlink(missing_ok=True)
    assert fingerprint(run_dir) == reference


@pytest.mark.slow
def test_sigkilled_augment_run_leaves_no_prefect_server(flow_cfg, tmp_path):
    run_dir = init_run_dir(flow_cfg)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "OMP_NUM_THREADS": "1",
           "PREFECT_API_URL": ""}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(run_dir)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    deadline = time.monotonic() + 240
    while server is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        server = next((pid for pid, cmd in children(proc.pid) if "uvicorn" in cmd), None)
    assert server is not None, "the temporary server never started"
    time.sleep(2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and alive(server):
        time.sleep(0.2)
    assert not alive(server), f"the temporary Prefect server (pid {server}) outlived its parent"


def children(pid: int) -> list[tuple[int, str]]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                out.append((int(stat.parent.name), cmd))
        except (OSError, IndexError, ValueError):
            continue
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_disk_estimate_counts_a_second_round_with_its_default_per_condition():
    """loop.per_condition None means sampling.per_condition: the estimate must read it so (it
    multiplied by None and failed every two-round run's pre-flight)."""
    from pinned_presets import FROZEN_DEMO  # round 2 needs the baseline arm

    from pipeline.config import load_config
    from pipeline.preflight import estimated_output_bytes

    one = estimated_output_bytes(load_config(FROZEN_DEMO), 10, (28, 28, 1))
    two = load_config(FROZEN_DEMO, ["loop.rounds=2", "loop.per_condition=null"])
    assert two.loop.per_condition is None
    assert estimated_output_bytes(two, 10, (28, 28, 1)) > one
