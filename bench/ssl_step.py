"""Throughput of the FixMatch step (WRN-28-2, USB batch shape) and where its time goes.

Measures, in one run on one device:
  pipelined the trainer's loop: batch k+1 produced (on a side CUDA stream) while step k runs
  serial    sample + augment, then forward/backward/SGD/EMA, steps/s
  data      sampling + weak/strong augmentation + layout only, ms/step, with the grouped
            augmentation (each op on the images that drew it) and the dense one
  model     the training step on a fixed batch only: the ceiling (the aim: pipelined
            >= 0.92 of it)
and, for the feeding side, a USB-like CPU loader: torchvision PIL transforms per image
(crop+flip, RandAugment(3) and RandomErasing as Cutout) in this one process.

On the CPU it also times the trainer's step in fp32 against bf16 autocast + channels_last,
for cnn-small at width 32 and 16 on Fashion-MNIST's shape (28x28x1) at the
cpu-short recipe's batch (16 + 2x16), and prints the ratios measured in this one run.

    .venv/bin/python -m bench.ssl_step --device cuda           # USB shape: 64 + 7x64x2 images
    .venv/bin/python -m bench.ssl_step --device cpu            # reduced batch, said in the output
    .venv/bin/python -m bench.ssl_step --device cpu --only-precision   # the fp32/bf16 ratios
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import numpy as np
import torch

import pipeline.ssl.trainer as trainer_module
from pipeline.ssl import SSLConfig
from pipeline.ssl.algorithms import FixMatch
from pipeline.ssl.nets import build_net
from pipeline.ssl.randaugment import strong_augment
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


def make_trainer(net_name: str, bs: int, mu: int, device: torch.device, amp: bool = True,
                 channels_last: bool = True, compile: bool = False,
                 n_pool: int = 50_000, shape: tuple[int, int, int] = (32, 32, 3),
                 width: int | None = None) -> Trainer:
    """A FixMatch trainer on a pool of random pixels (the cost of every op does not depend
    on content; CIFAR-10's shape unless ``shape``), 250 labeled rows, nothing written."""
    cfg = SSLConfig(net=net_name, net_width=width, steps=10**6, batch_size=bs, mu=mu,
                    device=str(device), amp=amp, channels_last=channels_last, compile=compile)
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (n_pool, *shape), dtype=np.uint8)
    store = torch.from_numpy(pool).to(device)
    labels = torch.from_numpy(rng.integers(0, 10, n_pool)).to(device)
    test = store[:1000]
    data = TrainData(store=store, labels=labels, weights=torch.ones(n_pool, device=device),
                     labeled_real=torch.arange(250, device=device),
                     labeled_synth=torch.zeros(0, dtype=torch.int64, device=device),
                     unlabeled=torch.arange(n_pool, device=device), test_images=test,
                     test_labels=labels[:1000], curve_images=test, curve_labels=labels[:1000],
                     num_classes=10)
    c = shape[-1]
    net = build_net(net_name, 10, shape, [0.49, 0.48, 0.45][:c], [0.25, 0.24, 0.26][:c], seed=0,
                    width=width)
    return Trainer(net, FixMatch(cfg, 10), data, cfg, device, Path("/nonexistent/ckpt.pt"),
                   "bench", progress=False)


def pipelined(trainer: Trainer, n: int, device: torch.device) -> float:
    """Trainer.fit's order of work, without its bookkeeping: seconds per step."""
    sync(device)
    t = time.perf_counter()
    pending = trainer._produce()
    for _ in range(n):
        batch = trainer._ready(pending)
        trainer.train_step(batch)
        pending = trainer._produce()
    sync(device)
    return (time.perf_counter() - t) / n


def cpu_precision(steps: int, tiny: bool) -> None:
    """fp32 against bf16 autocast + channels_last on this CPU, one run, as ratios."""
    from anl_core.precision import cpu_has_native_bf16

    device = torch.device("cpu")
    nets = [("cnn-tiny", None)] if tiny else [("cnn-small", 32), ("cnn-small", 16)]
    bs, mu = (4, 2) if tiny else (16, 2)
    print(f"\nCPU precision: batch {bs} + {mu}x{bs} unlabeled x 2 views, 28x28x1, "
          f"threads {torch.get_num_threads()}, native bf16: {cpu_has_native_bf16()}")
    print(f"{'net':<22}{'fp32 ms/step':>14}{'bf16+NHWC ms/step':>20}{'ratio':>8}")
    base = None
    for name, width in nets:
        t = {}
        for amp in (False, True):
            tr = make_trainer(name, bs, mu, device, amp=amp, channels_last=amp,
                              n_pool=2_000, shape=(28, 28, 1), width=width)
            pipelined(tr, 3, device)  # warm-up
            t[amp] = pipelined(tr, steps, device)
        base = base or t[False]
        label = f"{name} w{width or 'default'}"
        print(f"{label:<22}{t[False] * 1e3:>14.1f}{t[True] * 1e3:>20.1f}"
              f"{t[False] / t[True]:>7.2f}x")
    print(f"(first row's fp32 / each row's bf16: the speed-up of the recipe's width and "
          f"precision together: {base / t[True]:.2f}x for the last row)")


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
    p.add_argument("--only-precision", action="store_true",
                   help="CPU: only the fp32 vs bf16+channels_last comparison")
    p.add_argument("--tiny", action="store_true",
                   help="toy sizes (cnn-tiny, batch 4, mu 2, 3 steps, 2k-image pool): tests this "
                        "script in seconds; its figures mean nothing")
    args = p.parse_args()
    if args.tiny:
        args.net, args.batch_size, args.mu, args.steps = "cnn-tiny", 4, 2, args.steps or 3
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.only_precision:
        if cuda:
            p.error("--only-precision compares CPU precisions: use --device cpu")
        cpu_precision(args.steps or 40, args.tiny)
        return
    bs = args.batch_size or (64 if cuda else 8)
    steps = args.steps or (200 if cuda else 5)
    trainer = make_trainer(args.net, bs, args.mu, device, amp=not args.no_amp,
                           channels_last=not args.no_channels_last, compile=args.compile,
                           n_pool=2_000 if args.tiny else 50_000)
    cfg = trainer.config
    pool = trainer.data.store.cpu().numpy()

    def full() -> None:
        trainer.train_step(trainer.sample_batch())

    warm = 20 if cuda else 2
    for _ in range(warm):
        full()
    pipelined(trainer, warm, device)
    batch = trainer.sample_batch()
    t_pipe = pipelined(trainer, steps, device)
    t_full = timed(full, steps, device)
    t_data = timed(trainer.sample_batch, steps, device)
    t_model = timed(lambda: trainer.train_step(batch), steps, device)
    dense = functools.partial(strong_augment, grouped=False)
    trainer_module.strong_augment, grouped_fn = dense, trainer_module.strong_augment
    try:
        timed(trainer.sample_batch, warm, device)
        t_data_dense = timed(trainer.sample_batch, steps, device)
    finally:
        trainer_module.strong_augment = grouped_fn
    n_img = bs * (1 + 2 * args.mu)
    pil_rate = pil_loader_rate(pool, 512 if cuda else (16 if args.tiny else 128))

    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if cuda else "")
          + f", torch {torch.__version__}, threads {torch.get_num_threads()}")
    shape = "USB batch shape" if (bs, args.mu) == (64, 7) else "REDUCED batch (not USB's 64/7)"
    print(f"net {args.net}, batch {bs} labeled + {args.mu}x{bs} unlabeled x 2 views = {n_img} "
          f"images/step ({shape}); amp={trainer.amp} channels_last={trainer.channels_last} "
          f"compile={cfg.compile and cuda}")
    print(f"{'what':<44}{'ms/step':>10}{'steps/s':>10}")
    print(f"{'pipelined step (the trainer loop)':<44}{t_pipe * 1e3:>10.2f}{1 / t_pipe:>10.2f}")
    print(f"{'serial step (sample+augment, then train)':<44}{t_full * 1e3:>10.2f}"
          f"{1 / t_full:>10.2f}")
    print(f"{'  data: sample + augment (grouped ops)':<44}{t_data * 1e3:>10.2f}{1 / t_data:>10.2f}")
    print(f"{'  data: sample + augment (dense ops)':<44}{t_data_dense * 1e3:>10.2f}"
          f"{1 / t_data_dense:>10.2f}")
    print(f"{'  model: fwd/bwd/SGD/EMA on a fixed batch':<44}{t_model * 1e3:>10.2f}"
          f"{1 / t_model:>10.2f}")
    print(f"pipelined / model-only ceiling: {t_model / t_pipe:.3f} (aim >= 0.92); "
          f"pipelined / serial: {t_full / t_pipe:.2f}x; grouped / dense augmentation: "
          f"{t_data_dense / t_data:.2f}x faster")
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
    else:
        cpu_precision(args.steps or 40, args.tiny)


if __name__ == "__main__":
    main()
