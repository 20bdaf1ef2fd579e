"""The quality stage: KID, diversity, near-copies and class grids of the shards."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import AugmentConfig
from pipeline.runs import read_json, run_stage
from pipeline.stages.inputs import dataset_for
from pipeline.stages.keys import stage_keys


def run_quality(run_dir: Path, config: AugmentConfig) -> dict:
    keys = stage_keys(config)

    def body(device: str) -> tuple[dict, dict]:
        if not config.quality.enabled:
            return {}, {"enabled": False}
        from pipeline.evaluate.quality import evaluate_run_quality

        qcfg = config.quality.component()
        out = evaluate_run_quality(run_dir, dataset_for(config), qcfg,
                                   encoder=config.encoder, device=device,
                                   progress=config.progress)
        summary = read_json(out) or {}
        return {"quality": "quality"}, summary.get("overall", {})

    return run_stage(run_dir, config, "quality", keys["quality"], body)
