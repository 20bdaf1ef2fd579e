"""A classifier out: export a unit's EMA classifier, load it from its two files alone (also in
a fresh process), the run's default choice, and ``augment export`` / ``augment predict``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from flow_fixtures import REPO
from report_fixtures import write_arm_seed
from torch_helpers import anl_one_thread as one_thread

from flows.cli import main
from pipeline.data.splits import make_split
from pipeline.ssl import SSLConfig, run_arm
from pipeline.ssl.arms import CHECKPOINT, channel_stats, predict_probs
from pipeline.ssl.export import (
    CONFIG_FILE,
    MODEL_FILE,
    ExportError,
    export_classifier,
    load_classifier,
    predict,
)


@pytest.fixture(scope="module")
def trained_unit(ssl_fm_subset, tmp_path_factory):
    """A finished baseline unit (tiny net, 20 steps, with a validation split) and its
    export, at the trainer's defaults (bf16 autocast and channels_last where the CPU has
    native bf16)."""
    ds = ssl_fm_subset
    split = make_split(ds.train_labels, 4, seed=0, val_per_class=5)
    cfg = SSLConfig(net="cnn-tiny", steps=20, batch_size=16, mu=1, eval_every=10,
                    checkpoint_every=10, seed=0, device="cpu")
    root = tmp_path_factory.mktemp("export")
    with one_thread():
        run_arm("baseline", ds, split, root / "unit", cfg, progress=False)
        export_classifier(root / "unit", root / "classifier", class_names=list(ds.class_names),
                          provenance={"run": "test"}, image_shape=ds.image_shape,
                          check=(ds.test_images, ds.test_labels))
    return root / "unit", root / "classifier"


def test_export_reproduces_the_units_own_evaluation(trained_unit, ssl_fm_subset):
    unit, out = trained_unit
    ds = ssl_fm_subset
    metrics = json.loads((unit / "metrics.json").read_text())
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["net"] == {"name": "cnn-tiny", "width": None}
    assert config["class_names"] == list(ds.class_names) and config["num_classes"] == 10
    assert config["input"] == {"height": 28, "width": 28, "channels": 1, "pil_mode": "L",
                               "resize": "bicubic", "dtype": "uint8", "layout": "NHWC"}
    mean, std = channel_stats(ds.train_images)  # the trainer's normalisation, from its buffers
    assert config["preprocessing"]["mean"] == pytest.approx(mean)
    assert config["preprocessing"]["std"] == pytest.approx(std)
    assert (config["arm"], config["seed"]) == ("baseline", 0)
    for key in ("val_error", "top1_error", "last_top1_error"):
        assert config[key] == metrics[key]
    assert config["provenance"] == {"run": "test"}
    # The weights are the checkpoint's EMA, recalibrated BN statistics included.
    from safetensors.torch import load_file

    ema = torch.load(unit / CHECKPOINT, map_location="cpu", weights_only=True)["ema"]
    saved = load_file(out / MODEL_FILE)
    assert set(saved) == set(ema) and any(k.endswith("running_var") for k in saved)
    assert all(torch.equal(saved[k], ema[k]) for k in ema)

    with one_thread():
        model, loaded = load_classifier(out)
        probs = predict(model, loaded, ds.test_images)
    assert not model.training and loaded == config
    # final_points=1: the final test figure is the last evaluation, the exported model's.
    error = 1.0 - float(np.sum(probs.argmax(axis=1) == ds.test_labels)) / len(ds.test_labels)
    assert error == metrics["top1_error"] == metrics["last_top1_error"]
    assert config["check"]["top1_error"] == error == config["check"]["evaluation_top1_error"]
    assert np.array_equal(probs, predict_probs(unit, ds, ds.test_images))
    assert np.allclose(probs.sum(axis=1), 1.0)

    # Exporting the same unit again keeps the files as they are.
    stamps = [(out / f).stat().st_mtime_ns for f in (MODEL_FILE, CONFIG_FILE)]
    export_classifier(unit, out, class_names=list(ds.class_names), provenance={},
                      image_shape=ds.image_shape)
    assert [(out / f).stat().st_mtime_ns for f in (MODEL_FILE, CONFIG_FILE)] == stamps


def test_a_fresh_process_loads_identical_probabilities(trained_unit, ssl_fm_subset, tmp_path):
    _, out = trained_unit
    images = ssl_fm_subset.test_images[:64]
    np.save(tmp_path / "images.npy", images)
    code = ("import sys, numpy as np\n"
            "from pipeline.ssl.export import load_classifier, predict\n"
            "model, config = load_classifier(sys.argv[1])\n"
            "np.save(sys.argv[3], predict(model, config, np.load(sys.argv[2])))\n")
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "images.npy"),
                    str(tmp_path / "probs.npy")], check=True, cwd=REPO, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    with one_thread():
        model, config = load_classifier(out)
        here = predict(model, config, images)
    assert np.array_equal(np.load(tmp_path / "probs.npy"), here)


def test_loading_refuses_weights_the_config_does_not_describe(trained_unit, tmp_path):
    import shutil

    _, out = trained_unit
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / MODEL_FILE).write_bytes((copy / MODEL_FILE).read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ExportError, match="sha256 differs"):
        load_classifier(copy)
    with pytest.raises(ExportError, match="not an exported classifier"):
        load_classifier(tmp_path)


def _png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


def test_predict_cli_writes_one_row_per_image(trained_unit, ssl_fm_subset, tmp_path, capsys):
    _, out = trained_unit
    ds = ssl_fm_subset
    folder = tmp_path / "images"
    folder.mkdir()
    files = [_png(folder / f"{i}.png", ds.test_images[i, ..., 0]) for i in range(3)]
    (folder / "notes.txt").write_text("not an image: skipped inside a folder")
    # A colour image of another size: converted to grey and resized, as training images were.
    colour = _png(tmp_path / "colour.png", np.repeat(ds.test_images[3], 3, axis=-1)[:, :20])
    csv = tmp_path / "predictions.csv"
    with one_thread():
        assert main(["predict", str(out), str(folder), str(colour), "--out", str(csv)]) == 0
        model, config = load_classifier(out)
        probs = predict(model, config, ds.test_images[:3])
    table = pd.read_csv(csv)
    names = list(ds.class_names)
    assert list(table.columns) == ["path", "predicted", "confidence", *[f"p_{n}" for n in names]]
    assert table["path"].tolist() == [str(f) for f in (*files, colour)]
    assert np.allclose(table[[f"p_{n}" for n in names]].to_numpy()[:3], probs)
    assert table["predicted"].tolist()[:3] == [names[i] for i in probs.argmax(axis=1)]
    assert "4 images ->" in capsys.readouterr().out
    with one_thread():
        assert main(["predict", str(out), str(files[0]), "--out",
                     str(tmp_path / "p.parquet")]) == 0
    assert len(pd.read_parquet(tmp_path / "p.parquet")) == 1


def test_predict_cli_names_the_fix_for_unreadable_images(trained_unit, tmp_path, capsys):
    from PIL import Image

    _, out = trained_unit
    not_image = tmp_path / "scan.png"
    not_image.write_text("this is text")
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((28, 28), 40000, dtype=np.uint16)).save(deep)  # 16-bit grey
    assert Image.open(deep).mode.startswith("I")
    for path, named in ((not_image, "is not an image Pillow can read"),
                        (deep, "save it as an 8-bit greyscale PNG"),
                        (tmp_path / "missing.png", "no such file or folder")):
        assert main(["predict", str(out), str(path), "--out", str(tmp_path / "p.csv")]) == 2
        err = capsys.readouterr().err
        assert named in err and str(path) in err
    assert not (tmp_path / "p.csv").exists()


def test_run_exports_the_best_validation_arm_after_ssl(flow_cfg, capsys):
    from pipeline.config import with_overrides
    from pipeline.runs import init_run_dir, read_json
    from pipeline.stages.split import run_split
    from pipeline.stages.ssl import run_ssl

    cfg = with_overrides(flow_cfg, {"ssl.arms": ["supervised", "baseline"],
                                    "validation_per_class": 2})
    run_dir = init_run_dir(cfg)
    run_split(run_dir, cfg)
    with one_thread():
        rec = run_ssl(run_dir, cfg)
    val = {a: read_json(run_dir / f"ssl/{a}/seed-0/metrics.json")["val_error"]
           for a in ("supervised", "baseline")}
    best = "baseline" if val["baseline"] < val["supervised"] else "supervised"  # ties: first
    note = rec["metrics"]["export"]
    assert (note["arm"], note["seed"], note["chosen_by"]) == (best, 0, "lowest validation error")
    assert note["val_error_by_arm"] == val and note["path"] == "classifier"
    assert rec["outputs"]["classifier"] == "classifier/"
    assert read_json(run_dir / "stages" / "ssl.json")["metrics"]["export"] == note
    config = read_json(run_dir / "classifier" / CONFIG_FILE)
    assert config["arm"] == best and config["provenance"]["unit"] == f"ssl/{best}/seed-0"
    assert config["check"]["top1_error"] == config["check"]["evaluation_top1_error"]
    from pipeline.report.build import overview
    from pipeline.report.data import load_run

    row = dict(overview(load_run(run_dir))["rows"])["classifier"]  # the report says where
    assert row.startswith(f"classifier/: {best}, seed 0")
    assert f"augment predict {run_dir / 'classifier'} IMAGES" in row

    # A rerun skips the stage and keeps the export and the record as they are.
    stamps = {p: p.stat().st_mtime_ns for p in [run_dir / "stages" / "ssl.json",
                                                *(run_dir / "classifier").iterdir()]}
    with one_thread():
        assert run_ssl(run_dir, cfg)["skipped"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # Another arm through the CLI, to a folder of its own.
    other = "supervised" if best == "baseline" else "baseline"
    with one_thread():
        assert main(["export", str(run_dir), "--arm", other, "--out",
                     str(run_dir.parent / "other")]) == 0
    assert f"exported {other} seed 0 (named;" in capsys.readouterr().out
    assert read_json(run_dir.parent / "other" / CONFIG_FILE)["arm"] == other
    assert main(["export", str(run_dir.parent)]) == 2  # not a run directory


def test_default_choice_reads_validation_never_test(flow_cfg, tmp_path):
    from pipeline.config import with_overrides
    from pipeline.stages.classifier import choose_arm

    cfg = with_overrides(flow_cfg, {"ssl.arms": ["supervised", "baseline", "augmented"],
                                    "ssl.seeds": [0, 1]})
    run = tmp_path / "run"
    # baseline has the lowest test error, augmented the lowest mean validation error.
    for arm, test, vals in (("supervised", 0.30, (0.40, 0.40)), ("baseline", 0.10, (0.35, 0.33)),
                            ("augmented", 0.20, (0.30, 0.36))):
        for seed, v in enumerate(vals):
            write_arm_seed(run, arm, seed, test, val_error=v)
    arm, why, val = choose_arm(run, cfg)
    assert (arm, why) == ("augmented", "lowest validation error")
    assert val == pytest.approx({"supervised": 0.40, "baseline": 0.34, "augmented": 0.33})
    assert choose_arm(run, cfg, "baseline")[:2] == ("baseline", "named")
    no_val = tmp_path / "no-val"
    for arm in cfg.ssl.arms:
        write_arm_seed(no_val, arm, 0, 0.1 if arm == "supervised" else 0.5)
    assert choose_arm(no_val, cfg)[:2] == ("augmented", "no validation split: the default arm")


def test_export_section_keeps_default_hashes_and_checks_its_arm(flow_cfg):
    from pipeline.config import ConfigError, config_hash, result_fields, with_overrides

    assert "export" not in result_fields(flow_cfg)
    named = with_overrides(flow_cfg, {"export.arm": "baseline"})
    assert result_fields(named)["export"]["arm"] == "baseline"
    assert config_hash(named) != config_hash(flow_cfg)
    with pytest.raises(ConfigError, match="export.arm='selftrain' is not one of ssl.arms"):
        with_overrides(flow_cfg, {"export.arm": "selftrain"})
    with pytest.raises(ConfigError, match="export.seed=3 is not one of ssl.seeds"):
        with_overrides(flow_cfg, {"export.seed": 3})
