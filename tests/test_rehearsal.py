"""Rehearsal of the real CIFAR-10 deployment, offline: ``augment run cifar10-250labels``.

The preset file itself runs, through the console script a user calls, in a subprocess whose
Hugging Face cache holds tiny stand-ins under the real ids (``google/ddpm-cifar10-32``,
``openai/clip-vit-base-patch32``) and whose ``CIFAR10_ROOT`` is a small archive in the real
pickle layout (see ``rehearsal_fixtures``). Only sizes are overridden (``REHEARSAL_SIZES``)
plus ``device=cpu``, the explicit override for a GPU preset on a CPU. Every stage's output is
then checked from the outside; a subprocess is used because ``huggingface_hub`` and
``transformers`` read ``HF_HOME`` once, at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rehearsal_fixtures as rf

from pipeline.config import config_hash, load_config
from pipeline.paths import REPO_ROOT
from pipeline.runs import list_runs, read_json
from pipeline.stage_graph import STAGE_ORDER
from pipeline.stages.keys import ssl_unit_key

PRESET = "cifar10-250labels"
# Size overrides only: how much work each stage does, never what it computes with. The
# preset's dataset, labels per class, split seed, base model, encoder, adapter placement and
# widths, mask ratio, guidance, SSL algorithm and net (wrn-28-2) all stay as shipped.
REHEARSAL_SIZES = [
    "validation_per_class=5",  # the stand-in archive has 40 training images per class
    "tuning.steps=2", "tuning.batch_size=4",
    "sampling.per_condition=1", "sampling.num_inference_steps=2",
    "ssl.steps=2", "ssl.batch_size=2", "ssl.eval_size=64",
    "quality.reference.epochs=1", "quality.kid_subsets=2", "quality.kid_subset_size=8",
    # The second round: fewer pseudo-labels, and any confidence (a 2-step classifier is
    # never sure of anything; at 0.95 the pseudo step would rightly stop the run).
    "loop.per_class=2", "loop.threshold=0", "loop.per_condition=1",
]
REHEARSAL_OVERRIDES = ["device=cpu", *REHEARSAL_SIZES]


# --------------------------------------------------------------------------- set-up


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Hub cache (HF_HOME) with both stand-ins under the real ids, a local copy of each, and
    a CIFAR-10 root. Built in ~10 s."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("rehearsal")
        snapshots = rf.build_hub_cache(root / "hf", root / "saved")
        cifar = rf.build_cifar10_root(root / "cifar")
        local_ddpm = rf.build_ddpm_pipeline(root / "local" / "ddpm-pipeline")
        local_clip = rf.build_clip_vision(root / "local" / "clip-vision")
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "hf_home": root / "hf", "hub": root / "hf" / "hub",
            "snapshots": snapshots, "cifar_root": root / "cifar", "cifar": cifar,
            "local_ddpm": local_ddpm, "local_clip": local_clip}


def _env(hf_home: Path, cifar_root: Path, prefect_home: Path, offline: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "PREFECT_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1" if offline else "0",
               TRANSFORMERS_OFFLINE="1" if offline else "0", CIFAR10_ROOT=str(cifar_root),
               CIFAR10_SKIP_MD5="1",  # a fabricated archive: its md5s cannot be CIFAR's
               PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    return env


def _augment(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """The console script ``augment`` (what a user types), else ``python -m flows.cli``."""
    script = Path(sys.executable).with_name("augment")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "flows.cli"]
    return subprocess.run(cmd + args, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture
def hub_cache_in_process(stand_ins, monkeypatch):
    """Point this process's huggingface_hub at the stand-in cache (read at call time by
    ``snapshot_download``), for resolving ids here the way the subprocess did."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(stand_ins["hub"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return stand_ins["hub"]


# --------------------------------------------------------------------------- stand-ins


def test_stand_ins_have_the_real_layouts(stand_ins, hub_cache_in_process, monkeypatch):
    from pipeline.data.datasets import load_dataset

    monkeypatch.setenv("CIFAR10_SKIP_MD5", "1")  # the stand-in archive is fabricated
    from pipeline.models import resolve_base_model, resolve_scheduler_config
    from pipeline.preflight import check_encoder

    ddpm = stand_ins["snapshots"][rf.DDPM_ID]
    index = json.loads((ddpm / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    unet_cfg = json.loads((ddpm / "unet" / "config.json").read_text())
    for key in ("down_block_types", "up_block_types", "layers_per_block", "sample_size",
                "downsample_padding", "freq_shift", "flip_sin_to_cos"):
        want = rf.DDPM_UNET_CONFIG[key]
        assert unet_cfg[key] == (list(want) if isinstance(want, tuple) else want), key
    sched = json.loads((ddpm / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"],
            sched["num_train_timesteps"]) == ("linear", 1e-4, 0.02, 1000)
    # Cache layout: snapshot files are symlinks into blobs/, refs/main names the snapshot.
    repo = ddpm.parents[1]
    assert (repo / "refs" / "main").read_text() == ddpm.name
    assert all(p.is_symlink() and p.resolve().parent == repo / "blobs"
               for p in ddpm.rglob("*") if p.is_file())

    clip_cfg = json.loads((stand_ins["snapshots"][rf.CLIP_ID] / "config.json").read_text())
    assert clip_cfg["model_type"] == "clip" and "text_config" in clip_cfg  # full CLIP, as on hub

    # Resolved by id through huggingface_hub (offline), with the scheduler beside the U-Net.
    unet_dir = resolve_base_model(rf.DDPM_ID)
    assert unet_dir == ddpm / "unet"
    assert resolve_scheduler_config(unet_dir) == ddpm / "scheduler" / "scheduler_config.json"
    assert Path(check_encoder(rf.CLIP_ID)) == stand_ins["snapshots"][rf.CLIP_ID]

    ds = load_dataset("cifar10", stand_ins["cifar_root"])
    assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
    assert len(ds.train_labels) == 400 and len(ds.test_labels) == 200
    assert np.bincount(ds.train_labels, minlength=10).tolist() == [40] * 10
    real, real_labels = rf.foolbox_cifar10()
    np.testing.assert_array_equal(ds.test_images[:20], real)  # the real images, unchanged
    np.testing.assert_array_equal(ds.test_labels[:20], real_labels)
    assert len({ds.train_images[i].tobytes() for i in range(400)}) == 400  # no duplicates


def test_local_copies_load_by_path(stand_ins):
    """The other way to provide the models: folders given as base_model / encoder paths."""
    import torch

    from anl_core.encoders import load_encoder
    from pipeline.models import resolve_base_model, resolve_scheduler_config
    from pipeline.preflight import check_encoder

    unet_dir = resolve_base_model(str(stand_ins["local_ddpm"]))
    assert unet_dir == stand_ins["local_ddpm"] / "unet"
    assert resolve_scheduler_config(unet_dir) is not None
    clip = stand_ins["local_clip"]
    assert check_encoder(str(clip)) == str(clip)
    encoder = load_encoder(str(clip), device="cpu")
    tokens = encoder.encode(torch.rand(3, 3, 32, 32) * 2 - 1)
    assert tokens.shape == (3, rf.CLIP_TOKENS, rf.CLIP_VISION["projection_dim"])
    assert torch.isfinite(tokens).all() and tokens.std() > 0


# --------------------------------------------------------------------------- the rehearsal


@pytest.mark.slow
def test_cifar10_preset_runs_end_to_end_on_stand_ins(stand_ins, hub_cache_in_process,
                                                     tmp_path):
    import torch
    from diffusers import UNet2DModel

    from anl_core.inject import ANLUNet, base_fingerprint
    from pipeline.data.shards import read_shards, verify_shards
    from pipeline.data.splits import load_split
    from pipeline.stages.keys import stage_keys
    runs = tmp_path / "runs"
    env = _env(stand_ins["hf_home"], stand_ins["cifar_root"], tmp_path / "prefect")
    t0 = time.perf_counter()
    proc = _augment(["run", PRESET, *_sets(REHEARSAL_OVERRIDES), "--runs-dir", str(runs),
                     "--no-progress"], env, timeout=900)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    print(f"rehearsal: augment run {PRESET} took {wall:.0f} s")

    # The preset itself (read from data/presets), plus only the overrides above.
    expected = load_config(PRESET, [*REHEARSAL_OVERRIDES, f"runs_dir={runs}", "progress=false"])
    assert expected.base_model == rf.DDPM_ID and expected.encoder == rf.CLIP_ID
    assert expected.require_gpu and expected.ssl.net == "wrn-28-2"
    run_dir = runs / f"{PRESET}-{config_hash(expected)[:8]}"
    assert run_dir.is_dir(), f"no {run_dir}; runs: {list(runs.iterdir())}"
    stored = read_json(run_dir / "config.json")
    assert stored["_meta"]["config_hash"] == config_hash(expected)

    # Both models were resolved by id, in the stand-in cache.
    preflight_line = next(ln for ln in log.splitlines() if ln.startswith("pre-flight ok"))
    ddpm_snap, clip_snap = (stand_ins["snapshots"][i] for i in (rf.DDPM_ID, rf.CLIP_ID))
    assert f"base {ddpm_snap / 'unet'}" in preflight_line
    assert f"encoder {clip_snap}" in preflight_line

    # Every stage the preset keys ran under that key; those it gives no key (pretrain: the
    # preset brings its base; the round-2 loop: one round) left no record.
    keys = stage_keys(expected)
    assert keys["pretrain"] is None
    ran = [s for s in STAGE_ORDER if keys[s] is not None]
    outputs = {}
    for stage in STAGE_ORDER:
        rec = read_json(run_dir / "stages" / f"{stage}.json")
        if stage not in ran:
            assert rec is None, stage
            continue
        assert rec is not None, f"stage {stage} left no record"
        assert rec["key"] == keys[stage], stage
        assert rec["device"].startswith("cpu"), stage
        assert "adopted_from" not in rec, stage
        outputs[stage] = rec["outputs"]
    (info,) = list_runs(runs)
    assert info.status == "complete" and not (run_dir / "stages" / "failed.json").exists()
    assert info.stages_done == ran
    # The records name what is on disk: one adapter and one sample folder per class, one SSL
    # unit per configured arm and seed, and each of them there.
    classes = [f"class-{c:02d}" for c in range(10)]
    assert outputs["tune"] == {"adapters": [f"adapters/{c}" for c in classes]}
    assert outputs["sample"] == {"samples": [f"samples/{c}" for c in classes]}
    assert outputs["ssl"] == {"ssl": [f"ssl/{a}/seed-{s}" for a in expected.ssl.arms
                                      for s in expected.ssl.seeds],
                              "classifier": "classifier/"}  # the exported best arm
    for stage, out in outputs.items():
        for rel in (v for vs in out.values() for v in ([vs] if isinstance(vs, str) else vs)):
            assert (run_dir / rel).exists(), (stage, rel)

    # encode: the CLIP stand-in, loaded by the real id (encoder id "clip" = the default CLIP).
    enc = read_json(run_dir / "stages" / "encode.json")["metrics"]
    assert (enc["encoder_id"], enc["num_tokens"], enc["token_dim"], enc["images"]) == \
        ("clip", rf.CLIP_TOKENS, rf.CLIP_VISION["projection_dim"], 250)

    # tune: ten per-class adapters that load back onto the base from the cache.
    torch.set_num_threads(1)
    base = UNet2DModel.from_pretrained(ddpm_snap / "unet", low_cpu_mem_usage=False).eval()
    fingerprint = base_fingerprint(base)
    sample = torch.randn(2, 3, 32, 32)
    tokens = torch.randn(2, rf.CLIP_TOKENS, rf.CLIP_VISION["projection_dim"])
    for c in range(10):
        adapter_dir = run_dir / f"adapters/class-{c:02d}"
        tune = read_json(adapter_dir / "tune.json")
        assert tune["images"] == 25 and len(tune["loss_history"]) == 2
        assert np.isfinite(tune["loss_history"]).all()
        fresh = UNet2DModel.from_pretrained(ddpm_snap / "unet", low_cpu_mem_usage=False).eval()
        model = ANLUNet.from_pretrained(fresh, adapter_dir, encoder_id="clip")
        assert model.config.base_fingerprint == fingerprint
        assert set(model.config.block_channels) == {"down.0", "down.1", "down.2", "down.3",
                                                    "mid", "up.0", "up.1", "up.2", "up.3"}
        with torch.no_grad():
            out = model(sample, torch.tensor([10, 500]), tokens=tokens)
        assert out.shape == sample.shape and torch.isfinite(out).all()

    # shards: verified manifest, one synthetic image per labeled image sampled, the ones the
    # preset's filter kept written (its own records say how many), labels inherited.
    manifest = verify_shards(run_dir / "shards")
    shards_rec = read_json(run_dir / "stages" / "shards.json")["metrics"]
    n_rows = sum(s["rows"] for s in manifest["shards"])
    sampled = 10 * expected.labels_per_class * expected.sampling.per_condition * \
        len(expected.sampling.mask_ratios)
    assert sampled == 250 == read_json(run_dir / "stages" / "sample.json")["metrics"]["rows"]
    assert shards_rec["rows_sampled"] == sampled and 0 < n_rows == shards_rec["rows"] <= sampled
    arrays = read_shards(run_dir / "shards")
    per_class = np.bincount(arrays.labels, minlength=10)
    assert shards_rec["rows_per_class"] == {str(c): int(n) for c, n in enumerate(per_class)}
    assert shards_rec["kept_per_class"] == {str(c): round(int(n) / 25, 4)
                                            for c, n in enumerate(per_class)}
    assert shards_rec["kept_share"] == round(n_rows / sampled, 4)
    assert arrays.images.shape == (n_rows, 32, 32, 3) and arrays.images.dtype == np.uint8
    assert arrays.images.std() > 1  # denoised pixels, not a constant fill
    split = load_split(run_dir / "split.parquet")
    assert len(split.val_idx) == 50 and not set(split.val_idx) & set(split.labeled_idx)
    label_of = dict(zip(split.labeled_idx.tolist(), split.labeled_labels.tolist(), strict=True))
    frame = arrays.frame
    conds = frame["condition_id"].tolist()
    assert len(set(conds)) == len(conds) and set(conds) <= set(label_of)  # each at most once
    assert [label_of[i] for i in frame["condition_id"]] == arrays.labels.tolist()
    assert stand_ins["cifar"]["train_labels"][frame["condition_id"].to_numpy()].tolist() == \
        arrays.labels.tolist()
    assert set(frame["source"]) == {"synthetic"}
    assert set(frame["mask_ratio"]) == set(expected.sampling.mask_ratios)
    assert set(frame["guidance"]) == {expected.sampling.guidance}
    # Every row names its class's adapter (a class the filter emptied has no rows).
    assert set(frame["adapter_id"]) <= {f"class-{c:02d}" for c in range(10)}
    assert frame["adapter_id"].tolist() == [f"class-{c:02d}" for c in arrays.labels]

    # ssl: the arms of the preset, each a wrn-28-2; augmented and control with extra rows.
    # The control arm's rows are the judged real images it cached: per class at most as many
    # as the shards hold, short by the shortfall it recorded, all unlabeled training images.
    (judged_file,) = (run_dir / "ssl" / "control").glob("judged-*.npz")
    with np.load(judged_file) as judged:
        control_labels, control_idx = judged["labels"], judged["train_idx"]
        control_info = json.loads(str(judged["info"]))
    assert len(control_labels) == control_info["control_rows"] == \
        n_rows - control_info["control_shortfall"] > 0
    assert (np.bincount(control_labels, minlength=10) <= per_class).all()
    assert set(control_idx.tolist()) <= set(split.unlabeled_idx.tolist())
    report_md = (run_dir / "report.md").read_text()
    for arm in expected.ssl.arms:
        for seed in expected.ssl.seeds:
            unit = run_dir / f"ssl/{arm}/seed-{seed}"
            metrics = read_json(unit / "metrics.json")
            assert metrics is not None, f"{arm} wrote no metrics"
            assert (metrics["arm"], metrics["net"], metrics["steps"], metrics["dataset"]) == \
                (arm, "wrn-28-2", 2, "cifar10")
            # The error is the confusion matrix's off-diagonal share over the 200 test images,
            # and the report's per-seed table shows it (and the validation error).
            confusion = np.asarray(metrics["confusion_matrix"])
            assert confusion.sum() == metrics["num_test"] == 200
            assert metrics["top1_error"] == pytest.approx(1 - np.trace(confusion) / 200)
            assert (f"| {arm} | {seed} | {100 * metrics['top1_error']:.2f}% | "
                    f"{100 * metrics['val_error']:.2f}% |") in report_md
            assert metrics["num_labeled"] == 250
            extra = {"augmented": n_rows, "control": len(control_labels)}.get(arm, 0)
            assert metrics.get("num_synthetic", 0) == extra
            assert metrics["num_validation"] == 50
            assert read_json(unit / "unit.json")["key"] == ssl_unit_key(expected, keys, arm, seed)

    # quality and report: the record holds quality.json's figures, a label consistency is a
    # share of the n_rows synthetic images, and the report shows it.
    quality = read_json(run_dir / "stages" / "quality.json")["metrics"]
    overall = read_json(run_dir / "quality" / "quality.json")["overall"]
    assert quality == {k: overall[k] for k in quality}
    assert quality["n_synthetic"] == n_rows
    consistent = quality["label_consistency"] * n_rows
    assert consistent == pytest.approx(round(consistent), abs=1e-6)
    assert (f"| label consistency (reference classifier) | "
            f"{100 * quality['label_consistency']:.2f}% |") in report_md
    assert f"| synthetic images measured | {n_rows} |" in report_md
    html = (run_dir / "report.html").read_text()
    assert PRESET in html and all(arm in html for arm in expected.ssl.arms)
    assert f"run `{run_dir.name}`" in report_md


# --------------------------------------------------------------------------- pre-flight


def _only_ddpm_cached(stand_ins) -> Path:
    """An HF_HOME holding the base model but not the encoder."""
    hf = stand_ins["root"] / "hf-ddpm-only"
    if not hf.exists():
        rf.place_in_hub_cache(stand_ins["snapshots"][rf.DDPM_ID], rf.DDPM_ID, hf / "hub")
    return hf


@pytest.mark.parametrize("case", ["nothing-cached-offline", "hub-unreachable", "encoder-missing"])
def test_missing_models_fail_in_seconds_naming_the_id_and_both_fixes(stand_ins, tmp_path, case):
    hf_home = {"nothing-cached-offline": tmp_path / "empty-hf", "hub-unreachable":
               tmp_path / "empty-hf", "encoder-missing": _only_ddpm_cached(stand_ins)}[case]
    hf_home.mkdir(exist_ok=True)
    env = _env(hf_home, stand_ins["cifar_root"], tmp_path / "prefect",
               offline=case != "hub-unreachable")
    if case == "hub-unreachable":
        # No network here; make sure of it, so the test never depends on the hub.
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    runs = tmp_path / "runs"
    t0 = time.perf_counter()
    # The stand-in archive holds 40 training images per class: a validation split that fits.
    proc = _augment(["run", PRESET, "--set", "device=cpu", "--set", "validation_per_class=5",
                     "--runs-dir", str(runs)], env, timeout=120)
    wall = time.perf_counter() - t0
    print(f"{case}: failed after {wall:.1f} s")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr
    missing = rf.CLIP_ID if case == "encoder-missing" else rf.DDPM_ID
    param = "encoder" if case == "encoder-missing" else "base_model"
    assert f"{param}={missing!r}" in err
    assert f"hf download {missing}" in err  # way 1: the Hugging Face cache
    assert f"--set {param}=/path/to/it" in err  # way 2: a local copy
    assert str(hf_home / "hub") in err  # where it was looked for
    assert ("could not be reached" if case == "hub-unreachable" else "HF_HUB_OFFLINE=1") in err
    assert not runs.exists()  # failed before any work
    assert "Flow run" not in proc.stdout + err  # ... and before Prefect started


def test_gpu_preset_without_a_gpu_names_the_explicit_cpu_override(tmp_path, capsys):
    import torch

    from flows.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["run", PRESET, "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "require_gpu=true" in err and "--set device=cpu" in err
    assert not (tmp_path / "runs").exists()


def test_disk_check_counts_the_planned_shards(tmp_path):
    from pipeline.preflight import PreflightError, check_disk, estimated_output_bytes

    cfg = load_config(PRESET, [f"runs_dir={tmp_path / 'runs'}"])
    planned = estimated_output_bytes(cfg, 10, (32, 32, 3))
    rows = 10 * 25 * 40  # classes x labels per class x per_condition x one mask ratio
    assert planned >= 2 * rows * 32 * 32 * 3  # sample chunks + shards, at least the pixels
    assert check_disk(cfg, planned) >= planned
    huge = load_config(PRESET, [f"runs_dir={tmp_path / 'runs'}",
                                "sampling.per_condition=100000000"])
    with pytest.raises(PreflightError, match=r"runs_dir=.*GB free.*sampling\.per_condition"):
        check_disk(huge, estimated_output_bytes(huge, 10, (32, 32, 3)))
