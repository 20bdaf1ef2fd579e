"""pipeline.evaluate.paired: paired differences, their t interval and test, power, and the
convergence rule (doubling)."""

import math

import numpy as np
import pytest

from pipeline.evaluate.paired import (
    MIN_REPETITIONS,
    POWER,
    detectable_difference,
    doubling_check,
    paired_difference,
    paired_t_power,
)


def test_paired_difference_matches_a_hand_computation():
    a, b = [70.0, 72.0, 75.0], [68.0, 71.0, 71.0]  # diffs 2, 1, 4
    d = paired_difference(a, b)
    assert d.diffs == (2.0, 1.0, 4.0) and d.n == 3 and d.mean == pytest.approx(7 / 3)
    std = math.sqrt(((2 - 7 / 3) ** 2 + (1 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert d.std == pytest.approx(std)
    half = 4.302653 * std / math.sqrt(3)  # t(0.975, df=2)
    assert d.ci_low == pytest.approx(7 / 3 - half, abs=1e-5)
    assert d.ci_high == pytest.approx(7 / 3 + half, abs=1e-5)
    # Paired t = mean / (std / sqrt(n)); two-sided p for df=2 is 1 - t / sqrt(2 + t^2).
    t = (7 / 3) / (std / math.sqrt(3))
    assert d.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-6)
    assert d.direction == "unclear"  # the interval includes 0 (-1.46 .. 6.13)
    assert d.ci_low < 0 < d.ci_high


def test_direction_needs_enough_pairs_and_an_interval_clear_of_zero():
    assert MIN_REPETITIONS == 3
    two = paired_difference([80.0, 81.0], [70.0, 70.5])
    assert two.ci_low is None and two.p_value is None and two.direction == "unclear"
    up = paired_difference([80.0, 81.0, 82.0], [70.0, 70.5, 71.0])
    assert up.direction == "positive" and up.ci_low > 0
    down = paired_difference([70.0, 70.5, 71.0], [80.0, 81.0, 82.0])
    assert down.direction == "negative" and down.ci_high < 0
    same = paired_difference([71.0, 72.0, 73.0], [70.0, 71.0, 72.0])  # every diff is +1
    assert same.ci_low == same.ci_high == 1.0 and same.direction == "positive"
    with pytest.raises(ValueError, match="NaN"):
        paired_difference([1.0, float("nan"), 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference([1.0, 2.0], [1.0])


def test_detectable_difference_has_the_stated_power_by_simulation():
    """At the detectable difference, a paired t-test over n pairs rejects 0 80% of the time
    (checked by simulation), and it shrinks with more pairs and grows with the spread."""
    from scipy import stats

    n, sd = 5, 1.3
    mde = detectable_difference(sd, n)
    assert paired_t_power(mde, sd, n) == pytest.approx(POWER, abs=1e-6)
    rng = np.random.default_rng(0)
    d = rng.normal(mde, sd, size=(20000, n))
    p = stats.ttest_1samp(d, 0.0, axis=1).pvalue
    assert (p < 0.05).mean() == pytest.approx(0.8, abs=0.015)
    # Normal approximation for many pairs: (z_0.975 + z_0.8) sd / sqrt(n).
    assert detectable_difference(sd, 400) == pytest.approx(2.8016 * sd / 20, rel=0.01)
    assert detectable_difference(sd, 10) < mde < detectable_difference(2 * sd, n)
    assert paired_difference([1.0, 2.0, 4.0, 3.0, 5.0], [0.0] * 5).detectable == \
        pytest.approx(detectable_difference(float(np.std([1, 2, 4, 3, 5], ddof=1)), 5))
    assert paired_difference([1.0, 2.0], [0.0, 0.0]).detectable is None


def test_doubling_rule():
    """Converged: the baseline moved < 0.5 points from K to 2K and the gain at 2K lies inside
    the 95% interval of the gain at K."""
    gain_k = paired_difference([1.0, 2.0, 1.5, 0.5, 2.5], [0.0] * 5)  # mean 1.5, CI ~0.5..2.5
    inside = paired_difference([1.2, 1.8, 1.4, 1.0, 2.1], [0.0] * 5)
    outside = paired_difference([4.0, 4.5, 3.8, 4.2, 4.4], [0.0] * 5)
    ok = doubling_check([30.0, 31.0], [29.8, 30.9], gain_k, inside)
    assert ok.baseline_converged and ok.gain_stable and ok.converged
    assert ok.baseline_moved == pytest.approx(-0.15)
    moved = doubling_check([30.0, 31.0], [29.0, 30.0], gain_k, inside)
    assert not moved.baseline_converged and not moved.converged
    left = doubling_check([30.0, 31.0], [29.8, 30.9], gain_k, outside)
    assert left.gain_stable is False and not left.converged
    alone = doubling_check([30.0], [30.2])  # no gain measured: cannot say more than that
    assert alone.gain_stable is None and alone.baseline_converged and alone.converged is None
    assert doubling_check([30.0], [31.0]).converged is False
    with pytest.raises(ValueError, match="same"):
        doubling_check([30.0, 31.0], [30.0])
