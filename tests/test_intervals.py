"""Confidence intervals on hand-made numbers with exact expected values."""

import math

import pytest

from pruner.core.intervals import (Interval, mean_accuracy_stderr, paired_ratio, perplexity_over_chunks,
                                   perplexity_over_seeds, t_interval)

T_975_2 = 4.302652729749464  # t quantile 0.975 with 2 degrees of freedom (tables: 4.303)


def test_t_interval_by_hand():
    i = t_interval([1.0, 2.0, 3.0])  # mean 2, s = 1, n = 3
    half = T_975_2 / math.sqrt(3)
    assert i.estimate == 2.0 and i.n == 3
    assert i.low == pytest.approx(2 - half, rel=1e-9) and i.high == pytest.approx(2 + half, rel=1e-9)
    one = t_interval([5.0])
    assert (one.estimate, one.low, one.high, one.n) == (5.0, None, None, 1)
    assert one.text() == "5.00 (n = 1, no interval)"
    with pytest.raises(ValueError, match="at least one finite value"):
        t_interval([])
    with pytest.raises(ValueError, match="at least one finite value"):
        t_interval([1.0, float("nan")])


def test_perplexity_intervals_are_exponentiated_log_intervals():
    # chunks with mean NLL ln 8, ln 10, ln 12.5: perplexity = exp(mean) = 10 (geometric mean of 8, 10, 12.5)
    nll = [math.log(8), math.log(10), math.log(12.5)]
    i = perplexity_over_chunks(nll)
    assert i.estimate == pytest.approx(10.0, rel=1e-12)
    s = math.sqrt(sum((x - math.log(10)) ** 2 for x in nll) / 2)
    assert i.low == pytest.approx(10 * math.exp(-T_975_2 * s / math.sqrt(3)), rel=1e-9)
    assert i.high == pytest.approx(10 * math.exp(T_975_2 * s / math.sqrt(3)), rel=1e-9)
    assert "chunks" in i.method
    seeds = perplexity_over_seeds([8.0, 10.0, 12.5])
    assert (seeds.estimate, seeds.low, seeds.high) == pytest.approx((i.estimate, i.low, i.high), rel=1e-12)
    assert "seeds" in seeds.method
    assert Interval.from_dict(seeds.to_dict()) == seeds


def test_paired_ratio_is_separable_only_when_its_interval_excludes_one():
    a = [1.0, 2.0, 3.0]
    shifted = paired_ratio(a, [1.1, 2.1, 3.1], "seeds")  # every pair differs by exactly 0.1
    assert shifted.ratio.estimate == pytest.approx(math.exp(0.1)) and shifted.separable
    assert shifted.ratio.low == pytest.approx(math.exp(0.1)) and shifted.ratio.high == pytest.approx(math.exp(0.1))
    noisy = paired_ratio(a, [1.2, 1.9, 3.0], "chunks")  # differences 0.2, −0.1, 0: mean 0.0333, s 0.1528
    assert not noisy.separable and noisy.ratio.low < 1 < noisy.ratio.high
    assert noisy.text().endswith("not separable (the interval contains 1)")
    single = paired_ratio([1.0], [2.0], "seeds")
    assert not single.separable and "no interval" in single.text()
    with pytest.raises(ValueError, match="one length"):
        paired_ratio([1.0, 2.0], [1.0], "seeds")


def test_mean_accuracy_stderr_by_hand():
    """Two tasks with standard errors 0.03 and 0.04: SE of their mean = √(0.03² + 0.04²) / 2 = 0.05 / 2 = 0.025;
    one task keeps its own; a task without a stderr makes the mean's unknown."""
    assert mean_accuracy_stderr({"rte": {"acc": 0.5, "acc_stderr": 0.03},
                                 "boolq": {"acc": 0.6, "acc_stderr": 0.04}}) == pytest.approx(0.025, abs=1e-15)
    assert mean_accuracy_stderr({"rte": {"acc": 0.5, "acc_stderr": 0.03}}) == pytest.approx(0.03, abs=1e-15)
    assert mean_accuracy_stderr({"rte": {"acc": 0.5, "acc_stderr": 0.03}, "boolq": {"acc": 0.6}}) is None
    assert mean_accuracy_stderr({}) is None
