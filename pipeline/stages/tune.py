"""The tune stage: one ANL adapter per class (or one shared), each a unit a task runner may
run in parallel; the tuning itself is ``pipeline.generate.tune.tune_class_adapter``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write_json
from pipeline.config import AugmentConfig
from pipeline.generate.tune import tune_class_adapter
from pipeline.runs import (
    StageError,
    remove_tree,
    run_mapped_stage,
    run_unit,
)
from pipeline.stages.inputs import (
    TOKENS_FILE,
    adapter_rel,
    class_indices,
    dataset_for,
    load_run_base,
    load_tokens,
    round_root,
)
from pipeline.stages.keys import round_key, stage_keys


def adapter_units(config: AugmentConfig, num_classes: int) -> list[int | None]:
    """Classes to tune: one unit per class, or a single ``None`` unit for a shared adapter."""
    return [None] if config.adapter.scope == "shared" else list(range(num_classes))


def run_tune_class(run_dir: Path, config: AugmentConfig, class_idx: int | None,
                   loop_round: int = 1) -> dict:
    """Tune one ANL adapter on one class's labeled images (or all of them, when shared).

    Round 2: on its labeled and pseudo-labeled images, from its round-1 weights when
    ``loop.warm_start`` (else from a fresh initialisation, as round 1).
    """
    keys = stage_keys(config)
    rel = adapter_rel(class_idx)
    root = round_root(run_dir, loop_round)

    def body(unit_dir: Path, device: str) -> dict:
        import torch

        from anl_core.inject import WEIGHTS_NAME, AdapterWeightsError, check_adapter_weights
        from pipeline.data.images import to_model_space
        from pipeline.generate.neighbors import tuning_pairs

        ds, tok = dataset_for(config), load_tokens(root)
        rows = (torch.arange(len(tok["labels"])) if class_idx is None
                else torch.nonzero(tok["labels"] == class_idx).flatten())
        if len(rows) == 0:
            raise StageError(f"class {class_idx} has no labeled images in {run_dir / TOKENS_FILE}")
        targets, token_rows, weights = tuning_pairs(
            rows, tok.get("neighbors"), tok["index"], config.neighbors.self_share)
        images = to_model_space(ds.train_images[targets], size=config.image_size, device=device)
        unet, scheduler = load_run_base(run_dir, config, device)
        warm = loop_round == 2 and config.loop.warm_start
        model, result = tune_class_adapter(
            unet, scheduler, images, tok["tokens"][token_rows], config.adapter.component(), config.tuning,
            class_idx,
            tok["encoder_id"], weights=weights, warm_from=run_dir / rel if warm else None,
            progress=config.progress)
        # Write into a temp dir, swap it in: a killed tune leaves no half-saved adapter.
        tmp = unit_dir.with_name(f".{unit_dir.name}.tmp-{os.getpid()}")
        remove_tree(tmp)
        info = {"class": class_idx, "images": len(rows),
                "pseudo_labeled": int(tok["pseudo"][rows].sum()) if "pseudo" in tok else 0,
                "warm_start": warm,
                "neighbor_targets": len(targets) - len(rows), "loss_history": result.loss_history,
                "steps": result.steps, "steps_per_s": round(result.steps_per_second, 3),
                "wall_s": round(result.seconds, 3), "param_counts": model.param_counts(),
                "final_loss": float(np.mean(result.loss_history[-50:]))
                if result.loss_history else None}
        try:
            model.save_pretrained(tmp)
            # A diverged tune saves NaN weights, which sample all-black images: stop here.
            check_adapter_weights(tmp / WEIGHTS_NAME)
            atomic_write_json(tmp / "tune.json", info)
        except AdapterWeightsError as e:
            remove_tree(tmp)
            raise StageError(f"tuning class {class_idx} diverged: {e}; lower tuning.lr or "
                             "raise tuning.warmup_steps") from None
        except BaseException:
            remove_tree(tmp)  # a failed save (a full disk) leaves no half folder behind
            raise
        remove_tree(unit_dir)
        os.replace(tmp, unit_dir)
        return {k: v for k, v in info.items() if k != "loss_history"}

    return run_unit(root, rel, round_key(keys, "tune", loop_round), config, body)


def run_tune(run_dir: Path, config: AugmentConfig, loop_round: int = 1) -> dict:
    """Tune every missing adapter unit, then record the stage."""
    keys = stage_keys(config)
    root, key = round_root(run_dir, loop_round), round_key(keys, "tune", loop_round)

    def units() -> dict[str, dict]:
        return {adapter_rel(c): run_tune_class(run_dir, config, c, loop_round)
                for c in adapter_units(config, len(class_indices(run_dir, config)))}

    def summary(done: dict[str, dict]) -> tuple[dict, dict]:
        steps_per_s = [u["metrics"].get("steps_per_s", 0.0) for u in done.values()]
        return {"adapters": list(done)}, {"adapters": len(done),
                                          "steps_per_s": round(float(np.mean(steps_per_s)), 3)}

    return run_mapped_stage(root, config, "tune", key, units, summary)
