"""Paired comparisons of two arms over repetitions: mean difference, 95% CI, paired t-test.

A gain is only worth stating as the mean of per-repetition paired differences (arm A minus
arm B on the same labeled split and seeds) with its confidence interval; with fewer than
``MIN_REPETITIONS`` pairs no interval is given and callers must not state a direction.
The statistics are scipy's (Student t interval, ``scipy.stats.ttest_rel``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

MIN_REPETITIONS = 3  # fewer paired repetitions: report the figures, claim nothing


@dataclass(frozen=True)
class PairedDifference:
    """Per-repetition ``a - b`` and what can be said about its mean."""

    diffs: tuple[float, ...]
    mean: float
    std: float | None        # sample std (ddof 1); None with one pair
    ci_low: float | None     # 95% Student t interval of the mean; None below MIN_REPETITIONS
    ci_high: float | None
    p_value: float | None    # two-sided paired t-test; None below MIN_REPETITIONS
    confidence: float = 0.95

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def enough(self) -> bool:
        """Enough pairs to state a direction at all."""
        return self.n >= MIN_REPETITIONS and self.ci_low is not None

    @property
    def direction(self) -> str:
        """'positive' or 'negative' when the CI excludes 0, 'unclear' otherwise."""
        if not self.enough:
            return "unclear"
        if self.ci_low > 0:
            return "positive"
        if self.ci_high < 0:
            return "negative"
        return "unclear"

    def to_dict(self) -> dict:
        return {**asdict(self), "diffs": list(self.diffs), "n": self.n,
                "direction": self.direction}


def paired_difference(a: Sequence[float], b: Sequence[float],
                      confidence: float = 0.95) -> PairedDifference:
    """``a - b`` per repetition (same order in both), with a t interval and paired t-test.

    NaNs are not allowed: a missing repetition must be dropped from both sides by the caller.
    """
    from scipy import stats

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_difference needs two equal-length 1-d sequences, got "
                         f"{a.shape} and {b.shape}")
    if len(a) == 0:
        raise ValueError("paired_difference needs at least one pair")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("paired_difference got NaN; drop the repetitions missing an arm")
    d = a - b
    n = len(d)
    mean = float(d.mean())
    std = float(d.std(ddof=1)) if n > 1 else None
    lo = hi = p = None
    if n >= MIN_REPETITIONS:
        if std == 0.0:  # every pair moved by the same amount: the interval is a point
            lo = hi = mean
            p = 1.0 if mean == 0.0 else 0.0
        else:
            sem = std / np.sqrt(n)
            lo, hi = (float(x) for x in stats.t.interval(confidence, n - 1, loc=mean, scale=sem))
            p = float(stats.ttest_rel(a, b).pvalue)
    return PairedDifference(tuple(float(x) for x in d), mean, std, lo, hi, p, confidence)


def learning_curve_settled(steps: Sequence[int], errors: Sequence[float],
                           tolerance: float = 0.5) -> tuple[bool, float]:
    """(settled, movement): does the last quarter of a curve move less than ``tolerance``?

    ``errors`` in percent; movement is max - min of the points in the last quarter of the
    steps (both ends included), the rule issue 16 uses to call a budget converged. With
    fewer than two points in the last quarter it cannot tell: (False, nan).
    """
    steps = np.asarray(steps, dtype=np.float64)
    errors = np.asarray(errors, dtype=np.float64)
    if len(steps) < 2:
        raise ValueError("a learning curve needs at least two points")
    last = steps >= steps.max() * 0.75
    tail = errors[last]
    if len(tail) < 2:  # one point cannot show a curve has stopped moving
        return False, float("nan")
    movement = float(tail.max() - tail.min())
    return movement < tolerance, movement
