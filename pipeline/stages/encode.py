"""The encode stage: condition tokens of the labeled images (and, round 2, of the
pseudo-labeled ones), and each labeled image's unlabeled neighbours.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write
from pipeline.config import AugmentConfig
from pipeline.data.pool_labels import agreement
from pipeline.runs import (
    run_stage,
)
from pipeline.stages.inputs import TOKENS_FILE, dataset_for, round_root, split_for
from pipeline.stages.keys import round_key, stage_keys
from pipeline.stages.pseudo import load_pseudo_labels


def run_encode(run_dir: Path, config: AugmentConfig, loop_round: int = 1) -> dict:
    """Condition tokens of every labeled image, in split order (one row per labeled index).

    Round 2: the labeled images, then the round's pseudo-labeled ones (``pseudo`` = 1 marks
    them), with the classifier's labels; the unlabeled neighbours are round 1's alone.
    """
    keys = stage_keys(config)
    root = round_root(run_dir, loop_round)

    def body(device: str) -> tuple[dict, dict]:
        import torch
        from safetensors.torch import save_file

        from anl_core.encoders import load_encoder
        from pipeline.data.images import to_model_space

        ds, split = dataset_for(config), split_for(run_dir)
        encoder = load_encoder(config.encoder, device=device)
        index, labels = split.labeled_idx, split.labeled_labels
        pseudo = np.zeros(len(index), np.int64)
        if loop_round == 2:
            chosen = load_pseudo_labels(root)
            index = np.concatenate([index, chosen.train_idx])
            labels = np.concatenate([labels, chosen.labels])
            pseudo = np.concatenate([pseudo, np.ones(len(chosen.labels), np.int64)])
        images = to_model_space(ds.train_images[index], device=device)
        t0 = time.perf_counter()
        tokens = encoder.encode(images, progress=config.progress and loop_round == 2).cpu().contiguous()
        seconds = time.perf_counter() - t0
        tensors = {"tokens": tokens, "index": torch.as_tensor(index, dtype=torch.int64),
                   "labels": torch.as_tensor(labels, dtype=torch.int64)}
        if loop_round == 2:
            tensors["pseudo"] = torch.as_tensor(pseudo)
        metrics = {"images": len(tokens), "pseudo_labeled": int(pseudo.sum()),
                   "images_per_s": round(len(tokens) / max(seconds, 1e-9), 2),
                   "encoder_id": encoder.encoder_id, "num_tokens": encoder.num_tokens,
                   "token_dim": encoder.token_dim}
        if config.neighbors.per_image and loop_round == 1:
            tensors["neighbors"], nb_metrics = unlabeled_neighbors(
                ds, split, encoder, tokens, config, device)
            metrics.update(nb_metrics)
        out = root / TOKENS_FILE
        atomic_write(out, lambda tmp: save_file(
            tensors, tmp, metadata={"encoder_id": encoder.encoder_id,
                                    "token_dim": str(encoder.token_dim),
                                    "num_tokens": str(encoder.num_tokens)}))
        return ({"tokens": TOKENS_FILE}, metrics)

    return run_stage(root, config, "encode", round_key(keys, "encode", loop_round), body)


def unlabeled_neighbors(ds, split, encoder, tokens, config: AugmentConfig, device: str):
    """(L, k) training indices of each labeled image's unlabeled neighbours (-1 = none).

    The labels of the chosen neighbours are never used for tuning; their agreement with the
    condition's label is only recorded (``neighbor_purity``) to show how clean they are, over
    the neighbours whose label is known (``pipeline.data.pool_labels``).
    """
    import torch

    from pipeline.data.images import to_model_space
    from pipeline.generate.neighbors import find_neighbors, neighbor_pool, pooled_features

    nb = config.neighbors
    pool = neighbor_pool(split.unlabeled_idx, nb.pool, nb.seed)
    t0 = time.perf_counter()
    pool_tokens = encoder.encode(to_model_space(ds.train_images[pool], device=device),
                                 progress=config.progress).cpu()
    seconds = time.perf_counter() - t0
    labels = torch.as_tensor(split.labeled_labels, dtype=torch.int64)
    pos = find_neighbors(pooled_features(tokens), labels, pooled_features(pool_tokens),
                         nb.per_image)
    found = pos >= 0
    index = torch.where(found, torch.as_tensor(pool)[pos.clamp(min=0)], pos)
    purity = agreement(labels[:, None].expand_as(index)[found].numpy(),
                       split.labels[index[found].numpy()])
    return index.contiguous(), {
        "neighbor_pool": len(pool), "neighbors": int(found.sum()),
        **purity.record("neighbor_purity"),
        "pool_images_per_s": round(len(pool) / max(seconds, 1e-9), 2)}
