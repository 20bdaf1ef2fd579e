"""Calibrates the fit stage (issue 31): the shipped bases against pools of their own domain and
of others (sklearn digits upscaled to 28x28; Fashion-MNIST inverted), at two DDIM step counts
and two k. Prints KID x 100, the pool-vs-pool floor and the coverage (share of base samples
inside the pool's k-NN manifold) beside the pool's own coverage, and the seconds per base.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/domain_fit.py [ENCODER]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

from anl_core.encoders import load_encoder
from pipeline.data.datasets import load_dataset
from pipeline.evaluate.domain_fit import domain_fit
from pipeline.evaluate.quality import encoder_features
from pipeline.models import load_base_unet, resolve_base_model, sample_base

BASES = ("data/models/fashion-mnist-ddpm-32", "data/models/fashion-mnist-ddpm-32-disjoint")


def pools(n: int = 256) -> dict[str, np.ndarray]:
    fm = load_dataset("fashion-mnist")
    fashion = fm.train_images[np.random.default_rng(0).choice(len(fm.train_images), n,
                                                              replace=False)]
    digits = [Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BICUBIC)
              for im in load_digits().images[:n]]
    return {"fashion": fashion, "digits": np.stack([np.asarray(d) for d in digits])[..., None],
            "fashion-inverted": 255 - fashion}


def main(encoder: str = "efficientnet-lite0") -> None:
    torch.set_num_threads(1)
    features = encoder_features(load_encoder(encoder, device="cpu"))
    pool_features = {name: features(images) for name, images in pools().items()}
    for base in BASES:
        unet, scheduler = load_base_unet(resolve_base_model(base), "cpu")
        for steps in (10, 20):
            t = time.perf_counter()
            samples = features(sample_base(unet, scheduler, 64, steps, 0, shape=(28, 28),
                                           progress=False))
            seconds = time.perf_counter() - t
            for name, pool in pool_features.items():
                for k in (3, 5):
                    r = domain_fit(samples, pool, k=k)
                    print(f"{base.rsplit('/', 1)[-1]:32s} steps {steps:2d} {name:17s} k {k} "
                          f"KIDx100 {100 * r.kid_base_pool:6.2f} floor "
                          f"{100 * r.kid_pool_pool:5.2f}+-{100 * r.kid_pool_pool_std:4.2f} "
                          f"coverage {r.coverage:.2f} pool's own {r.pool_coverage:.2f} "
                          f"relative {r.relative_coverage:.2f}", flush=True)
            print(f"  64 samples + features: {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
