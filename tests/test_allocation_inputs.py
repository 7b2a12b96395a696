"""Pruning computes only what its allocator reads: no dense statistics pass for uniform, ER or AlphaPruning."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pruner.allocation import ALLOCATORS, NEEDS, NEEDS_LAYOUT, NEEDS_STATISTICS, NEEDS_WEIGHTS, allocate
from pruner.engine import artifacts
from pruner.engine.layout import ModelLayout
from pruner.engine.stats import collect_stats
from pruner.model.anatomy import find_blocks
from pruner.model.catalogue import ModelSpec
from pruner.model.loading import load_model
from pruner.runs.execute import run_prune
from pruner.specs import CalibSpec, PruneSpec
from tests.tiny_models import tiny_model, tiny_tokens

NSAMPLES, BATCH = 4, 2  # two calibration mini-batches


def _spec(tiny_folder, data_dir, allocator, method="wanda"):
    return PruneSpec(model=ModelSpec(tiny_folder, device="cpu"),
                     calib=CalibSpec(nsamples=NSAMPLES, seqlen=32, data_dir=data_dir),
                     allocator=allocator, method=method, sparsity=0.5,
                     allocator_params=ALLOCATORS[allocator].pick({"lam": 0.05, "m": 3}))


def _count_block_forwards(loaded) -> list[int]:
    """Attach a counter to every decoder block; a deep copy of the model (what run_prune prunes) keeps the hooks."""
    counts = [0] * len(find_blocks(loaded.model)[1])
    for i, block in enumerate(find_blocks(loaded.model)[1]):
        def hook(module, args, output, i=i):
            counts[i] += 1
        block.register_forward_hook(hook)
    return counts


@pytest.mark.parametrize("allocator, passes, inputs", [
    ("uniform", 2, "model layout"),  # the pruning pass only: calibration forward + forward of the pruned block
    ("er", 2, "model layout"),
    ("alpha", 2, "model weights"),
    ("owl", 3, "statistics pass"),  # OWL's LOD needs every dense block's scores before block 0 is pruned
])
def test_block_forwards_per_allocator(tiny_folder, data_dir, tmp_path, allocator, passes, inputs):
    loaded = load_model(ModelSpec(tiny_folder, device="cpu"))
    counts = _count_block_forwards(loaded)
    folder = run_prune(_spec(tiny_folder, data_dir, allocator), tmp_path, loaded=loaded, batch_size=BATCH)
    assert counts == [passes * NSAMPLES // BATCH] * len(counts)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["allocation_inputs"] == inputs
    assert (tmp_path / "stats").exists() == (inputs == "statistics pass")


@pytest.mark.parametrize("allocator", ["uniform", "er", "alpha"])
def test_same_weights_with_and_without_cached_statistics(tiny_folder, data_dir, tmp_path, allocator):
    spec = _spec(tiny_folder, data_dir, allocator)
    without = run_prune(spec, tmp_path / "a")
    artifacts.get_stats(spec.stats_spec, tmp_path / "b")
    with_stats = run_prune(spec, tmp_path / "b")
    assert json.loads((with_stats / "manifest.json").read_text())["allocation_inputs"] == "cached statistics"
    a, b = load_file(without / "model.safetensors"), load_file(with_stats / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_layout_matches_statistics():
    model = tiny_model("llama")
    stats = collect_stats(model, tiny_tokens(4, 16), "cpu")
    layout = ModelLayout.of(model, weights=True)
    assert layout.layer_names == stats.layer_names
    assert np.array_equal(layout.layer_block, stats.layer_block)
    assert np.array_equal(layout.layer_shapes, stats.layer_shapes)
    assert np.array_equal(layout.layer_alpha, stats.layer_alpha)  # same function, same weights: bit-equal
    for name in ("uniform", "er", "alpha"):
        assert np.array_equal(allocate(name, layout, 0.6).layer_sparsity, allocate(name, stats, 0.6).layer_sparsity)


def test_layout_refuses_what_needs_statistics():
    layout = ModelLayout.of(tiny_model("llama"))
    for name in ("owl", "owl_inverse", "global"):
        with pytest.raises(ValueError, match="calibration statistics"):
            allocate(name, layout, 0.6)
    with pytest.raises(ValueError, match="weights=True"):
        allocate("alpha", layout, 0.6)


def test_every_allocator_declares_what_it_reads():
    assert {a.needs for a in ALLOCATORS.values()} <= set(NEEDS)
    assert ALLOCATORS["uniform"].needs == ALLOCATORS["er"].needs == NEEDS_LAYOUT
    assert ALLOCATORS["alpha"].needs == NEEDS_WEIGHTS
    assert ALLOCATORS["owl"].needs == ALLOCATORS["global"].needs == NEEDS_STATISTICS
