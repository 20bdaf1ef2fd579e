"""When the SSL trainer's learning rate moves and when it evaluates, per step.

Two learning-rate schedules, as factors of ``lr`` for ``torch.optim.lr_scheduler.LambdaLR``:
USB's FixMatch cosine (``schedule: fixmatch-cosine``) and a warm-up then cosine to 0
(``schedule: warmup-cosine``, the short-budget recipes'); and the evaluation points, whose
last ``final_points`` make the final figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .config import SSLConfig


def fixmatch_cosine(total_steps: int) -> Callable[[int], float]:
    """FixMatch's schedule: lr * cos(7 pi k / (16 K)), ending at ~0.2 lr rather than 0."""
    return lambda k: math.cos(7.0 * math.pi * k / (16.0 * total_steps))


def warmup_cosine(total_steps: int, warmup: float) -> Callable[[int], float]:
    """Linear warm-up over ``warmup x K`` steps, then cosine from lr to 0 at step K: a short
    run's last evaluations are taken at a small step, not USB's 0.2 lr."""
    w = round(warmup * total_steps)

    def factor(k: int) -> float:
        if k < w:
            return (k + 1) / w
        return 0.5 * (1.0 + math.cos(math.pi * (k - w) / max(1, total_steps - w)))
    return factor


def lr_schedule(config: SSLConfig) -> Callable[[int], float]:
    """The LR factor per step for ``config.schedule``."""
    if config.schedule == "warmup-cosine":
        return warmup_cosine(config.steps, config.warmup)
    return fixmatch_cosine(config.steps)


def eval_steps(config: SSLConfig) -> list[int]:
    """The steps with an evaluation point: every ``eval_every`` and the last."""
    return sorted(set(range(config.eval_every, config.steps + 1, config.eval_every))
                  | {config.steps})
