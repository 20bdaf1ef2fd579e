"""AugmentConfig: presets, overrides, validation messages, hashes and per-stage keys."""

from __future__ import annotations

import json

import pytest

from pipeline.config import (
    AugmentConfig,
    ConfigError,
    available_presets,
    config_hash,
    load_config,
    parse_overrides,
    stage_key,
    validate_config,
    with_overrides,
)
from pipeline.config_sections import PretrainSection, QualitySection, SSLSection


def test_every_preset_loads_and_names_its_run():
    names = available_presets()
    assert {"demo", "fashion-mnist-40labels", "cifar10-250labels", "benchmark-nightly"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.preset == name
        assert len(config_hash(cfg)) == 64


def test_cifar_preset_matches_the_issue():
    cfg = load_config("cifar10-250labels")
    assert cfg.dataset == "cifar10" and cfg.labels_per_class == 25
    assert cfg.base_model == "google/ddpm-cifar10-32"
    assert cfg.encoder == "openai/clip-vit-base-patch32"
    assert cfg.ssl.steps == 2**20 and cfg.ssl.algorithm == "fixmatch"
    assert cfg.require_gpu


def test_overrides_parse_yaml_values_and_nest():
    cfg = load_config("demo", ["sampling.mask_ratios=[0.1, 0.9]", "tuning.steps=7",
                               "ssl.arms=[baseline]", "ssl.unlabeled_pool=null",
                               "dataset_root=null"])
    assert cfg.sampling.mask_ratios == [0.1, 0.9]
    assert cfg.tuning.steps == 7 and cfg.ssl.arms == ["baseline"]
    assert parse_overrides(["a.b=1", "c=x"]) == {"a.b": 1, "c": "x"}
    assert with_overrides(cfg, {"tuning.steps": 9}).tuning.steps == 9


@pytest.mark.parametrize("override, named", [
    ("sampling.mask_ratios=[0.2, 1.5]", "sampling.mask_ratios[1]=1.5"),
    ("labels_per_class=-1", "labels_per_class=-1"),
    ("sampling.bogus=1", "sampling.bogus"),
    ("bogus_top=1", "bogus_top"),
    ("tuning.cond_dropout=2", "tuning.cond_dropout=2"),
    ("ssl.arms=[supervised, nonsense]", "ssl.arms[1]"),
    ("ssl.budget=steps-7", "ssl.budget"),
    ("image_size=48", "image_size=48"),
])
def test_invalid_parameters_fail_naming_the_parameter(override, named):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    assert named in str(err.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="demo"):
        load_config("no-such-preset")


def test_malformed_override_is_explained():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["tuning.steps"])


def test_hash_ignores_runtime_fields_only():
    cfg = load_config("demo")
    same = with_overrides(cfg, {"runs_dir": "/elsewhere", "task_runner": "dask",
                                "progress": False, "device": "cpu"})
    assert config_hash(same) == config_hash(cfg)
    assert config_hash(with_overrides(cfg, {"sampling.guidance": 3.5})) != config_hash(cfg)


def test_stage_keys_change_only_downstream_of_a_change():
    cfg = load_config("demo")
    changed = with_overrides(cfg, {"sampling.guidance": 3.5})

    def keys(c):
        split = stage_key(c, "split")
        encode = stage_key(c, "encode", {"split": split})
        tune = stage_key(c, "tune", {"encode": encode})
        sample = stage_key(c, "sample", {"tune": tune})
        return split, encode, tune, sample

    a, b = keys(cfg), keys(changed)
    assert a[:3] == b[:3] and a[3] != b[3]
    tuned = with_overrides(cfg, {"tuning.lr": 3e-4})
    assert keys(tuned)[:2] == a[:2] and keys(tuned)[2:] != a[2:]


def test_config_round_trips_through_json():
    cfg = load_config("cifar10-250labels", ["pretrain.steps=10"])
    again = AugmentConfig.model_validate(json.loads(cfg.model_dump_json()))
    assert again == cfg and config_hash(again) == config_hash(cfg)


def test_budget_fills_steps_unless_given():
    assert SSLSection(budget="steps-1024").steps == 1024
    assert SSLSection(budget="steps-1024", steps=5).steps == 5




def test_sections_are_the_components_models():
    """The sections are the components' own models (tuning) or extend them (ssl, pretrain,
    quality): every field and bound is declared once, next to the code that reads it."""
    from anl_core.tuning import TuneConfig
    from pipeline.generate.pretrain import PretrainConfig

    assert AugmentConfig.model_fields["tuning"].annotation is TuneConfig  # composed, no copy
    # pretrain: one model, the section extends it (sample_size and device come from the run).
    assert issubclass(PretrainSection, PretrainConfig)
    assert set(PretrainSection().model_dump()) == set(PretrainConfig.model_fields) - \
        {"sample_size", "device"}
    run = PretrainSection(steps=7).component(sample_size=16, device="cpu")
    assert type(run) is PretrainConfig and (run.steps, run.sample_size, run.device) == \
        (7, 16, "cpu")
    with pytest.raises(ValueError, match="image_size"):
        PretrainSection(sample_size=16)
    from pipeline.evaluate.quality import QualityConfig

    assert issubclass(QualitySection, QualityConfig)
    q = QualitySection(enabled=False, kid_subsets=3).component()
    assert type(q) is QualityConfig and q.kid_subsets == 3


def test_pretrain_architecture_diffusers_cannot_build_is_a_config_error():
    from pipeline.generate.pretrain import PretrainConfig

    # The mid block always has attention: 16 channels cannot hold one 32-wide head.
    with pytest.raises(ConfigError, match=r"attention over \[16\] channels .* at most 16"):
        validate_config({"pretrain": {"block_out_channels": [8, 16], "attention_levels": []}})
    with pytest.raises(ConfigError, match=r"attention_levels \[2\] are not levels"):
        validate_config({"pretrain": {"block_out_channels": [64, 64], "attention_levels": [2]}})
    with pytest.raises(ValueError, match="gives no head"):  # augment pretrain --set ...
        PretrainConfig(block_out_channels=(8, 16), attention_levels=(0,), attention_head_dim=16)
    ok = validate_config({"pretrain": {"block_out_channels": [8, 16], "attention_levels": [1],
                                       "attention_head_dim": 8}})
    assert ok.pretrain.attention_head_dim == 8


# Every preset's config hash. Re-pinned when the trainer gained fields (net_width, schedule,
# warmup, final_points, bn_calibration, the ssl.recipe name), which are in every preset's ssl
# section at their defaults; a change that should leave results alone keeps these. demo was
# re-pinned on purpose when it moved to the gain map's 1-label cell (issue 29); its old
# content, tests/pinned/demo.yaml, keeps its old hash (test_frozen_demo_keeps_its_hash).
PINNED_HASHES = {"benchmark-nightly": "7ba5afee5bb2", "cifar10-250labels": "ad4c76439e97",
                 "demo": "8a8b6b5a353d", "fashion-mnist-40labels": "13f46c80d0cd"}


def test_frozen_demo_keeps_its_hash():
    from pinned_presets import FROZEN_DEMO

    from pipeline.config import config_hash, load_config

    assert config_hash(load_config(FROZEN_DEMO))[:12] == "a029c043b2f8"


def test_preset_hashes_are_pinned():
    from pipeline.config import available_presets, config_hash, load_config

    assert {p: config_hash(load_config(p))[:12] for p in available_presets()} == PINNED_HASHES


def test_ssl_section_extends_the_trainer_config_and_fills_seed_and_device():
    from pipeline.ssl.config import BUDGETS, SSLConfig

    sec = SSLSection(budget="steps-8192", seeds=[3, 4], lr=0.05)
    assert isinstance(sec, SSLConfig)
    assert sec.steps == BUDGETS["steps-8192"]["steps"]
    unit = sec.component(seed=4, device="cpu")
    assert type(unit) is SSLConfig and (unit.seed, unit.device, unit.lr) == (4, "cpu", 0.05)
    assert set(sec.model_dump()) == set(SSLConfig.model_fields) - {"seed", "device"} | \
        {"arms", "seeds", "budget", "recipe", "control_pool"}
    for bad, named in (({"seed": 1}, "ssl.seeds"), ({"device": "cpu"}, "top-level device"),
                       ({"budget": "short"}, "not a known budget")):
        with pytest.raises(ValueError, match=named):
            SSLSection(**bad)


def test_a_runs_own_config_json_reruns_that_run(tmp_path):
    """A run's config.json (or its directory) is a preset: the same config hash, the same
    run directory, overrides still apply."""
    from pipeline.config import config_hash, load_config
    from pipeline.runs import init_run_dir, load_run_config

    config = load_config("demo", {"runs_dir": str(tmp_path), "sampling.guidance": 2.0,
                                  "task_images": "task-half"})
    run_dir = init_run_dir(config)
    for source in (run_dir / "config.json", run_dir):
        again = load_config(source)
        assert config_hash(again) == config_hash(config) and again.preset == "demo"
    assert config_hash(load_run_config(run_dir)) == config_hash(config)
    changed = load_config(run_dir, {"sampling.guidance": 3.0})
    assert changed.sampling.guidance == 3.0 and config_hash(changed) != config_hash(config)


def test_a_saved_config_keeps_its_metadata_apart_and_old_records_still_load(tmp_path):
    """save_pretrained puts the hash and versions under one key that loading ignores;
    config.json files written before that key (the same entries at the top level) load."""
    import json

    from pipeline.config import AugmentConfig, config_hash, load_config, saved_metadata

    config = load_config("demo", {"sampling.guidance": 2.5})
    path = config.save_pretrained(tmp_path / "a")
    record = json.loads(path.read_text())
    assert set(record) - set(AugmentConfig.model_fields) == {"_meta"}
    assert saved_metadata(record)["config_hash"] == config_hash(config)
    assert "torch" in saved_metadata(record)["versions"]
    assert AugmentConfig.from_pretrained(tmp_path / "a") == config
    legacy = {k: v for k, v in record.items() if k != "_meta"}
    legacy.update(config_hash=config_hash(config), versions={"torch": "2.0"})
    (tmp_path / "old.json").write_text(json.dumps(legacy))
    assert AugmentConfig.from_pretrained(tmp_path / "old.json") == config
    assert saved_metadata(legacy)["config_hash"] == config_hash(config)
    record["_meta"] = {"config_hash": "tampered"}  # metadata never reaches a field or a hash
    (tmp_path / "meta.json").write_text(json.dumps(record))
    assert config_hash(AugmentConfig.from_pretrained(tmp_path / "meta.json")) == config_hash(config)


def test_strict_values_still_read_as_written():
    """Strict fields refuse true for a count and inf for a rate, but read what a preset or a
    --set means: an int where a float goes, 1e-4 without a dot (YAML 1.1 made it a string),
    a tuple from Python code where a list goes."""
    cfg = load_config("demo", ["tuning.lr=1e-4", "sampling.guidance=3", "ssl.lr=2E-2"])
    assert (cfg.tuning.lr, cfg.sampling.guidance, cfg.ssl.lr) == (1e-4, 3.0, 0.02)
    assert validate_config({"sampling": {"mask_ratios": (0.2, 0.4)}}).sampling.mask_ratios == [0.2, 0.4]
    with pytest.raises(ConfigError, match=r"tuning.steps=True"):
        load_config("demo", ["tuning.steps=true"])
    with pytest.raises(ConfigError, match=r"ssl.steps=16777217: .*less than or equal to 16777216"):
        load_config("demo", ["ssl.steps=16777217"])


def test_config_time_names_match_the_registries():
    """Names checked when a preset is read (no torch) are the registries' own."""
    import dataclasses

    from pipeline.evaluate.quality_config import ReferenceSettings
    from pipeline.evaluate.reference import ReferenceConfig
    from pipeline.ssl.algorithms import ALGORITHMS
    from pipeline.ssl.config import ALGORITHM_NAMES, NET_NAMES
    from pipeline.ssl.nets import NETS

    assert set(ALGORITHM_NAMES) == set(ALGORITHMS) and set(NET_NAMES) == set(NETS)
    assert [f.name for f in dataclasses.fields(ReferenceConfig)] == list(ReferenceSettings.model_fields)
    assert ReferenceSettings() == ReferenceSettings(**dataclasses.asdict(ReferenceConfig()))
