"""The loop stage: the second round, from pseudo-labels to round 2's two arms."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import AugmentConfig
from pipeline.integrity import check_record, check_round
from pipeline.runs import ROUND_TWO, aggregate_units, finished_record, flat_outputs
from pipeline.stages.encode import run_encode
from pipeline.stages.inputs import dataset_for, ssl_rel
from pipeline.stages.keys import stage_keys
from pipeline.stages.pseudo import ROUND_TWO_ARMS, round_two_grids, run_pseudo
from pipeline.stages.sample import run_sample
from pipeline.stages.shards import run_shards
from pipeline.stages.ssl import run_ssl_arm
from pipeline.stages.tune import run_tune


def run_loop(run_dir: Path, config: AugmentConfig) -> dict | None:
    """The second round (``loop.rounds: 2``): pseudo-labels, then round 2's encode, tune,
    sample and shards in ``round-2/``, then its two arms for every seed. None when off.

    The flow runs the same steps as tasks (the per-class ones on its task runner); this
    function then only writes the record.
    """
    if config.loop.rounds == 1:
        return None
    keys = stage_keys(config)
    rec = finished_record(run_dir, "loop", keys["loop"])
    if rec is not None:
        check_record(run_dir, "loop", rec, flat_outputs(rec.get("outputs", {})))
        check_round(run_dir / ROUND_TWO)
        return {**rec, "skipped": True}
    pseudo = run_pseudo(run_dir, config)
    run_encode(run_dir, config, loop_round=2)
    run_tune(run_dir, config, loop_round=2)
    run_sample(run_dir, config, loop_round=2)
    shards = run_shards(run_dir, config, loop_round=2)
    units = {ssl_rel(a, s): run_ssl_arm(run_dir, config, a, s)
             for a in ROUND_TWO_ARMS for s in config.ssl.seeds}
    grids = round_two_grids(run_dir, config)
    return aggregate_units(run_dir, config, "loop", keys["loop"], units,
                            {"round": ROUND_TWO, "ssl": list(units), "grids": grids},
                            {"pseudo": pseudo["metrics"], "rows": shards["metrics"]["rows"],
                             "kept_share": shards["metrics"].get("kept_share"),
                             "class_names": list(dataset_for(config).class_names),
                             "arms": list(ROUND_TWO_ARMS), "seeds": list(config.ssl.seeds)})
