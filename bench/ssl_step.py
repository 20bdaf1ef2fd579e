"""Throughput of the FixMatch step (WRN-28-2, USB batch shape) and where its time goes.

Measures, in one run on one device:
  full     sample + augment + forward/backward/SGD/EMA, steps/s
  data     sampling + weak/strong augmentation + layout only, ms/step
  model    the training step on a fixed batch only, ms/step
and, for the feeding side, a USB-like CPU loader: torchvision PIL transforms per image
(crop+flip, RandAugment(3) and RandomErasing as Cutout) in this one process.

    .venv/bin/python -m bench.ssl_step --device cuda           # USB shape: 64 + 7x64x2 images
    .venv/bin/python -m bench.ssl_step --device cpu            # reduced batch, said in the output
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.ssl import SSLConfig
from pipeline.ssl.algorithms import FixMatch
from pipeline.ssl.nets import build_net
from pipeline.ssl.trainer import TrainData, Trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n: int, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t) / n


def pil_loader_rate(images: np.ndarray, n_images: int) -> float:
    """Images/s of a USB-style per-image PIL pipeline (weak + strong view), one process."""
    from PIL import Image
    from torchvision import transforms as T

    weak = T.Compose([T.RandomCrop(32, padding=4, padding_mode="reflect"),
                      T.RandomHorizontalFlip(), T.PILToTensor()])
    strong = T.Compose([T.RandomCrop(32, padding=4, padding_mode="reflect"),
                        T.RandomHorizontalFlip(), T.RandAugment(num_ops=3), T.PILToTensor(),
                        T.ConvertImageDtype(torch.float32), T.RandomErasing(p=1.0)])
    pils = [Image.fromarray(images[i]) for i in range(256)]
    t = time.perf_counter()
    for i in range(n_images):
        im = pils[i % len(pils)]
        weak(im)
        strong(im)
    return n_images / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 8 on CPU")
    p.add_argument("--mu", type=int, default=7)
    p.add_argument("--net", default="wrn-28-2")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 200 CUDA, 5 CPU)")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    bs = args.batch_size or (64 if cuda else 8)
    steps = args.steps or (200 if cuda else 5)
    cfg = SSLConfig(net=args.net, steps=10**6, batch_size=bs, mu=args.mu, device=str(device),
                    amp=not args.no_amp, channels_last=not args.no_channels_last,
                    compile=args.compile)
    # CIFAR-10-sized pool of random pixels: the cost of every op does not depend on content.
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8)
    store = torch.from_numpy(pool).to(device)
    labels = torch.from_numpy(rng.integers(0, 10, 50_000)).to(device)
    test = store[:1000]
    data = TrainData(store=store, labels=labels, weights=torch.ones(50_000, device=device),
                     labeled_real=torch.arange(250, device=device),
                     labeled_synth=torch.zeros(0, dtype=torch.int64, device=device),
                     unlabeled=torch.arange(50_000, device=device), test_images=test,
                     test_labels=labels[:1000], curve_images=test, curve_labels=labels[:1000],
                     num_classes=10)
    net = build_net(args.net, 10, (32, 32, 3), [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], seed=0)
    trainer = Trainer(net, FixMatch(cfg, 10), data, cfg, device, Path("/nonexistent/ckpt.pt"),
                      "bench", progress=False)

    def full() -> None:
        trainer.train_step(trainer.sample_batch())

    warm = 20 if cuda else 2
    for _ in range(warm):
        full()
    batch = trainer.sample_batch()
    t_full = timed(full, steps, device)
    t_data = timed(trainer.sample_batch, steps, device)
    t_model = timed(lambda: trainer.train_step(batch), steps, device)
    n_img = bs * (1 + 2 * args.mu)
    pil_rate = pil_loader_rate(pool, 512 if cuda else 128)

    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if cuda else "")
          + f", torch {torch.__version__}, threads {torch.get_num_threads()}")
    shape = "USB batch shape" if (bs, args.mu) == (64, 7) else "REDUCED batch (not USB's 64/7)"
    print(f"net {args.net}, batch {bs} labeled + {args.mu}x{bs} unlabeled x 2 views = {n_img} "
          f"images/step ({shape}); amp={trainer.amp} channels_last={trainer.channels_last} "
          f"compile={cfg.compile and cuda}")
    print(f"{'what':<44}{'ms/step':>10}{'steps/s':>10}")
    print(f"{'full step (sample+augment+train)':<44}{t_full * 1e3:>10.2f}{1 / t_full:>10.2f}")
    print(f"{'  data: sample + augment + layout':<44}{t_data * 1e3:>10.2f}{1 / t_data:>10.2f}")
    print(f"{'  model: fwd/bwd/SGD/EMA on a fixed batch':<44}{t_model * 1e3:>10.2f}"
          f"{1 / t_model:>10.2f}")
    share = t_data / (t_data + t_model)
    print(f"share of step time in augmentation + data movement: {share:.1%} "
          f"(data / (data + model), measured separately)")
    # Unlabeled images need weak+strong; the labeled weak views are left out (cheap), so this
    # slightly flatters the PIL loader.
    pil_steps = pil_rate / (bs * args.mu)
    print(f"USB-like CPU PIL loader, 1 process: {pil_rate:.0f} images/s (weak+strong views) "
          f"= {pil_steps:.2f} steps/s at this batch; on-device data path is "
          f"{(1 / t_data) / pil_steps:.1f}x faster")
    if cuda:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB; "
              f"2^20 steps at this rate: {2**20 * t_full / 3600:.1f} h")


if __name__ == "__main__":
    main()
