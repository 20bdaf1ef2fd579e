"""Generative transfer: how well does each way of adapting the shipped Fashion-MNIST
DDPM to handwritten digits do, from a few images, at equal training steps?

Arms, each a ``pipeline.transfer`` run (so every run is resumable and has its own report):

* base (untouched): the base model's own samples, nothing trained (mode full, 0 steps);
* ANL only: one shared adapter on the frozen base, masked + guided sampling on the shots;
* full fine-tuning: every U-Net weight, same denoising loss, unconditional;
* from scratch: a U-Net of the base's config with fresh weights, trained on the shots.

Target: scikit-learn's digits (8x8, upscaled with Pillow into MNIST's 28x28 layout), all ten
digits as one domain, at 10 and 100 shots; or foolbox's 20 real MNIST digits
(``--target mnist-foolbox``: 10 shots only, 10 held out). The shots are a seeded draw; 10-shot
shots are among the 100-shot ones and both are measured against the same held-out images.
Prints one table: KID x 100 (± std over subsets) to the held-out images, sample diversity over
the held-out images' diversity, near-copy share, trained parameters and training steps/s; and
for scale, the same figures for as many real target images that are neither shots nor held out.

    OMP_NUM_THREADS=1 python -m bench.transfer            # ~10 min on one CPU thread
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import base_model_label, csv_list, markdown_table
from pipeline.atomic import atomic_write_json

COLUMNS = [("shots", "shots", ""), ("arm", "arm", ""), ("kid", "KID x100 ± std", ""),
           ("diversity_over_real", "diversity / real", ".3f"),
           ("near_copy_share", "near-copies", ".1%"), ("trained_params", "trained params", ""),
           ("steps_per_s", "steps/s", ".2f"), ("train_s", "train s", ".0f"),
           ("sample_s", "sample s", ".0f"), ("images_per_s", "img/s", ".1f")]


def arms(a: argparse.Namespace) -> list[tuple[str, dict]]:
    """(label, TransferConfig fields) per arm; each mode at its own learning rate."""
    return [("base (untouched)", {"mode": "full", "steps": 0}),
            ("ANL only", {"mode": "anl", "lr": a.lr_anl}),
            ("full fine-tuning", {"mode": "full", "lr": a.lr_full}),
            ("from scratch", {"mode": "scratch", "lr": a.lr_scratch})]


def real_floor(config) -> dict:
    """The figures for real target images that are neither shots nor held out, as many as the
    samples: what a perfect generator would score (KID's floor, diversity 1, ~5% near-copies)."""
    import numpy as np

    from anl_core.encoders import load_encoder
    from pipeline.evaluate.quality import encoder_features
    from pipeline.transfer.metrics import transfer_metrics
    from pipeline.transfer.model import base_channels
    from pipeline.transfer.target import draw_shots, target_pool

    pool = target_pool(config, base_channels(config))
    shots, held = draw_shots(len(pool), config.shots, config.max_held_out, config.seed)
    rest = np.setdiff1d(np.arange(len(pool)), np.concatenate([shots, held]))
    pick = np.random.default_rng(config.seed).choice(rest, min(config.samples, len(rest)),
                                                     replace=False)
    features = encoder_features(load_encoder(config.encoder, device="cpu"))
    m = transfer_metrics(pool[pick], pool[shots], pool[held], features, config)
    return {"shots": config.shots, "arm": f"real images ({len(pick)}, floor)",
            "kid": f"{100 * m['kid']:.2f} ± {100 * m['kid_std']:.2f}", "kid_value": m["kid"],
            "kid_std": m["kid_std"], "diversity_over_real": m["diversity_over_real"],
            "near_copy_share": m["near_copy_share"], "trained_params": "—"}


def row(shots: int, label: str, run: Path) -> dict:
    from pipeline.runs import read_json

    m = read_json(run / "eval" / "metrics.json")
    tune = read_json(run / "stages" / "tune.json")["metrics"]
    sample = read_json(run / "stages" / "sample.json")["metrics"]
    return {"shots": shots, "arm": label, "kid": f"{100 * m['kid']:.2f} ± {100 * m['kid_std']:.2f}",
            "kid_value": m["kid"], "kid_std": m["kid_std"],
            "diversity_over_real": m["diversity_over_real"],
            "near_copy_share": m["near_copy_share"], "trained_params": f"{m['trained_params']:,}",
            "steps_per_s": m["steps_per_s"], "train_s": tune["train_s"],
            "sample_s": sample["sample_s"], "images_per_s": sample["images_per_s"],
            "n_held_out": m["n_held_out"], "run": run.name}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", default="data/models/fashion-mnist-ddpm-32")
    p.add_argument("--target", default="sklearn-digits", help="or mnist-foolbox, or a folder")
    p.add_argument("--class", dest="target_class", default=None,
                   help="one class of the target (default: all of it as one domain)")
    p.add_argument("--shots", type=csv_list(int), default=[10, 100],
                   help="comma-separated; a count the target cannot hold out beside is skipped")
    p.add_argument("--steps", type=int, default=200, help="training steps, every arm alike")
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--max-held-out", type=int, default=500)
    p.add_argument("--lr-anl", type=float, default=1e-3)
    p.add_argument("--lr-full", type=float, default=2e-4)
    p.add_argument("--lr-scratch", type=float, default=4e-4)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any other TransferConfig field, for every arm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", default="runs/bench/transfer")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    from pipeline.paths import resolve_path
    from pipeline.transfer import TransferError, run_transfer, transfer_config

    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    rows, skipped, t0 = [], [], time.perf_counter()
    common = {"base_model": a.base_model, "target": a.target, "target_class": a.target_class,
              "steps": a.steps, "samples": a.samples, "max_held_out": a.max_held_out,
              "seed": a.seed, "runs_dir": a.runs_dir, "progress": not a.quiet}
    for shots in a.shots:
        for label, over in arms(a):
            config = transfer_config({**common, "shots": shots, **over}, a.overrides)
            try:
                run = run_transfer(config)
            except TransferError as e:  # e.g. 100 shots of a 20-image target
                skipped.append(f"{shots} shots: {e}")
                break
            rows.append(row(shots, label, run))
            print(f"{shots} shots, {label}: {rows[-1]['kid']} KID x100 ({run})", flush=True)
        else:  # every arm ran: the floor for this shot count
            rows.append(real_floor(config))
    print(f"\ngenerative transfer: {base_model_label(a.base_model)} -> {a.target}"
          f"{'' if a.target_class is None else ':' + a.target_class}, {a.steps} steps per arm, "
          f"{a.samples} samples, {rows[0]['n_held_out'] if rows else '?'} held-out images, "
          f"{torch.get_num_threads()} thread(s), {time.perf_counter() - t0:.0f} s\n")
    print(markdown_table(rows, COLUMNS))
    for s in skipped:
        print(f"skipped: {s}")
    out = resolve_path(a.runs_dir)
    atomic_write_json(out / "summary.json", {"args": vars(a), "rows": rows, "skipped": skipped})
    print(f"\nrows: {out / 'summary.json'}; each run's report.html is in its folder there")
    return rows


if __name__ == "__main__":
    main()
