"""pipeline.evaluate.paired: paired differences, their t interval and test, and the convergence rule."""

import math

import pytest

from pipeline.evaluate.paired import MIN_REPETITIONS, learning_curve_settled, paired_difference


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


def test_learning_curve_settled_reads_the_last_quarter():
    steps = [128 * k for k in range(1, 9)]  # 128 .. 1024: last quarter is 768, 896, 1024
    falling = [60, 50, 45, 40, 37, 34, 32, 30]
    assert learning_curve_settled(steps, falling) == (False, 4.0)
    flat_end = [60, 50, 45, 40, 37, 30.2, 30.0, 30.4]
    ok, moved = learning_curve_settled(steps, flat_end)
    assert ok and moved == pytest.approx(0.4)
    # A big drop just before the last quarter does not count against it.
    assert learning_curve_settled(steps, [60, 50, 45, 40, 37, 30.2, 30.1, 30.0])[0]
    assert not learning_curve_settled(steps, flat_end, tolerance=0.3)[0]
    # Points at 50 and 100 only: one point in the last quarter cannot show a flat curve.
    ok, moved = learning_curve_settled([50, 100], [40.0, 39.9])
    assert not ok and math.isnan(moved)
