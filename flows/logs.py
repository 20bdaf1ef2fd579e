"""Where the pipeline's log lines go when Prefect runs it.

``pipeline`` and ``anl_core`` log through the standard ``logging`` module and know nothing
of Prefect. Prefect sends a run's lines to its API (the UI's run page) only from its own
run loggers and from the loggers named in its documented ``PREFECT_LOGGING_EXTRA_LOGGERS``
setting; ``route_logs`` names ours there, so a worker training a four-hour arm shows its
stage lines and progress in the UI.

Every module of ``flows`` that defines tasks calls ``route_logs`` when imported, which also
happens in each Dask worker process that unpickles one of them.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

LOGGERS = ("pipeline", "anl_core")
EXTRA_LOGGERS_ENV = "PREFECT_LOGGING_EXTRA_LOGGERS"
# Set by the command line, which prints the one traceback of a failure itself; inherited by
# the worker processes it starts, whose console lines land in the same terminal.
QUIET_TRACEBACKS_ENV = "AUGMENT_QUIET_RUN_TRACEBACKS"
_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
# Where a failure's frames are the engine's, not the run's (see print_failure).
_ENGINE_PATHS = (os.sep + os.path.join("site-packages", "prefect") + os.sep,
                 os.sep + os.path.join("concurrent", "futures") + os.sep)


def route_logs() -> None:
    """Hand the ``pipeline`` and ``anl_core`` loggers to Prefect's run logging, in this
    process and (through the environment) in the processes it starts."""
    named = [n.strip() for n in os.environ.get(EXTRA_LOGGERS_ENV, "").split(",") if n.strip()]
    # The setting is read when Prefect configures logging, at its import: processes started
    # from here (Dask workers, served runs) inherit it; this one may have imported Prefect
    # already, so its loggers get the same handlers below, as Prefect's setup gives them.
    os.environ[EXTRA_LOGGERS_ENV] = ",".join(dict.fromkeys(named + list(LOGGERS)))
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    handlers = logging.getLogger("prefect.extra").handlers
    for handler in handlers:
        if not any(isinstance(f, _InRunOnly) for f in handler.filters):
            handler.addFilter(_InRunOnly())
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for handler in handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        # Prefect copies handlers, not levels: left unset, the root's WARNING would drop every
        # stage and progress line. INFO also reaches the console through the root's handler.
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    if os.environ.get(QUIET_TRACEBACKS_ENV):
        quiet_run_tracebacks()


class _InRunOnly(logging.Filter):
    """Sends to the API only what is logged inside a flow or task run.

    The same stage code also runs outside Prefect (``pipeline.stages.run_all``, tests, a
    notebook in a process that imported ``flows``); there Prefect's API handler would warn
    on every line that it has no run to file it under. Those lines still reach the console.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.context import FlowRunContext, TaskRunContext

        return bool(getattr(record, "flow_run_id", None) or TaskRunContext.get()
                    or FlowRunContext.get())


class _NoRunTraceback(logging.Filter):
    """Keeps a run logger's error line on the console but not its traceback.

    Prefect logs a failure's traceback once per task run and again for each flow run it
    passes through (5 in a run whose two tuning tasks failed), and the command line prints
    it once more. The run's own API handler sits on the run logger, so it has sent the whole
    record (traceback included, for the UI) before the record propagates to the console.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.startswith(_RUN_LOGGERS):
            record.exc_info, record.exc_text = None, None
            if isinstance(record.msg, str):
                record.msg += " (traceback at the end)"
        return True


def quiet_run_tracebacks() -> None:
    """Console lines without Prefect's run tracebacks (the caller prints the failure's one)."""
    os.environ[QUIET_TRACEBACKS_ENV] = "1"
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not any(
                isinstance(f, _NoRunTraceback) for f in handler.filters):
            handler.addFilter(_NoRunTraceback())


def _engine_frame(frame: traceback.FrameSummary) -> bool:
    return any(part in frame.filename for part in _ENGINE_PATHS)


def print_failure(exc: BaseException, file=None) -> None:
    """The failure's one traceback, without the frames of Prefect's engine and the futures
    it waits on (80 of a tuning failure's 100 lines): what is left is the caller's code and
    the stage's, down to the line that raised."""
    te = traceback.TracebackException.from_exception(exc)
    for part in (te, te.__cause__, te.__context__):
        if part is None:
            continue
        kept = [f for f in part.stack if not _engine_frame(f)]
        if len(kept) < len(part.stack):
            part.stack = traceback.StackSummary.from_list(kept)
    file = sys.stderr if file is None else file
    print("".join(te.format()), end="", file=file)
    print("(frames of Prefect's engine left out; the run's page in the Prefect UI has them all)",
          file=file)
