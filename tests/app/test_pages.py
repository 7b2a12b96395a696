"""AppTest of every page on the bundled model, with cached small statistics and one real pruned run."""

import base64
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from pruner.allocation import ALLOCATORS, allocate, owl
from pruner.engine import artifacts
from pruner.jobs.queue import JobStore, default_db, submit
from pruner.jobs.workflows import Context, LearnRequest
from pruner.model.catalogue import ModelSpec
from pruner.runs import metrics
from pruner.runs.execute import run_prune
from pruner.runs.manifest import read_run, run_folder
from pruner.specs import CalibSpec, PruneSpec, StatsSpec
from pruner.store.files import PROJECT_ROOT
from tests.conftest import copy_measured, share_project_models

LABEL = {"uniform": "Uniform", "owl": "OWL", "owl_inverse": "OWL-inverse", "er": "Erdős–Rényi", "global": "Global",
         "dlp": "DLP", "atp": "ATP"}


@pytest.fixture(scope="module")
def cached(smollm2, smollm2_tiny_stats, data_dir, tmp_path_factory):
    cache = copy_measured(smollm2_tiny_stats, tmp_path_factory.mktemp("app-cache"))
    share_project_models(cache)
    calib = CalibSpec.preset("tiny", data_dir=data_dir)
    stats = artifacts.get_stats(StatsSpec(ModelSpec("smollm2-135m"), calib), cache, loaded=smollm2)
    spec = PruneSpec(model=ModelSpec("smollm2-135m"), calib=calib, allocator="owl", method="wanda", sparsity=0.5)
    folder = run_prune(spec, cache, loaded=smollm2)
    metrics.evaluate_perplexity(folder, data_dir, max_chunks=1, seqlen=128)
    return cache, stats, spec


@pytest.fixture
def app(cached, data_dir, monkeypatch):
    monkeypatch.setenv("PRUNER_CACHE_DIR", str(cached[0]))
    monkeypatch.setenv("PRUNER_DATA_DIR", data_dir)
    at = AppTest.from_file(str(PROJECT_ROOT / "app.py"), default_timeout=90)
    at.run()
    at.sidebar.selectbox(key="calib_preset").select("tiny").run()
    assert not at.exception, at.exception
    return at


def values(v) -> np.ndarray:
    """A trace's data from figure JSON: plotly ≥ 6 encodes numpy arrays as {"dtype", "bdata": base64}."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
    return np.asarray(v, dtype=float)


def figures(at):
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def curves(at) -> dict:
    """The data the Allocation page's live curves (pages/_curves.js) were given on the last run."""
    (component,) = at.get("bidi_component")
    return json.loads(component.proto.json)


def curve(data: dict, name: str) -> np.ndarray:
    """One allocator's per-block sparsities (fractions) from ``curves``."""
    for s in data["series"]:
        if s["name"] == name:
            return np.asarray(s["sparsity"]) / 100
    raise KeyError(name)


def tiny_app(cache, tiny_folder: str, data_dir: str, monkeypatch) -> AppTest:
    """The app on ``cache`` with the tiny Llama folder chosen in the sidebar (tiny calibration preset). The app
    opens on the bundled SmolLM2, so ``cache`` shares the project's converted copy."""
    share_project_models(Path(cache))
    monkeypatch.setenv("PRUNER_CACHE_DIR", str(cache))
    monkeypatch.setenv("PRUNER_DATA_DIR", data_dir)
    at = AppTest.from_file(str(PROJECT_ROOT / "app.py"), default_timeout=90)
    at.run()
    at.sidebar.selectbox(key="calib_preset").select("tiny").run()
    at.sidebar.radio(key="model_source").set_value("local folder").run()
    at.sidebar.text_input(key="local_path").input(tiny_folder).run()
    assert not at.exception, at.exception
    return at


def go(at, page):
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, at.exception
    return at


def test_model_page(app):
    assert [m.value for m in app.metric] == ["30", "106.2 M", "134.5 M"]
    assert "`LlamaForCausalLM` · weights **Q4_1-dequantized**" in app.markdown[0].value
    assert any("Cached: 8 × 128 C4 tokens" in s.value for s in app.success)


def test_outliers_page(app, cached):
    go(app, "outliers")
    lod, heat, dist = figures(app)
    np.testing.assert_allclose(values(lod["data"][0]["y"]) / 100, cached[1].lod(5.0))
    assert len(heat["data"][0]["y"]) == 7 and heat["layout"]["xaxis"]["title"]["text"] == "transformer block"
    assert dist["layout"]["xaxis"]["type"] == "log" and dist["layout"]["shapes"][0]["x0"] == 5.0


def test_allocation_sliders_redraw_as_the_allocators_predict(app, cached):
    stats = cached[1]
    go(app, "allocation")
    fig = curves(app)
    for name, label in LABEL.items():
        expected = allocate(name, stats, 0.7, **ALLOCATORS[name].pick({"lam": 0.08, "m": 5, "alpha": 0.15,
                                                                       "delta": 0.01})).block_sparsity
        np.testing.assert_allclose(curve(fig, label), expected, atol=1e-9)
    # the controls are generated from the allocators' declared parameters, labelled by paper symbol
    # no slider range: a number input (BESA's β, the search's generations, screening, sequential norms, SparseGPT's
    # candidates)
    assert {n.label for n in app.number_input} == {"β (beta)", "G (generations)", "screened (screen)", "sequential",
                                                   "SparseGPT (sparsegpt)"}
    assert {n.label for n in app.slider} >= {"λ (lam)", "M (m)", "ε (epsilon)", "α (alpha)", "δ (delta)"}  # what-if
    app.slider(key="alloc_delta").set_value(0.02).run()  # ATP's curve steepens: s_b = s_0 + 0.02 b
    np.testing.assert_allclose(np.diff(curve(curves(app), "ATP")), 0.02, atol=1e-9)
    app.slider(key="alloc_m").set_value(8.0).run()
    app.slider(key="alloc_lam").set_value(0.12).run()
    after = curve(curves(app), "OWL")
    assert not np.allclose(after, curve(fig, "OWL"))
    assert curves(app)["band"] == pytest.approx([58.0, 82.0])  # S ± λ = 70% ± 12%
    np.testing.assert_allclose(after, owl(stats.lod(8.0), 0.7, 0.12), atol=1e-9)
    assert [b.label for b in app.get("download_button")] == ["Download CSV (per block)", "Download JSON (per block and layer)"]


def test_allocation_besa_is_queued_then_shown_beside_owl(tiny_folder, data_dir, tmp_path, monkeypatch):
    """On the tiny Llama (4 blocks, so learning takes a second): the page offers to learn BESA, queues the job,
    and once the allocation is learned shows it, on request, as a heatmap beside OWL's on one colour scale."""
    calib = CalibSpec.preset("tiny", data_dir=data_dir)
    spec = StatsSpec(ModelSpec(tiny_folder), calib)
    stats = artifacts.get_stats(spec, tmp_path)
    at = tiny_app(tmp_path, tiny_folder, data_dir, monkeypatch)
    go(at, "allocation")
    assert any("BESA (learned) has not been learned for S = 70%" in i.value for i in at.info)
    next(b for b in at.button if b.label == "Learn BESA (learned) at S = 70% in the background").click().run()
    store = JobStore(default_db(tmp_path))
    job = store.list()[0]
    request = job.request
    assert job.kind == "learn" and (request.allocator, request.sparsity, request.params) == ("besa", 0.7, {"beta": 50.0})
    assert job.label.startswith("BESA (learned) sparsities at S = 70% (β=50) of ")
    store.cancel(job.id)  # the queue works; learn it here instead, with the same workflow the worker runs
    from pruner.jobs.workflows import Context, run

    run(request, Context(tmp_path))
    learned = artifacts.cached_learned(spec, "besa", 0.7, {"beta": 50.0}, tmp_path)
    at.run()
    assert not at.exception, at.exception
    assert not [f for f in figures(at) if f["data"][0]["type"] == "heatmap"]  # drawn on request (slider speed)
    at.toggle(key="alloc_heatmaps").set_value(True).run()
    owl_heat, besa_heat = [f for f in figures(at) if f["data"][0]["type"] == "heatmap"]
    assert owl_heat["layout"]["title"]["text"].startswith("OWL: sparsity per layer")
    z = values(besa_heat["data"][0]["z"]).reshape(7, 4)  # (layers, blocks), in %
    np.testing.assert_allclose(z.T.ravel() / 100, learned["layer_sparsity"], atol=1e-9)
    owl_z = values(owl_heat["data"][0]["z"]).reshape(7, 4)
    np.testing.assert_allclose(owl_z / 100, np.repeat(allocate("owl", stats, 0.7).block_sparsity[None], 7, 0), atol=1e-9)
    assert owl_heat["data"][0]["zmin"] == besa_heat["data"][0]["zmin"]  # one colour scale for both
    np.testing.assert_allclose(curve(curves(at), "BESA (learned)"), 0.7, atol=1e-9)  # each block's mean is S
    assert any("lower)" in c.value for c in at.caption)


def test_allocation_too_wide_lambda_is_moved_to_the_valid_end_and_said_so(app):
    """At S = 95% the default λ = 0.08 is already too wide (OWL-inverse would pass 100%): the slider ends at the last
    valid step, a wider λ is moved there with a caption, and OWL's curve is drawn (it was a "too wide" warning and
    no OWL curve while the slider still offered 0 … 0.49)."""
    go(app, "allocation")
    app.slider(key="alloc_lam").set_value(0.2).run()  # valid at 70%
    app.slider(key="alloc_S").set_value(0.95).run()
    end = app.slider(key="alloc_lam").max
    assert 0 < end < 0.05 and app.slider(key="alloc_lam").value == end
    assert f"λ (lam) moved from 0.2 to {end:g}: the valid end for the current settings" in [c.value for c in app.caption]
    names = {s["name"] for s in curves(app)["series"]}
    assert {"OWL", "OWL-inverse", "Uniform"} <= names and not app.warning, [w.value for w in app.warning]


def test_allocation_prefills_prune(app):
    go(app, "allocation")
    assert app.selectbox(key="alloc_to_prune_which").value == "owl"  # the page's subject, not all eight curves
    app.button(key="alloc_to_prune").click().run()  # "Prune with this allocation"
    assert not app.exception
    assert app.session_state["prune_prefill"]["sparsity"] == 0.7
    assert app.session_state["prune_prefill"]["allocators"] == ["owl", "uniform"]
    assert app.multiselect(key="grid_allocators").value == ["owl", "uniform"]
    assert "Prune" in app.title[0].value


def test_prune_page_queues_jobs_and_lists_runs(app, cached, monkeypatch):
    go(app, "prune")
    assert any("wanda + owl" in m.value for m in app.markdown)  # the finished run, with a download button
    assert any(b.label.startswith("Download zip (") for b in app.get("download_button"))
    app.multiselect(key="grid_methods").set_value(["wanda", "admm"]).run()
    assert {"iterations", "ρ (rho)"} <= {n.label for n in app.number_input}  # ADMM's own parameters
    app.multiselect(key="grid_methods").set_value(["wanda"]).run()
    app.multiselect[0].set_value(["uniform"])
    app.multiselect[2].set_value([0.6])
    app.checkbox[0].uncheck()
    app.checkbox(key="grid_stream").check().run()
    assert any(c.value.startswith("Planned peak memory per job: wanda ") for c in app.caption)
    assert app.checkbox(key="grid_offload").disabled  # the model runs on CPU here: nothing to offload to
    app.button(key="grid_go").click().run()
    assert any("Queued 1 prune job" in s.value for s in app.success)
    assert any(re.fullmatch(r"1 (running|queued)( · \d+ (done|cancelled))*", c.value) for c in app.caption), \
        [c.value for c in app.caption]  # the jobs' totals above the list
    store = JobStore(default_db(cached[0]))
    job = store.list()[0]
    n_jobs = len(store.list())
    app.button(key="grid_go").click().run()  # a second click while the job is queued or running adds nothing
    assert any(f"Already queued or running: job(s) #{job.id}" in i.value for i in app.info), [i.value for i in app.info]
    assert len(store.list()) == n_jobs
    assert job.label == "wanda + uniform @ 60%" and job.request.spec.sparsity == 0.6 and job.request.stream
    store.cancel(job.id)  # stop the real worker soon
    end = time.time() + 120
    while store.get(job.id).state not in ("done", "failed", "cancelled") and time.time() < end:
        time.sleep(0.5)
    assert store.get(job.id).state in ("done", "cancelled")
    app.button(key=f"rec-{cached[2].key()}").click().run()  # the stored run, with a 1-chunk perplexity
    assert any("Queued the LoRA recovery of" in s.value for s in app.success)
    rec = next(j for j in store.list() if j.kind == "recover")
    assert rec.label == f"LoRA recovery (r=8, 100 steps) of run {cached[2].key()}" and rec.request.perplexity.max_chunks == 1
    store.cancel(rec.id)
    # a job over the memory allowed is announced before it is queued (workers are already running: they keep
    # the environment they started with)
    monkeypatch.setenv("PRUNER_MEMORY_LIMIT", "100MiB")
    app.run()
    assert any("will be refused" in w.value and "allowed" in w.value for w in app.warning)


def test_compare_page(app, cached):
    go(app, "compare")
    table = app.dataframe[0].value
    assert cached[2].key() in set(table["run"])
    figs = figures(app)
    assert figs[0]["layout"]["yaxis"]["type"] == "log"
    assert "Per-block sparsity of two runs" in figs[-1]["layout"]["title"]["text"]


def test_compare_offers_the_dense_baseline_and_draws_it(app, cached, data_dir):
    """No dense perplexity under the runs' protocol: Compare offers to compute it as a job; once computed (the
    job's own request, run here) the chart draws it as a line and the caption gives its value."""
    from pruner.jobs.workflows import run

    go(app, "compare")
    assert app.button(key="cmp_dense")  # offered
    app.button(key="cmp_dense").click().run()
    store = JobStore(default_db(cached[0]))
    job = next(j for j in store.list() if j.kind == "dense")
    store.cancel(job.id)  # run here instead of waiting for the worker
    request = job.request
    assert (request.perplexity.max_chunks, request.perplexity.seqlen) == (1, 128) and request.model.name == "smollm2-135m"
    dense_file = metrics._dense_metrics_path(request.model, cached[0])
    try:
        result = run(request, Context(cached[0]))
        app.run()
        assert not app.exception, app.exception
        chart = figures(app)[0]
        assert any(s.get("y0") == result["perplexity"] for s in chart["layout"].get("shapes", [])), chart["layout"]
        assert any(f"perplexity {result['perplexity']:,.3f} under this protocol" in c.value for c in app.caption)
    finally:
        dense_file.unlink(missing_ok=True)  # the module's other tests read the cache as it was


def test_compare_and_prune_pages_name_a_corrupt_run_and_show_the_rest(app, cached):
    import shutil

    bad = cached[0] / "runs" / "00000000000000dd"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"key": "00000000000000dd", "spec": {')  # truncated mid-write
    try:
        go(app, "compare")
        assert any("Skipped run 00000000000000dd: run 00000000000000dd: manifest.json is not valid JSON" in w.value
                   for w in app.warning)
        assert cached[2].key() in set(app.dataframe[0].value["run"])  # the good run is still there
        go(app, "prune")
        assert any("Skipped run 00000000000000dd" in w.value for w in app.warning)
    finally:
        shutil.rmtree(bad)


def test_learn_page(app, cached):
    go(app, "learn")
    # distribution, LOD, allocation, and (no damage table here) the measured runs' perplexity against S
    assert len(app.get("latex")) >= 3 and len(figures(app)) == 4
    assert any("2λ = 16%" in m.value for m in app.markdown)
    # the text says what the chart shows: OWL's most and least pruned blocks, 2λ apart
    owl = allocate("owl", cached[1], 0.7, lam=0.08, m=5.0)
    assert any(f"block {int(np.argmax(owl.block_sparsity))} at {owl.block_sparsity.max():.1%}" in m.value
               for m in app.markdown)
    measured = figures(app)[-1]
    assert measured["layout"]["yaxis"]["type"] == "log" and any("owl" in d["name"].lower() for d in measured["data"])


def test_a_registered_allocator_and_method_get_page_controls(app, cached):
    """One registry line each (tests/toy_registry.py) and the Allocation and Prune pages show their parameters,
    labelled by paper symbol, and build specs with them."""
    from tests.toy_registry import registered, tilt

    with registered():
        go(app, "allocation")
        assert "γ (gamma)" in {n.label for n in app.number_input}  # declared without a slider range
        app.number_input(key="alloc_gamma").set_value(0.1).run()
        assert not app.exception, app.exception
        np.testing.assert_allclose(curve(curves(app), "Toy tilt"), tilt(30, 0.7, 0.1), atol=1e-9)
        go(app, "prune")
        app.multiselect(key="grid_allocators").set_value(["toy_tilt"]).run()
        app.multiselect(key="grid_methods").set_value(["toy_power"]).run()
        assert {"γ (gamma)", "p (power)"} <= {n.label for n in app.number_input}
        app.number_input(key="grid_power").set_value(3.0).run()
        app.checkbox(key="grid_ppl").uncheck().run()
        app.button(key="grid_go").click().run()
        assert not app.exception, app.exception
        assert any("Queued 1 prune job" in s.value for s in app.success)
        store = JobStore(default_db(cached[0]))
        job = store.list()[0]
        store.cancel(job.id)  # a worker process does not have the toy entries registered
        assert job.payload["spec"]["allocator_params"] == {"gamma": 0.05}
        assert job.payload["spec"]["method_params"] == {"power": 3.0}


def test_allocation_predicts_each_curve_once_the_predictor_is_built(tiny_folder, data_dir, tmp_path, monkeypatch):
    """On the tiny Llama: the page offers to build the damage table around its S, queues it as a job; once built,
    every shown curve has its predicted perplexity (the table's own prediction of that allocation) and OWL a (λ, M) map with
    its lowest point marked."""
    from pruner.predictor.cache import cached_table
    from pruner.predictor.table import PredictorSpec

    calib = CalibSpec.preset("tiny", data_dir=data_dir)
    spec = StatsSpec(ModelSpec(tiny_folder), calib)
    stats = artifacts.get_stats(spec, tmp_path)
    at = tiny_app(tmp_path, tiny_folder, data_dir, monkeypatch)
    go(at, "allocation")
    at.button(key="alloc_predictor_build").click().run()
    store = JobStore(default_db(tmp_path))
    job = next(j for j in store.list() if j.kind == "predictor")
    assert job.label.startswith("perplexity predictor of ") and "around S = 70%" in job.label
    assert job.request.spec == PredictorSpec(spec, around=0.7)  # the table around the page's S
    store.cancel(job.id)  # the queue works; build it here with the workflow the worker runs
    from pruner.jobs.workflows import Context, run

    run(job.request, Context(tmp_path))
    table = cached_table(PredictorSpec(spec, around=0.7), tmp_path)
    at.run()
    assert not at.exception, at.exception
    shown = at.dataframe[-1].value
    for name in ("uniform", "owl", "dlp", "atp"):
        label = ALLOCATORS[name].label
        expected = table.predict(allocate(name, stats, 0.7).block_sparsity).perplexity
        got = float(shown.loc[shown["allocator"] == label, "predicted perplexity"].iloc[0])
        assert got == pytest.approx(expected, rel=1e-9), name
    heat = next(f for f in figures(at)
                if f["layout"].get("title", {}).get("text", "").startswith("OWL at S = 70%: predicted"))
    grid = values(heat["data"][0]["customdata"]).reshape(6, 11) if isinstance(heat["data"][0]["customdata"], dict) \
        else np.asarray(heat["data"][0]["customdata"], dtype=float)
    star = heat["data"][1]
    assert float(star["text"][0]) == pytest.approx(np.nanmin(grid), abs=0.05)
    # the Compare page puts measured runs against the same table's predictions
    for name in ("uniform", "owl", "atp"):
        folder = run_prune(PruneSpec(model=ModelSpec(tiny_folder), calib=calib, allocator=name, method="wanda",
                                          sparsity=0.7), tmp_path)
        metrics.evaluate_perplexity(folder, data_dir, max_chunks=1, seqlen=64)
    go(at, "compare")
    scatter = next(f for f in figures(at) if f["layout"].get("title", {}).get("text") == "Measured vs predicted perplexity")
    points = scatter["data"][0]
    expected = sorted(table.predict(allocate(n, stats, 0.7).block_sparsity).perplexity for n in ("uniform", "owl", "atp"))
    np.testing.assert_allclose(sorted(values(points["x"])), expected, rtol=1e-9)
    assert any("Spearman rank correlation per target sparsity: 70%: " in c.value and "(3 runs)" in c.value
               for c in at.caption)
    # back on the Allocation page: the measured runs join the predictions; "verify" queues the prune of another
    go(at, "allocation")
    shown = at.dataframe[-1].value
    for name in ("uniform", "owl", "atp"):
        folder = run_folder(PruneSpec(model=ModelSpec(tiny_folder), calib=calib, allocator=name, method="wanda",
                                           sparsity=0.7).key(), tmp_path)
        row = shown.loc[shown["allocator"] == ALLOCATORS[name].label].iloc[0]
        assert row["measured perplexity"] == pytest.approx(read_run(folder).latest_perplexity()["perplexity"])
        assert row["measured on"].startswith("test, first 1 of")
    assert shown.loc[shown["allocator"] == ALLOCATORS["dlp"].label, "measured on"].iloc[0] == "not yet"
    at.selectbox(key="alloc_verify_pick").set_value("dlp").run()
    at.button(key="alloc_verify").click().run()
    job = store.list()[0]
    store.cancel(job.id)
    assert job.kind == "prune" and job.request.spec.allocator == "dlp" and job.request.spec.sparsity == 0.7
    assert job.request.perplexity.max_chunks == 8 and job.request.spec.method == "wanda"
    # the Learn page explains the predictor next to this model's live numbers
    go(at, "learn")
    text = " ".join(m.value for m in at.markdown)
    uniform_predicted = table.predict(allocate("uniform", stats, 0.7).block_sparsity).perplexity
    assert f"is predicted {uniform_predicted:.1f}" in text and "independently" in text
    assert f"γ₊ = {table.gamma[0]:.3f}, γ₋ = {table.gamma[1]:.3f}" in text  # the table's own compounding fit


def test_a_run_without_weights_lists_its_numbers_but_offers_no_download_or_evaluation(app, cached):
    """A run whose weights were dropped after evaluation (pruner.runs.manifest.drop_weights) keeps its place on the Prune
    and Compare pages with its perplexity; the download, LoRA and evaluation controls are not offered for it."""
    path = run_folder(cached[2].key(), cached[0]) / "manifest.json"
    original = path.read_text()
    label = json.loads(original)["label"]
    go(app, "compare")
    assert any(o.startswith(label) for o in app.multiselect(key="cmp_eval_runs").options)  # offered while it has them
    path.write_text(json.dumps({**json.loads(original), "weights_dropped": {"when": "now", "bytes": 1}}))
    try:
        go(app, "prune")
        assert any("wanda + owl" in m.value and "ppl " in m.value for m in app.markdown)
        assert not any(b.label.startswith("Download zip") for b in app.get("download_button"))
        assert f"rec-{cached[2].key()}" not in {b.key for b in app.button}
        assert any("weights dropped after evaluation" in c.value for c in app.caption)
        go(app, "compare")
        assert cached[2].key() in set(app.dataframe[0].value["run"])
        assert not any(o.startswith(label) for o in app.multiselect(key="cmp_eval_runs").options)
    finally:
        path.write_text(original)


def test_corrupt_statistics_are_named_and_removed_on_request(cached, data_dir, tmp_path, monkeypatch):
    """Statistics cut short in the cache: the Model page names them instead of failing, and its button removes
    them, after which the page offers to compute them again (a copy of the module's cache: the others keep theirs)."""
    import shutil

    cache = share_project_models(tmp_path / "cache")
    shutil.copytree(cached[0] / "stats", cache / "stats")
    (folder,) = (cache / "stats").iterdir()
    (folder / "stats.npz").write_bytes((folder / "stats.npz").read_bytes()[:1000])
    monkeypatch.setenv("PRUNER_CACHE_DIR", str(cache))
    monkeypatch.setenv("PRUNER_DATA_DIR", data_dir)
    at = AppTest.from_file(str(PROJECT_ROOT / "app.py"), default_timeout=90)
    at.run()
    at.sidebar.selectbox(key="calib_preset").select("tiny").run()
    assert not at.exception, at.exception
    assert any(f"cached statistics {folder} cannot be used" in e.value for e in at.error)
    at.button(key="remove_corrupt_stats").click().run()
    assert not at.exception, at.exception
    assert not folder.exists() and any("Not computed yet" in i.value for i in at.info)


def test_sliders_follow_s_to_their_valid_ends_and_keep_their_values(app):
    """λ's valid range shrinks as S grows (OWL-inverse shown). A value beyond the new end is moved to it, with a
    caption; at S = 90% the default λ = 0.08 is itself invalid and the range ends below it; back at 70% the values
    stay where they were. Before: the slider kept its old range at 90% (an error instead of curves), and a slider
    whose ends moved started again at its low end (λ read 0, M 1) with no word."""
    go(app, "allocation")
    app.slider(key="alloc_lam").set_value(0.2).run()
    app.slider(key="alloc_S").set_value(0.8).run()
    lam = app.slider(key="alloc_lam")
    assert lam.value == lam.max < 0.2 and not app.exception and not app.error
    assert f"λ (lam) moved from 0.2 to {lam.value:g}: the valid end for the current settings" in [
        c.value for c in app.caption]
    app.slider(key="alloc_S").set_value(0.9).run()
    lam = app.slider(key="alloc_lam")
    assert lam.value == lam.max < 0.08 and not app.exception and not app.error, [e.value for e in app.error]
    kept = lam.value
    app.slider(key="alloc_S").set_value(0.7).run()
    assert app.slider(key="alloc_lam").value == kept and app.slider(key="alloc_lam").max > 0.2
    assert app.slider(key="alloc_m").value == 5.0 and not app.exception and not app.error
    assert not any("moved from" in c.value for c in app.caption)


def test_a_slider_range_ends_on_its_outermost_valid_steps():
    """pages._dashboard.valid_slider_range on a hand-made validity: λ's declared 0 … 0.49 in steps of 0.01."""
    from pages._dashboard import valid_slider_range
    from pruner.allocation import LAMBDA

    assert valid_slider_range(LAMBDA, lambda v: v < 0.225) == (0.0, 0.22)  # OWL at S = 70% with OWL-inverse shown
    assert valid_slider_range(LAMBDA, lambda v: 0.03 < v < 0.3) == (0.04, 0.29)
    assert valid_slider_range(LAMBDA, lambda v: True) == (0.0, 0.49)
    assert valid_slider_range(LAMBDA, lambda v: v > 0.5) == (0.0, 0.49)  # nothing valid: the declared range
    # the default (0.08) invalid: the interval around the valid step nearest to it (OWL's λ at S = 90% with
    # OWL-inverse shown: 0 … 0.07), on either side of it
    assert valid_slider_range(LAMBDA, lambda v: v < 0.075) == (0.0, 0.07)
    assert valid_slider_range(LAMBDA, lambda v: 0.195 < v < 0.305) == (0.2, 0.3)

def test_the_search_caption_counts_refits_and_new_parents_apart():
    """pages._search.search_caption on a hand-made history of three generations: the first child refitted became
    the parent, the second refitted lost under its own prune (SmolLM2's SparseGPT search on seed 0, generation 2),
    the third beat nobody. The caption said "2 new parents refitted" for this."""
    from pages._search import search_caption

    history = [{"measured": 4, "proposed": 16, "refitted": True, "replaced": True, "forward_tokens": 100_000},
               {"measured": 4, "proposed": 16, "refitted": True, "replaced": False, "forward_tokens": 120_000},
               {"measured": 4, "proposed": 15, "refitted": False, "replaced": False, "forward_tokens": 123_584}]
    state = {"history": history, "seeds": {"atp": {"fitness": 1.92}, "chosen": "atp"}, "pairs": []}
    text = search_caption(state, {"screen": 0, "sequential": 1, "sparsegpt": 1})
    assert text.startswith("12 of 47 children measured on calibration text (chosen at random: screening off), "
                           "123,584 tokens scored in all.")
    assert "Started from ATP, the best of the seeds" in text
    assert ("Children pruned by SparseGPT from the Hessians of the parent's sequential SparseGPT prune: 2 children "
            "that beat the parent refitted, each a calibration pass; 1 of them still beat it under their own prune "
            "and became the parent") in text
    wanda = search_caption({**state, "history": history[:1]}, {"screen": 1, "sequential": 1, "sparsegpt": 0})
    assert "(the damage table chose them)" in wanda
    assert "Masks from the parent's sequential Wanda prune: 1 child that beat the parent refitted" in wanda
    assert search_caption(state, {"screen": 0}).endswith("Masks from the dense model's input norms (one-shot).")



def test_allocation_shows_a_search_running_and_finished(tiny_folder, data_dir, tmp_path, monkeypatch):
    """On the tiny Llama: a finished search's curve is its learned allocation and its fitness chart has one point per
    generation; with only its last saved generation left (a running or stopped search), the page draws that
    generation's best allocation and says which generation it is."""
    import shutil

    from pruner.engine.artifacts import learn_allocation, learned_key
    from pruner.predictor.search import saved_search
    from pruner.store.layout import CacheLayout

    spec = StatsSpec(ModelSpec(tiny_folder), CalibSpec.preset("tiny", data_dir=data_dir))
    params = {"reach": 0.15, "generations": 3, "screen": 0}
    result = learn_allocation(spec, "search", 0.7, params, tmp_path)
    at = tiny_app(tmp_path, tiny_folder, data_dir, monkeypatch)
    go(at, "allocation")
    # the page opens at the default G = 40: the search learned with G = 3 is named, and a button sets the controls
    assert at.number_input(key="alloc_generations").value == 40
    row = "r=0.15, G=3, screened=0, sequential=0, SparseGPT=0 — learned"
    assert row in [m.value for m in at.markdown], [m.value for m in at.markdown]
    at.button(key="alloc_other_search_0").click().run()
    assert not at.exception, at.exception
    assert at.number_input(key="alloc_generations").value == 3 and row not in [m.value for m in at.markdown]
    np.testing.assert_allclose(curve(curves(at), "Search (evolutionary)"), result["block_sparsity"], atol=1e-9)
    (fitness,) = [f for f in figures(at) if f["layout"]["title"]["text"].startswith("Search: KL divergence")]
    best = next(t for t in fitness["data"] if t["name"].startswith("best"))
    np.testing.assert_allclose(values(best["y"]), [result["seeds"][result["seeds"]["chosen"]]["fitness"]]
                               + [h["best"] for h in result["history"]])
    # the learned entry gone, the checkpoint left: what a running search looks like
    shutil.rmtree(CacheLayout.at(tmp_path).learned(learned_key(spec, "search", 0.7, params)))
    saved = saved_search(spec, 0.7, params, tmp_path)
    assert saved["state"]["generation"] == 3
    at.run()
    assert not at.exception, at.exception
    assert any(c.value.startswith("Generation 3 of 3 saved") for c in at.caption)
    assert any("Masks from the dense model's input norms (one-shot)" in c.value for c in at.caption)  # sequential 0
    np.testing.assert_allclose(curve(curves(at), "Search (evolutionary)"),
                               np.asarray(saved["state"]["units"]) * 0.01, atol=1e-9)
    # from the defaults again: the stopped search, and a queued one with other parameters, each named
    store = JobStore(default_db(tmp_path))
    job = submit(store, LearnRequest(spec, "search", 0.7, {**params, "generations": 2}), start_worker=False)
    at.number_input(key="alloc_generations").set_value(40).run()
    assert not at.exception, at.exception
    rows = [m.value for m in at.markdown if " — " in m.value]
    assert "r=0.15, G=3, screened=0, sequential=0, SparseGPT=0 — stopped at generation 3 of 3 (resumes when learned again)" in rows
    assert any(r.startswith(f"r=0.15, G=2, screened=0, sequential=0, SparseGPT=0 — queued: job #{job}")
               or r.startswith(f"r=0.15, G=2, screened=0, sequential=0, SparseGPT=0 — running: job #{job}") for r in rows), rows
    # the queued job's own parameters: the page says it is under way instead of offering to learn it again
    at.number_input(key="alloc_generations").set_value(2).run()
    store.cancel(job)  # the page's job list started a worker for it
    assert any(f"with these parameters is queued (job #{job}," in i.value
               or f"with these parameters is running (job #{job}," in i.value for i in at.info), [i.value for i in at.info]
    assert not any(b.key == "alloc_learn_search" for b in at.button)
