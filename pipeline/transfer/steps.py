"""The transfer run's steps, declared as the augmentation run declares its stages
(``pipeline.stage_graph.Stage``): the config fields each reads, the steps before it, what it
writes. Their keys come from the same ``stage_key_of``, and the same run store
(``pipeline.runs.run_stage``) records, skips and reuses them.
"""

from __future__ import annotations

from typing import Any

from pipeline.stage_graph import Stage, stage_key_of
from pipeline.transfer.config import TransferConfig

# Each step reads the outputs of the one before it, so each follows every earlier step.
TRANSFER_STEPS: tuple[Stage, ...] = (
    Stage("target", ("target", "target_class", "target_root", "shots", "max_held_out", "seed"),
          (), {"target": "target/target.npz"},
          doc="the shots and the held-out images (uint8 NHWC)"),
    Stage("tune", ("mode", "base_model", "steps", "batch_size", "lr", "hflip", "seed"),
          ("target",), {"model": "model/"},
          doc="the adapter (anl) or the whole U-Net (full, scratch), and tune.json"),
    Stage("sample", ("samples", "num_inference_steps", "seed"), ("target", "tune"),
          {"shards": "shards/"}, doc="the samples as Parquet shards"),
    Stage("evaluate", ("encoder", "kid_subsets", "kid_subset_size", "seed"),
          ("target", "tune", "sample"), {"metrics": "eval/metrics.json"},
          doc="KID, diversity, near-copy share, cost"),
    Stage("report", (), ("target", "tune", "sample", "evaluate"),
          {"html": "report.html", "md": "report.md", "grid": "grid.png"},
          doc="the self-contained report and the grid"),
)
STEPS: tuple[str, ...] = tuple(s.name for s in TRANSFER_STEPS)
assert all(STEPS.index(u) < STEPS.index(s.name) for s in TRANSFER_STEPS for u in s.upstream)

# The anl mode reads more: the encoder and the adapter's shape when tuning, the guidance when
# sampling (the mask ratio is added from the shots, see step_parts).
ANL_PARTS = {"tune": ("encoder", "context_dim", "head_dim", "cond_dropout", "train_mask_ratio"),
             "sample": ("guidance",)}


def step_parts(config: TransferConfig) -> dict[str, dict[str, Any]]:
    """The config parts each step reads: a change reruns that step and the ones after it."""
    from pipeline.models import base_model_fingerprint
    from pipeline.transfer.model import base_dir, sample_mask_ratio

    fields = config.model_dump(mode="json")
    anl = config.mode == "anl"
    parts = {s.name: {n: fields[n] for n in s.parts + (ANL_PARTS.get(s.name, ()) if anl else ())}
             for s in TRANSFER_STEPS}
    # The base's content, not its path, decides the result: a retrained base reruns tuning.
    parts["tune"]["base_sha256"] = base_model_fingerprint(base_dir(config))
    if anl:
        parts["sample"]["mask_ratio"] = sample_mask_ratio(config)
    return parts


def step_keys(config: TransferConfig) -> dict[str, str]:
    parts, keys = step_parts(config), {}
    for s in TRANSFER_STEPS:
        keys[s.name] = stage_key_of(s.name, parts[s.name], {u: keys[u] for u in s.upstream})
    return keys
