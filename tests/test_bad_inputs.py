"""Bad inputs, refused before any work (issue 32, item 7): each row is one flag, preset file,
data folder or runs dir a user could hand ``augment``, and asserts what they get back: exit
code 2, one line of error naming the key (or the file), no traceback, and nothing written
into the runs dir (nor anywhere outside it).

The entry points of the work itself (the augment, sweep and transfer flows, pretraining) are
replaced by a tripwire, so a row that slips past validation and pre-flight fails at once
(exit 1, "reached the work") instead of running for minutes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from flows.cli import main


class ReachedWork(RuntimeError):
    pass


def _tripwire(*args, **kwargs):
    raise ReachedWork("reached the work: this input was not refused before it")


_tripwire.with_options = lambda **kwargs: _tripwire  # the sweep flow is called through it


@pytest.fixture(autouse=True)
def _no_work(monkeypatch):
    import flows.augment
    import flows.sweep
    import flows.transfer
    import pipeline.generate.pretrain

    monkeypatch.setattr(flows.augment, "augment", _tripwire)
    monkeypatch.setattr(flows.sweep, "sweep", _tripwire)
    monkeypatch.setattr(flows.transfer, "transfer", _tripwire)
    monkeypatch.setattr(pipeline.generate.pretrain, "pretrain_on_dataset", _tripwire)


@pytest.fixture()
def ctx(tmp_path, flow_cfg):
    """A valid tiny preset file (every stage runs in seconds) and an empty place for runs."""
    data = flow_cfg.model_dump(mode="json")
    data.pop("runs_dir")
    data.pop("preset")  # the file's name is the preset's
    preset = tmp_path / "presets" / "tiny.yaml"
    preset.parent.mkdir()
    preset.write_text(yaml.safe_dump(data))
    return {"tmp": tmp_path, "preset": preset, "data": data, "runs": tmp_path / "work" / "runs",
            "folder": Path(flow_cfg.dataset_root)}


# --set overrides on the valid preset: (override, what the message names[, also said]).
SET_CASES = [
    ("ssl.steps=true", "ssl.steps=True"),
    ("tuning.steps=true", "tuning.steps=True"),
    ("tuning.steps=1000000000000", "tuning.steps", "1000000"),
    ("ssl.steps=1073741824", "ssl.steps", "16777216"),
    ("ssl.steps=0", "ssl.steps=0"),
    ("sampling.guidance=inf", "sampling.guidance='inf'"),  # YAML: the word, not .inf
    ("sampling.guidance=.inf", "sampling.guidance=inf"),
    ("sampling.guidance=.nan", "sampling.guidance=nan"),
    ("sampling.guidance=true", "sampling.guidance=True"),
    ("sampling.num_inference_steps=100000", "sampling.num_inference_steps", "1000"),
    ("sampling.mask_ratios=[0.5, 1.5]", "sampling.mask_ratios[1]=1.5"),
    ("sampling.mask_ratios=[]", "sampling.mask_ratios"),
    ("sampling.per_condition='8'", "sampling.per_condition='8'"),
    ("sampling.batch_size=0", "sampling.batch_size=0"),
    ("sampling.eta=-1", "sampling.eta=-1"),
    ("sampling.not_a_key=3", "sampling.not_a_key"),
    ("not_a_key=1", "not_a_key"),
    ("split_seed=-1", "split_seed=-1"),
    ("sampling.seed=-3", "sampling.seed=-3"),
    ("tuning.seed=-1", "tuning.seed=-1"),
    ("ssl.seeds=[-1]", "ssl.seeds[0]=-1"),
    ("ssl.seeds=[true]", "ssl.seeds[0]=True"),
    ("tuning.lr=.inf", "tuning.lr=inf"),
    ("tuning.ema_decay=1.5", "tuning.ema_decay=1.5"),
    ("ssl.lr=-0.1", "ssl.lr=-0.1"),
    ("ssl.lr=.inf", "ssl.lr=inf"),
    ("ssl.tau=1.5", "ssl.tau=1.5"),
    ("ssl.eval_every=0", "ssl.eval_every=0"),
    ("ssl.algorithm=bogus", "ssl.algorithm='bogus'", "fixmatch"),
    ("ssl.net=bogus", "ssl.net='bogus'", "cnn-small"),
    ("ssl.arms=[bogus]", "ssl.arms[0]='bogus'"),
    ("ssl.arms=[]", "ssl.arms"),
    ("ssl.budget=bogus", "ssl.budget='bogus'"),
    ("ssl.recipe=bogus", "ssl.recipe='bogus'"),
    ("ssl.extra.bogus=1", "ssl.extra"),
    ("ssl.steps=3000000", "ssl.steps=3000000"),  # a GPU's budget on the CPU (pre-flight)
    ("filter.margin=.nan", "filter.margin=nan"),
    ("quality.reference.bogus=1", "quality.reference.bogus"),
    ("quality.reference.epochs=true", "quality.reference.epochs=True"),
    ("quality.reference.epochs=0", "quality.reference.epochs=0"),
    ("quality.kid_subset_size=1", "quality.kid_subset_size=1"),
    ("labels_per_class=true", "labels_per_class=True"),
    ("labels_per_class=0", "labels_per_class=0"),
    ("labels_per_class=2.5", "labels_per_class=2.5"),
    ("labels_per_class=500", "labels_per_class=500"),  # more than the data holds (pre-flight)
    ("validation_per_class=9", "validation_per_class"),  # the same, with the labels
    ("image_size=64", "image_size=64"),  # the base works at 32 px (pre-flight)
    ("image_size=48", "image_size=48"),  # not a power of two
    ("image_mode=cmyk", "image_mode='cmyk'"),
    ("resize=maybe", "resize='maybe'"),
    ("progress=1", "progress=1"),
    ("device=tpu", "device='tpu'"),
    ("dataset=imagenet", "dataset='imagenet'"),
    ("dataset_root=/no/such/folder", "dataset='image-folder'", "/no/such/folder"),
    ("base_model=/no/such/dir", "base_model='/no/such/dir'"),
    ("encoder=nobody/no-such-clip", "encoder='nobody/no-such-clip'"),
    ("export.arm=bogus", "export.arm='bogus'"),
    ("loop.rounds=3", "loop.rounds=3"),
    ("arms_at_once=0", "arms_at_once"),
    ("arms_at_once=true", "arms_at_once"),
    ("fit.samples=true", "fit.samples=True"),
    ("shards.rows_per_shard=0", "shards.rows_per_shard=0"),
    ("adapter.placement={down: [7], mid: true}", "adapter.placement", "down"),  # pre-flight
    ("adapter.placement={sideways: all}", "adapter.placement.sideways"),
    ("pretrain.steps=true", "pretrain.steps=True"),
    ("pretrain.extra.bogus=1", "pretrain.extra"),
    ("preset=/tmp/elsewhere", "preset='/tmp/elsewhere'"),  # would name the run's directory
    ("preset=../../escaped", "preset='../../escaped'"),
    ("sampling.mask_ratios=[0.1,", "sampling.mask_ratios"),  # the value is not YAML
    ("sampling=3", "sampling"),
]


def _runs_untouched(ctx) -> None:
    runs = ctx["runs"]
    assert not runs.exists() or not os.listdir(runs), f"written: {sorted(os.listdir(runs))}"
    # Nothing beside the runs dir either (a preset name once made a folder outside it).
    made = {p.name for p in ctx["tmp"].iterdir()} - {"presets", "work", *ctx.get("made", ())}
    assert not made, f"written outside the runs dir: {sorted(made)}"
    assert not Path("/tmp/elsewhere").exists()


def _refused(capsys, argv: list[str], named: str, *also: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "reached the work" not in err, err[-2000:]
    assert rc == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("augment: error: "), err
    for text in (named, *also):
        assert text in err, err
    return err


@pytest.mark.parametrize("case", SET_CASES, ids=[c[0] for c in SET_CASES])
def test_a_bad_override_is_refused_before_work(ctx, capsys, case):
    override, named, *also = case
    _refused(capsys, ["run", str(ctx["preset"]), "--runs-dir", str(ctx["runs"]),
                      "--set", override], named, *also)
    _runs_untouched(ctx)


# Preset files: (name, the file's text, what the message names besides the file).
MALFORMED = "dataset: image-folder\nsampling: {per_condition: 2\nssl: {}\n"
FILE_CASES = [
    ("malformed-yaml", MALFORMED, "line"),
    ("tab-indented", "sampling:\n\tper_condition: 2\n", "line"),
    ("empty", "", "empty"),
    ("only-comments", "# nothing here\n", "empty"),
    ("a-list", "- dataset: fashion-mnist\n", "mapping"),
    ("duplicate-key", "split_seed: 1\nsplit_seed: 2\n", "split_seed"),
    ("preset-escapes", "preset: ../../escaped\n", "preset='../../escaped'"),
    ("preset-absolute", "preset: /tmp/elsewhere\n", "preset='/tmp/elsewhere'"),
]


@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_a_bad_preset_file_is_refused_naming_it(ctx, capsys, case):
    name, text, named = case
    path = ctx["tmp"] / "presets" / f"{name}.yaml"
    if name in ("duplicate-key", "preset-escapes", "preset-absolute"):
        # Otherwise valid: the tiny preset with the bad part added.
        body = yaml.safe_dump({k: v for k, v in ctx["data"].items() if k != "split_seed"})
        text = body + text
    path.write_text(text)
    _refused(capsys, ["run", str(path), "--runs-dir", str(ctx["runs"])], named, path.name)
    _runs_untouched(ctx)


def _copy_folder(ctx, name: str) -> Path:
    folder = ctx["tmp"] / name
    shutil.copytree(ctx["folder"], folder)
    ctx["made"] = {name}
    return folder


def _first_rgb(folder: Path) -> None:
    first = min((folder / "train" / "a-tshirt").iterdir())
    Image.open(first).convert("RGB").save(first)


def _one_larger(folder: Path) -> None:
    last = max((folder / "train" / "b-trouser").iterdir())
    Image.open(last).resize((40, 40)).save(last)


def _all_small(folder: Path) -> None:
    for p in folder.rglob("*.png"):
        Image.open(p).resize((8, 8)).save(p)


def _one_class(folder: Path) -> None:
    for part in ("train", "test"):
        shutil.rmtree(folder / part / "b-trouser")


# Data folders the stages could not use: (name, how the copy is spoilt, what is named).
FOLDER_CASES = [
    ("first-file-rgb-rest-grey", _first_rgb, "image_mode"),
    ("sizes-differ", _one_larger, "resize"),
    ("images-too-small", _all_small, "resize"),
    ("one-class", _one_class, "class"),
]


@pytest.mark.parametrize("case", FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_a_data_folder_the_stages_cannot_use_is_refused(ctx, capsys, case):
    name, spoil, named = case
    folder = _copy_folder(ctx, name)
    spoil(folder)
    _refused(capsys, ["run", str(ctx["preset"]), "--runs-dir", str(ctx["runs"]),
                      "--set", f"dataset_root={folder}"], named)
    _runs_untouched(ctx)


def test_a_runs_dir_that_is_a_file_is_refused(ctx, capsys):
    ctx["runs"].parent.mkdir()
    ctx["runs"].write_text("not a folder")
    _refused(capsys, ["run", str(ctx["preset"]), "--runs-dir", str(ctx["runs"])], "runs_dir")
    assert ctx["runs"].read_text() == "not a folder"


def test_a_runs_dir_on_a_read_only_file_system_is_refused(ctx, capsys):
    # /proc refuses new folders even to root (chmod does not bind root).
    _refused(capsys, ["run", str(ctx["preset"]), "--runs-dir", "/proc/augment-runs"],
             "runs_dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod")
def test_a_read_only_runs_dir_is_refused(ctx, capsys):
    ctx["runs"].mkdir(parents=True)
    ctx["runs"].chmod(0o555)
    try:
        _refused(capsys, ["run", str(ctx["preset"]), "--runs-dir", str(ctx["runs"])],
                 "runs_dir")
        assert not os.listdir(ctx["runs"])
    finally:
        ctx["runs"].chmod(0o755)


# The other commands that take parameters: (name, argv after `augment`, what is named).
def _command_cases(ctx) -> dict[str, tuple[list[str], str]]:
    tmp, out = ctx["tmp"], str(ctx["tmp"] / "work" / "runs" / "base")
    spec = tmp / "presets" / "spec.yaml"
    good = {"preset": str(ctx["preset"]), "grid": {"sampling.guidance": [1.0, 2.0]},
            "repetitions": [0], "pairs": [["augmented", "baseline"]]}
    specs = {
        "sweep-malformed": "name: s\ngrid: {a: [1, 2\n",
        "sweep-name-escapes": yaml.safe_dump({**good, "name": "../../escaped"}),
        "sweep-name-non-ascii": yaml.safe_dump({**good, "name": "grüne"}),
        "sweep-cell-bad": yaml.safe_dump({**good, "name": "s",
                                          "grid": {"ssl.steps": [True, 4]}}),
    }
    cases = {
        "unknown-preset": (["run", "no-such-preset"], "no-such-preset"),
        "override-without-value": (["run", str(ctx["preset"]), "--set", "novalue"], "novalue"),
        "pretrain-steps-true": (["pretrain", "--out", out, "--set", "steps=true"], "steps=True"),
        "pretrain-lr-inf": (["pretrain", "--out", out, "--set", "lr=.inf"], "lr=inf"),
        "pretrain-steps-huge": (["pretrain", "--out", out, "--set", "steps=100000000"],
                                "steps=100000000"),
        "pretrain-seed-negative": (["pretrain", "--out", out, "--set", "seed=-1"], "seed=-1"),
        "transfer-guidance-inf": (["transfer", "--runs-dir", str(ctx["runs"]),
                                   "--set", "guidance=.inf"], "guidance=inf"),
        "transfer-steps-true": (["transfer", "--runs-dir", str(ctx["runs"]),
                                 "--set", "steps=true"], "steps=True"),
        "transfer-runs-dir-read-only": (["transfer", "--runs-dir", "/proc/augment-runs",
                                         "--shots", "2", "--samples", "2"], "runs_dir"),
        "report-no-run": (["report", str(tmp / "work" / "runs" / "nope")], "nope"),
        "export-no-run": (["export", str(tmp / "work" / "runs" / "nope")], "nope"),
    }
    for name, text in specs.items():
        cases[name] = (["sweep", str(spec), "--runs-dir", str(ctx["runs"])],
                       {"sweep-malformed": "line", "sweep-name-escapes": "name",
                        "sweep-name-non-ascii": "name", "sweep-cell-bad": "ssl.steps"}[name])
        cases[name] += (text,)
    return cases


COMMAND_CASES = ["unknown-preset", "override-without-value", "pretrain-steps-true",
                 "pretrain-lr-inf", "pretrain-steps-huge", "pretrain-seed-negative",
                 "transfer-guidance-inf", "transfer-steps-true", "transfer-runs-dir-read-only",
                 "report-no-run", "export-no-run", "sweep-malformed", "sweep-name-escapes",
                 "sweep-name-non-ascii", "sweep-cell-bad"]


@pytest.mark.parametrize("name", COMMAND_CASES)
def test_every_command_refuses_bad_parameters_before_work(ctx, capsys, name):
    argv, named, *spec_text = _command_cases(ctx)[name]
    if spec_text:
        (ctx["tmp"] / "presets" / "spec.yaml").write_text(spec_text[0])
    _refused(capsys, argv, named)
    _runs_untouched(ctx)


def test_the_table_holds_at_least_fifty_cases():
    n = len(SET_CASES) + len(FILE_CASES) + len(FOLDER_CASES) + len(COMMAND_CASES) + 3
    assert n >= 54, n


def test_a_non_ascii_preset_name_becomes_an_ascii_run_inside_the_runs_dir(ctx, capsys):
    """A preset called ``grüne Äpfel`` is a valid name: the run directory and the artifact
    keys are its ASCII slug, inside the runs dir (Prefect once refused the key at the very
    end of every run)."""
    from flows.tasks import artifact_key
    from pipeline.config import load_config
    from pipeline.runs import run_dir_for

    path = ctx["tmp"] / "presets" / "grüne Äpfel.yaml"
    path.write_text(yaml.safe_dump(ctx["data"]))
    config = load_config(path, [f"runs_dir={json.dumps(str(ctx['runs']))}"])
    run_dir = run_dir_for(config)
    assert run_dir.parent == ctx["runs"] and run_dir.name.startswith("grune-apfel-")
    assert run_dir.name.isascii() and artifact_key("report", config).isascii()
    assert main(["run", str(path), "--runs-dir", str(ctx["runs"]), "--dry-run"]) == 0
    assert f"run directory {run_dir}" in capsys.readouterr().out
