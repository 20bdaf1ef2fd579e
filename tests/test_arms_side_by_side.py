"""Classifier units side by side (``arms_at_once``): how many fit, and the same results as one by one."""

import numpy as np
import pytest
import torch
from flow_fixtures import flow_config

from pipeline.config import ConfigError, config_hash, with_overrides
from pipeline.ssl.capacity import CONTEXT_BYTES, HEADROOM, units_at_once

GiB = 2**30


def test_auto_divides_free_memory_by_peak_plus_context():
    peak, free = 3 * GiB, 139 * GiB
    expected = int(free * (1 - HEADROOM) // (peak + CONTEXT_BYTES))
    assert expected == 31  # 118.15 GiB / 3.75 GiB: written out so a changed constant shows
    assert units_at_once("auto", 40, "cuda", peak, free) == expected
    assert units_at_once("auto", 6, "cuda", peak, free) == 6        # never more than units
    assert units_at_once("auto", 6, "cuda", 200 * GiB, free) == 1   # at least one
    assert units_at_once("auto", 6, "cuda:1", peak, free) == 6


def test_cpu_auto_is_one_and_a_number_is_honoured():
    assert units_at_once("auto", 8, "cpu") == 1
    assert units_at_once(3, 8, "cpu") == 3
    assert units_at_once(3, 2, "cuda") == 2
    with pytest.raises(ValueError, match="needs one unit's measured peak"):
        units_at_once("auto", 4, "cuda")
    with pytest.raises(ValueError, match="arms_at_once=0"):
        units_at_once(0, 4, "cuda")


def test_arms_at_once_is_validated_and_not_part_of_the_hash(flow_cfg):
    assert config_hash(with_overrides(flow_cfg, {"arms_at_once": "auto"})) == \
        config_hash(flow_cfg)
    with pytest.raises(ConfigError, match="arms_at_once"):
        with_overrides(flow_cfg, {"arms_at_once": 0})


@pytest.mark.slow
def test_units_side_by_side_give_the_same_classifiers(flow_prefect, tmp_path, flow_tiny_base,
                                                      flow_image_folder):
    """Two worker processes train the four units of two arms x two seeds; every unit's
    metrics and EMA weights equal those of the one-by-one run."""
    from flows.augment import make_arm_runner, run_arms
    from pipeline.runs import init_run_dir, read_json
    from pipeline.stages.inputs import ssl_rel
    from pipeline.stages.split import run_split

    dirs = {}
    for at_once in (1, 2):
        cfg = flow_config(tmp_path / f"at{at_once}", flow_tiny_base, flow_image_folder,
                          arms_at_once=at_once, ssl={"arms": ["supervised", "baseline"],
                                                     "seeds": [0, 1], "steps": 4,
                                                     "batch_size": 4, "mu": 1, "eval_every": 2,
                                                     "checkpoint_every": 2, "net": "cnn-small"})
        assert type(make_arm_runner(cfg, at_once)).__name__ == \
            ("ThreadPoolTaskRunner" if at_once == 1 else "DaskTaskRunner")
        run_dir = init_run_dir(cfg)
        run_split(run_dir, cfg)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the Dask workers: the same kernels
        try:
            done = run_arms(str(run_dir), cfg, cfg.ssl.arms)
        finally:
            torch.set_num_threads(threads)
        assert len(done) == 4
        dirs[at_once] = run_dir
    assert dirs[1].name == dirs[2].name  # arms_at_once is not part of the config hash
    for arm in ("supervised", "baseline"):
        for seed in (0, 1):
            rel = ssl_rel(arm, seed)
            one, two = (read_json(dirs[n] / rel / "metrics.json") for n in (1, 2))
            assert (one["arm"], one["seed"]) == (two["arm"], two["seed"]) == (arm, seed)
            assert one["top1_error"] == pytest.approx(two["top1_error"], abs=1e-9)
            a = torch.load(dirs[1] / rel / "checkpoint.pt", weights_only=False)
            b = torch.load(dirs[2] / rel / "checkpoint.pt", weights_only=False)
            for k, v in a["ema"].items():
                np.testing.assert_allclose(v.float().numpy(), b["ema"][k].float().numpy(),
                                           rtol=1e-5, atol=1e-6, err_msg=f"{rel} {k}")
