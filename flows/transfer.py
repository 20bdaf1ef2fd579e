"""The ``transfer`` flow: few-shot generative transfer of a base model to a new image domain.

Thin: each task calls one ``pipeline.transfer`` function with the run directory and the
config, and the steps skip finished work themselves (their records are keyed on the config
parts they read), so Prefect's own result cache is off.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.logs import route_logs
from pipeline.run_lock import run_lock
from pipeline.runs import stage_failure_recorded
from pipeline.transfer import TransferConfig
from pipeline.transfer import run as transfer_run

route_logs()  # the stages' log lines into the run's logs (flows.logs)

_opts = {"cache_policy": NO_CACHE, "persist_result": False}


@task(name="transfer-check", **_opts)
def check_inputs(config: TransferConfig) -> dict:
    """Fail in seconds, naming the parameter, when an input is missing or too small."""
    return transfer_run.check_transfer(config)


@task(name="transfer-prepare", **_opts)
def prepare(config: TransferConfig) -> str:
    return str(transfer_run.init_run(config))


def _step_task(step: str):
    fn = transfer_run.STEP_FUNCTIONS[step]

    @task(name=f"transfer-{step}", **_opts)
    def run(run_dir: str, config: TransferConfig) -> dict:
        with stage_failure_recorded(Path(run_dir), step):  # `augment runs` says which failed
            return fn(Path(run_dir), config)

    run.__doc__ = f"Step {step!r}: {fn.__module__}.{fn.__name__}."
    return run


target = _step_task("target")
tune = _step_task("tune")
sample = _step_task("sample")
evaluate = _step_task("evaluate")
report = _step_task("report")


@flow(name="transfer", log_prints=True)
def transfer(config: TransferConfig) -> str:
    """Run (or resume) one transfer run; returns the path of its report.html."""
    check_inputs(config)
    with run_lock(transfer_run.transfer_run_dir(config)):  # one writer per run directory
        run_dir = prepare(config)
        print(f"run directory: {run_dir}")
        for step in (target, tune, sample, evaluate):
            step(run_dir, config)
        html = Path(run_dir) / report(run_dir, config)["outputs"]["html"]
    print(f"report: {html}")
    return str(html)
