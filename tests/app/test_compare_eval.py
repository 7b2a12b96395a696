"""The Compare page's zero-shot and speed-up charts on real stored results of a tiny run, and queuing an
evaluation job from the page (a real worker process)."""

import shutil
import time

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from pages._dashboard import NOT_TIMED_NO_AMX
from pruner.evaluate.deepsparse_env import deepsparse_status
from pruner.evaluate.speed_spec import SpeedSpec
from pruner.jobs.queue import JobStore, default_db
from pruner.runs import metrics
from pruner.runs.execute import recover_run
from pruner.runs.manifest import RunManifest
from pruner.store.files import PROJECT_ROOT, read_manifest
from tests.app.test_pages import figures, values
from tests.conftest import share_project_models


@pytest.fixture(scope="module")
def evaluated(speed_timed_run, data_dir, tmp_path_factory):
    """The session's tiny run, its speed measured (DeepSparse where it runs, else the labelled fallback: the
    ``speed_timed_run`` fixture), copied alone into this module's cache and evaluated there: the page charts every
    run of its cache and only the tasks they all share, so nothing else may sit beside it."""
    cache = share_project_models(tmp_path_factory.mktemp("compare-eval-cache"))
    folder = cache / "runs" / speed_timed_run[1].name
    shutil.copytree(speed_timed_run[1], folder)
    metrics.evaluate_perplexity(folder, data_dir, max_chunks=1, seqlen=64)
    metrics.evaluate_zeroshot(folder, data_dir, tasks=["rte", "arc_easy"], limit=2)
    metrics.dense_zeroshot(RunManifest.from_dict(read_manifest(folder)).model_spec(), data_dir, cache, tasks=["rte", "arc_easy"],
                       limit=2)
    # OpenVINO: 8-bit timings where the CPU has AMX, else the one-line reason and no speed-up
    metrics.evaluate_speed(folder, SpeedSpec(seqlen=16), cache, engine="openvino", data_dir=data_dir)
    return cache, folder


@pytest.fixture
def compare(evaluated, tiny_folder, data_dir, monkeypatch):
    monkeypatch.setenv("PRUNER_CACHE_DIR", str(evaluated[0]))
    monkeypatch.setenv("PRUNER_DATA_DIR", data_dir)
    at = AppTest.from_file(str(PROJECT_ROOT / "app.py"), default_timeout=90)
    at.run()
    at.sidebar.radio(key="model_source").set_value("local folder").run()
    at.sidebar.text_input(key="local_path").input(tiny_folder).run()
    at.switch_page("pages/compare.py").run()
    assert not at.exception, at.exception
    return at


def by_title(at, text):
    found = [f for f in figures(at) if text in f["layout"]["title"]["text"]]
    assert found, [f["layout"]["title"]["text"] for f in figures(at)]
    return found[0]


def test_zeroshot_charts_show_the_stored_accuracies(compare, evaluated):
    manifest = read_manifest(evaluated[1])
    stored = manifest["metrics"]["zeroshot:local:limit2"]["tasks"]
    dense = metrics.dense_metrics(RunManifest.from_dict(manifest).model_spec(), evaluated[0])["zeroshot:local:limit2"]["tasks"]
    fig = by_title(compare, "Zero-shot accuracy per task (partial: first 2 documents per task)")
    bars = {t["name"]: values(t["y"]) for t in fig["data"]}
    assert list(fig["data"][0]["x"]) == ["RTE", "ARC-e", "mean"]
    assert bars["dense"][:2].tolist() == [dense["rte"]["acc"] * 100, dense["arc_easy"]["acc"] * 100]
    assert bars[manifest["label"]][:2].tolist() == [stored["rte"]["acc"] * 100, stored["arc_easy"]["acc"] * 100]
    line = by_title(compare, "Mean zero-shot accuracy over 2 task(s) vs sparsity")
    mean = (stored["rte"]["acc"] + stored["arc_easy"]["acc"]) / 2 * 100
    assert values(line["data"][0]["y"]).tolist() == pytest.approx([mean])
    se = (stored["rte"]["acc_stderr"] ** 2 + stored["arc_easy"]["acc_stderr"] ** 2) ** 0.5 / 2 * 100
    assert values(line["data"][0]["error_y"]["array"]).tolist() == pytest.approx([se])
    assert list(line["data"][0]["x"]) == [f"{manifest['spec']['sparsity'] * 100:.4g}%"]
    assert line["layout"]["xaxis"]["title"]["text"] == "target sparsity S"


def test_speed_section_shows_measurements_or_says_why_not(compare, evaluated):
    stored = read_manifest(evaluated[1])["metrics"]
    result = next(v for k, v in stored.items() if k.startswith("speed:") and not k.startswith("speed:openvino"))
    openvino = next(v for k, v in stored.items() if k.startswith("speed:openvino"))
    assert any("end-of-life" in c.value for c in compare.caption)
    table = compare.dataframe[-1].value
    assert sorted(table["engine"]) == sorted([result["engine"], "openvino"])  # both engines' rows, one setting
    row = table[table["engine"] == result["engine"]].iloc[0]
    ov_row = table[table["engine"] == "openvino"].iloc[0]
    if deepsparse_status()["available"]:
        fig = by_title(compare, "speed-up vs sparsity")
        decode = next(t for t in fig["data"] if t["name"].endswith(": decode") and "OpenVINO" not in t["name"])
        assert values(decode["y"]).tolist() == pytest.approx([result["speedup"]["decode"]])
        by_title(compare, "Perplexity vs decode speed-up")
    else:
        assert any("DeepSparse cannot run here" in w.value for w in compare.warning)
    if openvino["amx"]:
        fig = by_title(compare, "OpenVINO 8-bit")
        decode = next(t for t in fig["data"] if t["name"].startswith("OpenVINO") and t["name"].endswith(": decode"))
        assert values(decode["y"]).tolist() == pytest.approx([openvino["speedup"]["decode"]])
        assert ov_row["outputs checked"].startswith("8-bit; packed layers")
    else:  # the reason, in the table and above it; no OpenVINO speed-up anywhere
        assert ov_row["outputs checked"] == NOT_TIMED_NO_AMX and pd.isna(ov_row["decode ×"])
        assert any("has no AMX" in i.value for i in compare.info)
        assert not [t for f in figures(compare) for t in f["data"] if "OpenVINO" in (t.get("name") or "")]
    if not deepsparse_status()["available"] and not openvino["amx"]:
        assert not [f for f in figures(compare) if "speed-up vs sparsity" in f["layout"]["title"]["text"]]
    assert row["dense decode ms"] == pytest.approx(result["graphs"]["decode"]["dense"]["median_ms"], abs=0.01)
    by_round = result["speedup_by_round"]["decode"]
    if by_round:  # dense and pruned took turns: the range of the rounds' decode speed-ups
        assert row["decode × per round"] == f"{min(by_round):.2f}–{max(by_round):.2f}"
        assert any(f"over {SpeedSpec().rounds} rounds" in c.value for c in compare.caption)
    else:  # dense ONNX Runtime timings only
        assert row["decode × per round"] is None


def test_queue_a_zeroshot_evaluation_from_the_page(compare, evaluated):
    key = read_manifest(evaluated[1])["key"]
    compare.multiselect(key="cmp_eval_runs").set_value([key])
    compare.multiselect(key="cmp_eval_tasks").set_value(["winogrande"])
    compare.number_input(key="cmp_eval_limit").set_value(1)
    next(b for b in compare.button if b.label == "Queue evaluations").click().run()
    assert any("Queued 1 evaluation job" in s.value for s in compare.success)
    store = JobStore(default_db(evaluated[0]))
    job = store.list()[0]
    assert job.label == f"zero-shot accuracy (first 1 per task) of run {key}"
    end = time.time() + 240
    while store.get(job.id).state not in ("done", "failed", "cancelled") and time.time() < end:
        time.sleep(0.5)
    assert store.get(job.id).state == "done", store.get(job.id).error
    assert read_manifest(evaluated[1])["metrics"]["zeroshot:local:limit1"]["tasks"]["winogrande"]["n"] == 1
    dense = metrics.dense_metrics(RunManifest.from_dict(read_manifest(evaluated[1])).model_spec(), evaluated[0])
    assert dense["zeroshot:local:limit1"]["tasks"]["winogrande"]["n"] == 1  # the reference came with it


def test_compare_lists_a_lora_recovered_run(compare, evaluated, data_dir):
    """A recovered run has no prune time of its own (it was trained, not pruned): the table shows its training time."""
    from pruner.engine.recover import RecoverSpec

    cache, folder = evaluated
    recovered = read_manifest(recover_run(folder, RecoverSpec(read_manifest(folder)["key"], steps=2, seqlen=32),
                                              data_dir, cache))
    compare.run()
    assert not compare.exception, compare.exception
    table = compare.dataframe[0].value
    row = table[table["run"] == recovered["key"]]
    assert row["method"].item() == "wanda + LoRA"
    assert row["prune / LoRA s"].item() == recovered["timings_s"]["recover"]
