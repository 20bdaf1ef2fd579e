"""The pipeline's stages: one module per stage, each with its ``run_<stage>(run_dir, config)
-> record``, bound here (``STAGE_FUNCTIONS``) to the stages ``pipeline.stage_graph`` declares.

Every stage reads paths and writes paths inside the run directory and ends by writing its
completion record ``stages/<stage>.json`` (atomically, last). A stage whose record exists
with the same key returns it without doing anything: the key hashes the config parts the
stage reads plus its upstream keys (``pipeline.stages.keys``), never a run id. What the
stages read from a run is ``pipeline.stages.inputs``; the run store that records, reuses and
hard-links their outputs is ``pipeline.runs``. Per-class work (tuning, sampling) and the
classifier arms are units (``run_tune_class``, ``run_sample_class``, ``run_ssl_arm``) that a
task runner may run in parallel. The work itself lives below: ``pipeline.generate``,
``pipeline.evaluate``, ``pipeline.ssl``, ``pipeline.data``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.config import AugmentConfig
from pipeline.stage_graph import STAGE_ORDER
from pipeline.stages.encode import run_encode
from pipeline.stages.fit import run_fit
from pipeline.stages.loop import run_loop
from pipeline.stages.pretrain import run_pretrain
from pipeline.stages.quality import run_quality
from pipeline.stages.report import run_report
from pipeline.stages.sample import run_sample
from pipeline.stages.shards import run_shards
from pipeline.stages.split import run_split
from pipeline.stages.ssl import run_ssl
from pipeline.stages.tune import run_tune

STAGE_FUNCTIONS: dict[str, Callable[[Path, AugmentConfig], dict | None]] = {
    "split": run_split, "pretrain": run_pretrain, "fit": run_fit, "encode": run_encode,
    "tune": run_tune, "sample": run_sample, "shards": run_shards, "quality": run_quality, "ssl": run_ssl,
    "loop": run_loop, "report": run_report,
}
assert tuple(STAGE_FUNCTIONS) == STAGE_ORDER


def run_all(run_dir: Path, config: AugmentConfig, until: str | None = None) -> dict[str, dict]:
    """Every stage in order in this process (no Prefect): the reference the flow must match."""
    records, run_dir = {}, Path(run_dir)
    for name, fn in STAGE_FUNCTIONS.items():
        rec = fn(run_dir, config)
        if rec is not None:
            records[name] = rec
        if name == until:
            break
    return records
