"""The ``augment`` flow: dataset -> split -> tokens -> adapters -> samples -> shards ->
classifiers -> [second round] -> report, all in one run directory named by preset and
config hash. With ``loop.rounds: 2`` the baseline's pseudo-labels expand each class's
subset and the generation steps run again in ``round-2/`` (``pipeline.generate.pseudo_labels``).

Per-class tuning and sampling run in a subflow whose task runner the config chooses:
threads on this machine (``task_runner: default``), or Prefect's Dask task runner
(``task_runner: dask``) against ``dask_address`` or a local cluster of ``dask_n_workers``
processes. Sampling of a class starts as soon as its own adapter is tuned.

The classifier units (arm x seed) are independent: ``arms_at_once`` of them train side by
side, one process each, on a local Dask cluster (on one card they share it; with several
cards each worker takes card ``worker number mod count``); with ``task_runner: dask`` they go
to the Dask cluster like the per-class tasks.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows import tasks
from pipeline.config import AugmentConfig, validate_config, with_overrides
from pipeline.run_lock import run_lock
from pipeline.runs import FAILED, run_dir_for, run_name
from pipeline.stages.pseudo import ROUND_TWO_ARMS
from pipeline.stages.ssl import arms_at_once
from pipeline.stages.tune import adapter_units


def make_task_runner(config: AugmentConfig):
    """The task runner for the per-class tasks, as the config says."""
    if config.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if config.dask_address:
            return DaskTaskRunner(address=config.dask_address)
        # Processes, one thread each: one worker per core (or, with CUDA_VISIBLE_DEVICES
        # set per worker by whoever starts the cluster, one per GPU).
        return DaskTaskRunner(cluster_kwargs={"n_workers": config.dask_n_workers,
                                              "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": ":0"})
    # One device: per-class tasks run one after another.
    return ThreadPoolTaskRunner(max_workers=1)


def make_arm_runner(config: AugmentConfig, at_once: int):
    """The task runner for the classifier units: ``at_once`` worker processes side by side."""
    if config.task_runner == "dask":
        return make_task_runner(config)
    if at_once == 1:
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(cluster_kwargs={"n_workers": at_once, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": ":0"})


@flow(name="augment-arms", log_prints=True)
def train_arms(run_dir: Path, config: AugmentConfig, units: list[tuple[str, int]]) -> list[str]:
    """Train every (arm, seed) unit; each unit's result depends on its own seed only."""
    futures = [tasks.ssl_arm.submit(run_dir, config, arm, seed) for arm, seed in units]
    return [f.result() for f in futures]


def run_arms(run_dir: Path, config: AugmentConfig, arms) -> list[str]:
    units = [(arm, seed) for arm in arms for seed in config.ssl.seeds]
    runner = make_arm_runner(config, arms_at_once(run_dir, config, units))
    return train_arms.with_options(task_runner=runner)(run_dir, config, units)


@flow(name="augment-classes", log_prints=True)
def adapt_classes(run_dir: Path, config: AugmentConfig, classes: list[int],
                  loop_round: int = 1) -> dict[str, list[str]]:
    """Tune every adapter unit and sample every class; sampling of class c waits only for
    the adapter it uses."""
    units = adapter_units(config, len(classes))
    tuned = {c: tasks.tune_class.submit(run_dir, config, c, loop_round) for c in units}
    sampled = [tasks.sample_class.submit(run_dir, config, c, loop_round,
                                         wait_for=[tuned[None if None in tuned else c]])
               for c in classes]
    return {"adapters": [f.result() for f in tuned.values()],
            "samples": [f.result() for f in sampled]}


def flow_run_name() -> str:
    """The flow run's name in the UI: the run's own name (``pipeline.runs.run_name``), the
    same as its directory and artifact keys, instead of Prefect's random two words."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    config = params.get("config")
    if isinstance(config, dict):  # a deployment's parameters arrive as plain JSON
        config = validate_config(config)
    return run_name(with_overrides(config, params.get("overrides")))


@flow(name="augment", log_prints=True, flow_run_name=flow_run_name)
def augment(config: AugmentConfig, overrides: dict[str, Any] | list[str] | None = None) -> str:
    """Run (or resume) the whole pipeline for ``config``; returns the report's path.

    ``overrides`` (``{"sampling.guidance": 3}`` or ``["sampling.guidance=3"]``) change single
    fields of ``config``; a deployment keeps its preset in ``config`` and a run passes only
    the overrides.
    """
    config = with_overrides(config, overrides)
    tasks.preflight_task(config)
    # One writer per run directory, for the whole run (re-entrant: `augment run` took it
    # before Prefect started); the per-class and arm tasks on worker processes run under it.
    with run_lock(run_dir_for(config)):
        report = _run_stages(config)
    path = Path(report)
    print(f"report: {path}")
    return str(path)


def _run_stages(config: AugmentConfig) -> str:
    """Every stage of the run in order; returns the report's path."""
    run_dir = tasks.prepare_run(config)
    print(f"run directory: {run_dir}")
    split = tasks.split(run_dir, config)
    if config.pretrains_base:
        tasks.pretrain(run_dir, config)
    tasks.fit(run_dir, config)
    tasks.encode(run_dir, config)
    classes = list(range(int(split["metrics"]["num_classes"])))
    runner = make_task_runner(config)
    adapt_classes.with_options(task_runner=runner)(run_dir, config, classes)
    tasks.tune(run_dir, config)
    tasks.sample(run_dir, config)
    tasks.shards(run_dir, config)
    tasks.quality(run_dir, config)
    run_arms(run_dir, config, config.ssl.arms)
    tasks.ssl(run_dir, config)
    if config.loop.rounds == 2:
        second_round(run_dir, config, classes)
    report = tasks.report(run_dir, config)
    tasks.publish_report(run_dir, config)
    (run_dir / "stages" / FAILED).unlink(missing_ok=True)  # a success: no failure to show
    return str(run_dir / report["outputs"].get("html", "report.html"))


def second_round(run_dir: Path, config: AugmentConfig, classes: list[int]) -> None:
    """Pseudo-label with the baseline, then round 1's generation steps again on the expanded
    class subsets (in ``round-2/``), then the round's two arms."""
    tasks.pseudo(run_dir, config)
    tasks.encode(run_dir, config, loop_round=2)
    adapt_classes.with_options(task_runner=make_task_runner(config))(run_dir, config, classes, 2)
    for stage in (tasks.tune, tasks.sample, tasks.shards):
        stage(run_dir, config, loop_round=2)
    run_arms(run_dir, config, ROUND_TWO_ARMS)
    tasks.loop(run_dir, config)


@flow(name="benchmark", log_prints=True)
def benchmark(config: AugmentConfig, overrides: dict[str, Any] | list[str] | None = None,
              history: str = "runs/benchmark-history.parquet", fresh: bool = True) -> str:
    """Run a fixed preset and append its figures to the ``history`` table.

    ``fresh`` (the nightly default) puts the run under ``<runs_dir>/benchmark/<UTC time>/``,
    where no earlier run can lend it finished stages: every stage is measured anew with
    today's code. ``fresh=False`` resumes and reuses like ``augment``.
    """
    config = with_overrides(config, overrides)
    if fresh:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        config = with_overrides(config, {"runs_dir": f"{config.runs_dir}/benchmark/{stamp}"})
    report = augment(config)
    row = tasks.append_history(str(Path(report).parent), history)
    print(f"benchmark history: {row['history']} (page {row['page']})")
    return row["history"]
