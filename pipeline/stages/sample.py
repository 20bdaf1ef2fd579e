"""The sample stage: masked sampling per class, in chunks written atomically, so a killed run
resumes without missing or duplicate rows.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write_json, save_npz
from pipeline.config import AugmentConfig
from pipeline.generate.sample import part_name, ratio_seed, sample_images
from pipeline.runs import (
    UNIT_MARKER,
    StageError,
    read_json,
    remove_tree,
    run_mapped_stage,
    run_unit,
)
from pipeline.stages.inputs import (
    adapter_rel,
    class_indices,
    dataset_for,
    load_run_base,
    load_tokens,
    round_root,
    sample_rel,
)
from pipeline.stages.keys import round_key, stage_keys


def _sample_plan(config: AugmentConfig, n_conditions: int) -> list[tuple[int, int, int, int]]:
    """(mask index, chunk index, first condition, end condition) for each part file."""
    step = config.sampling.chunk_conditions
    return [(mi, ci, s, min(s + step, n_conditions))
            for mi in range(len(config.sampling.mask_ratios))
            for ci, s in enumerate(range(0, n_conditions, step))]


def condition_rows(tok: dict, class_idx: int, config: AugmentConfig, loop_round: int = 1):
    """Token rows a class's samples are conditioned on (round 2 with ``loop.conditions:
    labeled``: its labeled images only, though its adapter was tuned on the pseudo ones too)."""
    import torch

    take = tok["labels"] == class_idx
    if loop_round == 2 and config.loop.conditions == "labeled":
        take &= tok["pseudo"] == 0
    return torch.nonzero(take).flatten()


def per_condition(config: AugmentConfig, loop_round: int = 1) -> int:
    lp = config.loop.per_condition
    return lp if loop_round == 2 and lp is not None else config.sampling.per_condition


def run_sample_class(run_dir: Path, config: AugmentConfig, class_idx: int,
                     loop_round: int = 1) -> dict:
    """Masked sampling for one class, in chunk files; a rerun resumes at the first missing one.

    Each chunk's images depend only on (seed, condition id, image index), so a resumed run
    writes exactly what an uninterrupted one would, with no missing or duplicated rows.
    """
    keys = stage_keys(config)
    rel = sample_rel(class_idx)
    adapter = adapter_rel(None if config.adapter.scope == "shared" else class_idx)
    root = round_root(run_dir, loop_round)
    key, k = round_key(keys, "sample", loop_round), per_condition(config, loop_round)

    def body(unit_dir: Path, device: str) -> dict:

        from anl_core.inject import ANLUNet

        plan_file = read_json(unit_dir / "plan.json")
        if plan_file and plan_file.get("key") != key:
            remove_tree(unit_dir)  # parts of another configuration: never mix them
        unit_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(unit_dir / "plan.json", {"key": key, "class": class_idx})
        tok = load_tokens(root)
        rows = condition_rows(tok, class_idx, config, loop_round)
        cond_ids = tok["index"][rows].numpy()
        ds = dataset_for(config)
        plan = _sample_plan(config, len(rows))
        todo = [p for p in plan if not (unit_dir / part_name(p[0], p[1])).exists()]
        s = config.sampling
        t0, made = time.perf_counter(), 0
        if todo:
            if not (root / adapter / UNIT_MARKER).exists():
                raise StageError(f"adapter {root / adapter} is not finished; run the tune stage")
            unet, scheduler = load_run_base(run_dir, config, device)
            model = ANLUNet.from_pretrained(unet, root / adapter, encoder_id=tok["encoder_id"])
            from anl_core.progress import progress_bar

            for mi, ci, a, b in progress_bar(todo, desc=f"sample class {class_idx}",
                                             enabled=config.progress, unit="chunk",
                                             logger=__name__):
                images = sample_images(model, scheduler, tok["tokens"][rows[a:b]], cond_ids[a:b],
                                       k, s, mask_ratio=s.mask_ratios[mi],
                                       seed=ratio_seed(s.seed, mi), image_shape=ds.image_shape[:2])
                n = len(images)
                save_npz(unit_dir / part_name(mi, ci), images=images,
                          labels=np.full(n, class_idx, np.int64),
                          condition_id=np.repeat(cond_ids[a:b], k).astype(np.int64),
                          mask_ratio=np.full(n, s.mask_ratios[mi], np.float64),
                          seed=np.full(n, ratio_seed(s.seed, mi), np.int64))
                made += n
        seconds = time.perf_counter() - t0
        total = sum(len(np.load(unit_dir / part_name(mi, ci))["labels"]) for mi, ci, _, _ in plan)
        return {"class": class_idx, "rows": total, "parts": len(plan), "rows_made": made,
                "images_per_s": round(made / seconds, 3) if made and seconds else None}

    return run_unit(root, rel, key, config, body)


def run_sample(run_dir: Path, config: AugmentConfig, loop_round: int = 1) -> dict:
    keys = stage_keys(config)
    root, key = round_root(run_dir, loop_round), round_key(keys, "sample", loop_round)

    def units() -> dict[str, dict]:
        return {sample_rel(c): run_sample_class(run_dir, config, c, loop_round)
                for c in class_indices(run_dir, config)}

    def summary(done: dict[str, dict]) -> tuple[dict, dict]:
        rates = [u["metrics"]["images_per_s"] for u in done.values()
                 if u["metrics"].get("images_per_s")]
        return {"samples": list(done)}, {
            "rows": sum(u["metrics"]["rows"] for u in done.values()),
            "images_per_s": round(float(np.mean(rates)), 3) if rates else None}

    return run_mapped_stage(root, config, "sample", key, units, summary)


def sample_parts(run_dir: Path, config: AugmentConfig, loop_round: int = 1):
    """Every finished sample chunk in a fixed order: (class, path)."""
    root = round_root(run_dir, loop_round)
    tok = load_tokens(root)
    for c in class_indices(run_dir, config):
        n = len(condition_rows(tok, c, config, loop_round))
        for mi, ci, _, _ in _sample_plan(config, n):
            yield c, root / sample_rel(c) / part_name(mi, ci)
