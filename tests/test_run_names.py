"""One name per run (``pipeline.runs.run_name``): its directory, Prefect flow run, artifact
keys and report title say preset, data and config hash, in characters Prefect accepts."""

from __future__ import annotations

import re

import prefect.runtime.flow_run as runtime_flow_run

from flows.augment import flow_run_name
from flows.tasks import artifact_key
from pipeline.config import load_config, validate_config
from pipeline.runs import run_dir_for, run_name, slug

KEY = re.compile(r"^[a-z0-9-]+$")  # what Prefect's artifact keys accept


def test_the_same_preset_on_another_folder_gets_another_name_and_key(tmp_path):
    demo = load_config("demo")
    digits = load_config("demo", ["dataset=image-folder", f"dataset_root={tmp_path / 'digits'}"])
    assert run_name(demo).startswith("demo-fashion-mnist-")
    assert run_name(digits).startswith("demo-digits-")
    assert artifact_key("report", demo) != artifact_key("report", digits)
    assert run_dir_for(digits).name == run_name(digits)
    assert all(KEY.match(artifact_key(k, c)) for k in ("report", "results") for c in (demo, digits))


def test_a_preset_that_names_its_data_is_not_repeated():
    cfg = load_config("fashion-mnist-40labels")
    name = run_name(cfg)
    assert name.startswith("fashion-mnist-40labels-") and name.count("fashion-mnist") == 1


def test_a_non_ascii_preset_name_gives_an_ascii_key():
    cfg = validate_config({"preset": "Zahlen_Ü bung+ç 数字"})  # a path is refused: test_bad_inputs
    name = run_name(cfg)
    assert KEY.match(name) and name.startswith("zahlen-u-bung-c-fashion-mnist-")
    assert KEY.match(artifact_key("report", cfg))
    only_symbols = validate_config({"preset": "数字"})  # nothing ASCII left: a word stands in
    assert run_name(only_symbols).startswith("custom-fashion-mnist-")
    assert slug("A" * 100) == "a" * 40


def test_the_flow_run_takes_the_run_name_also_from_a_deployment_s_json(monkeypatch):
    cfg = load_config("demo")
    for params, expected in (
            ({"config": cfg}, run_name(cfg)),
            ({"config": cfg.model_dump(mode="json")}, run_name(cfg)),  # a deployment's JSON
            ({"config": cfg, "overrides": ["ssl.steps=7"]},
             run_name(load_config("demo", ["ssl.steps=7"])))):
        monkeypatch.setitem(runtime_flow_run.FIELDS, "parameters", lambda p=params: p)
        assert flow_run_name() == expected
