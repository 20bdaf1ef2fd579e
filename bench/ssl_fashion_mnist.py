"""Supervised vs FixMatch on Fashion-MNIST with a few labels per class, on CPU or GPU.

Both arms share the split, seed, net initialisation and schedule (pipeline.ssl.run_arm);
prints test accuracy on the full 10k test split with the EMA model.

    .venv/bin/python bench/ssl_fashion_mnist.py --steps 600 --batch-size 16 --mu 3
    .venv/bin/python bench/ssl_fashion_mnist.py --steps 65536 --batch-size 64 --mu 7 --device cuda
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from pipeline.data.datasets import load_dataset
from pipeline.data.splits import make_split
from pipeline.ssl import SSLConfig, run_arm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--labels-per-class", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--net", default="auto", help="auto = cnn-small for 28x28 grey")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--mu", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--eval-every", type=int, default=None, help="default: steps // 4")
    p.add_argument("--eval-size", type=int, default=1000, help="test images per curve point")
    p.add_argument("--device", default="auto")
    p.add_argument("--arms", default="supervised,baseline")
    p.add_argument("--out", type=Path, default=None, help="run dir (reruns skip finished arms)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a busy box)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="ssl-fmnist-"))
    ds = load_dataset("fashion-mnist")
    split = make_split(ds.train_labels, args.labels_per_class, seed=args.seed)
    every = args.eval_every or max(1, args.steps // 4)
    cfg = SSLConfig(net=args.net, steps=args.steps, batch_size=args.batch_size, mu=args.mu,
                    lr=args.lr, eval_every=every, checkpoint_every=every,
                    eval_size=args.eval_size, seed=args.seed, device=args.device)
    rows = []
    for arm in args.arms.split(","):
        m = json.loads(run_arm(arm, ds, split, out / arm, cfg, progress=not args.quiet)
                       .read_text())
        rows.append(m)
    print(f"Fashion-MNIST, {args.labels_per_class} labels/class ({len(split.labeled_idx)} labels), "
          f"seed {args.seed}, net {rows[0]['net']}, {args.steps} steps, batch {args.batch_size}"
          f" (+{args.mu}x unlabeled), device {rows[0]['device']}, threads {args.threads}")
    print(f"{'arm':<12}{'algorithm':<12}{'top-1 acc':>10}{'error':>8}{'train s':>9}{'steps/s':>9}")
    for m in rows:
        print(f"{m['arm']:<12}{m['algorithm']:<12}{m['top1_accuracy']:>10.4f}"
              f"{m['top1_error']:>8.4f}{m['train_time_s']:>9.1f}{m['steps_per_s']:>9.2f}")
    if len(rows) >= 2:
        print(f"{rows[1]['arm']} - {rows[0]['arm']}: "
              f"{rows[1]['top1_accuracy'] - rows[0]['top1_accuracy']:+.4f} accuracy")
    print(f"outputs: {out}")


if __name__ == "__main__":
    main()
