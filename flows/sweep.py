"""The ``sweep`` flow: a grid of run configs, each cell over independent repetitions, then
one report with a heatmap of each pair's gain per cell.

Thin: every repetition is one task (``pipeline.sweep.run.run_cell_repetition``) that skips
itself when its record exists for the same inputs; the repetitions fan out on the flow's task
runner (``task_runner``: one at a time on a thread, or ``parallel`` worker processes of a
local Dask cluster). Failures are collected, the report is written from what finished,
and the flow fails after it when any repetition did.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.logs import route_logs
from pipeline.sweep.spec import Cell, SweepSpec

route_logs()  # the stages' log lines into the run's logs (flows.logs)

_opts = {"cache_policy": NO_CACHE, "persist_result": False}


def task_runner(spec: SweepSpec):
    """Threads for one repetition at a time; worker processes (a local Dask cluster, one
    torch thread pool each) for several: torch seeds its initialisations through one
    process-wide generator, so parallel repetitions must not share a process."""
    if spec.parallel == 1:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(cluster_kwargs={"n_workers": spec.parallel, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": ":0"})


@task(name="sweep-repetition", task_run_name="{cell.label} rep {r}", **_opts)
def repetition(spec: SweepSpec, cell: Cell, r: int, folder: str, extra: dict) -> dict:
    import torch

    from pipeline.sweep.run import run_cell_repetition

    torch.set_num_threads(spec.threads)  # in this worker

    return run_cell_repetition(spec, cell, r, Path(folder), extra)


@task(name="sweep-report", **_opts)
def report(spec: SweepSpec, folder: str) -> str:
    from pipeline.sweep.report import build_sweep_report

    return str(build_sweep_report(spec, Path(folder))["html"])


@flow(name="sweep", log_prints=True)
def sweep(spec: SweepSpec, folder: str, extra: dict | None = None,
          report_spec: SweepSpec | None = None) -> str:
    """Run (or resume) every repetition of every cell; returns the report's path. Repetition
    r of every cell comes before repetition r + 1 of any, so the map fills evenly.
    ``report_spec``: the whole grid, when ``spec`` runs part of it (``--only``)."""
    extra = extra or {}
    cells = spec.cells()
    futures = [repetition.submit(spec, cell, r, folder, extra)
               for r in spec.repetitions for cell in cells]
    failed = []
    for f in futures:
        try:
            f.result()
        except Exception as e:  # noqa: BLE001 - every failure is reported after the report
            failed.append(str(e).splitlines()[0][:300])
    html = report(report_spec or spec, folder)
    print(f"report: {html}")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(futures)} repetitions failed; the report "
                           f"shows the rest. First: {failed[0]}")
    return html
