"""One lock per run directory (pipeline.run_lock), the leftovers of killed writers, and the
failure record that must be written on a full disk (pipeline.atomic.write_record)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from flow_fixtures import REPO

from pipeline import atomic
from pipeline.run_lock import RunLockedError, holder, pid_alive, remove_leftovers, run_lock
from pipeline.runs import (
    FAILED,
    FAILED_SPARE,
    LOCK_NAME,
    read_json,
    run_status,
    stage_failure_recorded,
)

HOLD = ("import sys, time\nfrom pipeline.run_lock import run_lock\n"
        "with run_lock(sys.argv[1], command='augment run held-by-test'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(float(sys.argv[2]))\n")


def hold_in_child(run_dir: Path, seconds: float = 60.0) -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(seconds)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_holder_is_refused_naming_the_first(tmp_path):
    proc = hold_in_child(tmp_path)
    try:
        with pytest.raises(RunLockedError) as e, run_lock(tmp_path):
            pass
        msg = str(e.value)
        assert f"pid {proc.pid}" in msg and "augment run held-by-test" in msg and "--wait" in msg
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_blocks_nobody_and_its_stale_sidecar_is_replaced(tmp_path):
    proc = hold_in_child(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert holder(tmp_path)["pid"] == proc.pid  # the sidecar outlived its holder
    with run_lock(tmp_path, command="second"):
        assert holder(tmp_path)["pid"] == os.getpid() and holder(tmp_path)["command"] == "second"
    assert not (tmp_path / "stages" / LOCK_NAME).exists()


def test_wait_queues_behind_the_holder(tmp_path):
    proc = hold_in_child(tmp_path, seconds=1.5)
    t0 = time.monotonic()
    with run_lock(tmp_path, wait=True):
        assert holder(tmp_path)["pid"] == os.getpid()
    assert time.monotonic() - t0 > 0.5
    assert proc.wait(timeout=30) == 0


def test_the_lock_is_reentrant_in_one_process_across_threads(tmp_path):
    """`augment run` holds it and the flow takes it again (maybe on another thread): one
    hold, whose sidecar stays until the outer one ends."""
    with run_lock(tmp_path):
        errors = []

        def inner():
            try:
                with run_lock(tmp_path):
                    pass
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t = threading.Thread(target=inner)
        t.start()
        t.join(10)
        assert not errors and holder(tmp_path)["pid"] == os.getpid()
    assert holder(tmp_path) is None


def test_separate_run_dirs_lock_independently(tmp_path):
    """Sweep repetitions (one run directory each) never wait on each other's locks."""
    a, b = tmp_path / "rep-a", tmp_path / "rep-b"
    proc = hold_in_child(a)
    try:
        with run_lock(b):
            pass
    finally:
        proc.kill()
        proc.wait()


def test_cli_second_run_exits_2_naming_the_holder(flow_cfg, capsys):
    from flows.cli import main
    from pipeline.runs import init_run_dir

    run_dir = init_run_dir(flow_cfg)
    proc = hold_in_child(run_dir)
    try:
        assert main(["run", str(run_dir)]) == 2
    finally:
        proc.kill()
        proc.wait()
    err = capsys.readouterr().err
    assert f"is in use by pid {proc.pid}" in err and "Traceback" not in err


def test_leftovers_of_dead_writers_go_and_live_ones_stay(tmp_path):
    dead, live = dead_pid(), os.getpid()
    unit = tmp_path / "adapters" / f".class-00.tmp-{dead}"
    unit.mkdir(parents=True)
    (unit / "adapter_model.safetensors").write_bytes(b"x")
    stale_file = tmp_path / "samples" / "class-01" / f".part-0.npz.tmp-{dead}-k3j2h1"
    stale_file.parent.mkdir(parents=True)
    stale_file.write_bytes(b"half")
    adopt = tmp_path / f".shards.adopt-{dead}"
    adopt.mkdir()
    mine = tmp_path / "samples" / f".class-02.tmp-{live}"
    mine.mkdir()
    legacy_old = tmp_path / ".split.parquet.ab12cd34.tmp"
    legacy_old.write_bytes(b"")
    os.utime(legacy_old, (time.time() - 7200,) * 2)
    legacy_new = tmp_path / ".metrics.json.zz99yy88.tmp"
    legacy_new.write_bytes(b"")
    keep = tmp_path / "samples" / "class-01" / "part-0.npz"
    keep.write_bytes(b"real")

    with run_lock(tmp_path):  # taking the lock clears them
        pass
    assert not unit.exists() and not stale_file.exists() and not adopt.exists()
    assert not legacy_old.exists()
    assert mine.exists() and legacy_new.exists() and keep.exists()
    assert remove_leftovers(tmp_path) == []


def test_atomic_temp_names_carry_the_writers_pid(tmp_path, monkeypatch):
    seen = []

    def write(tmp):
        seen.append(Path(tmp).name)
        Path(tmp).write_text("{}")

    atomic.atomic_write(tmp_path / "x.json", write)
    assert seen[0].startswith(f".x.json.tmp-{os.getpid()}-")
    assert pid_alive(os.getpid()) and not pid_alive(dead_pid())


def _disk_full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device (simulated)")


def test_failure_record_is_written_on_a_full_disk_and_names_the_last_stage(flow_cfg,
                                                                           monkeypatch):
    from pipeline.runs import init_run_dir

    run_dir = init_run_dir(flow_cfg)
    stages_dir = run_dir / "stages"
    assert (stages_dir / FAILED_SPARE).stat().st_size == atomic.RECORD_BYTES
    monkeypatch.setattr(atomic, "atomic_write_bytes", _disk_full)
    for stage in ("tune", "sample"):  # first into the spare, then over the first record
        with pytest.raises(RuntimeError, match="boom"), stage_failure_recorded(run_dir, stage):
            raise RuntimeError(f"boom in {stage}" + "x" * 5000)
        rec = read_json(stages_dir / FAILED)
        assert rec["stage"] == stage and rec["error"].startswith(f"RuntimeError: boom in {stage}")
        assert (stages_dir / FAILED).stat().st_size == atomic.RECORD_BYTES
    info = run_status(run_dir)
    assert info.status == "failed" and "boom in sample" in info.error


def test_a_failure_the_stage_has_since_got_past_is_not_shown(flow_cfg):
    from pipeline.runs import init_run_dir

    run_dir = init_run_dir(flow_cfg)
    stages_dir = run_dir / "stages"
    atomic.write_record(stages_dir / FAILED, {"stage": "split", "error": "OSError: old",
                                              "time": time.time() - 100})
    (stages_dir / "split.json").write_text(json.dumps({"stage": "split", "key": "k",
                                                       "finished": time.time()}))
    info = run_status(run_dir)
    assert info.status == "incomplete" and info.error is None
