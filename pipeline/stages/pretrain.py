"""The pretrain stage: an unconditional base U-Net, when the config asks for one."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import AugmentConfig
from pipeline.runs import read_json, run_stage
from pipeline.stages.inputs import dataset_for, split_for
from pipeline.stages.keys import stage_keys


def run_pretrain(run_dir: Path, config: AugmentConfig) -> dict | None:
    """Pretrain the base model, when the config asks for it: on the unlabeled pool, or with
    ``task_images: task-half`` on the base half (never a task image)."""
    if not config.pretrains_base:
        return None
    keys = stage_keys(config)

    def body(device: str) -> tuple[dict, dict]:
        from pipeline.generate.pretrain import pretrain

        ds, split = dataset_for(config), split_for(run_dir)
        pcfg = config.pretrain.component(sample_size=config.image_size, device=device)
        disjoint = config.task_images == "task-half"
        seen = split.base_idx if disjoint else split.unlabeled_idx
        source = {"dataset": config.dataset, "root": config.dataset_root,
                  **({"half": "base", "half_seed": config.half_seed} if disjoint else
                     {"labels_per_class": config.labels_per_class,
                      "split_seed": config.split_seed})}
        out = pretrain(ds.train_images[seen], run_dir / "base", pcfg,
                       progress=config.progress, source=source)
        info = read_json(out / "training.json") or {}
        return ({"base": "base"},
                {k: info.get(k) for k in ("steps", "steps_per_s", "final_loss", "params")})

    return run_stage(run_dir, config, "pretrain", keys["pretrain"], body)
