"""Progress of a loop: a tqdm bar on a terminal, log lines everywhere else.

A bar redraws itself with ``\\r``; written to a file, a pipe or a log collector (a Prefect
worker, ``augment run ... > log``) every redraw stays, glued on one line, and the lines
other code logs end up inside it. So a bar shows only when stderr is a terminal and the
caller wants one; otherwise the same calls feed a quiet tracker that logs, through the
standard ``logging`` module, a line with done/total, rate and ETA now and then (see
``LogProgress``). Whoever runs the code decides where those lines go (the flows hand the
``anl_core`` and ``pipeline`` loggers to Prefect's run logger).

Every loop of ``anl_core`` and ``pipeline`` that reports progress goes through
``progress_bar``; nothing else imports tqdm.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

# Seconds between two progress lines (at least; see LogProgress). The environment can change
# it: a test wants lines from a loop of a second, a batch job may want fewer.
EVERY_ENV = "AUGMENT_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 30.0
# A long loop logs when it has moved this share of its work, or after this many intervals,
# whichever comes first: about ten lines for a ten-minute stage, one per five minutes for a
# four-hour one.
SHARE = 0.1
MAX_INTERVALS = 10


def bars_wanted(enabled: bool = True, stream=None) -> bool:
    """Whether a tqdm bar may draw: asked for, not switched off by ``TQDM_DISABLE`` (tqdm's
    own variable: callers pass ``disable`` explicitly, which tqdm lets win over it), and the
    stream a terminal."""
    if not enabled or os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


def _every_s() -> float:
    try:
        return max(0.0, float(os.environ.get(EVERY_ENV, DEFAULT_EVERY_S)))
    except ValueError:
        return DEFAULT_EVERY_S


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


class LogProgress:
    """The bar's interface (``update``, ``set_postfix``, ``close``, iteration) writing log
    lines instead: ``desc: done/total (pct) rate unit/s, elapsed, ETA h:mm:ss, k=v``.

    A line comes when ``every_s`` seconds have passed since the last one and the loop has
    moved ``SHARE`` of its work or ``MAX_INTERVALS`` intervals have passed; loops that end
    sooner than ``every_s`` log nothing (the stage's own end line says what they did).
    """

    def __init__(self, iterable: Iterable | None = None, total: int | None = None,
                 desc: str = "", unit: str = "it", initial: int = 0,
                 logger: logging.Logger | str | None = None, every_s: float | None = None):
        self.iterable = iterable
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.logger = (logger if isinstance(logger, logging.Logger)
                       else logging.getLogger(logger or "anl_core.progress"))
        self.every_s = _every_s() if every_s is None else every_s
        self.postfix: dict[str, Any] = {}
        self.start = self._last_t = time.monotonic()
        self._last_n = initial

    def __iter__(self) -> Iterator:
        for item in self.iterable:  # type: ignore[union-attr]
            yield item
            self.update(1)

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix.update(values)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        waited = now - self._last_t
        if waited < self.every_s:
            return
        moved = (self.n - self._last_n) / self.total if self.total else 1.0
        if moved >= SHARE or (self.every_s and waited >= MAX_INTERVALS * self.every_s):
            self._last_t, self._last_n = now, self.n
            self.logger.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.{2 if rate < 100 else 0}f} {self.unit}/s, "
                     f"elapsed {_clock(elapsed)}")
        if self.total and rate > 0:
            parts[-1] += f", ETA {_clock((self.total - self.n) / rate)}"
        if self.postfix:
            parts.append(", ".join(f"{k}={v}" for k, v in self.postfix.items()))
        return "; ".join(parts)

    def close(self) -> None:
        """Nothing to erase: the lines already written are the record."""


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 enabled: bool = True, unit: str = "it", initial: int = 0, leave: bool = True,
                 logger: logging.Logger | str | None = None, **tqdm_kwargs: Any):
    """A tqdm bar when ``enabled`` and stderr is a terminal, else a ``LogProgress`` logging to
    ``logger`` (the caller's module name: the flows route by it). Both wrap ``iterable`` and
    take ``update``/``set_postfix``/``close``."""
    if bars_wanted(enabled):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                    **tqdm_kwargs)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial,
                       logger=logger)
