"""The second round's pseudo-labels (``loop.rounds: 2``): the baseline's confident picks per
class, and the round's class grids for the report.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write
from pipeline.config import AugmentConfig
from pipeline.data.pool_labels import NOT_COMPUTED, agreement
from pipeline.runs import (
    ROUND_TWO,
    UNIT_MARKER,
    StageError,
    read_json,
    run_stage,
)
from pipeline.stages.inputs import dataset_for, round_root, split_for, ssl_rel
from pipeline.stages.keys import ssl_unit_key, stage_keys

PSEUDO_FILE = "pseudo.parquet"


ROUND_TWO_ARMS = ("augmented-r2", "selftrain")


def load_pseudo_labels(root: Path):
    """The round's pseudo-labels, as the pseudo stage wrote them."""
    import pandas as pd

    from pipeline.generate.pseudo_labels import PseudoLabels

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

        from pipeline.generate.pseudo_labels import select_pseudo_labels
        from pipeline.ssl.arms import predict_probs

        arm_dir = run_dir / ssl_rel("baseline", seed)
        marker = read_json(arm_dir / UNIT_MARKER)
        if not marker or marker.get("key") != ssl_unit_key(config, keys, "baseline", seed):
            raise StageError(f"the baseline arm {arm_dir} is not finished for this config; "
                             "run the ssl stage first")
        from pipeline.data.splits import capped_pool

        ds, split = dataset_for(config), split_for(run_dir)
        pool = capped_pool(split, config.ssl.unlabeled_pool)  # the pool the baseline saw
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
        # Evaluation only, after the choice: how many of the pseudo-labels are right, over
        # the chosen images whose true label is known (none, in a pool without labels).
        true = ds.train_labels[chosen.train_idx]
        per_class = chosen.per_class(ds.num_classes)
        by_class = [agreement(chosen.labels[chosen.labels == c], true[chosen.labels == c])
                    for c in range(ds.num_classes)]
        return ({"pseudo": PSEUDO_FILE}, {
            "classifier": ssl_rel("baseline", seed), "pool": len(pool),
            "pseudo_labeled": len(chosen.labels), "per_class": per_class,
            **agreement(chosen.labels, true).record("precision"),
            "precision_per_class": [None if s.value is None else round(s.value, 4)
                                    for s in by_class],
            **({"precision_per_class" + NOT_COMPUTED: [s.reason for s in by_class]}
               if any(s.reason for s in by_class) else {}),
            "pool_images_per_s": round(len(pool) / max(seconds, 1e-9), 1)})

    return run_stage(root, config, "pseudo", keys["pseudo"], body)


def round_two_grids(run_dir: Path, config: AugmentConfig, cols: int = 8) -> list[str]:
    """Per class, a PNG of its pseudo-labeled images above its round-2 samples (for the
    report: does the expanded subset look like the class, and do the samples follow it?)."""
    from pipeline.data.grids import class_grid_png, grid_picks
    from pipeline.data.shards import read_shards

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
        atomic_write(run_dir / rel, lambda tmp, png=png: Path(tmp).write_bytes(png))
        out.append(rel)
    return out
