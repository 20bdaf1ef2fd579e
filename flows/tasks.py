"""Prefect tasks: each calls one ``pipeline`` function with a run directory and the config.

Tasks pass paths and small records, never tensors, so any task runner (threads on one
machine, Dask workers elsewhere) can run them. Skipping finished work is the stages' job
(their completion records are keyed on config + upstream keys, never on a run id), so
Prefect's own result cache is off: ``NO_CACHE``.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.logs import route_logs
from pipeline import runs, stages
from pipeline.config import AugmentConfig
from pipeline.preflight import preflight
from pipeline.runs import init_run_dir
from pipeline.stages.inputs import adapter_rel, round_root, sample_rel, ssl_rel
from pipeline.stages.pseudo import run_pseudo
from pipeline.stages.sample import run_sample_class
from pipeline.stages.ssl import run_ssl_arm
from pipeline.stages.tune import run_tune_class

route_logs()  # the stages' log lines into the run's logs (flows.logs)

_opts = {"cache_policy": NO_CACHE, "persist_result": False}


@task(name="preflight", **_opts)
def preflight_task(config: AugmentConfig) -> dict:
    """Fail in seconds, naming the parameter, when an input of the run is missing."""
    return preflight(config)


@task(name="prepare-run", **_opts)
def prepare_run(config: AugmentConfig) -> Path:
    """The run directory with its config (the flow holds the directory's lock already)."""
    return init_run_dir(config)


def _stage_task(stage: str, fn=None):
    fn = fn or stages.STAGE_FUNCTIONS[stage]

    @task(name=stage, task_run_name=f"{stage}-round{{loop_round}}", **_opts)
    def run(run_dir: Path, config: AugmentConfig, loop_round: int = 1) -> dict | None:
        """``loop_round`` 2: the generation stages again, in ``round-2/`` (``loop.rounds: 2``)."""
        with runs.stage_failure_recorded(run_dir, stage):
            if loop_round == 1:
                return fn(run_dir, config)
            return fn(run_dir, config, loop_round=loop_round)

    run.__doc__ = f"Stage {stage!r}: {fn.__module__}.{fn.__name__}."
    return run


split = _stage_task("split")
pretrain = _stage_task("pretrain")
fit = _stage_task("fit")
encode = _stage_task("encode")
tune = _stage_task("tune")      # after the per-class units: writes the stage record
sample = _stage_task("sample")  # likewise
shards = _stage_task("shards")
quality = _stage_task("quality")
ssl = _stage_task("ssl")
pseudo = _stage_task("pseudo", run_pseudo)  # round 2's pseudo-labels
loop = _stage_task("loop")  # after round 2's tasks: writes the loop record
report = _stage_task("report")


def use_worker_gpu() -> None:
    """On a Dask worker of a machine with several GPUs, take GPU ``worker number mod count``
    (LocalCluster names its workers 0, 1, ...), so n workers spread over the cards."""
    import torch

    if torch.cuda.device_count() < 2:
        return
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not on a Dask worker
        return
    index = int(name) if str(name).isdigit() else sum(map(ord, str(name)))
    torch.cuda.set_device(index % torch.cuda.device_count())


@task(name="tune-class", task_run_name="tune-{class_idx}-round{loop_round}", **_opts)
def tune_class(run_dir: Path, config: AugmentConfig, class_idx: int | None, loop_round: int = 1) -> str:
    """Tune one class's adapter; returns its directory."""
    use_worker_gpu()
    with runs.stage_failure_recorded(run_dir, "tune"):
        run_tune_class(run_dir, config, class_idx, loop_round)
    return str(round_root(run_dir, loop_round) / adapter_rel(class_idx))


@task(name="sample-class", task_run_name="sample-{class_idx}-round{loop_round}", **_opts)
def sample_class(run_dir: Path, config: AugmentConfig, class_idx: int, loop_round: int = 1) -> str:
    """Masked sampling for one class; returns its sample directory."""
    use_worker_gpu()
    with runs.stage_failure_recorded(run_dir, "sample"):
        run_sample_class(run_dir, config, class_idx, loop_round)
    return str(round_root(run_dir, loop_round) / sample_rel(class_idx))


@task(name="ssl-arm", task_run_name="ssl-{arm}-seed{seed}", **_opts)
def ssl_arm(run_dir: Path, config: AugmentConfig, arm: str, seed: int) -> str:
    """Train one classifier unit (``ssl/<arm>/seed-<s>``); returns its directory."""
    use_worker_gpu()
    with runs.stage_failure_recorded(run_dir, "ssl"):
        run_ssl_arm(run_dir, config, arm, seed)
    return str(run_dir / ssl_rel(arm, seed))


@task(name="append-history", **_opts)
def append_history(run_dir: Path, history: str) -> dict:
    """Add the run's row to the benchmark history table and re-render history.html."""
    from pipeline.paths import resolve_path
    from pipeline.report.history import append_history as append
    from pipeline.report.history import render_history

    path = resolve_path(history)
    row = append(path, run_dir)
    page = render_history(path, path.parent)
    return {"history": str(path), "page": str(page), "run_id": row["run_id"]}


def artifact_key(kind: str, config: AugmentConfig) -> str:
    """``<kind>-<run name>``: one key per distinct run (preset, data, config hash), so a run
    of another folder under the same preset gets its own artifact instead of a new version
    of the preset's; the run name is already ``[a-z0-9-]``, all Prefect keys accept."""
    return f"{kind}-{runs.run_name(config)}"


@task(name="publish-report", **_opts)
def publish_report(run_dir: Path, config: AugmentConfig) -> dict[str, str]:
    """The run's Markdown summary and results table as Prefect artifacts, keyed by run name,
    so the UI (and ``prefect artifact inspect report-<run name>``) shows each run's latest."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from pipeline.report.build import artifacts

    markdown, table = artifacts(run_dir)
    keys = {"markdown": artifact_key("report", config),
            "table": artifact_key("results", config)}
    create_markdown_artifact(markdown=markdown, key=keys["markdown"],
                             description=f"anl-augment report for {run_dir}")
    create_table_artifact(table=table, key=keys["table"],
                          description=f"SSL arms of {run_dir} (error in %)")
    return keys
