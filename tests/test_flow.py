"""The augment flow in-process on Prefect's test harness (temporary SQLite, no server).

Also checks that the per-class tasks give the same adapters and samples on a local Dask
cluster of two worker processes as on the default task runner.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file
from test_stages import flow_cfg, flow_config, flow_image_folder, flow_tiny_base  # noqa: F401

from pipeline import stages
from pipeline.runs import init_run_dir, list_runs, read_json


@pytest.fixture(scope="module")
def flow_prefect(tmp_path_factory):
    """Prefect with its own home and a temporary database; no server, no analytics."""
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: str(home)}), prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_runs_every_stage_and_a_rerun_skips_them(flow_prefect, flow_cfg):  # noqa: F811
    from flows.augment import augment

    cfg = flow_cfg.model_copy(update={"quality": flow_cfg.quality.model_copy(
        update={"enabled": True, "reference": {"epochs": 1}, "kid_subset_size": 4,
                "kid_subsets": 2})})
    report = augment(config=cfg, overrides={"ssl.seeds": [0]})
    run_dir = init_run_dir(cfg)
    assert str(run_dir) in report
    for name in ("split", "encode", "tune", "sample", "shards", "quality", "ssl", "report"):
        assert read_json(run_dir / "stages" / f"{name}.json"), name
    manifest = read_json(run_dir / "shards" / "manifest.json")
    sampled = read_json(run_dir / "stages" / "sample.json")["metrics"]["rows"]
    assert sum(s["rows"] for s in manifest["shards"]) == sampled == 8
    for arm in ("supervised", "baseline", "augmented"):
        assert (run_dir / f"ssl/{arm}/seed-0/metrics.json").exists(), arm
    (info,) = list_runs(run_dir.parent)
    assert info.status == "complete"

    records = {p.name: p.read_text() for p in (run_dir / "stages").glob("*.json")}
    augment(config=cfg)
    assert {p.name: p.read_text() for p in (run_dir / "stages").glob("*.json")} == records


def test_invalid_override_fails_before_any_work(flow_prefect, flow_cfg):  # noqa: F811
    from flows.augment import augment
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"sampling\.mask_ratios\[0\]=1\.5"):
        augment(config=flow_cfg, overrides=["sampling.mask_ratios=[1.5]"])
    assert not (flow_cfg.runs_root()).exists()


def _run_classes(cfg, runner_name):
    from flows.augment import adapt_classes, make_task_runner

    run_dir = init_run_dir(cfg)
    stages.run_split(run_dir, cfg)
    stages.run_encode(run_dir, cfg)
    runner = make_task_runner(cfg)
    assert type(runner).__name__ == runner_name
    adapt_classes.with_options(task_runner=runner)(str(run_dir), cfg, [0, 1])
    return run_dir


def test_dask_task_runner_gives_the_same_adapters_and_samples(flow_prefect, tmp_path,
                                                              flow_tiny_base,  # noqa: F811
                                                              flow_image_folder):  # noqa: F811
    import torch

    base = flow_config(tmp_path / "a", flow_tiny_base, flow_image_folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Dask workers: same kernels, bitwise-equal results
    try:
        default_dir = _run_classes(base, "ThreadPoolTaskRunner")
    finally:
        torch.set_num_threads(threads)
    dask_cfg = flow_config(tmp_path / "b", flow_tiny_base, flow_image_folder,
                           task_runner="dask", dask_n_workers=2)
    dask_dir = _run_classes(dask_cfg, "DaskTaskRunner")
    assert default_dir.name == dask_dir.name  # the runner is not part of the config hash
    # Equal up to float rounding: worker processes may take other vectorised code paths
    # (seen: 8 of 1024 weights differing in the last bit), so compare at that resolution.
    for c in (0, 1):
        a = load_file(default_dir / f"adapters/class-{c:02d}/adapter.safetensors")
        b = load_file(dask_dir / f"adapters/class-{c:02d}/adapter.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
        parts = sorted((default_dir / stages.sample_rel(c)).glob("part-*.npz"))
        assert len(parts) == 2
        for p in parts:
            x = np.load(p)["images"].astype(int)
            y = np.load(dask_dir / stages.sample_rel(c) / p.name)["images"].astype(int)
            assert x.shape == y.shape and np.abs(x - y).max() <= 1
            assert (x == y).mean() > 0.99
