"""The augment flow with the second round (``loop.rounds: 2``) on Prefect's test harness (a
temporary Prefect API server): the round-2 tasks run after the baseline, on the flow's task
runner, and leave the same records and outputs as the stage functions do; the report is
published as Prefect artifacts that the API gives back."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline.config import with_overrides
from pipeline.runs import ROUND_TWO, init_run_dir, list_runs, read_json
from pipeline.stages.keys import stage_keys
from pipeline.stages.pseudo import PSEUDO_FILE

pytestmark = pytest.mark.slow  # the Prefect harness starts a temporary API (about 15 s)


def test_flow_runs_the_second_round_and_a_rerun_skips_it(flow_prefect, flow_cfg):
    from flows.augment import augment

    cfg = with_overrides(flow_cfg, {"loop.rounds": 2, "loop.threshold": 0.0,
                                    "loop.per_class": 3, "ssl.arms": ["baseline", "augmented"]})
    report = augment(config=cfg)
    run_dir = init_run_dir(cfg)
    assert str(run_dir) in report
    r2 = run_dir / ROUND_TWO
    for name in ("pseudo", "encode", "tune", "sample", "shards"):
        assert read_json(r2 / "stages" / f"{name}.json")["key"] == \
            stage_keys(cfg)["pseudo" if name == "pseudo" else f"{name}-r2"], name
    loop = read_json(run_dir / "stages" / "loop.json")
    assert loop["key"] == stage_keys(cfg)["loop"]
    pseudo = pd.read_parquet(r2 / PSEUDO_FILE)
    assert loop["metrics"]["pseudo"]["pseudo_labeled"] == len(pseudo)
    selftrain = read_json(run_dir / "ssl/selftrain/seed-0/metrics.json")
    assert selftrain["num_synthetic"] == len(pseudo)
    augmented = read_json(run_dir / "ssl/augmented-r2/seed-0/metrics.json")
    assert augmented["num_synthetic"] == loop["metrics"]["rows"]
    (info,) = list_runs(run_dir.parent)
    assert info.status == "complete" and "loop" in info.stages_done

    # The report, published as Prefect artifacts keyed by run name, read back from the API.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.tasks import artifact_key

    keys = [artifact_key("report", cfg), artifact_key("results", cfg)]
    assert keys == [f"report-{run_dir.name}", f"results-{run_dir.name}"]
    with get_client(sync_client=True) as client:
        # Other flow tests on this server may publish under the same keys: the newest
        # version of each key is this run's.
        found = {a.key: a for a in sorted(client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys))),
            key=lambda a: a.created)}
    assert set(found) == set(keys)
    assert found[keys[0]].type == "markdown"
    # The same summary as report.md, now with the report stage's own row in the stage table.
    md = (run_dir / "report.md").read_text()
    published = found[keys[0]].data
    assert published.split("## Stages")[0] == md.split("## Stages")[0]
    assert "| report | done |" in published and "| report | done |" not in md
    rows = found[keys[1]].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    errors = {r["arm"]: r["error_pct"] for r in rows}
    assert errors["selftrain"] == pytest.approx(100 * selftrain["top1_error"], abs=0.01)
    assert errors["augmented-r2"] == pytest.approx(100 * augmented["top1_error"], abs=0.01)

    records = {p: p.read_text() for p in run_dir.rglob("stages/*.json")}
    augment(config=cfg)
    assert {p: p.read_text() for p in run_dir.rglob("stages/*.json")} == records
