"""The shards stage: the synthetic filter, then Parquet shards with their manifest last.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import AugmentConfig
from pipeline.runs import (
    UNIT_MARKER,
    StageError,
    read_json,
    run_stage,
)
from pipeline.stages.inputs import (
    adapter_rel,
    class_indices,
    dataset_for,
    load_tokens,
    round_root,
    sample_rel,
    split_for,
)
from pipeline.stages.keys import round_key, stage_keys
from pipeline.stages.sample import sample_parts


def run_shards(run_dir: Path, config: AugmentConfig, loop_round: int = 1) -> dict:
    """All synthetic chunks into Parquet shards with provenance; the manifest goes last."""
    keys = stage_keys(config)
    root = round_root(run_dir, loop_round)

    def body(device: str) -> tuple[dict, dict]:
        from pipeline.data.shards import ShardWriter, verify_shards

        for c in class_indices(run_dir, config):
            marker = read_json(root / sample_rel(c) / UNIT_MARKER)
            if not marker or marker.get("key") != round_key(keys, "sample", loop_round):
                raise StageError(f"samples of class {c} are not finished; run the sample stage")
        ds = dataset_for(config)
        s = config.sampling
        keep, filter_info = synthetic_filter(run_dir, config, device, loop_round)
        per_class: dict[int, int] = {}
        sampled: dict[int, int] = {}
        with ShardWriter(root / "shards", ds.class_names, rows_per_shard=config.shards.rows_per_shard,
                         overwrite=True, image_shape=ds.image_shape) as writer:
            for c, path in sample_parts(run_dir, config, loop_round):
                with np.load(path) as npz:
                    part = {k: npz[k] for k in npz.files}
                sampled[c] = sampled.get(c, 0) + len(part["labels"])
                kept = keep(part["images"], part["labels"])
                part = {k: v[kept] for k, v in part.items()}
                adapter = adapter_rel(None if config.adapter.scope == "shared" else c)
                writer.write(part["images"], part["labels"], source="synthetic",
                             condition_id=part["condition_id"],
                             adapter_id=adapter.split("/", 1)[1],
                             seed=part.get("seed", s.seed),  # parts before ratio seeds: s.seed
                             mask_ratio=part["mask_ratio"], guidance=s.guidance,
                             steps=s.num_inference_steps)
                per_class[c] = per_class.get(c, 0) + len(part["labels"])
        if not sum(per_class.values()):
            raise StageError(f"the filter dropped all {sum(sampled.values())} samples; lower "
                             "filter.margin or filter.copy_quantile, or turn it off "
                             "(filter.method=none, filter.copy_quantile=0)")
        manifest = verify_shards(root / "shards")
        metrics = {"rows": int(manifest.get("rows", sum(per_class.values()))),
                   "rows_per_class": {str(k): v for k, v in per_class.items()},
                   "shard_files": len(manifest["shards"])}
        if config.filter.enabled:
            metrics.update(**filter_info, rows_sampled=sum(sampled.values()),
                           kept_share=round(sum(per_class.values()) / sum(sampled.values()), 4),
                           kept_per_class={str(k): round(per_class.get(k, 0) / n, 4)
                                           for k, n in sampled.items()})
        return ({"shards": "shards"}, metrics)

    return run_stage(root, config, "shards", round_key(keys, "shards", loop_round), body)


def synthetic_filter(run_dir: Path, config: AugmentConfig, device: str, loop_round: int = 1):
    """(``keep(images, labels) -> bool mask``, what it tests) for the shards stage.

    The judge and the near-copy test compare samples with the round's condition images
    (round 2: labeled and pseudo-labeled, under their pseudo-labels).
    """
    tok = load_tokens(round_root(run_dir, loop_round))
    encoder = None
    if config.filter.method == "prototype":
        from anl_core.encoders import load_encoder

        encoder = load_encoder(config.encoder, device=device)
        if encoder.encoder_id != tok["encoder_id"]:
            raise StageError(f"the condition tokens were made by {tok['encoder_id']} but the "
                             f"config names {encoder.encoder_id}; rerun the encode stage")
    from pipeline.generate.synthetic_filter import build_filter

    return build_filter(config.filter, dataset_for(config), split_for(run_dir), encoder,
                        tok["tokens"], device, conditions=(tok["index"].numpy(),
                                                           tok["labels"].numpy()))
