"""A torch ``IterableDataset`` over a shard set, for training on the shards in your own loop.

The pipeline's own classifier reads whole shard sets into memory (:func:`pipeline.data.shards.
read_shards`); a user with more rows than memory, or with their own trainer, streams them::

    from torch.utils.data import DataLoader
    from pipeline.data.shard_dataset import ShardDataset

    loader = DataLoader(ShardDataset("runs/<run>/shards", seed=0), batch_size=256, num_workers=4)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data.shard_format import decode_image_column, load_manifest
from pipeline.data.shards import verify_shards


class ShardDataset(IterableDataset):
    """A shuffled stream of ``(image uint8 tensor (H, W, C), label int)`` from a shard set.

    Shuffling is two-level, as for any sharded format: the row groups of all shards are
    visited in a seeded random order, and the rows of ``mix_row_groups`` groups at a time
    are shuffled together. DataLoader workers each take a disjoint slice of the row groups.
    Call :meth:`set_epoch` each epoch for a fresh order (like DistributedSampler).
    """

    def __init__(self, shard_dir: str | Path, shuffle: bool = True, seed: int = 0, *,
                 verify: bool = True, mix_row_groups: int = 4) -> None:
        self.shard_dir = Path(shard_dir)
        self.manifest = verify_shards(self.shard_dir) if verify else load_manifest(self.shard_dir)
        self.shape = self.manifest["image_shape"]
        self.shuffle, self.seed, self.epoch = shuffle, int(seed), 0
        self.mix_row_groups = max(1, int(mix_row_groups))
        self.units = [(s["file"], g, rows) for s in self.manifest["shards"]
                      for g, rows in enumerate(s["row_groups"])]

    def __len__(self) -> int:
        return int(self.manifest["num_rows"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _my_units(self, rng: np.random.Generator) -> list[tuple[str, int, int]]:
        order = rng.permutation(len(self.units)) if self.shuffle else np.arange(len(self.units))
        info = get_worker_info()
        if info is not None:
            order = order[info.id::info.num_workers]
        return [self.units[i] for i in order]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        # Every worker draws the same group order from (seed, epoch), then takes its slice.
        rng = np.random.default_rng([self.seed, self.epoch])
        units = self._my_units(rng)
        files: dict[str, pq.ParquetFile] = {}
        for start in range(0, len(units), self.mix_row_groups):
            images, labels = [], []
            for file, group, _ in units[start:start + self.mix_row_groups]:
                if file not in files:
                    files[file] = pq.ParquetFile(self.shard_dir / file)
                table = files[file].read_row_group(group, columns=["image", "label"])
                images.append(decode_image_column(table, self.shape, self.shard_dir / file))
                labels.append(table.column("label").to_numpy())
            x, y = np.concatenate(images), np.concatenate(labels)
            order = rng.permutation(len(y)) if self.shuffle else np.arange(len(y))
            for i in order:
                yield torch.from_numpy(x[i]), int(y[i])
