"""AppTest of the minimal dashboard on the bundled model with cached small statistics."""

import base64
import json

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from pruner import api
from pruner.allocation import owl
from pruner.specs import CalibSpec, ModelSpec, StatsSpec
from pruner.store import PROJECT_ROOT


@pytest.fixture(scope="module")
def cached(smollm2, data_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("app-cache")
    spec = StatsSpec(ModelSpec("smollm2-135m"), CalibSpec.preset("tiny", data_dir=data_dir))
    stats = api.get_stats(spec, cache, loaded=smollm2)
    return cache, stats


@pytest.fixture
def app(cached, data_dir, monkeypatch):
    monkeypatch.setenv("PRUNER_CACHE_DIR", str(cached[0]))
    monkeypatch.setenv("PRUNER_DATA_DIR", data_dir)
    at = AppTest.from_file(str(PROJECT_ROOT / "app.py"), default_timeout=60)
    at.run()
    at.sidebar.selectbox[1].select("tiny").run()
    assert not at.exception, at.exception
    return at


def values(v) -> np.ndarray:
    """A trace's data from figure JSON: plotly ≥ 6 encodes numpy arrays as {"dtype", "bdata": base64}."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
    return np.asarray(v, dtype=float)


def figures(at):
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def owl_trace(at):
    alloc = figures(at)[1]
    return values(next(t["y"] for t in alloc["data"] if t["name"] == "OWL")) / 100


def test_page_renders_lod_and_owl(app, cached):
    stats = cached[1]
    lod_fig, alloc_fig = figures(app)
    np.testing.assert_allclose(values(lod_fig["data"][0]["y"]) / 100, stats.lod(5.0))
    assert lod_fig["layout"]["yaxis"]["title"]["text"] == "outlier ratio (%)"
    np.testing.assert_allclose(owl_trace(app), owl(stats.lod(5.0), 0.7, 0.08), atol=1e-9)


def test_moving_sliders_redraws_owl_as_predicted(app, cached):
    stats = cached[1]
    before = owl_trace(app)
    app.slider[0].set_value(8.0).run()  # M
    app.slider[2].set_value(0.12).run()  # λ
    after = owl_trace(app)
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, owl(stats.lod(8.0), 0.7, 0.12), atol=1e-9)


def test_too_wide_lambda_shows_allowed_range(app):
    app.slider[1].set_value(0.95).run()  # S = 0.95 leaves little room above
    app.slider[2].set_value(0.5).run()
    assert not app.exception
    assert any("too wide" in w.value and "choose λ <" in w.value for w in app.warning)
    assert len(app.get("plotly_chart")) == 1  # only the LOD chart; no nonsense allocation drawn
