"""How much the EMA model's BatchNorm statistics move the SSL figures.

Trains one FixMatch baseline (the preset's labeled split and validation split, the chosen
recipe) and, at every curve point, scores the same EMA weights two ways on the validation
images: with the raw model's running BN buffers copied in (what the trainer used to do,
and what USB does) and with BN statistics recomputed for the EMA weights on the trainer's
fixed clean calibration images (what it does now). Prints both curves, the largest upward
jump between points, the sum of upward moves, the mean gap, and the evaluation's own standard
error (binomial, at the final error), all from this one run.

    .venv/bin/python -m bench.bn_recalibration --preset demo --steps 4096 --recipe cpu-short \\
        --set validation_per_class=200
"""

from __future__ import annotations

import argparse
import copy
import math

import numpy as np
import torch

from bench.common import add_preset_args, load_bench_config, upward_moves


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_preset_args(p, "demo")
    p.add_argument("--steps", type=int, default=4096)
    p.add_argument("--curve-points", type=int, default=16)
    p.add_argument("--recipe", default="cpu-short")
    p.add_argument("--seed", type=int, default=0, help="split and training seed")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from pipeline.devices import resolve_device
    from pipeline.ssl.algorithms import get_algorithm
    from pipeline.ssl.arms import build_train_data, net_for
    from pipeline.ssl.evaluate import evaluate
    from pipeline.ssl.trainer import Trainer
    from pipeline.stages.inputs import dataset_for

    every = max(1, args.steps // args.curve_points)
    config = load_bench_config(args, {"split_seed": args.seed, "ssl.recipe": args.recipe,
                                      "ssl.budget": None, "ssl.steps": args.steps,
                                      "ssl.eval_every": every,
                                      "ssl.checkpoint_every": args.steps})
    if not config.validation_per_class:
        p.error("needs a validation split: --set validation_per_class=N")
    from pipeline.data.splits import make_split

    ds = dataset_for(config)
    split = make_split(ds.train_labels, config.labels_per_class, seed=args.seed,
                       val_per_class=config.validation_per_class)
    scfg = config.ssl.component(seed=args.seed, device=config.device)
    device = resolve_device(scfg.device)
    data = build_train_data(ds, split, scfg, device)
    net = net_for(scfg, ds)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(net, get_algorithm(scfg.algorithm)(scfg, ds.num_classes), data, scfg,
                          device, Path(tmp) / "ckpt.pt", "bench", progress=not args.quiet)
        copied, recomputed, steps = [], [], []

        def score(step: int) -> None:
            if step % every and step != scfg.steps:
                return
            stale = copy.deepcopy(trainer.ema)
            for b_ema, b_raw in zip(stale.buffers(), trainer.model.buffers(), strict=True):
                b_ema.copy_(b_raw)  # the old rule: the raw model's running statistics
            e_copied = evaluate(stale, data.val_images, data.val_labels, ds.num_classes,
                                amp=trainer.amp, channels_last=trainer.channels_last)
            e_new = trainer.evaluate_ema("validation")
            steps.append(step)
            copied.append(100 * e_copied.top1_error)
            recomputed.append(100 * e_new.top1_error)

        trainer.fit(on_step=score)
    n_val = len(data.val_labels)
    print(f"preset {config.preset}, split seed {args.seed}, {args.steps} steps, recipe "
          f"{args.recipe} (net {scfg.net} width {scfg.net_width}, batch {scfg.batch_size} + "
          f"{scfg.mu}x unlabeled, lr {scfg.lr}), {n_val} validation images, device {device}, "
          f"bf16 {trainer.amp}")
    print("| step | copied buffers (old) | recomputed (now) |\n| --- | --- | --- |")
    for s, a, b in zip(steps, copied, recomputed, strict=True):
        print(f"| {s} | {a:.2f} | {b:.2f} |")
    se = 100 * math.sqrt(recomputed[-1] / 100 * (1 - recomputed[-1] / 100) / n_val)
    print("\n| evaluation | final error % | largest upward jump | sum of upward moves |")
    print("| --- | --- | --- | --- |")
    for name, c in (("copied raw buffers (as USB)", copied),
                    ("BN recomputed for the EMA weights", recomputed)):
        jump, total = upward_moves(c)
        print(f"| {name} | {c[-1]:.2f} | {jump:.2f} | {total:.2f} |")
    gap = float(np.mean(np.asarray(copied) - np.asarray(recomputed)))
    print(f"\nmean gap (copied - recomputed) over the curve: {gap:+.2f} points; the evaluation's "
          f"own standard error at the final error: {se:.2f} points")


if __name__ == "__main__":
    main()
