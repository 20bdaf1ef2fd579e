"""The report stage: the run's HTML and Markdown report, from its own records."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import AugmentConfig
from pipeline.runs import run_stage
from pipeline.stages.keys import stage_keys


def run_report(run_dir: Path, config: AugmentConfig) -> dict:
    keys = stage_keys(config)

    def body(device: str) -> tuple[dict, dict]:
        from pipeline.report.build import build_run_report

        paths = build_run_report(run_dir)
        rels = {Path(p).suffix.lstrip("."): str(Path(p).relative_to(run_dir)) for p in paths}
        return rels, {}

    # The report reads this run's own records (wall times, devices), so it is never adopted.
    return run_stage(run_dir, config, "report", keys["report"], body, adopt=False)
