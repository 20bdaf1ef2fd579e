"""Parquet shards: round trips, Hugging Face compatibility, manifest checks, shuffled reading."""

import io
import json
import os
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.shard_dataset import ShardDataset
from pipeline.data.shard_format import (
    LEGACY_MANIFEST,
    MANIFEST,
    ShardError,
    decode_pngs,
    encode_pngs,
    manifest_path,
)
from pipeline.data.shards import ShardWriter, read_shards, verify_shards


@pytest.fixture(scope="module")
def fmnist(data_fashion_mnist):
    """1000 real Fashion-MNIST training images (all ten classes) and their labels."""
    return data_fashion_mnist.train_images[:1000], data_fashion_mnist.train_labels[:1000], \
        data_fashion_mnist.class_names


@pytest.fixture
def shard_dir(tmp_path, fmnist):
    x, y, names = fmnist
    out = tmp_path / "shards"
    with ShardWriter(out, names, rows_per_shard=300, row_group_rows=128) as w:
        w.write(x, y, source="real")
    return out


def _digests(images):
    return [img.tobytes() for img in images]


# --------------------------------------------------------------------------- PNG codec


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_images_round_trip_and_any_writers_png_decodes(channels, data_foolbox_cifar10):
    rgb = data_foolbox_cifar10[0]
    x = {1: rgb[..., :1], 3: rgb, 4: np.concatenate([rgb, rgb[..., :1]], axis=-1)}[channels]
    x = np.ascontiguousarray(x)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    ours = encode_pngs(x)
    for blob, img in zip(ours, x, strict=True):  # standard PNGs of the right colour type
        with Image.open(io.BytesIO(blob)) as im:
            assert im.format == "PNG" and im.mode == mode
            np.testing.assert_array_equal(np.asarray(im).reshape(img.shape), img)
    np.testing.assert_array_equal(decode_pngs(ours, x.shape[1:]), x)
    # Files from another writer (another compression level and filter choice) decode too.
    theirs = []
    for img in x:
        buf = io.BytesIO()
        Image.fromarray(img.squeeze(-1) if channels == 1 else img).save(buf, "PNG",
                                                                          compress_level=9)
        theirs.append(buf.getvalue())
    np.testing.assert_array_equal(decode_pngs(theirs, x.shape[1:]), x)
    with pytest.raises(ValueError, match="expected"):  # a PNG of another size is refused
        decode_pngs(ours[:1], (16, 16, channels))


# --------------------------------------------------------------------------- write / read


def test_round_trip_pixels_labels_and_manifest(shard_dir, fmnist):
    x, y, names = fmnist
    manifest = verify_shards(shard_dir)
    assert manifest["num_rows"] == 1000 and manifest["image_shape"] == [28, 28, 1]
    assert manifest["class_names"] == list(names)
    assert manifest["class_histogram"] == np.bincount(y, minlength=10).tolist()
    assert [s["rows"] for s in manifest["shards"]] == [300, 300, 300, 100]
    assert manifest["shards"][0]["row_groups"] == [128, 128, 44]
    for s in manifest["shards"]:
        assert pq.ParquetFile(shard_dir / s["file"]).metadata.num_row_groups == len(s["row_groups"])
    assert sorted(p.name for p in shard_dir.iterdir()) == [
        MANIFEST, "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet",
        "shard-00003.parquet"]  # no temp files left behind
    data = read_shards(shard_dir)
    np.testing.assert_array_equal(data.images, x)  # order kept, pixels exact
    np.testing.assert_array_equal(data.labels, y)
    assert data.labels.dtype == np.int64 and len(data) == 1000
    assert data.frame["label_name"].tolist() == [names[v] for v in y]
    assert (data.frame["source"] == "real").all()
    assert data.frame["condition_id"].isna().all() and data.frame["mask_ratio"].isna().all()


def test_provenance_columns_scalar_per_row_and_null(tmp_path, data_foolbox_cifar10):
    x, y = data_foolbox_cifar10
    names = [f"c{i}" for i in range(10)]
    with ShardWriter(tmp_path, names) as w:
        w.write(x[:5], y[:5], source="real")
        w.write(x[5:], y[5:], condition_id=np.arange(100, 115), adapter_id="class-3",
                seed=[7] * 14 + [None], mask_ratio=0.25, guidance=np.float32(3.0), steps=50)
    data = read_shards(tmp_path)
    np.testing.assert_array_equal(data.images, x)
    f = data.frame
    assert f["source"].tolist() == ["real"] * 5 + ["synthetic"] * 15
    assert f["condition_id"][:5].isna().all()
    assert f["condition_id"][5:].tolist() == list(range(100, 115))
    assert f["seed"].isna().tolist() == [True] * 5 + [False] * 14 + [True]
    assert f["mask_ratio"][5:].tolist() == [0.25] * 15 and f["steps"][5:].eq(50).all()
    assert f["adapter_id"][5:].eq("class-3").all() and f["guidance"][5:].eq(3.0).all()
    assert w.manifest["sources"] == {"real": 5, "synthetic": 15}


def test_shards_respect_the_byte_bound(tmp_path, fmnist):
    x, y, names = fmnist
    with ShardWriter(tmp_path, names, rows_per_shard=10_000, max_shard_bytes=60_000) as w:
        w.write(x, y)
    sizes = [s["bytes"] for s in w.manifest["shards"]]
    assert len(sizes) > 5  # ~540 kB of PNGs split by the byte bound, not by rows
    assert max(sizes) < 60_000 + 8_000  # the bound plus Parquet's footer and metadata
    np.testing.assert_array_equal(read_shards(tmp_path).images, x)


def test_hugging_face_datasets_reads_an_image_feature(shard_dir, fmnist):
    import datasets

    x, y, names = fmnist
    files = sorted(str(p) for p in shard_dir.glob("shard-*.parquet"))
    ds = datasets.Dataset.from_parquet(files, cache_dir=str(shard_dir.parent / "hf-cache"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["label"].names == list(names)
    assert len(ds) == 1000
    for i in (0, 299, 300, 999):
        row = ds[i]
        np.testing.assert_array_equal(np.asarray(row["image"]), x[i, ..., 0])
        assert row["label"] == y[i] and row["source"] == "real" and row["seed"] is None


def test_pandas_reads_the_shards(shard_dir, fmnist):
    x, y, _ = fmnist
    frame = pd.read_parquet(shard_dir / "shard-00001.parquet")
    assert frame["label"].tolist() == y[300:600].tolist()
    with Image.open(io.BytesIO(frame["image"][0]["bytes"])) as im:
        np.testing.assert_array_equal(np.asarray(im), x[300, ..., 0])


def test_duckdb_queries_the_shards(shard_dir, fmnist):
    import duckdb

    x, y, _ = fmnist
    glob = str(shard_dir / "shard-*.parquet")
    counts = duckdb.sql(f"SELECT label, count(*) AS n FROM read_parquet('{glob}') "
                        "GROUP BY label ORDER BY label").fetchall()
    assert counts == [(int(c), int((y == c).sum())) for c in np.unique(y)]
    ((blob,),) = duckdb.sql(f"SELECT image.bytes FROM read_parquet('{glob}') "
                            "WHERE source = 'real' LIMIT 1").fetchall()
    with Image.open(io.BytesIO(blob)) as im:
        assert np.asarray(im).shape == x.shape[1:3]


# --------------------------------------------------------------------------- refusals


def test_tampered_shard_is_refused(shard_dir):
    path = shard_dir / "shard-00001.parquet"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size, one byte altered
    path.write_bytes(bytes(blob))
    with pytest.raises(ShardError, match=r"shard-00001.parquet was altered.*rerun"):
        verify_shards(shard_dir)
    with pytest.raises(ShardError, match="altered"):
        read_shards(shard_dir)
    with pytest.raises(ShardError, match="altered"):
        ShardDataset(shard_dir)


def test_truncated_and_missing_shards_are_refused(shard_dir):
    path = shard_dir / "shard-00002.parquet"
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(ShardError, match=r"shard-00002.parquet is truncated"):
        read_shards(shard_dir)
    with pytest.raises(ShardError, match="truncated"):  # caught without reading a checksum
        verify_shards(shard_dir, checksum=False)
    path.unlink()
    with pytest.raises(ShardError, match=r"shard-00002.parquet .* is missing"):
        verify_shards(shard_dir)


def test_the_folder_reads_whole_with_pandas_duckdb_and_datasets(shard_dir, fmnist, tmp_path):
    """Folder readers skip the manifest (its name starts with a dot) and get every row."""
    _, y, _ = fmnist
    want = sorted(y.tolist())
    assert sorted(pd.read_parquet(shard_dir)["label"].tolist()) == want
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.connect().execute(
        f"SELECT label FROM read_parquet('{shard_dir}/*.parquet')").fetchall()
    assert sorted(r[0] for r in rows) == want
    datasets = pytest.importorskip("datasets")
    for args, kwargs in [(("parquet",), {"data_dir": str(shard_dir)}), ((str(shard_dir),), {})]:
        train = datasets.load_dataset(*args, **kwargs, cache_dir=str(tmp_path / "hf"))["train"]
        assert sorted(train["label"]) == want


def test_an_old_set_with_manifest_json_still_verifies_reads_and_reports(shard_dir, fmnist):
    from pipeline.report.data import load_run

    x, y, names = fmnist
    (shard_dir / MANIFEST).rename(shard_dir / LEGACY_MANIFEST)
    assert manifest_path(shard_dir) == shard_dir / LEGACY_MANIFEST  # what the stages check
    assert verify_shards(shard_dir)["num_rows"] == 1000
    np.testing.assert_array_equal(read_shards(shard_dir).images, x)
    assert len(ShardDataset(shard_dir, shuffle=False)) == 1000
    assert load_run(shard_dir.parent).manifest["num_rows"] == 1000
    with pytest.raises(ShardError, match=r"manifest\.json\); pass overwrite=True"):
        ShardWriter(shard_dir, names)
    with ShardWriter(shard_dir, names, overwrite=True) as w:  # rewritten in the new layout
        w.write(x[:10], y[:10])
    assert sorted(p.name for p in shard_dir.iterdir()) == [MANIFEST, "shard-00000.parquet"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_get_the_mode_open_would_give(tmp_path, fmnist, umask, mode):
    x, y, names = fmnist
    old = os.umask(umask)
    try:
        with ShardWriter(tmp_path, names, rows_per_shard=50) as w:
            w.write(x[:100], y[:100])
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys([MANIFEST, "shard-00000.parquet", "shard-00001.parquet"], mode)


def test_unfinished_set_without_manifest_is_refused(shard_dir):
    verify_shards(shard_dir)
    (shard_dir / MANIFEST).unlink()
    with pytest.raises(ShardError, match="never finished"):
        read_shards(shard_dir)
    with pytest.raises(ShardError, match="never finished"):
        verify_shards(shard_dir, checksum=False)


def test_failed_write_leaves_nothing(tmp_path, fmnist):
    x, y, names = fmnist
    with (pytest.raises(RuntimeError, match="sampler crashed"),
          ShardWriter(tmp_path, names, rows_per_shard=200, row_group_rows=100) as w):
        w.write(x[:500], y[:500])  # two shards finished and one in flight
        raise RuntimeError("sampler crashed")
    assert list(tmp_path.iterdir()) == []


def test_existing_set_needs_overwrite(shard_dir, fmnist):
    x, y, names = fmnist
    with pytest.raises(ShardError, match="overwrite=True"):
        ShardWriter(shard_dir, names)
    with ShardWriter(shard_dir, names, overwrite=True) as w:
        w.write(x[:10], y[:10])
    assert sorted(p.name for p in shard_dir.iterdir()) == [MANIFEST, "shard-00000.parquet"]
    np.testing.assert_array_equal(read_shards(shard_dir).images, x[:10])


def test_bad_input_is_refused_before_writing(tmp_path, fmnist):
    x, y, names = fmnist
    with ShardWriter(tmp_path, names) as w:
        with pytest.raises(ValueError, match="uint8"):
            w.write(x.astype(np.float32), y)
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
            w.write(x[:2], [0, 10])
        with pytest.raises(ValueError, match="2 images but 3 labels"):
            w.write(x[:2], [0, 1, 2])
        with pytest.raises(ValueError, match="seed has 3 values for 2 images"):
            w.write(x[:2], y[:2], seed=[1, 2, 3])
        with pytest.raises(ValueError, match="source must be one of"):
            w.write(x[:2], y[:2], source="fake")
        with pytest.raises(ValueError, match="condition_id must be int64"):
            w.write(x[:2], y[:2], condition_id="seven")
        w.write(x[:2], y[:2])
        with pytest.raises(ValueError, match=r"\(32, 32, 3\) but this shard set holds"):
            w.write(np.zeros((1, 32, 32, 3), np.uint8), [0])
    assert read_shards(tmp_path).labels.tolist() == y[:2].tolist()  # only the good write


# --------------------------------------------------------------------------- torch dataset


def test_shard_dataset_shuffles_and_yields_every_row_once(shard_dir, fmnist):
    x, y, _ = fmnist
    ds = ShardDataset(shard_dir, shuffle=True, seed=0)
    assert len(ds) == 1000
    items = list(ds)
    img, label = items[0]
    assert img.shape == (28, 28, 1) and str(img.dtype) == "torch.uint8" and isinstance(label, int)
    got = Counter((im.numpy().tobytes(), lab) for im, lab in items)
    assert got == Counter(zip(_digests(x), y.tolist()))
    order = [im.numpy().tobytes() for im, _ in items]
    assert order != _digests(x)  # shuffled
    assert order == [im.numpy().tobytes() for im, _ in ShardDataset(shard_dir, seed=0)]
    ds.set_epoch(1)
    assert [im.numpy().tobytes() for im, _ in ds] != order  # a fresh order each epoch
    # Rows of different shards end up near each other, not shard by shard.
    first = {s for s, d in enumerate(_digests(x)) if d in set(order[:100])}
    assert len({i // 300 for i in first}) >= 2
    plain = [im.numpy().tobytes() for im, _ in ShardDataset(shard_dir, shuffle=False)]
    assert plain == _digests(x)


def test_shard_dataset_splits_rows_across_loader_workers(shard_dir, fmnist):
    import torch

    _, y, _ = fmnist
    loader = torch.utils.data.DataLoader(ShardDataset(shard_dir, seed=1), batch_size=100,
                                         num_workers=2)
    labels = torch.cat([lab for _, lab in loader]).tolist()
    assert sorted(labels) == sorted(y.tolist())  # each row once, across both workers
    # The manifest as written is plain JSON a person can read.
    assert json.loads((shard_dir / MANIFEST).read_text())["num_rows"] == 1000
