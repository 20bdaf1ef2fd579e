"""What a run will read and how long its stages will take here, for ``augment run --dry-run``
and ``augment init``: the data's counts by role, and each long stage's time as a rate measured
on this machine in a second or two times the configured count.

Rates are the networks' own cost, timed on random inputs of the configured shapes: the base
U-Net's forward + backward at the tuning batch (tuning), its forward at the sampling batch
(sampling), the SSL net's forward + backward at one FixMatch batch (SSL). The ANL adapter,
data loading and evaluations are left out, so the figures are rough (on the demo, 2 busy CPU
cores: 14.5 min estimated, 13 min recorded): good to tell minutes from days.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from pipeline.config import AugmentConfig
from pipeline.data.datasets import ImageDataset
from pipeline.ssl.arm_names import SUPERVISED_ARMS, base_arm

# Stages not timed here (split, encode, shards, quality, report) and Prefect's start: what
# they took in the recorded demo run on 2 busy CPU cores (about 2 min), a rough allowance.
OTHER_STAGES_S = 120.0


@dataclass
class Counts:
    class_names: list[str]
    per_class: list[int]     # labeled training images of each class, as found
    labeled: list[int]       # of them, the labeled split's per class
    validation: int
    unlabeled: int           # the pool: unlabeled images plus labeled ones left over
    test: int


def data_counts(config: AugmentConfig, ds: ImageDataset) -> Counts:
    """The split's sizes by role, as the split stage will cut them (labels_per_class, then
    validation_per_class from each class; the rest, and every unlabeled image, the pool)."""
    labels = np.asarray(ds.train_labels)
    per_class = [int((labels == c).sum()) for c in range(ds.num_classes)]
    labeled = [min(config.labels_per_class, n) for n in per_class]
    val = [min(config.validation_per_class, n - k) for n, k in zip(per_class, labeled)]
    pool = len(labels) - sum(labeled) - sum(val)
    if config.ssl.unlabeled_pool is not None:
        pool = min(pool, config.ssl.unlabeled_pool)
    return Counts(list(ds.class_names), per_class, labeled, sum(val), pool, len(ds.test_labels))


def _timed(fn, reps: int = 3) -> float:
    """Seconds per call of ``fn``, after one untimed call (allocations, lazy init)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def unet_rates(config: AugmentConfig, device: str) -> dict[str, float]:
    """Seconds per tuning step (forward + backward at ``tuning.batch_size``) and per sampling
    denoising step of one batch (forward at ``sampling.batch_size``, capped at 64 and
    scaled linearly beyond: a CPU's time grows with the batch)."""
    import torch

    from pipeline.models import load_base_unet, resolve_base_model

    unet, _ = load_base_unet(resolve_base_model(config.base_model), device)
    size, ch = unet.config.sample_size, unet.config.in_channels
    t = torch.tensor([500], device=device)

    def step(batch: int, backward: bool):
        x = torch.randn(batch, ch, size, size, device=device)
        with torch.set_grad_enabled(backward):
            out = unet(x, t.expand(batch)).sample
            if backward:
                out.square().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    tb = min(config.tuning.batch_size, 64)
    tune = _timed(lambda: step(tb, True)) * config.tuning.batch_size / tb
    sb = min(config.sampling.batch_size, 64)
    sample = _timed(lambda: step(sb, False)) * config.sampling.batch_size / sb
    return {"tune_step_s": tune, "sample_batch_step_s": sample, "sample_batch": sb}


def ssl_rate(config: AugmentConfig, shape: tuple[int, int, int], classes: int,
             device: str, fixmatch: bool) -> float:
    """Seconds per SSL step of the configured net: one labeled batch, plus the unlabeled
    weak and strong views (``mu`` x batch each) for the FixMatch arms."""
    import torch

    from pipeline.ssl.nets import build_net, resolve_net_name

    ssl = config.ssl
    net = build_net(resolve_net_name(ssl.net, shape), classes, shape, [0.5] * shape[-1],
                    [0.5] * shape[-1], 0, width=ssl.net_width).to(device).train()
    batch = ssl.batch_size * (1 + 2 * ssl.mu if fixmatch else 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def step():
        x = torch.rand(batch, shape[-1], shape[0], shape[1], device=device)
        loss = net(x).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return _timed(step)


def _arm_steps(config: AugmentConfig) -> list[tuple[str, int]]:
    """(arm, steps) per classifier unit; a "-2x" arm trains twice the steps."""
    return [(arm, config.ssl.steps * (2 if arm.endswith("-2x") else 1))
            for arm in config.ssl.arms for _ in config.ssl.seeds]


def estimate(config: AugmentConfig, counts: Counts, shape: tuple[int, int, int],
             device: str) -> list[dict]:
    """One row per stage: its count, the measured rate, and seconds = rate x count."""
    k = len(counts.class_names)
    rows = []
    if config.pretrains_base:  # the base is trained in the run: no net to time yet
        rows.append({"stage": "pretrain+tune+sample", "count": f"{config.pretrain.steps} "
                     "pretraining steps, then tuning and sampling", "rate": "not measured: "
                     "the base U-Net does not exist before the run", "seconds": 0.0})
        return rows + _ssl_rows(config, counts, shape, device)
    unet = unet_rates(config, device)
    units = k if config.adapter.scope == "per-class" else 1
    rows.append({"stage": "tune", "count": f"{units} adapters x {config.tuning.steps} steps",
                 "rate": f"{unet['tune_step_s']:.3f} s/step (U-Net fwd+bwd, batch "
                         f"{config.tuning.batch_size}, measured)",
                 "seconds": units * config.tuning.steps * unet["tune_step_s"]})
    images = sum(counts.labeled) * config.sampling.per_condition * len(config.sampling.mask_ratios)
    passes = 1 if config.sampling.guidance in (0.0, 1.0) else 2  # guidance: a second pass
    batches = math.ceil(images / config.sampling.batch_size) * passes
    steps = batches * config.sampling.num_inference_steps
    rows.append({"stage": "sample",
                 "count": f"{images} images = {batches} batches x "
                          f"{config.sampling.num_inference_steps} steps",
                 "rate": f"{unet['sample_batch_step_s']:.3f} s/batch-step (U-Net fwd, batch "
                         f"{config.sampling.batch_size}, measured)",
                 "seconds": steps * unet["sample_batch_step_s"]})
    return rows + _ssl_rows(config, counts, shape, device)


def _ssl_rows(config: AugmentConfig, counts: Counts, shape: tuple[int, int, int],
              device: str) -> list[dict]:
    from pipeline.ssl.nets import resolve_net_name

    k = len(counts.class_names)
    rows = []
    fixmatch = ssl_rate(config, shape, k, device, fixmatch=True)
    labeled_only = ssl_rate(config, shape, k, device, fixmatch=False)
    total = sum(n * (labeled_only if base_arm(arm) in SUPERVISED_ARMS else fixmatch)
                for arm, n in _arm_steps(config))
    rows.append({"stage": "ssl",
                 "count": f"{len(_arm_steps(config))} units (arm x seed), "
                          f"{config.ssl.steps} steps each",
                 "rate": f"{fixmatch:.3f} s/step FixMatch, {labeled_only:.3f} s/step labeled "
                         f"only ({resolve_net_name(config.ssl.net, shape)} net, batch {config.ssl.batch_size}, mu "
                         f"{config.ssl.mu}, measured)",
                 "seconds": total})
    rows.append({"stage": "other", "count": "split, encode, shards, quality, report",
                 "rate": "not measured: the recorded demo run's 2 min on 2 CPU cores",
                 "seconds": OTHER_STAGES_S})
    return rows


def format_counts(c: Counts) -> list[str]:
    lines = [f"classes ({len(c.class_names)}): " + ", ".join(
        f"{name} {n}" for name, n in zip(c.class_names, c.per_class))]
    lines.append(f"labeled per class {min(c.labeled)}" +
                 (f"-{max(c.labeled)}" if max(c.labeled) != min(c.labeled) else "") +
                 f" ({sum(c.labeled)} in all), validation {c.validation}, unlabeled pool "
                 f"{c.unlabeled}, test {c.test}")
    return lines


def format_estimate(rows: list[dict]) -> list[str]:
    lines = [f"  {r['stage']:7s} {r['seconds'] / 60:6.1f} min  {r['count']}; {r['rate']}"
             for r in rows]
    total = sum(r["seconds"] for r in rows)
    lines.append(f"  total   {total / 60:6.1f} min  (rough: the networks' own cost; the "
                 "adapter, data loading and evaluations are not timed)")
    return lines


def dry_run_report(config: AugmentConfig) -> list[str]:
    """What ``augment run --dry-run`` prints after the pre-flight: the data by role and each
    stage's estimated time on this machine (a few seconds of timing)."""
    from pipeline.data.datasets import load_dataset_cached

    ds = load_dataset_cached(config.dataset, config.dataset_root, config.download,
                             **config.loader_options())
    counts = data_counts(config, ds)
    device = config.resolved_device()
    return [*format_counts(counts),
            f"estimated time on this machine ({device}, rates timed just now):",
            *format_estimate(estimate(config, counts, ds.image_shape, device))]
