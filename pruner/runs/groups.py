"""Run groups: the runs of one spec that differ only in the calibration seed, summarised with intervals, and
comparisons that say whether two results can be told apart.

A perplexity is compared only with perplexities of the same protocol (the metric name says it: dataset, window,
full or first k chunks). A group's perplexity is the geometric mean over its seeds with a seed interval; a group
of one run carries its evaluation interval instead (over chunks). ``compare`` pairs by seed when both groups have
two or more seeds in common, else by chunk when both are single runs evaluated on the same chunks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from pruner.core.intervals import Difference, Interval, paired_ratio, perplexity_over_chunks, perplexity_over_seeds
from pruner.runs.manifest import RunManifest
from pruner.store.formats import stable_hash


def group_identity(run: RunManifest) -> dict:
    """The run's identity without its calibration seed (and without a LoRA recovery's own seed offset)."""
    spec = dict(run.spec)
    spec["calib"] = {k: v for k, v in spec["calib"].items() if k != "seed"}
    return spec


def seed_of(run: RunManifest) -> int:
    return int(run.spec["calib"]["seed"])


@dataclass(frozen=True)
class GroupSummary:
    """One group's perplexity under one protocol: per seed, and the summary with its interval and its kind."""

    perplexity: Interval  # seeds: geometric mean and seed interval; one seed: that run's evaluation interval
    kind: str  # "seeds" or "evaluation"
    by_seed: dict  # seed → perplexity
    partial: bool

    def text(self) -> str:
        what = (f"over {len(self.by_seed)} seeds" if self.kind == "seeds" else
                f"evaluation interval over {self.perplexity.n} chunks")
        return f"{self.perplexity.text()} ({self.perplexity.confidence:.0%}, {what}{', partial' if self.partial else ''})"


@dataclass(frozen=True)
class RunGroup:
    key: str
    runs: tuple  # RunManifest, by seed

    @property
    def first(self) -> RunManifest:
        return self.runs[0]

    @property
    def label(self) -> str:
        """The runs' label without their seed (they share everything else)."""
        return self.first.label

    @property
    def seeds(self) -> list[int]:
        return [seed_of(r) for r in self.runs]

    def run_of_seed(self, seed: int) -> RunManifest:
        return next(r for r in self.runs if seed_of(r) == seed)

    def results(self, metric: str) -> dict:
        """seed → the perplexity result under ``metric``, stored or derived from a longer evaluation
        (``perplexity_result``); runs without one are left out."""
        results = {seed_of(r): perplexity_result(r.metrics, metric) for r in self.runs}
        return {s: r for s, r in results.items() if r is not None}

    def summary(self, metric: str) -> GroupSummary | None:
        results = self.results(metric)
        if not results:
            return None
        by_seed = {s: r["perplexity"] for s, r in sorted(results.items())}
        partial = any(r["partial"] for r in results.values())
        if len(results) >= 2:
            return GroupSummary(perplexity_over_seeds(list(by_seed.values())), "seeds", by_seed, partial)
        (only,) = results.values()
        nll = only.get("chunk_mean_nll")
        interval = (perplexity_over_chunks(nll) if nll else
                    Interval(only["perplexity"], None, None, 1, "no per-chunk losses stored (older result)"))
        return GroupSummary(interval, "evaluation", by_seed, partial)


def first_chunks(result: dict, k: int, name: str) -> dict:
    """The perplexity over the first ``k`` chunks, taken from a stored ``result`` (named ``name``) over more chunks
    of the same text and window: every chunk is scored on its own, so its mean NLL is the same in both
    evaluations, and the perplexity over the first k is exp of the mean of their mean NLLs (all chunks score
    seqlen − 1 tokens). ``seconds`` is the parent's share (k of its chunks), ``derived_from`` names the parent.
    Needs no weights: a run whose weights were dropped after a full evaluation still gets its quick-protocol
    number."""
    nll = result.get("chunk_mean_nll") or []
    if not 1 <= k <= len(nll):
        raise ValueError(f"the first {k} chunks need a result that kept at least {k} per-chunk NLLs; "
                         f"{name} kept {len(nll)}")
    first = [float(v) for v in nll[:k]]
    share = k / len(nll)
    derived = {**result, "perplexity": math.exp(sum(first) / k), "chunks": k,
               "partial": k < result.get("chunks_total", len(nll)), "chunk_mean_nll": first,
               "interval": perplexity_over_chunks(first).to_dict(), "derived_from": f"{name} (its first {k} of "
                                                                                   f"{len(nll)} chunks)"}
    if "tokens_scored" in result:  # every chunk scores seqlen − 1 tokens
        derived["tokens_scored"] = result["tokens_scored"] // len(nll) * k
    if "seconds" in result:
        derived["seconds"] = round(result["seconds"] * share, 2)
    return derived


def perplexity_result(metrics: dict, name: str) -> dict | None:
    """A run's perplexity result under the protocol ``name``: the stored one, or for "…:firstK" one derived from a
    stored result of the same dataset and window over more chunks (``first_chunks``), or None."""
    if name in metrics:
        return metrics[name]
    found = re.fullmatch(r"(perplexity:.+):first(\d+)", name)
    if not found:
        return None
    base, k = found[1], int(found[2])
    longer = [(len(r.get("chunk_mean_nll") or []), n, r) for n, r in metrics.items()
              if (n == base or n.startswith(base + ":first")) and len(r.get("chunk_mean_nll") or []) > k]
    if not longer:
        return None
    _, n, r = min(longer, key=lambda t: t[0])
    return first_chunks(r, k, n)


def group_runs(runs) -> list[RunGroup]:
    """The runs grouped by everything but the calibration seed, in the order of their first appearance."""
    groups: dict[str, list] = {}
    for run in runs:
        groups.setdefault(stable_hash(group_identity(run)), []).append(run)
    return [RunGroup(k, tuple(sorted(rs, key=seed_of))) for k, rs in groups.items()]


def perplexity_metrics(runs) -> list[str]:
    """The perplexity protocols (metric names) these runs were evaluated under, most common first."""
    counts: dict[str, int] = {}
    for r in runs:
        for name in r.metric_names("perplexity"):
            counts[name] = counts.get(name, 0) + 1
    return sorted(counts, key=lambda n: (-counts[n], n))


def compare(a: RunGroup, b: RunGroup, metric: str) -> Difference | None:
    """B relative to A under one protocol, paired by seed (≥ 2 shared seeds) or by chunk (single runs on the same
    chunks); None when neither pairing is possible (e.g. one seed each and no stored per-chunk losses)."""
    ra, rb = a.results(metric), b.results(metric)
    shared = sorted(set(ra) & set(rb))
    if len(shared) >= 2:
        return paired_ratio(np.log([ra[s]["perplexity"] for s in shared]),
                            np.log([rb[s]["perplexity"] for s in shared]), "seeds")
    if len(ra) == 1 and len(rb) == 1:
        (x,), (y,) = ra.values(), rb.values()
        if x.get("chunk_mean_nll") and y.get("chunk_mean_nll") and len(x["chunk_mean_nll"]) == len(y["chunk_mean_nll"]):
            return paired_ratio(x["chunk_mean_nll"], y["chunk_mean_nll"], "chunks")
    return None


@dataclass(frozen=True)
class Rank:
    group: RunGroup
    summary: GroupSummary
    versus_next: Difference | None  # this group against the next-better one (None for the best)


def ranking(groups, metric: str) -> list[Rank]:
    """Groups with a result under ``metric``, best (lowest perplexity) first; each compared with the one ranked
    just above it, so a run of "not separable" marks results that cannot be told apart."""
    scored = [(g, g.summary(metric)) for g in groups]
    scored = sorted([(g, s) for g, s in scored if s is not None], key=lambda gs: gs[1].perplexity.estimate)
    return [Rank(g, s, None if i == 0 else compare(scored[i - 1][0], g, metric)) for i, (g, s) in enumerate(scored)]
