"""Confidence intervals for perplexities and their differences: pure numpy + scipy, no model.

Two kinds of uncertainty are kept apart everywhere they are shown:

* **evaluation** — how precisely one model's perplexity is measured on the evaluation text: a t-interval over the
  chunks' mean NLLs (each WikiText-2 chunk is one sample of the model's loss), exponentiated. Chunks are
  consecutive pieces of the same articles, so they are not quite independent; the interval is a guide, and a
  partial evaluation (first k of n chunks) is wider and says so.
* **seeds** — how much the *method* moves when the calibration windows change: a t-interval over the seeds'
  log-perplexities, exponentiated (a geometric mean with a multiplicative interval). With n = 3 seeds the t
  quantile is 4.30, so the interval is wide: that is what three seeds can say.

A difference between two runs evaluated on the same chunks is tested *paired*: a t-interval on the mean of the
per-chunk NLL differences; between two run groups with matching seeds, on the mean of the per-seed differences of
log-perplexity. Two results are **separable** when that interval excludes 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

#: Two-sided confidence level of every interval shown.
CONFIDENCE = 0.95


def _t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, n - 1))


@dataclass(frozen=True)
class Interval:
    """``estimate`` with a two-sided ``confidence`` interval [low, high] from ``n`` samples by ``method``;
    ``low``/``high`` are None when n < 2 (one sample gives no interval)."""

    estimate: float
    low: float | None
    high: float | None
    n: int
    method: str
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Interval":
        return cls(**d)

    def text(self, digits: int = 2) -> str:
        """'42.45 [41.80, 43.11]' or '42.45 (n = 1, no interval)'."""
        if self.low is None:
            return f"{self.estimate:.{digits}f} (n = 1, no interval)"
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def t_interval(values, confidence: float = CONFIDENCE, method: str = "t-interval of the mean") -> Interval:
    """mean ± t_{(1+c)/2, n−1} · s/√n of ``values`` (s: sample standard deviation)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 1 or not np.all(np.isfinite(x)):
        raise ValueError("an interval needs at least one finite value")
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, None, None, 1, method, confidence)
    half = _t_quantile(x.size, confidence) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, int(x.size), method, confidence)


def _exp(i: Interval, method: str) -> Interval:
    return Interval(math.exp(i.estimate), None if i.low is None else math.exp(i.low),
                    None if i.high is None else math.exp(i.high), i.n, method, i.confidence)


def perplexity_over_chunks(chunk_mean_nll, confidence: float = CONFIDENCE) -> Interval:
    """Evaluation interval of a perplexity: exp of the t-interval of the chunks' mean NLLs (nats per token; all
    chunks score the same number of tokens, so exp(mean) is the perplexity itself)."""
    return _exp(t_interval(chunk_mean_nll, confidence),
                f"exp of a {confidence:.0%} t-interval over the chunks' mean NLL")


def perplexity_over_seeds(perplexities, confidence: float = CONFIDENCE) -> Interval:
    """Seed interval of a run group: geometric mean of the seeds' perplexities with exp of the t-interval of their
    logs."""
    return _exp(t_interval(np.log(np.asarray(perplexities, dtype=np.float64)), confidence),
                f"geometric mean; exp of a {confidence:.0%} t-interval over seeds of log-perplexity")


@dataclass(frozen=True)
class Difference:
    """B relative to A as a perplexity ratio B/A (exp of the mean log difference) with its interval; separable
    when the interval excludes 1 (B/A = 1: no difference)."""

    ratio: Interval
    paired_by: str  # "chunks" or "seeds"

    @property
    def separable(self) -> bool:
        return self.ratio.low is not None and (self.ratio.low > 1 or self.ratio.high < 1)

    def text(self) -> str:
        r = self.ratio
        if r.low is None:
            return f"B/A = {r.estimate:.3f}; one {self.paired_by[:-1]} only: no interval, not separable"
        verdict = "separable" if self.separable else "not separable (the interval contains 1)"
        return (f"B/A = {r.estimate:.3f} [{r.low:.3f}, {r.high:.3f}], paired over {r.n} {self.paired_by}: "
                f"{verdict}")


def paired_ratio(a, b, paired_by: str, confidence: float = CONFIDENCE) -> Difference:
    """B/A from paired log-scale values (per-chunk mean NLLs, or per-seed log-perplexities): exp of the
    t-interval of the mean of b − a."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two 1-D arrays of one length; got {a.shape} and {b.shape}")
    return Difference(_exp(t_interval(b - a, confidence), f"exp of a {confidence:.0%} paired t-interval over "
                                                          f"{paired_by}"), paired_by)


def mean_accuracy_stderr(tasks: dict[str, dict]) -> float | None:
    """Standard error of the unweighted mean zero-shot accuracy over T tasks, from lm-eval's per-task standard
    errors (``{task: {"acc_stderr": SE_t, ...}}``): the tasks' documents are disjoint, so their errors are
    independent and SE(mean) = √(Σ_t SE_t²) / T. (Evaluation uncertainty, like ``perplexity_over_chunks``.) None
    where a task has no stderr: the mean's error cannot be stated then."""
    errors = [v.get("acc_stderr") for v in tasks.values()]
    if not errors or any(e is None for e in errors):
        return None
    return float(np.sqrt(np.sum(np.square(errors))) / len(errors))
