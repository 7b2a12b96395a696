"""Run groups on the Compare page: error bars read from the figure, the ranking view, and the Prune page's seed
control — on real tiny-model runs (3 calibration seeds × uniform / OWL), pruned and evaluated in the fixture."""

import numpy as np
import pytest

from pruner.jobs.queue import JobStore, default_db
from pruner.jobs.workflows import Context, PerplexityOptions, PruneRequest, run
from pruner.model.catalogue import ModelSpec
from pruner.runs.groups import group_runs, ranking
from pruner.runs.manifest import list_runs
from pruner.specs import CalibSpec, PruneSpec
from tests.app.test_pages import figures, tiny_app, values

PROTOCOL = "perplexity:wikitext2-test:seq64:first3"


@pytest.fixture(scope="module")
def seeded(tiny_folder, data_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("seeded-cache")
    for allocator, params in (("uniform", {}), ("owl", {"lam": 0.05, "m": 3})):
        for seed in (0, 1, 2):
            spec = PruneSpec(model=ModelSpec(tiny_folder, device="cpu"),
                             calib=CalibSpec(nsamples=4, seqlen=64, seed=seed, data_dir=data_dir),
                             allocator=allocator, allocator_params=params, method="wanda", sparsity=0.6)
            run(PruneRequest(spec, PerplexityOptions(max_chunks=3, seqlen=64), data_dir=data_dir), Context(cache))
    return cache


@pytest.fixture
def app(seeded, tiny_folder, data_dir, monkeypatch):
    return tiny_app(seeded, tiny_folder, data_dir, monkeypatch)


def test_compare_shows_seed_intervals_as_error_bars_and_a_ranking(app, seeded):
    app.switch_page("pages/compare.py").run()
    assert not app.exception, app.exception
    # a random tiny model's perplexity is in the tens of thousands: collapsed, and still drawn unless hidden
    assert not app.checkbox(key="cmp_hide_collapsed").value
    groups = group_runs(list_runs(seeded).runs)
    assert len(groups) == 2 and all(g.seeds == [0, 1, 2] for g in groups)
    fig = figures(app)[0]
    assert fig["layout"]["title"]["text"] == "WikiText-2 perplexity vs sparsity"
    hidden = app.checkbox(key="cmp_hide_collapsed").check().run()
    assert not any(f["layout"]["title"]["text"] == "WikiText-2 perplexity vs sparsity" for f in figures(hidden))
    assert any("No run matches the chart's filters" in c.value for c in hidden.caption)
    app.checkbox(key="cmp_hide_collapsed").uncheck().run()
    # one line per allocator and parameters, at the target sparsity's category, points of one S side by side
    names = {"Uniform": "uniform", "OWL (λ=0.05, M=3)": "owl"}  # in the panel titled "wanda"
    assert sorted(t["name"] for t in fig["data"]) == sorted(names) and fig["layout"]["scattermode"] == "group"
    for trace in fig["data"]:
        group = next(g for g in groups if g.first.allocator == names[trace["name"]])
        assert list(trace["x"]) == ["60%"]
        s = group.summary(PROTOCOL)
        assert s.kind == "seeds"
        np.testing.assert_allclose(values(trace["y"]), [s.perplexity.estimate])
        np.testing.assert_allclose(values(trace["error_y"]["array"]), [s.perplexity.high - s.perplexity.estimate])
        np.testing.assert_allclose(values(trace["error_y"]["arrayminus"]), [s.perplexity.estimate - s.perplexity.low])
    table = app.dataframe[1].value  # the run groups
    assert sorted(table["seeds"]) == [3, 3] and set(table["interval"]) == {"seeds"}
    ranked = app.table[0].value  # the ranking at wanda @ 60% (a static table: its cells wrap)
    expected = ranking(groups, PROTOCOL)
    assert list(ranked["run group"]) == [r.group.label for r in expected]
    verdict = ranked["vs the row above"].iloc[1]
    assert "paired over 3 seeds" in verdict and verdict == expected[1].versus_next.text()
    assert ("not separable" in verdict) == (not expected[1].versus_next.separable)
    # two runs: the two models paired over the chunks, and (when they belong to two groups) the groups over seeds
    a = app.selectbox(key="cmp_a").value
    app.selectbox(key="cmp_b").set_value(next(g for g in groups if a not in {r.key for r in g.runs}).runs[0].key).run()
    caption = next(c.value for c in app.caption if c.value.startswith("Perplexity of run B relative to run A"))
    assert "paired over 3 chunks" in caption and "Their run groups: " in caption and "paired over 3 seeds" in caption


def test_prune_page_queues_one_job_per_seed(app, seeded):
    app.switch_page("pages/prune.py").run()
    app.multiselect(key="grid_allocators").set_value(["uniform"]).run()
    app.multiselect(key="grid_sparsities").set_value([0.5]).run()
    app.number_input(key="grid_seeds").set_value(3).run()
    app.checkbox(key="grid_ppl").uncheck().run()
    assert app.button(key="grid_go").label.startswith("Queue 3 job(s)")
    app.button(key="grid_go").click().run()
    assert any("Queued 3 prune job" in s.value for s in app.success)
    store = JobStore(default_db(seeded))
    for job in store.list():  # the prune jobs and any statistics queued before them
        store.cancel(job.id)
    jobs = store.list()[:3]
    assert sorted(j.request.spec.calib.seed for j in jobs) == [0, 1, 2]
    assert len({j.request.spec.key() for j in jobs}) == 3


def test_compare_queues_a_full_wikitext2_evaluation(app, seeded):
    app.switch_page("pages/compare.py").run()
    key = list_runs(seeded).runs[0].key
    app.multiselect(key="cmp_eval_runs").set_value([key])
    app.checkbox(key="cmp_eval_zs").uncheck()
    app.checkbox(key="cmp_eval_ppl").check()
    next(b for b in app.button if b.label == "Queue evaluations").click().run()
    assert any("Queued 1 evaluation job" in s.value for s in app.success)
    store = JobStore(default_db(seeded))
    job = store.list()[0]
    store.cancel(job.id)
    assert job.label == f"perplexity of run {key}"  # no "(first k chunks)": the whole test set
    assert job.request.perplexity.max_chunks is None and job.request.zeroshot is None
