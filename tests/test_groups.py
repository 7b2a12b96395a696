"""Run groups and comparisons on hand-made manifests with exact expected values."""

import math

import pytest

from pruner.runs.groups import compare, group_runs, perplexity_metrics, perplexity_result, ranking
from pruner.runs.manifest import RunManifest

METRIC = "perplexity:wikitext2-test:seq2048"


def run(allocator: str, seed: int, ppl: float, chunk_nll=None, metric=METRIC):
    result = {"perplexity": ppl, "partial": False, "chunks": 3, "chunks_total": 3}
    if chunk_nll is not None:
        result["chunk_mean_nll"] = chunk_nll
    return RunManifest.from_dict({
        "key": f"{allocator}{seed}", "label": f"wanda + {allocator} @ 70%", "created": f"2026-12-01T00:00:0{seed}",
        "spec": {"model": {"name": "m"}, "calib": {"dataset": "c4", "nsamples": 32, "seqlen": 512, "seed": seed},
                 "allocator": allocator, "allocator_params": {}, "method": "wanda", "method_params": {},
                 "sparsity": 0.7, "nm": None, "scope": "row", "format": 2},
        "achieved": {"overall": 0.7, "block": [0.7]}, "metrics": {metric: result}})


def test_groups_by_everything_but_the_seed_with_a_seed_interval():
    runs = [run("owl", 1, 10.0), run("uniform", 0, 20.0), run("owl", 0, 8.0), run("owl", 2, 12.5)]
    owl, uniform = group_runs(runs)
    assert owl.seeds == [0, 1, 2] and uniform.seeds == [0]
    s = owl.summary(METRIC)
    assert s.kind == "seeds" and s.by_seed == {0: 8.0, 1: 10.0, 2: 12.5}
    assert s.perplexity.estimate == pytest.approx(10.0)  # geometric mean of 8, 10, 12.5
    assert s.perplexity.low < 8.0 and s.perplexity.high > 12.5  # t with 2 degrees of freedom is wide
    assert s.text().endswith("(95%, over 3 seeds)")
    one = uniform.summary(METRIC)
    assert one.kind == "evaluation" and one.perplexity.low is None  # an old result without per-chunk losses
    assert owl.summary("perplexity:other") is None
    assert perplexity_metrics(runs) == [METRIC]


def test_compare_pairs_by_seed_then_by_chunk():
    a = group_runs([run("uniform", s, p) for s, p in ((0, 20.0), (1, 22.0), (2, 21.0))])[0]
    b = group_runs([run("owl", s, p) for s, p in ((0, 10.0), (1, 11.0), (2, 10.5))])[0]  # exactly half, each seed
    d = compare(a, b, METRIC)
    assert d.paired_by == "seeds" and d.ratio.estimate == pytest.approx(0.5) and d.separable
    assert d.ratio.low == pytest.approx(0.5) and d.ratio.high == pytest.approx(0.5)
    c = group_runs([run("uniform", 0, math.e, [0.9, 1.0, 1.1])])[0]
    e = group_runs([run("owl", 0, math.e, [1.0, 0.9, 1.1])])[0]  # the same mean, chunks move apart
    d = compare(c, e, METRIC)
    assert d.paired_by == "chunks" and d.ratio.estimate == pytest.approx(1.0) and not d.separable
    assert compare(c, group_runs([run("er", 0, 3.0)])[0], METRIC) is None  # no per-chunk losses on one side


def test_ranking_marks_results_that_cannot_be_told_apart():
    groups = group_runs([run("uniform", s, p) for s, p in ((0, 20.0), (1, 22.0), (2, 21.0))]
                        + [run("owl", s, p) for s, p in ((0, 10.0), (1, 11.0), (2, 10.5))]
                        + [run("er", s, p) for s, p in ((0, 18.0), (1, 22.0), (2, 21.0))])
    ranks = ranking(groups, METRIC)
    assert [r.group.first.allocator for r in ranks] == ["owl", "er", "uniform"]
    assert ranks[0].versus_next is None
    assert ranks[1].versus_next.separable  # ER vs OWL: about twice, every seed
    assert not ranks[2].versus_next.separable  # uniform vs ER: within the seeds' spread


def test_quick_protocol_taken_from_a_longer_evaluation():
    """Runs evaluated on all 3 chunks answer "first 2" from their first two chunk NLLs: per seed exp(mean), and
    the group pairs by seed as if they had been evaluated on 2 chunks."""
    quick = METRIC + ":first2"
    nll = {0: [math.log(4), math.log(16), 9.0], 1: [math.log(2), math.log(8), 9.0]}  # first two: 8 and 4
    runs = [run("owl", s, 99.0, nll[s]) for s in (0, 1)]
    (owl,) = group_runs(runs)
    r = perplexity_result(runs[0].metrics, quick)
    assert r["perplexity"] == pytest.approx(8.0) and r["chunks"] == 2 and r["partial"]
    assert r["derived_from"] == f"{METRIC} (its first 2 of 3 chunks)" and r["chunk_mean_nll"] == nll[0][:2]
    assert owl.summary(quick).by_seed == pytest.approx({0: 8.0, 1: 4.0}) and owl.summary(quick).partial
    assert perplexity_result(runs[0].metrics, METRIC + ":first3") is None  # not more than was scored
    assert perplexity_result(runs[0].metrics, METRIC + ":first1")["perplexity"] == pytest.approx(4.0)
    assert perplexity_result(runs[0].metrics, "perplexity:wikitext2-test:seq64:first2") is None  # other window
    assert perplexity_result(runs[0].metrics, METRIC) is runs[0].metrics[METRIC]
