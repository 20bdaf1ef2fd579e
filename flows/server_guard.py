"""The temporary Prefect API server dies with the process that started it.

Without an API URL, Prefect starts a temporary server (``prefect.server.api.server.
SubprocessASGIServer``: ``python -m uvicorn ...`` in a child process) and stops it at exit.
A SIGKILL of that parent skips every exit hook, so the server (about 260 MB) ran on,
re-parented to PID 1, after every killed ``augment`` run. :func:`install` makes Prefect start
the server under a few lines of watchdog instead: a thread in the server's process that
stops it once its parent is gone (its parent pid changes when the parent dies, however it
dies). ``PR_SET_PDEATHSIG`` would be quicker but fires when the *thread* that started the
child exits, and Prefect may start the server from a short-lived thread.
"""

from __future__ import annotations

import os
import subprocess
import types

# Run in the server's process by ``python -c``: argv[1] is the parent pid, the rest is the
# uvicorn command line Prefect built. Self-contained (no import of this package): the server
# process's sys.path need not reach it.
WATCHDOG = """\
import os, runpy, signal, sys, threading, time
parent = int(sys.argv[1])
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's own graceful shutdown first
    time.sleep(3)  # then no more waiting: nobody is left to talk to it
    os._exit(1)
threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
sys.argv = ["uvicorn", *sys.argv[2:]]
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


def guarded_args(args: list[str], parent: int | None = None) -> list[str]:
    """``[python, -m, uvicorn, ...]`` -> ``[python, -c, WATCHDOG, <parent pid>, ...]``; any
    other command line as given."""
    if len(args) >= 3 and list(args[1:3]) == ["-m", "uvicorn"]:
        return [args[0], "-c", WATCHDOG, str(parent or os.getpid()), *args[3:]]
    return list(args)


def _popen(*args, **kwargs):
    if args:
        args = (guarded_args(list(args[0])), *args[1:])
    elif "args" in kwargs:
        kwargs["args"] = guarded_args(list(kwargs["args"]))
    return subprocess.Popen(*args, **kwargs)


def install() -> bool:
    """Route the temporary server's start through the watchdog. Only the name ``subprocess``
    inside Prefect's server module is replaced (by a copy of the module with this Popen), so
    no other caller of subprocess is touched. False when Prefect's layout differs (the
    server then starts as before)."""
    try:
        from prefect.server.api import server
    except ImportError:
        return False
    if getattr(server.subprocess, "_anl_guarded", False):
        return True
    if not hasattr(server, "SubprocessASGIServer") or server.subprocess is not subprocess:
        return False
    shim = types.ModuleType("subprocess")
    shim.__dict__.update(vars(subprocess))
    shim.Popen = _popen
    shim._anl_guarded = True
    server.subprocess = shim
    return True

