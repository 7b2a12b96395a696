"""Chart details a screenshot caught."""

import math

from pruner.charts import ppl_vs_sparsity_figure


def test_dense_label_on_the_log_perplexity_axis_sits_at_the_dense_line():
    rows = [{"method": "wanda", "allocator": "uniform", "sparsity": s, "ppl": p, "spec": {}}
            for s, p in ((0.5, 42.5), (0.7, 968.2))]
    fig = ppl_vs_sparsity_figure(rows, dense=19.13)
    assert fig.layout.yaxis.type == "log"
    (label,) = [a for a in fig.layout.annotations if a.text == "dense 19.13"]
    # annotation y on a log axis is log10(value); y = 19.13 would stretch the axis to 10^19
    assert label.y == math.log10(19.13) and label.yref == "y"


def test_allocation_specs_keep_every_number_in_the_datasets():
    """Two allocations over 3 blocks of 10 weights: the curves dataset holds sparsity (%) and each block's share of
    the kept weights (%); the band is S ± λ; the specs are identical for another S and λ (only the data moves)."""
    import numpy as np

    from pruner.allocation import Allocation
    from pruner.charts import allocation_comparison_specs

    numel = np.array([10.0, 10.0, 10.0])
    a = [Allocation("uniform", 0.5, {}, np.full(3, 0.5), np.full(3, 0.5), 0.5),
         Allocation("owl", 0.5, {}, np.array([0.4, 0.5, 0.6]), np.array([0.4, 0.5, 0.6]), 0.5)]
    top, bottom = allocation_comparison_specs(a, numel, 0.5, 0.1)
    curves = top["datasets"]["curves"]
    owl = curves[curves["allocator"] == "OWL"]
    assert owl["sparsity"].tolist() == [40.0, 50.0, 60.0]
    # kept 6, 5, 4 of 15 weights
    assert owl["kept"].tolist() == [40.0, round(100 / 3, 4), round(80 / 3, 4)]
    assert top["datasets"]["band"][["low", "high"]].to_numpy().tolist() == [[40.0, 60.0], [40.0, 60.0]]
    assert top["datasets"]["target"]["S"].tolist() == [50.0]
    other_top, other_bottom = allocation_comparison_specs(a, numel, 0.6, None)
    assert other_top["datasets"]["band"].empty
    strip = lambda spec: {k: v for k, v in spec.items() if k != "datasets"}  # noqa: E731
    assert strip(other_top) == strip(top) and strip(other_bottom) == strip(bottom)
    assert top["layer"][2]["encoding"]["color"]["scale"]["domain"] == ["Uniform", "OWL"]
