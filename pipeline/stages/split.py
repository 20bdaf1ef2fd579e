"""The split stage: labeled, unlabeled and validation indices, stratified and seeded
(with ``task_images: task-half``, drawn from the task half only)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import AugmentConfig, stage_key
from pipeline.runs import run_stage
from pipeline.stages.inputs import dataset_for


def run_split(run_dir: Path, config: AugmentConfig) -> dict:
    from pipeline.data.splits import make_split, save_split

    def body(device: str) -> tuple[dict, dict]:
        ds = dataset_for(config)
        split = make_split(ds.train_labels, config.labels_per_class, config.split_seed,
                           ds.num_classes, val_per_class=config.validation_per_class,
                           half_seed=config.half_seed if config.task_images == "task-half"
                           else None)
        save_split(split, run_dir / "split.parquet")
        return ({"split": "split.parquet"},
                {"labeled": len(split.labeled_idx), "unlabeled": len(split.unlabeled_idx),
                 "validation": len(split.val_idx), "base_half": len(split.base_idx),
                 "num_classes": ds.num_classes})

    return run_stage(run_dir, config, "split", stage_key(config, "split"), body)
