"""Stage keys: every stage's key from the config and ``pipeline.stage_graph`` (round 2's too),
and one classifier unit's key, which hashes only what that arm reads.
"""

from __future__ import annotations

from pipeline.config import AugmentConfig, stage_key
from pipeline.digest import digest
from pipeline.stage_graph import STAGE_ORDER, STAGE_UPSTREAM


def stage_keys(config: AugmentConfig) -> dict[str, str | None]:
    """Every stage's key. The tune key includes the base model's content fingerprint."""
    from pipeline.models import base_model_fingerprint, resolve_base_model

    base = None if config.pretrains_base else \
        base_model_fingerprint(resolve_base_model(config.base_model))
    extras: dict[str, dict | None] = {
        "tune": {"base": base},
        "fit": {"base": base},
        # Several mask ratios: each draws its own noise (ratio_seed); one keeps its old key.
        "sample": {"ratio_seeds": True} if len(config.sampling.mask_ratios) > 1 else None,
        # bf16 pretraining (CUDA, CPUs with native bf16) computes another model than fp32.
        "pretrain": {"precision": "bf16"} if config.pretrains_base and _pretrains_bf16(config)
        else None,
    }
    # pipeline.stage_graph is the graph; pretrain has a key only when the config pretrains.
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


def _pretrains_bf16(config: AugmentConfig) -> bool:
    from anl_core.precision import uses_bf16

    return uses_bf16(config.resolved_device(), True, cpu=True)


def _round_two_keys(config: AugmentConfig, k: dict, base: str | None) -> str:
    """Adds the second round's keys to ``k`` (``pseudo``, ``<stage>-r2``); returns the loop key.

    The pseudo-labels depend on the baseline classifier that made them (its unit key) and on
    K and the threshold; round 2's encode/tune/sample/shards chain from there as round 1's do,
    so a changed K reruns round 2 only, and a changed sampling setting reruns from sample-r2.
    """
    lp = config.loop
    k["pseudo"] = digest({"stage": "pseudo", "per_class": lp.per_class,
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


def round_key(keys: dict, stage: str, loop_round: int) -> str:
    return keys[stage] if loop_round == 1 else keys[f"{stage}-r2"]


def ssl_unit_key(config: AugmentConfig, keys: dict, arm: str, seed: int) -> str:
    """Key of one arm and seed: only what that arm reads.

    Only the augmented and control arms read the shards (control: their per-class counts;
    replay reads the extra-row settings but draws its rows from the split; a "-2x" arm is
    keyed as the arm it doubles, under its own name)
    and the extra-row settings (round 2: augmented-r2 the round-2 shards, selftrain the
    pseudo-labels); the other arms survive a sampling change, a change of the
    extra-row settings and a change of the arm or seed lists.
    """
    from pipeline.ssl.arm_names import EXTRA_ROW_ARMS, base_arm
    from pipeline.ssl.config import SYNTHETIC_FIELDS

    up = {"split": keys["split"], "arm": arm, "seed": str(seed)}  # "-2x": twice the steps
    ssl = config.ssl.model_dump(exclude={"arms", "seeds"})
    if ssl["unlabeled_pool"] is None:
        ssl.pop("unlabeled_pool")  # uncapped: keys from before the cap stay
    arm = base_arm(arm)
    if arm == "augmented-r2":
        up["shards"] = keys["shards-r2"]
    elif arm == "selftrain":
        up["pseudo"] = keys["pseudo"]
    elif arm == "replay":  # its extra rows are the split's labeled images
        pass
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
    return digest({"stage": "ssl", "ssl": ssl, "upstream": up})[:16]
