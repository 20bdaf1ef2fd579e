"""Benchmark: Parquet shard write/read rows/s against plain np.save/np.load of the same array.

    .venv/bin/python bench/shards.py --n 20000 --n-rgb 20000

Images: real Fashion-MNIST (28x28x1) and the 20 real CIFAR-10 images from foolbox tiled with
random flips and shifts (32x32x3; each PNG is still compressed on its own, so sizes are
realistic). Also times Pillow per-image PNG encode/decode alone, the codec the shards use.
Every ratio printed comes from this one run on this machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.datasets import load_dataset
from pipeline.data.shard_dataset import ShardDataset
from pipeline.data.shards import ShardWriter, read_shards


def timed(fn, repeat: int) -> tuple[float, object]:
    """Best wall time of ``repeat`` runs (the least disturbed by the shared machine)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def fashion_images(n: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    ds = load_dataset("fashion-mnist")
    if n > len(ds.train_labels):
        raise SystemExit(f"--n {n} exceeds the {len(ds.train_labels)} Fashion-MNIST images")
    return ds.train_images[:n], ds.train_labels[:n], ds.class_names


def cifar_like_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        raise SystemExit("the 32x32x3 case needs the foolbox package: pip install -e .[dev]")
    files = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("cifar10_*.png"))
    base = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    labels = np.array([int(p.stem.split("_")[2]) for p in files], dtype=np.int64)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(base), n)
    x = base[pick]
    flip = rng.random(n) < 0.5
    x[flip] = x[flip, :, ::-1]
    for s in range(-3, 4):  # small shifts so that tiles are not byte-identical
        sel = pick % 7 == s + 3
        x[sel] = np.roll(x[sel], s, axis=2)
    return np.ascontiguousarray(x), labels[pick]


def pil_codec(images: np.ndarray) -> tuple[float, float]:
    squeeze = images.shape[-1] == 1
    t = time.perf_counter()
    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if squeeze else img).save(buf, "PNG", compress_level=1)
        blobs.append(buf.getvalue())
    enc = time.perf_counter() - t
    t = time.perf_counter()
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as im:
            np.asarray(im)
    return enc, time.perf_counter() - t


def bench_case(name: str, x: np.ndarray, y: np.ndarray, names, work: Path, args) -> None:
    n = len(x)
    npy = work / f"{name}.npy"
    shard_dir = work / f"{name}-shards"

    def write_shards():
        with ShardWriter(shard_dir, names, rows_per_shard=args.rows_per_shard,
                         row_group_rows=args.row_group_rows, overwrite=True) as w:
            for i in range(0, n, args.write_batch):  # as a sampler would hand them over
                w.write(x[i:i + args.write_batch], y[i:i + args.write_batch])

    t_save, _ = timed(lambda: np.save(npy, x), args.repeat)
    t_load, loaded = timed(lambda: np.load(npy), args.repeat)
    t_write, _ = timed(write_shards, args.repeat)
    t_read, data = timed(lambda: read_shards(shard_dir, verify=True), args.repeat)
    t_read_nv, _ = timed(lambda: read_shards(shard_dir, verify=False), args.repeat)
    t_iter, count = timed(lambda: sum(1 for _ in ShardDataset(shard_dir, verify=False)), 1)
    assert np.array_equal(data.images, x) and np.array_equal(loaded, x) and count == n
    t_pil_enc, t_pil_dec = pil_codec(x[:min(n, 5000)])
    pil_n = min(n, 5000)
    shard_bytes = sum(p.stat().st_size for p in shard_dir.glob("*.parquet"))

    def row(label, seconds, rows=n, ref=None):
        rate = rows / seconds
        ratio = f"{rate / ref:8.3f}x np" if ref else ""
        print(f"  {label:<38} {rate:>12,.0f} rows/s {ratio}")
        return rate

    print(f"\n{name}: {n} images {x.shape[1:]}, {x.nbytes / 2**20:.1f} MiB raw, "
          f"shards {shard_bytes / 2**20:.1f} MiB ({shard_bytes / x.nbytes:.2f} of raw)")
    save = row("np.save", t_save)
    load = row("np.load", t_load)
    row("ShardWriter write + close (PNG)", t_write, ref=save)
    row("read_shards, sha256 verified", t_read, ref=load)
    row("read_shards, verify=False", t_read_nv, ref=load)
    row("ShardDataset iteration (shuffled)", t_iter, ref=load)
    pil_enc = row("Pillow PNG encode, per image", t_pil_enc, rows=pil_n)
    pil_dec = row("Pillow PNG decode, per image", t_pil_dec, rows=pil_n)
    print(f"  shard write is {n / t_write / pil_enc:.2f}x Pillow's encode alone; "
          f"shard read is {n / t_read_nv / pil_dec:.2f}x Pillow's decode alone")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000, help="Fashion-MNIST images (0 to skip)")
    p.add_argument("--n-rgb", type=int, default=20000, help="32x32x3 images (0 to skip)")
    p.add_argument("--rows-per-shard", type=int, default=4096)
    p.add_argument("--row-group-rows", type=int, default=1024)
    p.add_argument("--write-batch", type=int, default=1000, help="images per write() call")
    p.add_argument("--repeat", type=int, default=2, help="runs per measurement (best kept)")
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-shards-", dir=args.dir))
    try:
        if args.n:
            x, y, names = fashion_images(args.n)
            bench_case("fashion-mnist", x, y, names, work, args)
        if args.n_rgb:
            x, y = cifar_like_images(args.n_rgb)
            bench_case("cifar-like", x, y, [f"class{i}" for i in range(10)], work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
