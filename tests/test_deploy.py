"""Deployments: prefect.yaml is generated from the presets, and, against a real Prefect server
on 127.0.0.1, ``augment serve`` + ``prefect deployment run augment/demo --watch`` produce a run
directory whose shards, classifier metrics and report agree with each other.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.deploy import DEPLOYMENTS, PREFECT_YAML, build_deployments, render_prefect_yaml
from pipeline.config import load_config
from pipeline.data.shard_format import MANIFEST
from pipeline.runs import read_json

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_prefect_yaml_is_up_to_date_with_the_presets():
    assert PREFECT_YAML.read_text() == render_prefect_yaml(), \
        "prefect.yaml is stale: run `augment deployments --write`"


def test_deployments_carry_presets_and_schedules():
    deps = {f"{d.flow_name}/{d.name}": d for d in build_deployments()}
    assert set(deps) == {"augment/cifar10-250labels", "augment/fashion-mnist-40labels",
                         "augment/demo", "benchmark/nightly"}
    for spec in DEPLOYMENTS:
        d = deps[spec.full_name]
        assert d.parameters["config"] == load_config(spec.preset).model_dump(mode="json")
    (sched,) = deps["benchmark/nightly"].schedules
    assert sched.schedule.cron == "0 2 * * *"
    assert not deps["augment/demo"].schedules


def _listening_port(proc: subprocess.Popen) -> int | None:
    """The port the server listens on. It was started with --port 0, so the OS picked a free
    one at bind time: no window in which another process can take it."""
    import psutil

    ports = [c.laddr.port for c in psutil.Process(proc.pid).net_connections(kind="tcp")
             if c.status == psutil.CONN_LISTEN]
    return ports[0] if ports else None


def _wait(predicate, timeout: float, what: str, procs=()) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in procs:
            assert p.poll() is None, f"{what}: a process exited early (rc {p.returncode})"
        if predicate():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_served_demo_deployment_runs_end_to_end(tmp_path, flow_tiny_base,
                                                flow_image_folder):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               HF_HUB_OFFLINE="1", DO_NOT_TRACK="1", TQDM_DISABLE="1", COLUMNS="200")
    logs = tmp_path / "logs"
    logs.mkdir()
    started: list[subprocess.Popen] = []
    client_env: dict[str, str] = {}  # PREFECT_API_URL is known once the server has bound

    def start(cmd, env, name):
        with open(logs / f"{name}.log", "w") as log:
            p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        started.append(p)
        return p

    def cli(*args, timeout=120):
        return subprocess.run([str(BIN / "prefect"), *args], env=client_env, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout, check=False)

    runs = tmp_path / "runs"
    overrides = {
        "dataset": "image-folder", "dataset_root": str(flow_image_folder),
        "labels_per_class": 2, "validation_per_class": 2, "ssl.seeds": [0],
        "base_model": str(flow_tiny_base),
        "encoder": "efficientnet-lite0@64", "adapter.context_dim": 32, "adapter.head_dim": 16,
        "tuning.steps": 2, "tuning.batch_size": 4, "sampling.per_condition": 2,
        "sampling.num_inference_steps": 2, "sampling.chunk_conditions": 1,
        "ssl.steps": 4, "ssl.batch_size": 4, "ssl.mu": 1, "ssl.eval_every": 2,
        "ssl.checkpoint_every": 2, "ssl.eval_size": None, "quality.reference": {"epochs": 1},
        "quality.kid_subset_size": 4, "quality.kid_subsets": 2,
        "runs_dir": str(runs), "progress": False, "device": "cpu",
    }
    try:
        server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                        "--port", "0"], env, "server")
        _wait(lambda: _listening_port(server), 180, "the Prefect server to listen", [server])
        api = f"http://127.0.0.1:{_listening_port(server)}/api"
        client_env.update(env, PREFECT_API_URL=api)
        _wait(lambda: _healthy(api), 60, "the Prefect server's health", [server])
        serve = start([str(BIN / "augment"), "serve"], client_env, "serve")
        # `serve` registers its deployments one after another: wait for the last of them,
        # not the first, or the listing races the registration.
        served = ("augment/demo", "augment/cifar10-250labels",
                  "augment/fashion-mnist-40labels", "benchmark/nightly")
        _wait(lambda: all(cli("deployment", "inspect", name).returncode == 0
                          for name in served), 180, "the served deployments", [server, serve])

        listing = cli("deployment", "ls")
        for name in served:
            assert name in listing.stdout, listing.stdout
        nightly = cli("deployment", "inspect", "benchmark/nightly").stdout
        assert "0 2 * * *" in nightly

        run = cli("deployment", "run", "augment/demo", "--watch", "--watch-timeout", "540",
                  "-p", f"overrides={json.dumps(overrides)}", timeout=600)
        assert run.returncode == 0, run.stdout + run.stderr + (logs / "serve.log").read_text()
    finally:
        for p in reversed(started):
            _stop(p)

    (run_dir,) = [p for p in runs.iterdir() if p.is_dir() and not p.name.startswith("_")]
    assert run_dir.name.startswith("demo-")
    manifest = read_json(run_dir / "shards" / MANIFEST)
    shard_rows = sum(s["rows"] for s in manifest["shards"])
    sample_units = read_json(run_dir / "stages" / "sample.json")["metrics"]["units"]
    shards = read_json(run_dir / "stages" / "shards.json")["metrics"]
    assert sum(u["rows"] for u in sample_units.values()) == shards["rows_sampled"] == 2 * 2 * 2
    # The demo preset filters its samples (filter:): the shards hold the ones it kept.
    assert shards["filter"] == "prototype+copies" and 0 < shard_rows == shards["rows"] <= 8
    # The demo's arms (the gain map's no-pool cell): the labeled images with and without the
    # synthetic rows.
    synthetic = read_json(run_dir / "ssl/supervised+synthetic/seed-0/metrics.json")
    assert synthetic["num_synthetic"] == shard_rows
    supervised = read_json(run_dir / "ssl/supervised/seed-0/metrics.json")
    assert supervised["num_synthetic"] == 0 and 0.0 <= supervised["top1_accuracy"] <= 1.0
    assert supervised["num_validation"] == 4 and synthetic["num_validation"] == 4
    quality = read_json(run_dir / "quality" / "quality.json")
    assert quality["overall"]["n_synthetic"] == shard_rows
    report = (run_dir / "report.md").read_text()
    assert (run_dir / "report.html").exists() and \
        "Supervised+synthetic vs supervised, 1 paired run" in report
