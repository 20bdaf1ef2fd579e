"""Logs a worker can read: no progress bars off a terminal, progress lines with an ETA through
``logging``, stage and unit start/end lines, the ``pipeline``/``anl_core`` loggers in the
Prefect run's logs, and one traceback per failed run."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from anl_core.progress import EVERY_ENV, LogProgress, bars_wanted, progress_bar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_only_on_a_terminal_and_when_wanted(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert bars_wanted(True, _Terminal())
    assert not bars_wanted(True, io.StringIO())  # a file or a pipe
    assert not bars_wanted(False, _Terminal())  # progress: false
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not bars_wanted(True, _Terminal())
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(range(3), desc="x"), LogProgress)


def test_log_progress_lines_carry_done_total_rate_and_eta(log_records):
    with log_records("pipeline.test") as records:
        bar = LogProgress(total=100, desc="fixmatch seed 0", unit="step", initial=20,
                          logger="pipeline.test", every_s=0.0)
        for _ in range(5):
            bar.update(1)
        bar.set_postfix(loss="0.123", validation_error="0.4000")
        bar.update(10)
        bar.close()
    lines = [r.getMessage() for r in records]
    # 5 single steps are 5% of the work: under the 10% a line waits for.
    assert len(lines) == 1, lines
    assert lines[0].startswith("fixmatch seed 0: 35/100 (35%); ")
    assert "step/s" in lines[0] and "ETA " in lines[0]
    assert lines[0].endswith("loss=0.123, validation_error=0.4000")


def test_log_progress_waits_for_its_interval(log_records):
    with log_records("pipeline.test") as records:
        bar = LogProgress(range(50), desc="encode", logger="pipeline.test", every_s=3600.0)
        assert sum(1 for _ in bar) == 50
    assert not records  # a loop shorter than the interval says nothing


def test_stages_piped_to_a_file_log_lines_not_bars(flow_cfg, capfd, monkeypatch):
    """The tune stage with progress on, stderr captured (not a terminal): start/end lines,
    progress lines with an ETA, no carriage returns, no line a reader must scroll."""
    from pipeline.config import with_overrides
    from pipeline.runs import init_run_dir
    from pipeline.stages import run_all

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv(EVERY_ENV, "0")  # every 10% of a loop, however short
    cfg = with_overrides(flow_cfg, {"progress": True, "tuning.steps": 10})
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s - %(message)s"))
    loggers = [logging.getLogger(n) for n in ("pipeline", "anl_core")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        run_all(init_run_dir(cfg), cfg, until="tune")
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
    out = capfd.readouterr()
    text = out.out + out.err
    assert "\r" not in text
    lines = text.splitlines()
    assert max(map(len, lines)) <= 300, max(lines, key=len)
    assert any(ln.startswith("INFO pipeline.runs - stage split: start (key ") for ln in lines)
    assert any("stage split: done in " in ln and "labeled=4" in ln for ln in lines), lines
    assert any(ln.startswith("INFO pipeline.runs - adapters/class-00: start (key ")
               for ln in lines), lines
    assert any("adapters/class-00: done in " in ln and "final_loss=" in ln for ln in lines)
    tune = [ln for ln in lines if "anl_core.tuning - tune adapter: " in ln]
    assert tune and all("ETA " in ln for ln in tune[:-1]), lines
    assert any("loss=" in ln for ln in tune)
    assert any("stage tune (2 units, summed): done in " in ln for ln in lines), lines


def test_flows_hand_the_pipeline_loggers_to_prefect():
    from prefect.logging.handlers import APILogHandler

    import flows.tasks  # noqa: F401  (importing a flows module routes the logs)

    named = os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"].split(",")
    assert {"pipeline", "anl_core"} <= set(named)
    for name in ("pipeline", "anl_core"):
        logger = logging.getLogger(name)
        assert any(isinstance(h, APILogHandler) for h in logger.handlers)
        assert logger.getEffectiveLevel() <= logging.INFO


@pytest.mark.slow
def test_a_stage_line_reaches_the_flow_runs_logs(flow_prefect):
    """What a stage logs inside a task is stored with the flow run (the UI's run page)."""
    import asyncio

    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.context import get_run_context
    from prefect.logging.handlers import APILogHandler

    import flows.tasks  # noqa: F401

    @task
    def stage_like():
        logging.getLogger("pipeline.runs").info("stage demo: done in 1.0 s; top1_error=0.1")

    @flow
    def routed() -> str:
        stage_like()
        return str(get_run_context().flow_run.id)

    run_id = routed()

    async def messages():
        await APILogHandler.aflush()  # the handler sends in batches, from a worker thread
        async with get_client() as client:
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            return [log.message for log in logs]

    assert "stage demo: done in 1.0 s; top1_error=0.1" in asyncio.run(messages())


@pytest.mark.slow
def test_a_failed_run_prints_one_traceback(flow_cfg, tmp_path):
    """Two tuning tasks fail with a raw error (as an RGB folder with a grey base did): the
    command's output holds one traceback, not Prefect's task and flow copies of it."""
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump(flow_cfg.model_dump(mode="json")))
    script = textwrap.dedent(f"""
        import sys
        import anl_core.tuning

        def broken(*args, **kwargs):
            raise RuntimeError("expected input[4, 3, 32, 32] to have 1 channels")

        anl_core.tuning.tune_adapter = broken
        from flows.cli import main
        sys.exit(main(["run", {str(preset)!r}]))
    """)
    env = {**os.environ, "PYTHONPATH": REPO, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600, check=False)
    text = done.stdout + done.stderr
    assert done.returncode == 1, text[-3000:]
    assert text.count("Traceback (most recent call last)") == 1, text
    assert text.rstrip().splitlines()[-1].startswith("RuntimeError: expected input") or \
        "RuntimeError: expected input[4, 3, 32, 32] to have 1 channels" in text
    assert "Task run failed with exception" in text  # the task's line stays, short
