"""The pipeline's stages: one function per stage, ``run_<stage>(run_dir, config) -> record``.

Every stage reads paths and writes paths inside the run directory and ends by writing its
completion record ``stages/<stage>.json`` (atomically, last). A stage whose record exists
with the same key returns it without doing anything: the key hashes the config parts the
stage reads plus its upstream keys (:func:`pipeline.config.stage_key`), never a run id.

Reuse across runs: when another run directory under the same ``runs_dir`` already finished
a stage (or one class's adapter or samples) with the same key, its outputs are hard-linked
into this run instead of recomputed (the bookkeeping is ``pipeline.runs``). So a changed sampling parameter gives a new run
directory but reruns only sampling and what follows it.

Per-class work (tuning, sampling) is split into units, ``run_tune_class`` and
``run_sample_class``, which a task runner may run in parallel; ``run_tune`` and
``run_sample`` run any missing units and then write the stage record.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write
from pipeline.config import STAGE_UPSTREAM, AugmentConfig, _digest, stage_key
from pipeline.runs import (
    ROUND_TWO,
    STAGE_ORDER,
    UNIT_MARKER,
    StageError,
    aggregate_units,
    atomic_write_json,
    finished_record,
    read_json,
    remove_tree,
    run_stage,
    run_unit,
)

# --------------------------------------------------------------------------- shared inputs


def dataset_for(config: AugmentConfig):
    from pipeline.data.datasets import load_dataset_cached

    return load_dataset_cached(config.dataset, config.dataset_root, config.download)


def split_for(run_dir: Path):
    from pipeline.data.splits import load_split

    return load_split(run_dir / "split.parquet")


def base_model_dir(run_dir: Path, config: AugmentConfig) -> Path:
    from pipeline.preflight import resolve_base_model

    if config.pretrains_base:
        base = run_dir / "base"
        if not (base / "training.json").exists():
            raise StageError(f"{base} is not finished; run the pretrain stage first")
        return resolve_base_model(str(base))
    return resolve_base_model(config.base_model)


def load_base(run_dir: Path, config: AugmentConfig, device: str):
    """The frozen base U-Net (fp32 on CPU; the stored dtype is not trusted) and its scheduler."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    from pipeline.preflight import resolve_scheduler_config

    unet_dir = base_model_dir(run_dir, config)
    unet = UNet2DModel.from_pretrained(unet_dir, torch_dtype=torch.float32,
                                       low_cpu_mem_usage=False).to(device).eval()
    sched_cfg = resolve_scheduler_config(unet_dir)
    scheduler = (DDPMScheduler.from_pretrained(sched_cfg.parent) if sched_cfg
                 else DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear"))
    if unet.config.sample_size != config.image_size:
        raise StageError(f"image_size={config.image_size} but the base model works at "
                         f"{unet.config.sample_size}; set image_size={unet.config.sample_size}")
    return unet, scheduler


def stage_keys(config: AugmentConfig, run_dir: Path | None = None) -> dict[str, str | None]:
    """Every stage's key. The tune key includes the base model's content fingerprint."""
    from pipeline.preflight import base_model_fingerprint, resolve_base_model

    base = None if config.pretrains_base else \
        base_model_fingerprint(resolve_base_model(config.base_model))
    extras: dict[str, dict | None] = {
        "tune": {"base": base},
        # Several mask ratios: each draws its own noise (ratio_seed); one keeps its old key.
        "sample": {"ratio_seeds": True} if len(config.sampling.mask_ratios) > 1 else None,
    }
    # config.STAGE_UPSTREAM is the graph; pretrain has a key only when the config pretrains.
    k: dict[str, str | None] = {}
    for stage in STAGE_ORDER[:STAGE_ORDER.index("loop")]:  # loop and report: below
        if stage == "pretrain" and not config.pretrains_base:
            k[stage] = None
            continue
        k[stage] = stage_key(config, stage, {u: k[u] for u in STAGE_UPSTREAM[stage]},
                             extra=extras.get(stage))
    k["loop"] = _round_two_keys(config, k, base) if config.loop.rounds == 2 else None
    k["report"] = stage_key(config, "report", {u: k[u] for u in STAGE_UPSTREAM["report"]})
    return k


def _round_two_keys(config: AugmentConfig, k: dict, base: str | None) -> str:
    """Adds the second round's keys to ``k`` (``pseudo``, ``<stage>-r2``); returns the loop key.

    The pseudo-labels depend on the baseline classifier that made them (its unit key) and on
    K and the threshold; round 2's encode/tune/sample/shards chain from there as round 1's do,
    so a changed K reruns round 2 only, and a changed sampling setting reruns from sample-r2.
    """
    lp = config.loop
    k["pseudo"] = _digest({"stage": "pseudo", "per_class": lp.per_class,
                           "threshold": lp.threshold,
                           "classifier": ssl_unit_key(config, k, "baseline", config.ssl.seeds[0])}
                          )[:16]
    k["encode-r2"] = stage_key(config, "encode", {"split": k["split"], "pseudo": k["pseudo"]})
    k["tune-r2"] = stage_key(config, "tune", {"encode": k["encode-r2"], "pretrain": k["pretrain"],
                                              "warm": k["tune"] if lp.warm_start else None},
                             extra={"base": base})
    k["sample-r2"] = stage_key(config, "sample", {"tune": k["tune-r2"]},
                               extra={"ratio_seeds": True, "conditions": lp.conditions,
                                      "per_condition": lp.per_condition})
    k["shards-r2"] = stage_key(config, "shards", {"sample": k["sample-r2"]})
    return stage_key(config, "loop", {"shards-r2": k["shards-r2"], "pseudo": k["pseudo"],
                                      "ssl": k["ssl"]})


def round_root(run_dir: Path, loop_round: int) -> Path:
    """Where a round's conditions, adapters, samples, shards and stage records live."""
    return Path(run_dir) if loop_round == 1 else Path(run_dir) / ROUND_TWO


def _key(keys: dict, stage: str, loop_round: int) -> str:
    return keys[stage] if loop_round == 1 else keys[f"{stage}-r2"]


def ssl_unit_key(config: AugmentConfig, keys: dict, arm: str, seed: int) -> str:
    """Key of one arm and seed: only what that arm reads.

    Only the augmented and control arms read the shards (control: their per-class counts)
    and the extra-row settings (round 2: augmented-r2 the round-2 shards, selftrain the
    pseudo-labels); the other arms survive a sampling change, a change of the
    extra-row settings and a change of the arm or seed lists.
    """
    from pipeline.ssl.arms import EXTRA_ROW_ARMS
    from pipeline.ssl.config import SYNTHETIC_FIELDS

    up = {"split": keys["split"], "arm": arm, "seed": str(seed)}
    ssl = config.ssl.model_dump(exclude={"arms", "seeds"})
    if arm == "augmented-r2":
        up["shards"] = keys["shards-r2"]
    elif arm == "selftrain":
        up["pseudo"] = keys["pseudo"]
    elif arm in EXTRA_ROW_ARMS:
        up["shards"] = keys["shards"]
    else:
        for k in (*SYNTHETIC_FIELDS, "control_pool"):
            ssl.pop(k)
    if arm == "control":
        up["encode"] = keys["encode"]  # the judge's encoder and labeled tokens
        up["judge"] = {"margin": config.filter.margin, "seed": config.sampling.seed}
    else:
        ssl.pop("control_pool", None)
    return _digest({"stage": "ssl", "ssl": ssl, "upstream": up})[:16]


# --------------------------------------------------------------------------- split


def run_split(run_dir: Path, config: AugmentConfig) -> dict:
    from pipeline.data.splits import make_split, save_split

    def body(device: str) -> tuple[dict, dict]:
        ds = dataset_for(config)
        split = make_split(ds.train_labels, config.labels_per_class, config.split_seed,
                           ds.num_classes, val_per_class=config.validation_per_class)
        save_split(split, Path(run_dir) / "split.parquet")
        return ({"split": "split.parquet"},
                {"labeled": len(split.labeled_idx), "unlabeled": len(split.unlabeled_idx),
                 "validation": len(split.val_idx), "num_classes": ds.num_classes})

    return run_stage(run_dir, config, "split", stage_key(config, "split"), body)


# --------------------------------------------------------------------------- pretrain


def run_pretrain(run_dir: Path, config: AugmentConfig) -> dict | None:
    """Pretrain the base model on the unlabeled pool, when the config asks for it."""
    if not config.pretrains_base:
        return None
    keys = stage_keys(config)

    def body(device: str) -> tuple[dict, dict]:
        from pipeline.generate.pretrain import PretrainConfig, pretrain

        ds, split = dataset_for(config), split_for(Path(run_dir))
        pcfg = PretrainConfig.from_dict({**config.pretrain.model_dump(),
                                         "sample_size": config.image_size, "device": device})
        out = pretrain(ds.train_images[split.unlabeled_idx], Path(run_dir) / "base", pcfg,
                       progress=config.progress)
        info = read_json(out / "training.json") or {}
        return ({"base": "base"},
                {k: info.get(k) for k in ("steps", "steps_per_s", "final_loss", "params")})

    return run_stage(run_dir, config, "pretrain", keys["pretrain"], body)


# --------------------------------------------------------------------------- encode

TOKENS_FILE = "conditions/tokens.safetensors"


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

        ds, split = dataset_for(config), split_for(Path(run_dir))
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

    return run_stage(root, config, "encode", _key(keys, "encode", loop_round), body)


def unlabeled_neighbors(ds, split, encoder, tokens, config: AugmentConfig, device: str):
    """(L, k) training indices of each labeled image's unlabeled neighbours (-1 = none).

    The labels of the chosen neighbours are never used for tuning; their agreement with the
    condition's label is only recorded (``neighbor_purity``) to show how clean they are.
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
    agree = split.labels[index[found].numpy()] == labels[:, None].expand_as(index)[found].numpy()
    return index.contiguous(), {
        "neighbor_pool": len(pool), "neighbors": int(found.sum()),
        "neighbor_purity": round(float(agree.mean()), 4) if agree.size else None,
        "pool_images_per_s": round(len(pool) / max(seconds, 1e-9), 2)}


def load_tokens(run_dir: Path) -> dict:
    """Tokens, labeled indices, labels and encoder metadata written by the encode stage."""
    from safetensors import safe_open

    path = Path(run_dir) / TOKENS_FILE
    if not path.exists():
        raise StageError(f"{path} not found; run the encode stage first")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    return {**data, "encoder_id": meta["encoder_id"], "token_dim": int(meta["token_dim"]),
            "num_tokens": int(meta["num_tokens"])}


# --------------------------------------------------------------------------- tune


def adapter_units(config: AugmentConfig, num_classes: int) -> list[int | None]:
    """Classes to tune: one unit per class, or a single ``None`` unit for a shared adapter."""
    return [None] if config.adapter.scope == "shared" else list(range(num_classes))


def adapter_rel(class_idx: int | None) -> str:
    return "adapters/shared" if class_idx is None else f"adapters/class-{class_idx:02d}"


def class_indices(run_dir: Path, config: AugmentConfig) -> list[int]:
    return list(range(dataset_for(config).num_classes))


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

        from anl_core.inject import save_adapter
        from pipeline.data.images import to_model_space
        from pipeline.generate.neighbors import tuning_pairs

        run = Path(run_dir)
        ds, tok = dataset_for(config), load_tokens(root)
        rows = (torch.arange(len(tok["labels"])) if class_idx is None
                else torch.nonzero(tok["labels"] == class_idx).flatten())
        if len(rows) == 0:
            raise StageError(f"class {class_idx} has no labeled images in {run / TOKENS_FILE}")
        targets, token_rows, weights = tuning_pairs(
            rows, tok.get("neighbors"), tok["index"], config.neighbors.self_share)
        images = to_model_space(ds.train_images[targets], size=config.image_size, device=device)
        unet, scheduler = load_base(run, config, device)
        warm = loop_round == 2 and config.loop.warm_start
        model, result = tune_class_adapter(
            unet, scheduler, images, tok["tokens"][token_rows], config, class_idx,
            tok["encoder_id"], weights=weights, warm_from=run / rel if warm else None,
            progress=config.progress)
        # Write into a temp dir, swap it in: a killed tune leaves no half-saved adapter.
        tmp = unit_dir.with_name(f".{unit_dir.name}.tmp-{os.getpid()}")
        remove_tree(tmp)
        save_adapter(model, tmp)
        info = {"class": class_idx, "images": len(rows),
                "pseudo_labeled": int(tok["pseudo"][rows].sum()) if "pseudo" in tok else 0,
                "warm_start": warm,
                "neighbor_targets": len(targets) - len(rows), "loss_history": result.loss_history,
                "steps": result.steps, "steps_per_s": round(result.steps_per_second, 3),
                "wall_s": round(result.seconds, 3), "param_counts": model.param_counts(),
                "final_loss": float(np.mean(result.loss_history[-50:]))
                if result.loss_history else None}
        atomic_write_json(tmp / "tune.json", info)
        remove_tree(unit_dir)
        os.replace(tmp, unit_dir)
        return {k: v for k, v in info.items() if k != "loss_history"}

    return run_unit(root, rel, _key(keys, "tune", loop_round), config, body)


def unit_seed(seed: int, class_idx: int | None) -> int:
    """Different, reproducible seeds per class: seed + 1000 * (class + 1); shared: seed."""
    return seed if class_idx is None else seed + 1000 * (class_idx + 1)


def tune_class_adapter(unet, scheduler, images, tokens, config: AugmentConfig,
                       class_idx: int | None, encoder_id: str, *, weights=None,
                       steps: int | None = None, warm_from: Path | None = None,
                       progress: bool = False):
    """Tune one adapter on ``images`` with their condition ``tokens``: (model, TuneResult).

    The stage's tuning and the benches' (``bench/faithfulness.py``) are this one function:
    the adapter's initialisation and its tuning draws come from the class's ``unit_seed``.
    ``warm_from``: start from a saved adapter (the second round) instead of a fresh one.
    """
    import torch

    from anl_core.inject import ANLConfig, attach_anl, load_adapter
    from anl_core.tuning import TuneConfig, tune_adapter

    seed = unit_seed(config.tuning.seed, class_idx)
    torch.manual_seed(seed)  # the adapter's initialisation
    if warm_from is not None:
        model = load_adapter(unet, warm_from, encoder_id=encoder_id)
    else:
        model = attach_anl(unet, ANLConfig(
            token_dim=tokens.shape[2], num_tokens=tokens.shape[1], encoder_id=encoder_id,
            **config.adapter.model_dump(exclude={"scope"})))
    tcfg = TuneConfig(**{**config.tuning.model_dump(), "seed": seed,
                         **({"steps": steps} if steps else {})})
    return model, tune_adapter(model, scheduler, images, tokens, tcfg, progress=progress,
                               weights=weights)


def run_tune(run_dir: Path, config: AugmentConfig, loop_round: int = 1) -> dict:
    """Tune every missing adapter unit, then record the stage."""
    keys = stage_keys(config)
    root, key = round_root(run_dir, loop_round), _key(keys, "tune", loop_round)
    rec = finished_record(root, "tune", key)
    if rec is not None:
        return {**rec, "skipped": True}
    units = {adapter_rel(c): run_tune_class(run_dir, config, c, loop_round)
             for c in adapter_units(config, len(class_indices(run_dir, config)))}
    steps_per_s = [u["metrics"].get("steps_per_s", 0.0) for u in units.values()]
    return aggregate_units(root, config, "tune", key, units,
                            {"adapters": list(units)},
                            {"adapters": len(units),
                             "steps_per_s": round(float(np.mean(steps_per_s)), 3)})


# --------------------------------------------------------------------------- sample


def sample_rel(class_idx: int) -> str:
    return f"samples/class-{class_idx:02d}"


def _sample_plan(config: AugmentConfig, n_conditions: int) -> list[tuple[int, int, int, int]]:
    """(mask index, chunk index, first condition, end condition) for each part file."""
    step = config.sampling.chunk_conditions
    return [(mi, ci, s, min(s + step, n_conditions))
            for mi in range(len(config.sampling.mask_ratios))
            for ci, s in enumerate(range(0, n_conditions, step))]


def ratio_seed(seed: int, mask_idx: int) -> int:
    """The sampling seed of the ``mask_idx``-th mask ratio.

    Each ratio gets its own noise and masks: with one shared seed, the images of two ratios
    of one condition started from the same noise and nested masks (the 0.25 mask a subset
    of the 0.5 one), near-duplicate pairs the copy filter does not see. The first ratio
    keeps ``seed`` itself, so one-ratio runs draw what they always drew.
    """
    if mask_idx == 0:
        return seed
    state = np.random.SeedSequence([seed, mask_idx, 0x4D41534B]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def part_name(mask_idx: int, chunk_idx: int) -> str:
    return f"part-{mask_idx:02d}-{chunk_idx:05d}.npz"


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    atomic_write(path, write)


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
    key, k = _key(keys, "sample", loop_round), per_condition(config, loop_round)

    def body(unit_dir: Path, device: str) -> dict:

        from anl_core.inject import load_adapter
        from anl_core.sampling import masked_sample
        from pipeline.data.images import from_model_space

        run = Path(run_dir)
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
            unet, scheduler = load_base(run, config, device)
            model = load_adapter(unet, root / adapter, encoder_id=tok["encoder_id"])
            from tqdm.auto import tqdm

            for mi, ci, a, b in tqdm(todo, desc=f"sample class {class_idx}",
                                     disable=not config.progress, unit="chunk"):
                x = masked_sample(model, scheduler, tok["tokens"][rows[a:b]], k,
                                  mask_ratio=s.mask_ratios[mi], guidance=s.guidance,
                                  num_inference_steps=s.num_inference_steps,
                                  seed=ratio_seed(s.seed, mi),
                                  batch_size=s.batch_size, condition_ids=cond_ids[a:b],
                                  progress=False, eta=s.eta, compile=s.compile)
                images = from_model_space(x, shape=ds.image_shape[:2])
                n = len(images)
                _save_npz(unit_dir / part_name(mi, ci), images=images,
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
    root, key = round_root(run_dir, loop_round), _key(keys, "sample", loop_round)
    rec = finished_record(root, "sample", key)
    if rec is not None:
        return {**rec, "skipped": True}
    units = {sample_rel(c): run_sample_class(run_dir, config, c, loop_round)
             for c in class_indices(run_dir, config)}
    rates = [u["metrics"]["images_per_s"] for u in units.values()
             if u["metrics"].get("images_per_s")]
    return aggregate_units(root, config, "sample", key, units,
                            {"samples": list(units)},
                            {"rows": sum(u["metrics"]["rows"] for u in units.values()),
                             "images_per_s": round(float(np.mean(rates)), 3) if rates else None})


def sample_parts(run_dir: Path, config: AugmentConfig, loop_round: int = 1):
    """Every finished sample chunk in a fixed order: (class, path)."""
    root = round_root(run_dir, loop_round)
    tok = load_tokens(root)
    for c in class_indices(run_dir, config):
        n = len(condition_rows(tok, c, config, loop_round))
        for mi, ci, _, _ in _sample_plan(config, n):
            yield c, root / sample_rel(c) / part_name(mi, ci)


# --------------------------------------------------------------------------- shards


def run_shards(run_dir: Path, config: AugmentConfig, loop_round: int = 1) -> dict:
    """All synthetic chunks into Parquet shards with provenance; the manifest goes last."""
    keys = stage_keys(config)
    root = round_root(run_dir, loop_round)

    def body(device: str) -> tuple[dict, dict]:
        from pipeline.data.shards import ShardWriter, verify_shards

        run = Path(run_dir)
        for c in class_indices(run, config):
            marker = read_json(root / sample_rel(c) / UNIT_MARKER)
            if not marker or marker.get("key") != _key(keys, "sample", loop_round):
                raise StageError(f"samples of class {c} are not finished; run the sample stage")
        ds = dataset_for(config)
        s = config.sampling
        keep, filter_info = synthetic_filter(run, config, device, loop_round)
        per_class: dict[int, int] = {}
        sampled: dict[int, int] = {}
        with ShardWriter(root / "shards", ds.class_names, rows_per_shard=config.shards.rows_per_shard,
                         overwrite=True, image_shape=ds.image_shape) as writer:
            for c, path in sample_parts(run, config, loop_round):
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

    return run_stage(root, config, "shards", _key(keys, "shards", loop_round), body)


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

    return build_filter(config.filter, dataset_for(config), split_for(Path(run_dir)), encoder,
                        tok["tokens"], device, conditions=(tok["index"].numpy(),
                                                           tok["labels"].numpy()))


# --------------------------------------------------------------------------- quality


def run_quality(run_dir: Path, config: AugmentConfig) -> dict:
    keys = stage_keys(config)

    def body(device: str) -> tuple[dict, dict]:
        if not config.quality.enabled:
            return {}, {"enabled": False}
        from pipeline.evaluate.quality import QualityConfig, evaluate_run_quality

        qcfg = QualityConfig(**config.quality.model_dump(exclude={"enabled"}))
        out = evaluate_run_quality(Path(run_dir), dataset_for(config), qcfg,
                                   encoder=config.encoder, device=device,
                                   progress=config.progress)
        summary = read_json(out) or {}
        return {"quality": "quality"}, summary.get("overall", {})

    return run_stage(run_dir, config, "quality", keys["quality"], body)


# --------------------------------------------------------------------------- ssl


def ssl_rel(arm: str, seed: int) -> str:
    return f"ssl/{arm}/seed-{seed}"


def run_ssl_arm(run_dir: Path, config: AugmentConfig, arm: str, seed: int) -> dict:
    """One classifier: ``pipeline.ssl.run_arm`` in ``ssl/<arm>/seed-<s>`` (resumes in place)."""
    keys = stage_keys(config)
    rel = ssl_rel(arm, seed)

    def body(unit_dir: Path, device: str) -> dict:
        from pipeline.ssl import SSLConfig, run_arm

        run = Path(run_dir)
        scfg = SSLConfig.from_dict({**config.ssl.trainer_fields(seed), "device": device})
        shard_dir = {"augmented": run / "shards", "control": run / "shards",
                     "augmented-r2": round_root(run, 2) / "shards"}.get(arm)
        if shard_dir is not None and not (shard_dir / "manifest.json").exists():
            raise StageError(f"{shard_dir} has no manifest; run the shards stage first")
        extra_rows, info = None, {}
        if arm == "control":
            extra_rows, info = control_rows_for(run, config, shard_dir, device)
            shard_dir = None
        if arm == "selftrain":  # the round's pseudo-labeled real images, as extra rows
            chosen = load_pseudo_labels(round_root(run, 2))
            extra_rows = (dataset_for(config).train_images[chosen.train_idx], chosen.labels)
            info = {"selftrain_rows": len(chosen.labels)}
        metrics_path = run_arm(arm, dataset_for(config), split_for(run), unit_dir, scfg,
                               shard_dir=shard_dir, progress=config.progress,
                               synthetic=extra_rows)
        metrics = read_json(metrics_path) or {}
        return {**{k: v for k, v in metrics.items()
                   if isinstance(v, (int, float, str, type(None)))}, **info}

    return run_unit(Path(run_dir), rel, ssl_unit_key(config, keys, arm, seed), config, body)


def control_rows_for(run_dir: Path, config: AugmentConfig, shard_dir: Path, device: str):
    """The control arm's (images, labels) for this run, and what the judge did.

    As many real unlabeled images per class as the shards hold synthetic rows of that class,
    labeled by the filter's prototype judge in the run's encoder (``pipeline.evaluate.control``).
    """
    from anl_core.encoders import load_encoder
    from pipeline.data.shards import read_shards
    from pipeline.evaluate.control import control_rows, judge_pool

    keys = stage_keys(config)
    key = _digest({"shards": keys["shards"], "encode": keys["encode"],
                   "margin": config.filter.margin, "seed": config.sampling.seed,
                   "pool": config.ssl.control_pool})[:16]
    cached = Path(run_dir) / "ssl" / "control" / f"judged-{key}.npz"
    if cached.exists():  # every seed of the control arm reads the same rows: judge once
        with np.load(cached) as z:
            return (z["images"], z["labels"]), json.loads(str(z["info"]))
    tok = load_tokens(run_dir)
    encoder = load_encoder(config.encoder, device=device)
    if encoder.encoder_id != tok["encoder_id"]:
        raise StageError(f"the condition tokens were made by {tok['encoder_id']} but the "
                         f"config names {encoder.encoder_id}; rerun the encode stage")
    ds, split = dataset_for(config), split_for(run_dir)
    synth_labels = read_shards(shard_dir, verify=True).labels
    counts = {int(c): int(n) for c, n in enumerate(np.bincount(synth_labels)) if n}

    def judge(images):
        return judge_pool(encoder, tok["tokens"], split.labeled_labels, images, device)

    rows = control_rows(ds.train_images, ds.train_labels, split.unlabeled_idx, counts, judge,
                        config.ssl.control_pool, config.sampling.seed, config.filter.margin)
    if not len(rows.labels):
        raise StageError(f"the judge kept none of the {config.ssl.control_pool} unlabeled images "
                         "for the control arm; raise ssl.control_pool or lower filter.margin")
    info = {"control_rows": len(rows.labels), "control_precision": round(rows.precision, 4),
            "control_shortfall": int(sum(rows.shortfall.values()))}
    cached.parent.mkdir(parents=True, exist_ok=True)
    _save_npz(cached, images=rows.images, labels=rows.labels, train_idx=rows.train_idx,
              info=np.array(json.dumps(info)))
    return (rows.images, rows.labels), info


def run_ssl(run_dir: Path, config: AugmentConfig) -> dict:
    keys = stage_keys(config)
    rec = finished_record(Path(run_dir), "ssl", keys["ssl"])
    if rec is not None:
        return {**rec, "skipped": True}
    units = {ssl_rel(a, s): run_ssl_arm(run_dir, config, a, s)
             for a in config.ssl.arms for s in config.ssl.seeds}
    return aggregate_units(Path(run_dir), config, "ssl", keys["ssl"], units,
                            {"ssl": list(units)}, {"arms": list(config.ssl.arms),
                                                   "seeds": list(config.ssl.seeds)})


def arms_at_once(run_dir: Path, config: AugmentConfig, units: list[tuple[str, int]]) -> int:
    """How many of ``units`` (arm, seed) to train side by side (``config.arms_at_once``);
    for ``"auto"`` on CUDA, one unit's peak memory is measured first (a few steps)."""
    from pipeline.ssl.capacity import free_bytes_now, measure_arm_peak_bytes, units_at_once

    device = config.resolved_device()
    peak = free = None
    if config.arms_at_once == "auto" and device == "cuda" and len(units) > 1:
        from pipeline.ssl import SSLConfig

        # An arm without extra rows: extra rows add k labeled rows per batch and a few
        # thousand small images to the store, noise against the unlabeled batch's share.
        arm = next((a for a, _ in units if a in ("baseline", "supervised")), "baseline")
        scfg = SSLConfig.from_dict({**config.ssl.trainer_fields(units[0][1]), "device": device})
        peak = measure_arm_peak_bytes(arm, dataset_for(config), split_for(run_dir), scfg)
        free = free_bytes_now()
    n = units_at_once(config.arms_at_once, len(units), device, peak, free)
    if peak is not None:
        print(f"arms side by side: {n} (one unit peaks at {peak / 2**30:.2f} GiB, "
              f"{free / 2**30:.1f} GiB free)")
    return n


# --------------------------------------------------------------------------- loop (round 2)

PSEUDO_FILE = "pseudo.parquet"
ROUND_TWO_ARMS = ("augmented-r2", "selftrain")


def load_pseudo_labels(root: Path):
    """The round's pseudo-labels, as the pseudo stage wrote them."""
    import pandas as pd

    from pipeline.generate.loop import PseudoLabels

    path = Path(root) / PSEUDO_FILE
    if not path.exists():
        raise StageError(f"{path} not found; run the pseudo-labeling step (loop stage) first")
    frame = pd.read_parquet(path)
    return PseudoLabels(frame["train_idx"].to_numpy(np.int64), frame["label"].to_numpy(np.int64),
                        frame["confidence"].to_numpy(np.float64))


def run_pseudo(run_dir: Path, config: AugmentConfig) -> dict:
    """The baseline classifier (first seed) labels the unlabeled pool; keep, per class, its
    ``loop.per_class`` most confident images above ``loop.threshold``.

    Reads the pool's images only. Their true labels are read afterwards, for the precision
    figure in the record, which nothing downstream uses.
    """
    keys = stage_keys(config)
    root, seed, lp = round_root(run_dir, 2), config.ssl.seeds[0], config.loop

    def body(device: str) -> tuple[dict, dict]:
        import pandas as pd

        from pipeline.generate.loop import select_pseudo_labels
        from pipeline.ssl.arms import predict_probs

        run = Path(run_dir)
        arm_dir = run / ssl_rel("baseline", seed)
        marker = read_json(arm_dir / UNIT_MARKER)
        if not marker or marker.get("key") != ssl_unit_key(config, keys, "baseline", seed):
            raise StageError(f"the baseline arm {arm_dir} is not finished for this config; "
                             "run the ssl stage first")
        ds, split = dataset_for(config), split_for(run)
        pool = split.unlabeled_idx
        t0 = time.perf_counter()
        probs = predict_probs(arm_dir, ds, ds.train_images[pool], device)
        seconds = time.perf_counter() - t0
        chosen = select_pseudo_labels(probs, pool, lp.per_class, lp.threshold)
        if not len(chosen.labels):
            raise StageError(f"no unlabeled image reached confidence {lp.threshold} under the "
                             f"baseline classifier (highest: {probs.max():.3f}); lower "
                             "loop.threshold or train the baseline longer (ssl.steps)")
        frame = pd.DataFrame({"train_idx": chosen.train_idx, "label": chosen.labels,
                              "confidence": chosen.confidence})
        atomic_write(root / PSEUDO_FILE, lambda tmp: frame.to_parquet(tmp, index=False))
        # Evaluation only, after the choice: how many of the pseudo-labels are right.
        right = ds.train_labels[chosen.train_idx] == chosen.labels
        per_class = chosen.per_class(ds.num_classes)
        return ({"pseudo": PSEUDO_FILE}, {
            "classifier": ssl_rel("baseline", seed), "pool": len(pool),
            "pseudo_labeled": len(chosen.labels), "per_class": per_class,
            "precision": round(float(right.mean()), 4),
            "precision_per_class": [round(float(right[chosen.labels == c].mean()), 4)
                                    if per_class[c] else None for c in range(ds.num_classes)],
            "pool_images_per_s": round(len(pool) / max(seconds, 1e-9), 1)})

    return run_stage(root, config, "pseudo", keys["pseudo"], body)


def run_loop(run_dir: Path, config: AugmentConfig) -> dict | None:
    """The second round (``loop.rounds: 2``): pseudo-labels, then round 2's encode, tune,
    sample and shards in ``round-2/``, then its two arms for every seed. None when off.

    The flow runs the same steps as tasks (the per-class ones on its task runner); this
    function then only writes the record.
    """
    if config.loop.rounds == 1:
        return None
    keys = stage_keys(config)
    rec = finished_record(Path(run_dir), "loop", keys["loop"])
    if rec is not None:
        return {**rec, "skipped": True}
    pseudo = run_pseudo(run_dir, config)
    run_encode(run_dir, config, loop_round=2)
    run_tune(run_dir, config, loop_round=2)
    run_sample(run_dir, config, loop_round=2)
    shards = run_shards(run_dir, config, loop_round=2)
    units = {ssl_rel(a, s): run_ssl_arm(run_dir, config, a, s)
             for a in ROUND_TWO_ARMS for s in config.ssl.seeds}
    grids = round_two_grids(Path(run_dir), config)
    return aggregate_units(Path(run_dir), config, "loop", keys["loop"], units,
                            {"round": ROUND_TWO, "ssl": list(units), "grids": grids},
                            {"pseudo": pseudo["metrics"], "rows": shards["metrics"]["rows"],
                             "kept_share": shards["metrics"].get("kept_share"),
                             "class_names": list(dataset_for(config).class_names),
                             "arms": list(ROUND_TWO_ARMS), "seeds": list(config.ssl.seeds)})


def round_two_grids(run_dir: Path, config: AugmentConfig, cols: int = 8) -> list[str]:
    """Per class, a PNG of its pseudo-labeled images above its round-2 samples (for the
    report: does the expanded subset look like the class, and do the samples follow it?)."""
    from pipeline.data.shards import read_shards
    from pipeline.evaluate.quality import class_grid_png, grid_picks

    root = round_root(run_dir, 2)
    ds, chosen = dataset_for(config), load_pseudo_labels(root)
    arrays = read_shards(root / "shards")
    ratios = arrays.frame["mask_ratio"].to_numpy(dtype=np.float64)
    out = []
    for c, name in enumerate(ds.class_names):
        rows = np.flatnonzero(arrays.labels == c)
        synth = {float(r): arrays.images[grid_picks(arrays.frame, rows[ratios[rows] == r], cols)]
                 for r in np.unique(ratios[rows])}
        real = ds.train_images[chosen.train_idx[chosen.labels == c][:cols]]
        if not len(real) and not synth:
            continue
        if not len(real):
            real = np.zeros((0, *ds.image_shape), np.uint8)
        rel = f"{ROUND_TWO}/grids/class-{c:02d}.png"
        png = class_grid_png(real, synth, f"round 2, class {c}: {name}", cols,
                             real_label="pseudo-labeled")
        atomic_write(Path(run_dir) / rel, lambda tmp, png=png: Path(tmp).write_bytes(png))
        out.append(rel)
    return out


# --------------------------------------------------------------------------- report


def run_report(run_dir: Path, config: AugmentConfig) -> dict:
    keys = stage_keys(config)

    def body(device: str) -> tuple[dict, dict]:
        from pipeline.report.build import write_report

        paths = write_report(Path(run_dir))
        rels = {Path(p).suffix.lstrip("."): str(Path(p).relative_to(run_dir)) for p in paths}
        return rels, {}

    # The report reads this run's own records (wall times, devices), so it is never adopted.
    return run_stage(run_dir, config, "report", keys["report"], body, adopt=False)


STAGE_FUNCTIONS: dict[str, Callable[[Path, AugmentConfig], dict | None]] = {
    "split": run_split, "pretrain": run_pretrain, "encode": run_encode, "tune": run_tune,
    "sample": run_sample, "shards": run_shards, "quality": run_quality, "ssl": run_ssl,
    "loop": run_loop, "report": run_report,
}
assert tuple(STAGE_FUNCTIONS) == STAGE_ORDER


def run_all(run_dir: Path, config: AugmentConfig, until: str | None = None) -> dict[str, dict]:
    """Every stage in order in this process (no Prefect): the reference the flow must match."""
    records = {}
    for name, fn in STAGE_FUNCTIONS.items():
        rec = fn(Path(run_dir), config)
        if rec is not None:
            records[name] = rec
        if name == until:
            break
    return records
