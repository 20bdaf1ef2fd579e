"""Generative transfer check (the paper's first experiment, small): does tuning ANL adapters on a
few images of a new domain move the frozen base model's samples to that domain?

Base model: the shipped Fashion-MNIST DDPM (data/models/fashion-mnist-ddpm-32). Target: the 20
real MNIST digits that ship inside the PyPI package foolbox (28x28, the real MNIST grid), or,
with ``--target sklearn-digits``, scikit-learn's 8x8 digits upscaled to 28x28. One shared
adapter is tuned on all target images, each conditioned on its own encoder tokens; then

* before: N unconditional samples of the base model (what a zero-initialised adapter gives);
* after:  N masked, guided samples of the tuned model, ``--per-condition`` per target image;

and both are measured against the target images in the encoder's feature space (KID, and the
mean cosine distance from each sample to its nearest target), with the pixel distance to the
nearest target as a memorisation check, and the noise-prediction loss on the targets of the
base and the tuned model. Prints a table and the after/before ratios; writes JSON and a grid.

    python -m bench.transfer                       # ~5 min on one CPU thread
    python -m bench.transfer --tune-steps 1000 --per-condition 10   # on a GPU

The target set is tiny (20 images): KID compares subsets of 20 samples with it and is noisy;
the nearest-target distance is steadier. Both are measured against the very images the adapter
was tuned on, as in the few-shot setting, so read them with the memorisation (pixel) column.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import image_grid_png
from pipeline.atomic import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASE = REPO / "data" / "models" / "fashion-mnist-ddpm-32"


def foolbox_mnist() -> np.ndarray:
    """The 20 real MNIST digits in foolbox/data/mnist_{index}_{label}.png: uint8 (20, 28, 28, 1)."""
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("foolbox is not installed (pip install foolbox), or use "
                         "--target sklearn-digits")
    files = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("mnist_*.png"))
    if not files:
        raise SystemExit("no foolbox/data/mnist_*.png found; use --target sklearn-digits")
    return np.stack([np.asarray(Image.open(p).convert("L")) for p in files])[..., None]


def sklearn_digits(n: int, seed: int) -> np.ndarray:
    """``n`` of scikit-learn's 8x8 digits (values 0..16), upscaled to 28x28 uint8 like MNIST."""
    from sklearn.datasets import load_digits

    data = load_digits().images
    pick = np.random.default_rng(seed).choice(len(data), n, replace=False)
    x = torch.as_tensor(data[pick], dtype=torch.float32)[:, None] / 16.0
    # MNIST digits fill a 20x20 box centred in 28x28: upscale to 20, pad 4 on each side.
    x = torch.nn.functional.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    x = torch.nn.functional.pad(x, (4, 4, 4, 4))
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def nearest_cosine(queries: np.ndarray, targets: np.ndarray) -> float:
    """Mean over queries of the cosine distance to the nearest target feature."""
    def unit(f):
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return float((1.0 - (unit(queries) @ unit(targets).T).max(axis=1)).mean())


def measure(name: str, images: np.ndarray, target: np.ndarray, features, target_feats,
            seed: int) -> dict:
    from pipeline.quality import kid, nearest_rmse

    feats = features(images)
    # Subsets of the samples as large as the target set (the whole target set each time).
    k, _ = kid(feats, target_feats, n_subsets=20, subset_size=len(target_feats), seed=seed)
    return {"set": name, "n": len(images), "kid": k,
            "nearest_target_cosine": nearest_cosine(feats, target_feats),
            "nearest_target_rmse": float(nearest_rmse(images, target).mean())}


def main(argv: list[str] | None = None) -> dict:
    from anl_core.encoders import load_encoder
    from anl_core.inject import ANLConfig, attach_anl
    from anl_core.sampling import masked_sample
    from anl_core.tuning import TuneConfig, denoising_loss, tune_adapter
    from pipeline.images import from_model_space, to_model_space
    from pipeline.model_card import load_base, sample_base
    from pipeline.pretrain import resolve_device
    from pipeline.quality import encoder_features

    p = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(DEFAULT_BASE), help="diffusers DDPM pipeline directory")
    p.add_argument("--target", choices=["foolbox-mnist", "sklearn-digits"],
                   default="foolbox-mnist")
    p.add_argument("--num-target", type=int, default=20, help="sklearn-digits only")
    p.add_argument("--encoder", default="efficientnet-lite0@128")
    p.add_argument("--context-dim", type=int, default=128)
    p.add_argument("--tune-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--per-condition", type=int, default=5)
    p.add_argument("--mask-ratio", type=float, default=0.3)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=str(REPO / "runs" / "bench" / "transfer"),
                   help="directory for transfer.json and transfer.png")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    progress = not a.no_progress
    times: dict[str, float] = {}

    target = foolbox_mnist() if a.target == "foolbox-mnist" else \
        sklearn_digits(a.num_target, a.seed)
    unet, scheduler = load_base(a.base, device)
    size = unet.config.sample_size
    encoder = load_encoder(a.encoder, device=device)
    features = encoder_features(encoder)
    x_target = to_model_space(target, size=size, device=device)
    tokens = encoder.encode(x_target)
    target_feats = tokens.mean(dim=1).float().cpu().numpy()
    n = len(target) * a.per_condition

    t0 = time.perf_counter()
    before = sample_base(unet, scheduler, n, a.sample_steps, a.seed, batch_size=n,
                         shape=target.shape[1:3], progress=progress)
    times["sample_before_s"] = time.perf_counter() - t0

    torch.manual_seed(a.seed)  # adapter initialisation
    model = attach_anl(unet, ANLConfig.for_encoder(encoder, context_dim=a.context_dim))
    tune = TuneConfig(steps=a.tune_steps, batch_size=a.batch_size, lr=a.lr,
                      warmup_steps=min(50, a.tune_steps // 10), seed=a.seed,
                      train_mask_ratio=a.mask_ratio)
    loss_base = denoising_loss(model, scheduler, x_target, tokens, seed=a.seed, adapter=False)
    result = tune_adapter(model, scheduler, x_target, tokens, tune, progress=progress)
    times["tune_s"] = result.seconds
    loss_tuned = denoising_loss(model, scheduler, x_target, tokens, seed=a.seed)

    t0 = time.perf_counter()
    after = from_model_space(
        masked_sample(model, scheduler, tokens, a.per_condition, a.mask_ratio, a.guidance,
                      a.sample_steps, a.seed, batch_size=n, progress=progress),
        shape=target.shape[1:3])
    times["sample_after_s"] = time.perf_counter() - t0

    rows = [measure("before tuning (base, unconditional)", before, target, features,
                    target_feats, a.seed),
            measure("after tuning (ANL, masked + guided)", after, target, features,
                    target_feats, a.seed)]
    # Scale: what the base model's own domain looks like from the target, at the same N.
    from pipeline.datasets import load_dataset

    fm = load_dataset("fashion-mnist").test_images
    fm = fm[np.random.default_rng(a.seed).choice(len(fm), n, replace=False)]
    rows.append(measure("real Fashion-MNIST test images", fm, target, features, target_feats,
                        a.seed))
    record = {
        "base": str(a.base), "target": a.target, "num_target": len(target),
        "encoder": encoder.encoder_id, "args": vars(a), "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "adapter_params": model.param_counts(), "tune_steps_per_s": result.steps_per_second,
        "tune_loss_first_last": [float(np.mean(result.loss_history[:20])),
                                 float(np.mean(result.loss_history[-20:]))],
        "denoising_loss_on_target": {"base": loss_base, "tuned": loss_tuned},
        "rows": rows, "times_s": {k: round(v, 1) for k, v in times.items()},
        "ratios_after_over_before": {k: rows[1][k] / rows[0][k] if rows[0][k] else None
                                     for k in ("kid", "nearest_target_cosine",
                                               "nearest_target_rmse")},
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    image_grid_png([("target", target[:10]), ("before", before[::a.per_condition][:10]),
                    ("after", after[::a.per_condition][:10]),
                    ("after j=1", after[1::a.per_condition][:10])],
                   out / "transfer.png", f"{Path(a.base).name} -> {a.target}")
    atomic_write_json(out / "transfer.json", record)

    print(f"\ngenerative transfer: {Path(a.base).name} -> {a.target} ({len(target)} images), "
          f"encoder {encoder.encoder_id}, {a.tune_steps} tuning steps on {device} "
          f"({torch.get_num_threads()} threads)")
    print(f"{'set':40s} {'n':>4s} {'KID x100':>9s} {'NN cos':>7s} {'NN RMSE':>8s}")
    for r in rows:
        print(f"{r['set']:40s} {r['n']:4d} {100 * r['kid']:9.2f} "
              f"{r['nearest_target_cosine']:7.3f} {r['nearest_target_rmse']:8.3f}")
    ratios = record["ratios_after_over_before"]
    print(f"after/before: KID {ratios['kid']:.3f}, nearest-target cosine "
          f"{ratios['nearest_target_cosine']:.3f}, nearest-target RMSE "
          f"{ratios['nearest_target_rmse']:.3f}")
    print(f"noise-prediction loss on the targets: base {loss_base:.4f} -> tuned "
          f"{loss_tuned:.4f} ({loss_tuned / loss_base:.3f}x); tuning "
          f"{result.steps_per_second:.2f} steps/s; times {record['times_s']}")
    print(f"wrote {out / 'transfer.json'} and {out / 'transfer.png'}")
    return record


if __name__ == "__main__":
    main()
