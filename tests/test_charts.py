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
