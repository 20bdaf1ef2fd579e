"""Aggregate FixMatch throughput of N classifier units side by side on one device vs one.

Each unit is its own process (as the flow runs them with ``arms_at_once``): it builds the
trainer of ``bench.ssl_step`` (WRN-28-2 at USB's batch on CUDA), warms up, waits at a
barrier so every unit trains at the same time, and times ``--steps`` steps of the trainer's
loop. Aggregate = N x steps / (the slowest unit's time). Also prints one unit's peak memory
and how many ``arms_at_once: auto`` would run on this card.

    python -m bench.arms_at_once --device cuda --units 1,4        # aim: >= 3x
    python -m bench.arms_at_once --device cpu --tiny               # tests this script only
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch


def unit(args, barrier, results, index: int) -> None:
    from bench.ssl_step import make_trainer, pipelined, sync

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    trainer = make_trainer(args.net, args.batch_size, args.mu, device,
                           n_pool=2_000 if args.tiny else 50_000)
    pipelined(trainer, args.warmup, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    barrier.wait()
    t = time.perf_counter()
    pipelined(trainer, args.steps, device)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    results[index] = (time.perf_counter() - t, peak)


def run(args, n: int) -> tuple[float, int]:
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    barrier, results = ctx.Barrier(n), ctx.Manager().dict()
    procs = [ctx.Process(target=unit, args=(args, barrier, results, i)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if len(results) != n or any(p.exitcode for p in procs):
        raise SystemExit(f"a unit failed (exit codes {[p.exitcode for p in procs]})")
    slowest = max(r[0] for r in results.values())
    return n * args.steps / slowest, max(r[1] for r in results.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--units", default="1,4", help="comma-separated numbers of units at once")
    p.add_argument("--net", default="wrn-28-2")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mu", type=int, default=7)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per unit")
    p.add_argument("--tiny", action="store_true", help="cnn-tiny, batch 4, mu 2, 3 steps")
    args = p.parse_args(argv)
    if args.tiny:
        args.net, args.batch_size, args.mu, args.steps, args.warmup = "cnn-tiny", 4, 2, 3, 1
    counts = [int(n) for n in args.units.split(",")]
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device {args.device} ({name}), net {args.net}, batch {args.batch_size} + "
          f"{args.mu}x{args.batch_size}x2, {args.steps} timed steps per unit")
    print(f"{'units':>6}{'aggregate steps/s':>20}{'per unit':>10}{'vs 1 unit':>11}")
    base = None
    peak = 0
    for n in counts:
        rate, peak_n = run(args, n)
        peak = max(peak, peak_n)
        base = base or (rate if n == 1 else None)
        ratio = f"{rate / base:>11.2f}" if base else f"{'':>11}"
        print(f"{n:>6}{rate:>20.2f}{rate / n:>10.2f}{ratio}")
    if cuda:
        from pipeline.ssl.capacity import units_at_once

        free, _ = torch.cuda.mem_get_info()
        print(f"one unit peaks at {peak / 2**30:.2f} GiB; {free / 2**30:.1f} GiB free: "
              f"arms_at_once=auto would run {units_at_once('auto', 64, 'cuda', peak, free)}")


if __name__ == "__main__":
    main()
