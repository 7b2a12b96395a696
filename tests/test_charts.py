"""Chart details a screenshot caught."""

import math

import pytest

from pruner.allocation import ALLOCATORS
from pruner.charts import (ALLOCATOR_COLORS, accuracy_vs_sparsity_figure, ppl_vs_sparsity_figure, speedup_vs_sparsity_figure,
                           zeroshot_tasks_figure)


def test_dense_label_on_the_log_perplexity_axis_sits_at_the_dense_line():
    rows = [{"method": "wanda", "allocator": "uniform", "sparsity": s, "ppl": p, "spec": {}}
            for s, p in ((0.5, 42.5), (0.7, 968.2))]
    fig = ppl_vs_sparsity_figure(rows, dense=19.13)
    assert fig.layout.yaxis.type == "log"
    (label,) = [a for a in fig.layout.annotations if a.text == "dense 19.13"]
    # annotation y on a log axis is log10(value); y = 19.13 would stretch the axis to 10^19
    assert label.y == math.log10(19.13) and label.yref == "y"



def test_the_search_chart_names_its_seeds_in_the_legend_at_their_kl():
    """The seeds' KL was drawn as horizontal lines with a text annotation each: on the log axis the text sat at 10^KL
    (uniform's 3.47 at ~2,900), stretching the axis three decades above the curves."""
    from pruner.charts import search_progress_figure

    history = [{"generation": g, "best": b, "median": m} for g, b, m in ((1, 2.47, 2.6), (2, 2.45, 2.55))]
    seeds = {"uniform": {"fitness": 3.4658}, "atp": {"fitness": 2.643}, "predicted": {"fitness": 2.4769},
             "chosen": "predicted"}
    fig = search_progress_figure(history, seeds)
    assert fig.layout.yaxis.type == "log" and not fig.layout.annotations and not fig.layout.shapes
    lines = {t.name: list(t.y) for t in fig.data if t.name.startswith("seed: ")}
    assert lines == {"seed: Uniform (3.466)": [3.4658] * 2, "seed: ATP (2.643)": [2.643] * 2,
                     "seed: Predictor-optimal (2.477)": [2.4769] * 2}
    assert all(list(t.x) == [0, 2] for t in fig.data if t.name.startswith("seed: "))  # across the generations
    assert max(y for t in fig.data for y in t.y) == 3.4658  # nothing drawn above the worst seed
    assert not [t for t in fig.data if t.name == "their parent (stage 1)"]  # a history saved before it was measured


def test_the_search_chart_draws_the_children_s_parent_on_their_windows():
    """The children's median (stage 1) was drawn against the parent's stage-2 KL, on other windows: the median could
    sit below the parent's line though no child beat it. The parent's stage-1 KL is drawn where the history has it."""
    from pruner.charts import search_progress_figure

    history = [{"generation": 1, "best": 2.47, "median": 2.3, "parent_first": 2.2},
               {"generation": 2, "best": 2.45, "median": 2.31, "parent_first": 2.2},
               {"generation": 3, "best": 2.45, "median": 2.25, "parent_first": 2.18}]
    fig = search_progress_figure(history, {"atp": {"fitness": 2.5}, "chosen": "atp"})
    parent = [t for t in fig.data if t.name == "their parent (stage 1)"]
    assert len(parent) == 1 and list(parent[0].x) == [1, 2, 3] and list(parent[0].y) == [2.2, 2.2, 2.18]
    assert parent[0].line.shape == "hv"  # a parent's value holds until the next one


def test_allocation_curves_data_by_hand():
    """Two blocks of 100 and 300 weights: OWL at 25% and 75% keeps 75 of each, so each block holds 50% of the kept
    weights; uniform at 50% keeps 50 and 150 (25%, 75%). Sparsities in percent, the band S ± λ in percent."""
    import numpy as np

    from pruner.allocation import Allocation
    from pruner.charts import ALLOCATOR_COLORS, allocation_curves_data

    numel = np.array([100.0, 300.0])
    allocs = [Allocation("uniform", 0.5, {}, np.array([0.5, 0.5]), np.array([0.5, 0.5]), 0.5),
              Allocation("owl", 0.5, {}, np.array([0.25, 0.75]), np.array([0.25, 0.75]), 0.5)]
    data = allocation_curves_data(allocs, numel, 0.5, 0.25)
    owl, uni = data["series"]  # uniform, the reference, is drawn last (on top), thick and dashed
    assert (uni["key"], uni["dash"], uni["width"]) == ("uniform", "8 5", 3) and "dash" not in owl
    assert (owl["key"], owl["name"], owl["color"]) == ("owl", "OWL", ALLOCATOR_COLORS["owl"])
    assert owl["sparsity"] == [25.0, 75.0] and owl["kept"] == [50.0, 50.0]
    assert uni["sparsity"] == [50.0, 50.0] and uni["kept"] == [25.0, 75.0]
    assert data["band"] == [25.0, 75.0] and data["blocks"] == 2
    assert data["title"] == "Per-block sparsity at target S = 50%"
    assert allocation_curves_data(allocs, numel, 0.5, None)["band"] is None


def test_settings_of_one_allocator_are_separate_lines_side_by_side_at_their_target():
    """Two OWL settings at 70% (achieved 1e-5 points apart) and uniform at 50% and 70%: three lines, x the target
    sparsity as categories in numeric order, points of one S grouped side by side, achieved sparsity in the hover."""
    rows = [{"method": "wanda", "allocator": "owl", "parameters": "λ=0.08, M=5", "target": 0.7, "sparsity": 0.700004,
             "ppl": 700.0, "ppl_low": 600.0, "ppl_high": 800.0},
            {"method": "wanda", "allocator": "owl", "parameters": "λ=0.15, M=14.3", "target": 0.7,
             "sparsity": 0.699996, "ppl": 650.0},
            {"method": "wanda", "allocator": "uniform", "parameters": "", "target": 0.7, "sparsity": 0.7003,
             "ppl": 1000.0},
            {"method": "wanda", "allocator": "uniform", "parameters": "", "target": 0.5, "sparsity": 0.5, "ppl": 42.0}]
    fig = ppl_vs_sparsity_figure(rows, dense=None)
    by_name = {t.name: t for t in fig.data}
    assert sorted(by_name) == ["OWL (λ=0.08, M=5)", "OWL (λ=0.15, M=14.3)", "Uniform"]
    assert list(by_name["Uniform"].x) == ["50%", "70%"] and list(by_name["Uniform"].y) == [42.0, 1000.0]
    assert list(by_name["OWL (λ=0.08, M=5)"].x) == ["70%"]
    assert list(fig.layout.xaxis.categoryarray) == ["50%", "70%"] and fig.layout.xaxis.type == "category"
    assert fig.layout.scattermode == "group"
    # two settings of one allocator: its colour, told apart by dash and marker
    first, second = by_name["OWL (λ=0.08, M=5)"], by_name["OWL (λ=0.15, M=14.3)"]
    assert first.line.color == second.line.color == ALLOCATOR_COLORS["owl"] != by_name["Uniform"].line.color
    assert (first.line.dash, first.marker.symbol) != (second.line.dash, second.marker.symbol)
    owl = by_name["OWL (λ=0.08, M=5)"]
    assert list(owl.error_y.array) == [100.0] and list(owl.error_y.arrayminus) == [100.0]
    assert owl.customdata[0][0] == 0.700004 * 100 and owl.customdata[0][1] == " [600.0, 800.0]"
    assert "achieved %{customdata[0]:.4f}%" in owl.hovertemplate


def test_each_method_gets_a_panel_and_each_allocator_one_colour_and_one_legend_entry():
    """Wanda and SparseGPT runs of uniform and OWL: two panels sharing the log y axis; a setting is drawn in both
    panels in one colour, listed once in the legend; the method is named in the hover."""
    rows = [{"method": m, "allocator": a, "parameters": p, "target": S, "sparsity": S, "ppl": v}
            for m in ("wanda", "sparsegpt") for a, p in (("uniform", ""), ("owl", "λ=0.08, M=5"))
            for S, v in ((0.5, 40.0), (0.7, 900.0))]
    fig = ppl_vs_sparsity_figure(rows, dense=19.13)
    assert [a.text for a in fig.layout.annotations if a.text in ("wanda", "sparsegpt")] == ["sparsegpt", "wanda"]
    assert len(fig.data) == 4
    panels = {(t.name, t.xaxis) for t in fig.data}
    assert panels == {("Uniform", "x"), ("OWL (λ=0.08, M=5)", "x"), ("Uniform", "x2"), ("OWL (λ=0.08, M=5)", "x2")}
    assert sorted(t.name for t in fig.data if t.showlegend) == ["OWL (λ=0.08, M=5)", "Uniform"]
    for name in ("Uniform", "OWL (λ=0.08, M=5)"):
        assert len({t.line.color for t in fig.data if t.name == name}) == 1
    assert fig.layout.yaxis2.matches == "y" and fig.layout.yaxis2.type == fig.layout.yaxis.type == "log"
    assert {t.hovertemplate.split(" + ")[0] for t in fig.data} == {"wanda", "sparsegpt"}
    assert list(fig.layout.xaxis2.categoryarray) == ["50%", "70%"]


def test_setting_label_puts_parameters_inside_a_label_that_ends_in_a_bracket():
    assert ALLOCATORS["besa"].setting_label("β=50") == "BESA (learned, β=50)"
    assert ALLOCATORS["owl"].setting_label("λ=0.08, M=5") == "OWL (λ=0.08, M=5)"
    assert ALLOCATORS["uniform"].setting_label("") == "Uniform" == ALLOCATORS["uniform"].setting_label(None)


def test_accuracy_and_speed_charts_place_runs_at_their_target_sparsity():
    """Mean accuracy and speed-up against target S as categories (achieved sparsity in the hover), the mean's
    standard error as error bars; a row without one gets no bar."""
    rows = [{"method": "wanda", "allocator": "owl", "parameters": "λ=0.08, M=5", "target": 0.7, "sparsity": 0.700004,
             "mean_acc": 0.40, "mean_acc_stderr": 0.025, "decode": 1.5, "prefill": 1.2, "ideal": 2.0},
            {"method": "wanda", "allocator": "owl", "parameters": "λ=0.08, M=5", "target": 0.5, "sparsity": 0.5000002,
             "mean_acc": 0.45, "mean_acc_stderr": 0.02, "decode": 1.1, "prefill": 1.0, "ideal": 1.6},
            {"method": "wanda", "allocator": "besa", "parameters": "β=50", "target": 0.7, "sparsity": 0.6999,
             "mean_acc": 0.41, "mean_acc_stderr": None, "decode": 1.4, "prefill": 1.1, "ideal": 2.0}]
    acc = accuracy_vs_sparsity_figure(rows, dense=0.5, n_tasks=2)
    by_name = {t.name: t for t in acc.data}
    assert sorted(by_name) == ["BESA (learned, β=50)", "OWL (λ=0.08, M=5)"]  # in the panel titled "wanda"
    assert [a.text for a in acc.layout.annotations if a.text == "wanda"] == ["wanda"]
    owl = by_name["OWL (λ=0.08, M=5)"]
    assert list(owl.x) == ["50%", "70%"] and list(owl.y) == [45.0, 40.0]
    assert list(owl.error_y.array) == [2.0, 2.5] and owl.customdata[1][0] == 0.700004 * 100
    assert by_name["BESA (learned, β=50)"].error_y.array is None
    assert list(acc.layout.xaxis.categoryarray) == ["50%", "70%"] and acc.layout.xaxis.type == "category"
    speed = speedup_vs_sparsity_figure(rows)
    decode = {t.name: t for t in speed.data}["wanda + OWL (λ=0.08, M=5): decode"]
    assert list(decode.x) == ["50%", "70%"] and list(decode.y) == [1.1, 1.5]
    ideal = {t.name: t for t in speed.data}["ideal decode (estimate from weights removed)"]
    assert list(ideal.x) == ["50%", "70%"] and list(ideal.y) == [1.6, 2.0]
    assert list(speed.layout.xaxis.categoryarray) == ["50%", "70%"]


def test_speed_chart_draws_both_engines_in_the_allocators_colour_and_the_engines_style():
    rows = [{"method": "wanda", "allocator": "owl", "parameters": "λ=0.08, M=5", "target": 0.7, "sparsity": 0.7,
             "decode": d, "prefill": p, "engine": e} for e, d, p in (("deepsparse", 1.5, 1.2), ("openvino", 1.3, 1.0))]
    traces = {t.name: t for t in speedup_vs_sparsity_figure(rows).data}
    ds, ov = traces["DeepSparse: wanda + OWL (λ=0.08, M=5): decode"], traces["OpenVINO 8-bit: wanda + OWL (λ=0.08, M=5): decode"]
    assert list(ds.y) == [1.5] and list(ov.y) == [1.3]
    assert ds.line.color == ov.line.color == ALLOCATOR_COLORS["owl"]
    assert (ds.line.dash, ov.line.dash) == ("solid", "dot") and ov.marker.symbol == "diamond"
    assert list(traces["OpenVINO 8-bit: wanda + OWL (λ=0.08, M=5): prefill"].y) == [1.0]
    assert speedup_vs_sparsity_figure(rows).layout.title.text.startswith("DeepSparse and OpenVINO 8-bit speed-up")
    # one engine alone: the legend names no engine, the title names it
    alone = speedup_vs_sparsity_figure(rows[1:])
    assert "wanda + OWL (λ=0.08, M=5): decode" in {t.name for t in alone.data}
    assert alone.layout.title.text.startswith("OpenVINO 8-bit speed-up")


def test_per_task_chart_gives_the_mean_its_standard_error():
    entries = [{"label": "dense", "tasks": {"rte": {"acc": 0.5, "acc_stderr": 0.03},
                                            "boolq": {"acc": 0.6, "acc_stderr": 0.04}}}]
    bar = zeroshot_tasks_figure(entries, {"rte": "RTE", "boolq": "BoolQ"}).data[0]
    assert list(bar.x) == ["RTE", "BoolQ", "mean"] and list(bar.y) == pytest.approx([50.0, 60.0, 55.0])
    assert list(bar.error_y.array) == pytest.approx([3.0, 4.0, 2.5])


def test_every_chart_draws_an_allocator_in_its_one_colour():
    """Learn's allocation chart, the Allocation page's curves, Compare's perplexity, speed-up, trade-off and two-run
    charts: uniform and OWL have the same colour in each (uniform was light blue on Learn and grey on Allocation)."""
    import numpy as np

    from pruner.allocation import Allocation
    from pruner.charts import allocation_curves_data, allocation_figure, ppl_vs_speedup_figure

    allocs = [Allocation("uniform", 0.5, {}, np.array([0.5, 0.5]), np.array([0.5, 0.5]), 0.5),
              Allocation("owl", 0.5, {}, np.array([0.25, 0.75]), np.array([0.25, 0.75]), 0.5)]
    rows = [{"method": "wanda", "allocator": a, "target": 0.5, "sparsity": 0.5, "ppl": 20.0, "decode": 1.2,
             "prefill": 1.1} for a in ("uniform", "owl")]
    seen = {"uniform": set(), "owl": set()}
    for s in allocation_curves_data(allocs, np.array([1.0, 1.0]), 0.5, None)["series"]:
        seen[s["key"]].add(s["color"])
    for name, fig in (("learn", allocation_figure(allocs, 0.5)), ("ppl", ppl_vs_sparsity_figure(rows, None)),
                      ("speed", speedup_vs_sparsity_figure(rows)), ("trade-off", ppl_vs_speedup_figure(rows, None))):
        for trace in fig.data:
            key = "uniform" if "Uniform" in trace.name else "owl" if "OWL" in trace.name else None
            if key:
                seen[key].add(trace.line.color if trace.mode and "lines" in trace.mode else trace.marker.color)
    # Compare's two runs side by side (run A uniform, run B OWL): each in its allocator's colour, B dashed
    from types import SimpleNamespace

    from pruner.charts import two_runs_figure

    runs = [SimpleNamespace(allocator=a.allocator, label=f"wanda + {a.allocator} @ 50%",
                            achieved_block=a.block_sparsity, allocation={"block_sparsity": a.block_sparsity.tolist()}) for a in allocs]
    for trace in two_runs_figure(*runs).data:
        key = "uniform" if "uniform" in trace.name else "owl"
        seen[key].add(trace.line.color if trace.mode == "lines" else trace.marker.color)
    assert seen == {"uniform": {ALLOCATOR_COLORS["uniform"]}, "owl": {ALLOCATOR_COLORS["owl"]}}, seen


def test_the_distribution_axes_show_powers_of_ten_and_end_where_the_data_end():
    """Three bins hold weights, the last of eight bins none: only held bins are drawn (the x axis ended at 10⁶
    while the data ended near 10³), and both log axes label powers of ten (plotly wrote 0.0001 % as "100µ")."""
    import numpy as np

    from pruner.charts import distribution_figure

    edges = 10.0 ** np.arange(-2, 6)  # 8 edges: 8 bins up to 10⁵ and the overflow count
    counts = np.array([0, 5, 90, 5, 0, 0, 0, 0, 0])
    fig = distribution_figure(edges, counts, 5.0, 0.05, "t")
    bar = fig.data[0]
    np.testing.assert_allclose(bar.y, [5.0, 90.0, 5.0])
    assert max(bar.x) < 10 and fig.layout.xaxis.exponentformat == fig.layout.yaxis.exponentformat == "power"
    assert fig.layout.xaxis.range[1] == pytest.approx(1.1)  # the last held bin ends at 10¹ (+0.1 decade)
    (note,) = fig.layout.annotations  # the share above M, at M (log10 on a log axis), inside the axis
    assert note.x == pytest.approx(np.log10(5.0)) and fig.layout.xaxis.range[0] < note.x < fig.layout.xaxis.range[1]


def test_a_perplexity_protocol_in_words():
    from pruner.runs.metrics import protocol_label, protocol_options

    assert protocol_label("perplexity:wikitext2-test:seq2048:first8") == ("WikiText-2 test, 2048-token windows, "
                                                                          "first 8 chunks (partial)")
    assert protocol_label("perplexity:wikitext2-test:seq128") == "WikiText-2 test, 128-token windows, all chunks"
    assert protocol_options("perplexity:wikitext2-test:seq64:first3") == (64, 3)
    with pytest.raises(ValueError, match="not a perplexity protocol"):
        protocol_options("zeroshot:local:all")


def test_two_flat_runs_are_drawn_on_a_readable_axis():
    """Uniform at 70% allocated and 69.97% achieved: the axis spans ±5 points, not the 0.03 points between them."""
    import types

    import numpy as np

    from pruner.charts import MIN_HALF_SPAN, two_runs_figure

    run = types.SimpleNamespace(allocation={"block_sparsity": [0.7] * 4}, achieved_block=[0.6997] * 4,
                                label="wanda + uniform @ 70%", allocator="uniform")
    fig = two_runs_figure(run, run)
    low, high = fig.layout.yaxis.range
    assert high - low == pytest.approx(2 * MIN_HALF_SPAN) and low < 69.97 and high > 70
    owl = types.SimpleNamespace(allocation={"block_sparsity": list(np.linspace(0.6, 0.8, 4))},
                                achieved_block=list(np.linspace(0.6, 0.8, 4)), label="wanda + owl @ 70%",
                                allocator="owl")
    assert two_runs_figure(run, owl).layout.yaxis.range is None  # a spread allocation keeps plotly's own range
