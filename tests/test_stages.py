"""Stage functions on a tiny real setup: 2 Fashion-MNIST classes as an image folder, a tiny
U-Net base saved in diffusers layout, the packaged EfficientNet-Lite0 encoder at 64 px.

The ``flow_*`` fixtures live in ``flow_fixtures.py`` (loaded by conftest for every module).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flow_fixtures import REPO
from pinned_presets import FROZEN_DEMO

from pipeline import stages
from pipeline.config import with_overrides
from pipeline.data.shard_format import MANIFEST
from pipeline.generate.sample import part_name, ratio_seed
from pipeline.runs import init_run_dir, list_runs, read_json, run_dir_for
from pipeline.stages.inputs import (
    adapter_rel,
    dataset_for,
    load_run_base,
    load_tokens,
    sample_rel,
    split_for,
)
from pipeline.stages.keys import ssl_unit_key, stage_keys
from pipeline.stages.sample import run_sample, run_sample_class
from pipeline.stages.shards import run_shards
from pipeline.stages.split import run_split


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


UPSTREAM = ("split", "fit", "encode", "tune", "sample", "shards")


def assert_outputs_as_declared(stage: str, outputs: dict, root: str = "") -> None:
    """A record's outputs are the ones pipeline.stage_graph declares for the stage."""
    from pipeline.stage_graph import BY_NAME

    declared = BY_NAME[stage].outputs
    assert set(outputs) <= set(declared), (stage, set(outputs) - set(declared))
    for name, paths in outputs.items():
        for path in paths if isinstance(paths, list) else [paths]:
            want = root + declared[name]
            ok = path.startswith(want) if want.endswith("/") else path == want
            assert ok or path + "/" == want, (stage, name, path, want)


def test_stages_write_records_and_skip_on_rerun(flow_cfg):
    run_dir = init_run_dir(flow_cfg)
    records = stages.run_all(run_dir, flow_cfg, until="shards")
    assert set(records) == set(UPSTREAM)  # no pretrain record: the base is given
    for name, rec in records.items():
        on_disk = read_json(run_dir / "stages" / f"{name}.json")
        assert on_disk["key"] == rec["key"] and on_disk["stage"] == name
        for field in ("started", "finished", "wall_s", "peak_mem_mb", "device", "outputs"):
            assert field in on_disk, (name, field)
        assert_outputs_as_declared(name, on_disk["outputs"])
    for c in (0, 1):
        tune = read_json(run_dir / f"adapters/class-{c:02d}/tune.json")
        assert len(tune["loss_history"]) == 2 and tune["param_counts"]["adapter"] > 0
        assert (run_dir / f"adapters/class-{c:02d}/adapter_model.safetensors").exists()
    manifest = read_json(run_dir / "shards" / MANIFEST)
    # 2 classes x 2 labeled images x 2 samples per condition x 1 mask ratio
    assert sum(s["rows"] for s in manifest["shards"]) == 8
    assert records["shards"]["metrics"]["rows_per_class"] == {"0": 4, "1": 4}

    before = _mtimes(run_dir)
    again = stages.run_all(run_dir, flow_cfg, until="shards")
    assert all(r.get("skipped") for r in again.values())
    assert _mtimes(run_dir) == before


def test_changed_sampling_reuses_finished_upstream_stages(flow_cfg):
    first = init_run_dir(flow_cfg)
    stages.run_all(first, flow_cfg, until="shards")
    changed = with_overrides(flow_cfg, {"sampling.guidance": 3.0})
    second = init_run_dir(changed)
    assert second != first
    records = stages.run_all(second, changed, until="shards")
    for name in ("split", "encode"):
        assert records[name].get("adopted_from") == first.name, name
    for c in (0, 1):
        unit = read_json(second / f"adapters/class-{c:02d}/unit.json")
        assert unit["key"] == read_json(first / f"adapters/class-{c:02d}/unit.json")["key"]
        a = first / f"adapters/class-{c:02d}/adapter_model.safetensors"
        b = second / f"adapters/class-{c:02d}/adapter_model.safetensors"
        assert a.stat().st_ino == b.stat().st_ino  # hard link, not retuned
    assert "adopted_from" not in records["sample"]
    old = np.load(first / "samples/class-00" / part_name(0, 0))["images"]
    new = np.load(second / "samples/class-00" / part_name(0, 0))["images"]
    assert not np.array_equal(old, new)  # guidance changed the samples


def test_killed_sampling_resumes_without_missing_or_duplicate_rows(flow_cfg, tmp_path):
    cfg = with_overrides(flow_cfg, {"sampling.num_inference_steps": 4,
                                    "sampling.per_condition": 3})
    run_dir = init_run_dir(cfg)
    stages.run_all(run_dir, cfg, until="tune")
    adapters_before = _mtimes(run_dir / "adapters")
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.model_dump_json())
    # The process kills itself (SIGKILL: no cleanup, no finally) right after its first chunk
    # is published, so the test sees the same mid-sampling state on every machine and load.
    code = ("import os, signal, sys; from pathlib import Path; "
            "from pipeline.config import AugmentConfig; "
            "from pipeline.stages import sample\n"
            "save = sample.save_npz\n"
            "def save_then_die(*a, **k):\n"
            "    save(*a, **k); os.kill(os.getpid(), signal.SIGKILL)\n"
            "sample.save_npz = save_then_die\n"
            "cfg = AugmentConfig.model_validate_json(Path(sys.argv[1]).read_text())\n"
            "sample.run_sample(Path(sys.argv[2]), cfg)")
    proc = subprocess.run([sys.executable, "-c", code, str(cfg_file), str(run_dir)], cwd=REPO,
                          timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    parts = list(run_dir.glob("samples/class-*/part-*.npz"))
    assert len(parts) == 1, parts  # 4 chunks planned (2 classes x 2 conditions): 3 missing
    assert not (run_dir / "stages" / "sample.json").exists()
    first_part = {p: p.stat().st_mtime_ns for p in parts}

    run_sample(run_dir, cfg)
    run_shards(run_dir, cfg)
    assert {p: p.stat().st_mtime_ns for p in parts} == first_part  # finished chunks kept
    assert _mtimes(run_dir / "adapters") == adapters_before  # adapters not redone

    from pipeline.data.shards import read_shards

    arrays = read_shards(run_dir / "shards")
    manifest = read_json(run_dir / "shards" / MANIFEST)
    assert len(arrays.labels) == sum(s["rows"] for s in manifest["shards"]) == 2 * 2 * 3
    counts = arrays.frame.groupby("condition_id").size()
    assert len(counts) == 4 and (counts == 3).all()  # every condition, each exactly k times

    # A chunk is a pure function of (seed, condition, index): regenerating the first one
    # (written by the killed process) gives the same pixels (up to 1 level of rounding,
    # since thread counts may differ between processes).
    killed_part = min(parts)
    original = np.load(killed_part)["images"]
    killed_part.unlink()
    (killed_part.parent / "unit.json").unlink()
    run_sample_class(run_dir, cfg, int(killed_part.parent.name.split("-")[1]))
    regenerated = np.load(killed_part)["images"]
    assert np.abs(original.astype(int) - regenerated.astype(int)).max() <= 1


def test_runs_listing_reports_status(flow_cfg):
    run_dir = init_run_dir(flow_cfg)
    run_split(run_dir, flow_cfg)
    (runs,) = list_runs(run_dir.parent)
    assert runs.path == run_dir and runs.status == "incomplete" and runs.stages_done == ["split"]
    assert run_dir_for(flow_cfg) == run_dir and run_dir.name.startswith("tiny-")


def test_neighbors_add_unlabeled_tuning_targets_and_keep_keys_when_off(flow_cfg):
    from pipeline.config import config_hash

    plain = stage_keys(flow_cfg)
    on = with_overrides(flow_cfg, {"neighbors.per_image": 3, "neighbors.pool": 8})
    keys = stage_keys(on)
    assert keys["split"] == plain["split"] and keys["encode"] != plain["encode"]
    off = with_overrides(flow_cfg, {"neighbors.pool": 8})  # per_image 0: the option is off
    assert stage_keys(off) == plain and config_hash(off) == config_hash(flow_cfg)
    share = with_overrides(on, {"neighbors.self_share": 0.9})  # read by tune, not encode
    assert stage_keys(share)["encode"] == keys["encode"]
    assert stage_keys(share)["tune"] != keys["tune"]

    run_dir = init_run_dir(on)
    records = stages.run_all(run_dir, on, until="tune")
    tok = load_tokens(run_dir)
    split = split_for(run_dir)
    nb = tok["neighbors"]
    assert nb.shape == (4, 3)  # 2 classes x 2 labeled images, 3 neighbours each
    found = nb[nb >= 0].numpy()
    assert len(found) > 0 and set(found) <= set(split.unlabeled_idx.tolist())
    metrics = records["encode"]["metrics"]
    assert metrics["neighbor_pool"] == 8 and metrics["neighbors"] == len(found)
    assert 0.0 <= metrics["neighbor_purity"] <= 1.0
    for c in (0, 1):
        tune = read_json(run_dir / f"adapters/class-{c:02d}/tune.json")
        assert tune["images"] == 2
        assert tune["neighbor_targets"] == int((nb[tok["labels"] == c] >= 0).sum())


def test_each_mask_ratio_draws_its_own_noise_and_masks(flow_cfg):
    """Two mask ratios of one condition: different seeds, so different noise and masks (with
    one seed the 0.25 mask was a subset of the 0.5 one, from the same starting noise)."""
    import torch

    from anl_core.sampling import MASK_STREAM, _random_mask, image_seed

    assert ratio_seed(7, 0) == 7  # one-ratio runs draw what they always drew
    s0, s1 = ratio_seed(7, 0), ratio_seed(7, 1)
    assert s1 != s0 and ratio_seed(7, 1) == s1 and ratio_seed(8, 1) != s1
    noise = [torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(
        image_seed(s, 3, 0))) for s in (s0, s1)]
    assert not torch.equal(*noise)
    masks = [_random_mask(16, 0.5, torch.Generator().manual_seed(
        image_seed(s, 3, 0, MASK_STREAM))) for s in (s0, s1)]
    assert not torch.equal(*masks)
    cfg = with_overrides(flow_cfg, {"sampling.mask_ratios": [0.0, 0.0]})  # same ratio twice
    run_dir = init_run_dir(cfg)
    stages.run_all(run_dir, cfg, until="shards")
    a = np.load(run_dir / "samples/class-00" / part_name(0, 0))["images"]
    b = np.load(run_dir / "samples/class-00" / part_name(1, 0))["images"]
    assert not np.array_equal(a, b)  # only the ratio's index differs between the two
    from pipeline.data.shards import read_shards

    frame = read_shards(run_dir / "shards", verify=True).frame
    assert set(frame["seed"]) == {cfg.sampling.seed, ratio_seed(cfg.sampling.seed, 1)}


def test_control_arm_runs_in_the_flow_with_judged_real_rows(flow_cfg):
    cfg = with_overrides(flow_cfg, {"ssl.arms": ["baseline", "augmented", "control"],
                                    "validation_per_class": 2})
    run_dir = init_run_dir(cfg)
    stages.run_all(run_dir, cfg, until="ssl")
    split = split_for(run_dir)
    assert len(split.val_idx) == 4
    m = read_json(run_dir / "ssl/control/seed-0/metrics.json")
    aug = read_json(run_dir / "ssl/augmented/seed-0/metrics.json")
    unit = read_json(run_dir / "ssl/control/seed-0/unit.json")
    # As many judged real rows as synthetic ones, unless the small pool runs short.
    assert 0 < m["num_synthetic"] <= aug["num_synthetic"] == 8
    assert unit["metrics"]["control_rows"] == m["num_synthetic"]
    assert m["num_synthetic"] + unit["metrics"]["control_shortfall"] == 8
    assert m["num_validation"] == 4 and m["val_error"] is not None
    (judged,) = (run_dir / "ssl" / "control").glob("judged-*.npz")  # judged once per run
    with np.load(judged) as z:
        assert len(z["labels"]) == m["num_synthetic"]
        assert set(z["train_idx"].tolist()) <= set(split.unlabeled_idx.tolist())
    base = read_json(run_dir / "ssl/baseline/seed-0/metrics.json")
    keys = stage_keys(cfg)
    # A change of the extra-row settings reruns augmented and control, not the baseline.
    other = with_overrides(cfg, {"ssl.synthetic_batch_share": 1.0})
    k2 = stage_keys(other)
    assert ssl_unit_key(cfg, keys, "baseline", 0) == \
        ssl_unit_key(other, k2, "baseline", 0)
    for arm in ("augmented", "control"):
        assert ssl_unit_key(cfg, keys, arm, 0) != ssl_unit_key(other, k2, arm, 0)
    assert base["fingerprint"] != m["fingerprint"]


def _class_conditions(run_dir: Path, c: int) -> list[int]:
    """The condition images of class c in sampling order: the split's labeled indices of c."""
    split = split_for(run_dir)
    return [int(i) for i in split.labeled_idx if split.labels[i] == c]


def test_sample_parts_and_shards_record_each_rows_condition_label_and_seed(flow_cfg):
    """Several conditions per chunk: row i * k + j of a chunk is sample j of the chunk's
    i-th condition (condition-major), in the part file, in its pixels and in the shards."""
    import torch

    from anl_core.inject import ANLUNet
    from anl_core.sampling import masked_sample
    from pipeline.data.images import from_model_space
    from pipeline.data.shards import read_shards

    k, ratios = 2, [0.3, 0.6]
    cfg = with_overrides(flow_cfg, {"labels_per_class": 3, "sampling.chunk_conditions": 2,
                                    "sampling.per_condition": k, "sampling.mask_ratios": ratios})
    run_dir = init_run_dir(cfg)
    stages.run_all(run_dir, cfg, until="shards")
    expected = []  # (label, condition_id, seed, mask_ratio) per row, in shard order
    for c in (0, 1):
        conds = _class_conditions(run_dir, c)
        assert len(conds) == 3
        for mi, ratio in enumerate(ratios):
            seed = ratio_seed(cfg.sampling.seed, mi)
            for ci, chunk in enumerate((conds[:2], conds[2:])):  # chunk_conditions = 2
                with np.load(run_dir / sample_rel(c) / part_name(mi, ci)) as z:
                    rows = [(c, cid, seed, ratio) for cid in chunk for _ in range(k)]
                    assert z["condition_id"].tolist() == [r[1] for r in rows], (c, mi, ci)
                    assert z["labels"].tolist() == [c] * len(rows)
                    assert z["seed"].tolist() == [seed] * len(rows)
                    assert z["mask_ratio"].tolist() == [ratio] * len(rows)
                    assert len(z["images"]) == len(rows)
                expected += rows
    # The pixels agree with the provenance: each condition sampled alone gives its rows.
    unet, scheduler = load_run_base(run_dir, cfg, "cpu")
    tok = load_tokens(run_dir)
    model = ANLUNet.from_pretrained(unet, run_dir / adapter_rel(1), encoder_id=tok["encoder_id"])
    shape = dataset_for(cfg).image_shape[:2]
    s = cfg.sampling
    with np.load(run_dir / sample_rel(1) / part_name(1, 0)) as z:
        images = z["images"]
    for i, cid in enumerate(_class_conditions(run_dir, 1)[:2]):
        row = int(torch.nonzero(tok["index"] == cid).flatten()[0])
        x = masked_sample(model, scheduler, tok["tokens"][row:row + 1], k,
                          mask_ratio=ratios[1], guidance=s.guidance,
                          num_inference_steps=s.num_inference_steps,
                          seed=ratio_seed(s.seed, 1), batch_size=s.batch_size,
                          condition_ids=[cid], progress=False, eta=s.eta)
        alone = from_model_space(x, shape=shape)
        assert np.abs(alone.astype(int) - images[i * k:(i + 1) * k].astype(int)).max() <= 1, cid
    frame = read_shards(run_dir / "shards").frame
    got = list(zip(frame["label"].tolist(), frame["condition_id"].tolist(),
                   frame["seed"].tolist(), frame["mask_ratio"].tolist(), strict=True))
    assert got == expected


def test_crash_inside_a_chunk_write_leaves_no_partial_chunk(flow_cfg, monkeypatch):
    """The second chunk's write dies half way through its bytes: no file under its final
    name and no temp file are left, the rerun writes the missing chunks only, and every
    condition ends up with exactly k rows."""
    import io

    from pipeline.data.shards import read_shards

    k = 2
    cfg = with_overrides(flow_cfg, {"labels_per_class": 3, "sampling.chunk_conditions": 1,
                                    "sampling.per_condition": k})
    run_dir = init_run_dir(cfg)
    stages.run_all(run_dir, cfg, until="tune")
    real_savez, calls = np.savez, []

    def crashing_savez(file, *args, **kwargs):
        calls.append(file)
        if len(calls) < 2:
            return real_savez(file, *args, **kwargs)
        buf = io.BytesIO()
        real_savez(buf, *args, **kwargs)
        data = buf.getvalue()
        file.write(data[:len(data) // 2])
        file.flush()
        raise OSError("injected: disk full half way through a chunk")

    with monkeypatch.context() as m:
        m.setattr(np, "savez", crashing_savez)
        with pytest.raises(OSError, match="injected"):
            run_sample(run_dir, cfg)
    unit = run_dir / sample_rel(0)
    first = unit / part_name(0, 0)
    # Only the finished chunk and the plan: no partial part, no temp file, no unit marker.
    assert sorted(p.name for p in unit.iterdir()) == [first.name, "plan.json"]
    assert not (run_dir / sample_rel(1)).exists()
    stamp = first.stat().st_mtime_ns

    run_sample(run_dir, cfg)
    assert first.stat().st_mtime_ns == stamp  # the finished chunk is kept, not redone
    for c in (0, 1):
        d = run_dir / sample_rel(c)
        assert sorted(p.name for p in d.glob("*.npz")) == \
            [part_name(0, ci) for ci in range(3)]
        assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temp files
        ids = []
        for ci in range(3):
            with np.load(d / part_name(0, ci)) as z:
                assert z["images"].shape[0] == k and z["images"].dtype == np.uint8
                ids += z["condition_id"].tolist()
        assert ids == [cid for cid in _class_conditions(run_dir, c) for _ in range(k)]
    run_shards(run_dir, cfg)
    frame = read_shards(run_dir / "shards").frame
    assert len(frame) == 2 * 3 * k
    counts = frame.groupby("condition_id").size()
    assert len(counts) == 6 and (counts == k).all()


# The demo preset's stage keys, pinned: moving code around must not rename finished work
# (these equal the keys before the second round and the STAGE_UPSTREAM-driven stage_keys).
# BN recalibration and new trainer fields changed what an SSL unit computes, so the ssl,
# report, pseudo and loop keys and the unit keys and fingerprints were re-pinned then; the
# generation stages (split .. shards, quality) kept theirs: their finished work is reused.
# The fit stage (issue 31) added its key and moved the report's (report folds fit in); every
# other key is unchanged.
# The keys of the demo preset up to b0fb373 (tests/pinned/demo.yaml): code changes must not
# rename them; the shipped demo's own keys are the gain map's (tests/test_demo_regime.py).
DEMO_KEYS = {"split": "73054915575ea91f", "pretrain": None, "fit": "7c3ae34bc0886fb1",
             "encode": "17a09fdda5f70922",
             "tune": "9f9f45dea10b937e", "sample": "7aae4600183810cf",
             "shards": "48e016007854a2db", "quality": "26a45d05633ff7da",
             "ssl": "f9ab7bc834d34b70", "loop": None, "report": "53eda735df971d55"}


def test_stage_keys_are_pinned():
    from pipeline.config import load_config

    assert stage_keys(load_config(FROZEN_DEMO)) == DEMO_KEYS
    two = stage_keys(load_config(FROZEN_DEMO, ["loop.rounds=2"]))
    assert {k: two[k] for k in DEMO_KEYS if k not in ("loop", "report")} == \
        {k: v for k, v in DEMO_KEYS.items() if k not in ("loop", "report")}
    assert two["pseudo"] == "4f3c9c2004bd038a" and two["loop"] == "05fb6966c4c57dbc"


def test_unit_keys_and_ssl_fingerprints_are_pinned():
    """A finished arm is found by its unit key and resumed by its fingerprint: moving the
    hashing into one function (pipeline.digest) must not rename either."""
    from pipeline.config import load_config
    from pipeline.stages.keys import ssl_unit_key

    config = load_config(FROZEN_DEMO)
    keys = stage_keys(config)
    assert {a: ssl_unit_key(config, keys, a, 0)
            for a in ("supervised", "baseline", "augmented", "control")} == {
        "supervised": "bdaccf8d53553fa3", "baseline": "6f90adf62a7883c5",
        "augmented": "54ba630fdfe7706b", "control": "fa1041eaeb4685b2"}
    trainer = config.ssl.component(seed=0, device="cpu")
    assert trainer.fingerprint() == "4811c0de7ef96f7f"
    assert trainer.fingerprint(reads_extra_rows=False) == "78c76799331833a0"
