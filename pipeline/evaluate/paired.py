"""Paired comparisons of two arms over repetitions: mean difference, 95% CI, paired t-test,
the smallest difference the repetitions could detect, and convergence by budget doubling.

A gain is only worth stating as the mean of per-repetition paired differences (arm A minus
arm B on the same labeled split and seeds) with its confidence interval; with fewer than
``MIN_REPETITIONS`` pairs no interval is given and callers must not state a direction.
The statistics are scipy's (Student t interval, ``scipy.stats.ttest_rel``, the noncentral t
for power).

Convergence (``doubling_check``): a comparison measured at K steps is called converged when
the same arms at 2K steps moved the baseline by less than ``DOUBLING_TOLERANCE_PP`` and the
paired gain at 2K lies inside the 95% interval of the gain at K.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

MIN_REPETITIONS = 3  # fewer paired repetitions: report the figures, claim nothing
POWER = 0.8  # the power at which the smallest detectable difference is stated
DOUBLING_TOLERANCE_PP = 0.5  # baseline move (points) under which doubling K "changed nothing"


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
    # The smallest true mean difference this many pairs with this spread would detect (two-
    # sided paired t-test at 1 - confidence) with probability POWER; None below MIN_REPETITIONS.
    detectable: float | None = None

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
    lo = hi = p = detectable = None
    if n >= MIN_REPETITIONS:
        if std == 0.0:  # every pair moved by the same amount: the interval is a point
            lo = hi = mean
            p = 1.0 if mean == 0.0 else 0.0
        else:
            sem = std / np.sqrt(n)
            lo, hi = (float(x) for x in stats.t.interval(confidence, n - 1, loc=mean, scale=sem))
            p = float(stats.ttest_rel(a, b).pvalue)
        detectable = detectable_difference(std, n, 1.0 - confidence)
    return PairedDifference(tuple(float(x) for x in d), mean, std, lo, hi, p, confidence,
                            detectable)


def paired_t_power(effect: float, std: float, n: int, alpha: float = 0.05) -> float:
    """Probability that a two-sided paired t-test at ``alpha`` over ``n`` pairs whose
    differences have SD ``std`` rejects 0 when the true mean difference is ``effect``."""
    from scipy import stats

    df = n - 1
    crit = stats.t.ppf(1.0 - alpha / 2.0, df)
    nc = effect / (std / np.sqrt(n))
    power = float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
    if not np.isfinite(power):  # scipy's nct gives NaN far in the tail at large df: normal
        power = float(stats.norm.sf(crit - nc) + stats.norm.cdf(-crit - nc))
    return power


def detectable_difference(std: float, n: int, alpha: float = 0.05,
                          power: float = POWER) -> float:
    """The smallest true mean difference a paired t-test over ``n`` pairs with SD ``std``
    detects with probability ``power`` (scipy's noncentral t, solved with brentq)."""
    from scipy import optimize

    if n < 2:
        raise ValueError("power needs at least two pairs")
    if std == 0.0:
        return 0.0
    hi = std
    while paired_t_power(hi, std, n, alpha) < power:
        hi *= 2.0
    return float(optimize.brentq(lambda e: paired_t_power(e, std, n, alpha) - power, 0.0, hi,
                                 xtol=1e-6))


@dataclass(frozen=True)
class DoublingCheck:
    """Did doubling the budget change the answer? (baseline moved, gain left its interval)"""

    baseline_k: float         # mean error % over the repetitions at K steps
    baseline_2k: float        # the same at 2K
    gain_k: PairedDifference | None   # the comparison at K (None: not run at both)
    gain_2k: PairedDifference | None
    tolerance: float = DOUBLING_TOLERANCE_PP

    @property
    def baseline_moved(self) -> float:
        return self.baseline_2k - self.baseline_k

    @property
    def baseline_converged(self) -> bool:
        return abs(self.baseline_moved) < self.tolerance

    @property
    def gain_stable(self) -> bool | None:
        """Is the gain at 2K inside the 95% interval of the gain at K? None: cannot tell."""
        if self.gain_k is None or self.gain_2k is None or self.gain_k.ci_low is None:
            return None
        return self.gain_k.ci_low <= self.gain_2k.mean <= self.gain_k.ci_high

    @property
    def converged(self) -> bool | None:
        """True when the baseline held and the gain stayed in its interval; False when either
        failed; None when the baseline held but the gain could not be checked."""
        if not self.baseline_converged or self.gain_stable is False:
            return False
        return True if self.gain_stable else None

    def to_dict(self) -> dict:
        return {"baseline_k": self.baseline_k, "baseline_2k": self.baseline_2k,
                "baseline_moved": self.baseline_moved,
                "baseline_converged": self.baseline_converged,
                "gain_k": self.gain_k.to_dict() if self.gain_k else None,
                "gain_2k": self.gain_2k.to_dict() if self.gain_2k else None,
                "gain_stable": self.gain_stable, "converged": self.converged,
                "tolerance": self.tolerance}


def doubling_check(baseline_k: Sequence[float], baseline_2k: Sequence[float],
                   gain_k: PairedDifference | None = None,
                   gain_2k: PairedDifference | None = None) -> DoublingCheck:
    """The doubling rule on error % of the baseline at K and 2K (same repetitions) and,
    when both were run, the paired gain at K and at 2K."""
    if len(baseline_k) == 0 or len(baseline_k) != len(baseline_2k):
        raise ValueError("doubling_check needs the baseline at K and 2K on the same "
                         f"repetitions, got {len(baseline_k)} and {len(baseline_2k)}")
    return DoublingCheck(float(np.mean(baseline_k)), float(np.mean(baseline_2k)), gain_k,
                         gain_2k)
