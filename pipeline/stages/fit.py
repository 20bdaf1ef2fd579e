"""The fit stage: does the base model know the task's images? Seconds, before any tuning.

A base from another domain runs to the end today and its synthetic rows can raise the error;
this stage measures it first (``pipeline.evaluate.domain_fit``), warns with the fix
(``pretrain:`` on the pool), and leaves the figures and a strip of the base's samples beside
pool images for the report.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write_bytes
from pipeline.config import AugmentConfig
from pipeline.evaluate.domain_fit import misfit_message
from pipeline.runs import run_stage
from pipeline.stages.inputs import dataset_for, load_run_base, split_for
from pipeline.stages.keys import stage_keys

log = logging.getLogger(__name__)

STRIP = "fit/samples.png"


def run_fit(run_dir: Path, config: AugmentConfig) -> dict:
    keys = stage_keys(config)

    def body(device: str) -> tuple[dict, dict]:
        fc = config.fit
        if not fc.enabled:
            return {}, {"enabled": False}
        from anl_core.encoders import load_encoder
        from pipeline.data.grids import strips_png
        from pipeline.evaluate.domain_fit import domain_fit
        from pipeline.evaluate.quality import encoder_features
        from pipeline.models import sample_base

        ds, split = dataset_for(config), split_for(run_dir)
        # The pool the classifier would read; a split without one (every image labeled)
        # compares against the labeled images.
        pool = split.unlabeled_idx if len(split.unlabeled_idx) >= 16 else split.train_idx
        if len(pool) < 2 * (fc.k + 2):  # two halves, each larger than k
            return {}, {"not_computed": f"{len(pool)} images are too few to measure the fit "
                                        f"(at least {2 * (fc.k + 2)} with fit.k={fc.k})"}
        rng = np.random.default_rng(fc.seed)
        pool = np.sort(rng.choice(pool, min(fc.pool, len(pool)), replace=False))
        unet, scheduler = load_run_base(run_dir, config, device)
        samples = sample_base(unet, scheduler, fc.samples, fc.steps, fc.seed,
                              shape=ds.image_shape[:2], progress=config.progress)
        if samples.shape[-1] != ds.image_shape[-1]:
            from pipeline.runs import StageError

            raise StageError(f"the base makes {samples.shape[-1]}-channel images but the data "
                             f"has {ds.image_shape[-1]}; pre-flight should have refused this")
        features = encoder_features(load_encoder(config.encoder, device=device))
        result = domain_fit(features(samples), features(ds.train_images[pool]), fc.k, fc.seed)
        metrics = result.as_record(fc.min_relative_coverage)
        png = strips_png([("base", samples[:16]), ("pool", ds.train_images[pool[:16]])],
                         "base model samples (top) and the task's pool (bottom)")
        atomic_write_bytes(run_dir / STRIP, png)
        if metrics["fits"]:
            log.info("domain fit: %.0f%% of the base's samples lie among the pool's images "
                     "(pool's own: %.0f%%)", 100 * result.coverage, 100 * result.pool_coverage)
        else:
            log.warning(misfit_message(metrics))
        return {"fit": "fit/"}, metrics

    return run_stage(run_dir, config, "fit", keys["fit"], body)
