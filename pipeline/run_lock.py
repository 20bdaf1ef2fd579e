"""One writer per run directory: a ``filelock`` lock on ``stages/running.lock``, held by the
process that runs the flow (``augment run``, a deployment's flow run, a sweep repetition) or
writes the report, for as long as it writes into the directory.

The lock is the operating system's (``fcntl``): it is released when its holder dies, however
it dies, so a killed run never blocks the next one. Who holds it is written beside it, in
``stages/running.json`` (pid, host, start time and command), only to name the holder in the
message a second run gets; that file may outlive a killed holder, so it is trusted only while
the lock is actually held. The lock is re-entrant within a process (``augment run`` takes it
before Prefect starts, the flow takes it again); the units a run hands to worker processes
(per-class tuning, classifier arms) never take it: their run's process holds it for them.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from pipeline.atomic import atomic_write_json
from pipeline.runs import LOCK_NAME, read_json

LOCK_FILE = "running.lock"
# A holder writes its sidecar right after taking the lock; a second run that finds the lock
# taken but no live holder named retries this long before naming none.
_NAME_GRACE_S = 2.0

log = logging.getLogger(__name__)


class RunLockedError(RuntimeError):
    """Another process is writing into this run directory (the CLI exits 2 on it)."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return True


def holder(run_dir: str | Path) -> dict | None:
    """The sidecar of the run directory's lock (who holds it, or who last did)."""
    return read_json(Path(run_dir) / "stages" / LOCK_NAME)


def describe_holder(info: dict | None) -> str:
    if not info:
        return "another process (it has not written its name yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("since", 0))))
    command = f", running `{info['command']}`" if info.get("command") else ""
    return f"pid {info.get('pid')} on {info.get('host')} since {since}{command}"


def _lock(run_dir: Path) -> FileLock:
    # One instance per path in this process (is_singleton) shared by all its threads, so the
    # CLI's hold and the flow's (possibly on Prefect's thread) are one re-entrant hold, not
    # two that deadlock. preserve_lock_file: the native lock only, never filelock's soft
    # marker file, which a SIGKILL would leave behind.
    return FileLock(str(run_dir / "stages" / LOCK_FILE), is_singleton=True, thread_local=False,
                    preserve_lock_file=True)


def _live(info: dict | None) -> bool:
    return bool(info) and (info.get("host") != socket.gethostname()
                           or pid_alive(int(info.get("pid", 0))))


@contextmanager
def run_lock(run_dir: str | Path, wait: bool = False, command: str | None = None):
    """Hold ``run_dir``'s lock for the ``with`` body. Taken: raise :class:`RunLockedError`
    naming the holder, or with ``wait`` block until the holder finishes."""
    run_dir = Path(run_dir)
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    lock = _lock(run_dir)
    outer = not lock.is_locked  # this process's first hold writes (and later removes) the sidecar
    if wait and outer:
        try:
            lock.acquire(blocking=False)
        except Timeout:
            log.warning("run directory %s is in use by %s; waiting for it", run_dir,
                        describe_holder(holder(run_dir)))
            lock.acquire()
    else:
        deadline = time.monotonic() + _NAME_GRACE_S
        while True:
            try:
                lock.acquire(blocking=False)
                break
            except Timeout:
                info = holder(run_dir)
                if _live(info) or time.monotonic() > deadline:
                    raise RunLockedError(
                        f"run directory {run_dir} is in use by {describe_holder(info if _live(info) else None)}; "
                        "two runs of one config would both do all the work and overwrite each "
                        "other's files. Wait for it to finish (`augment run ... --wait` queues "
                        "behind it), or stop it") from None
                time.sleep(0.1)
    try:
        if outer:
            remove_leftovers(run_dir)  # holding the lock: nobody else may be writing here
            words = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
            atomic_write_json(run_dir / "stages" / LOCK_NAME,
                              {"pid": os.getpid(), "host": socket.gethostname(),
                               "since": time.time(), "command": words[:300]})
        yield run_dir
    finally:
        if outer:
            sidecar = run_dir / "stages" / LOCK_NAME
            if (read_json(sidecar) or {}).get("pid") == os.getpid():
                sidecar.unlink(missing_ok=True)
        lock.release()


# --------------------------------------------------------------------------- leftovers

# What a writer killed mid-write leaves: ``.<name>.tmp-<pid>`` (a unit's folder before its
# rename, pipeline.stages.tune), ``.<name>.tmp-<pid>-<random>`` (pipeline.atomic and the
# shard writer), ``.<name>.adopt-<pid>`` (pipeline.runs.place). The pid says whether its
# writer may still be at work.
_TAGGED = re.compile(r"^\..+\.(?:tmp|adopt)-(\d+)(?:-[^/]*)?$")
# The atomic writer's names before they carried a pid (``.<name>.<8 random>.tmp``): no pid to
# ask, so only once old enough that no write could still be going on.
_UNTAGGED = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
_UNTAGGED_AGE_S = 3600.0


def is_leftover(path: Path, now: float | None = None) -> bool:
    if m := _TAGGED.match(path.name):
        return not pid_alive(int(m.group(1)))
    if _UNTAGGED.match(path.name):
        try:
            return (now or time.time()) - path.lstat().st_mtime > _UNTAGGED_AGE_S
        except FileNotFoundError:
            return False
    return False


def remove_leftovers(run_dir: str | Path) -> list[Path]:
    """Remove the temporary files and folders of dead writers under ``run_dir`` (a live
    pid's are left alone: that writer may still rename them); returns what went."""
    from pipeline.runs import remove_tree

    gone, now = [], time.time()
    for top, dirs, files in os.walk(run_dir):
        for name in [d for d in dirs if d.startswith(".")] + [f for f in files if f.startswith(".")]:
            path = Path(top) / name
            if is_leftover(path, now):
                try:
                    remove_tree(path)
                except FileNotFoundError:
                    continue
                gone.append(path)
        dirs[:] = [d for d in dirs if (Path(top) / d) not in gone]
    if gone:
        log.info("removed %d leftover temporary file(s) of killed runs in %s: %s", len(gone),
                 run_dir, ", ".join(str(p.relative_to(run_dir)) for p in gone[:5]))
    return gone
