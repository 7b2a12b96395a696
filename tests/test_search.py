"""The searched allocation (pruner.predictor.search): its lattice and mutations by hand, the generation loop on a
hand-made fitness, and the learner on a tiny real model: mean exactly S, no test text read, deterministic for a
seed, resumed after a SIGKILL from its last saved generation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pruner.model.catalogue import ModelSpec
from pruner.predictor.search import (SEARCH_MEASURED, SEARCH_SURVIVORS, SearchState, block_units, evolve, mutate,
                                     to_lattice, unit_bounds)
from pruner.specs import CalibSpec, PruneSpec, StatsSpec
from pruner.store.files import PROJECT_ROOT
from tests.conftest import copy_measured


def test_lattice_worked_by_hand():
    assert block_units(0.7, 30) == 2100  # SmolLM2 at 70%: 2100 steps of 1% over 30 blocks
    with pytest.raises(ValueError, match="multiple of 0.01"):
        block_units(0.705, 31)  # 2185.5 steps
    lo, hi = unit_bounds(0.6, 0.15, 4)
    assert lo.tolist() == [45] * 4 and hi.tolist() == [75] * 4
    assert unit_bounds(0.9, 0.15, 2)[1].tolist() == [99, 99]  # a block sparsity stays below 1
    # floors 61, 58, 60, 60 (239): the missing unit goes to the block whose rounding lost most (58.8)
    assert to_lattice([0.612, 0.588, 0.6, 0.6], 240, lo, hi).tolist() == [61, 59, 60, 60]
    # outside the bounds a seed is moved to them, and the sum is restored from the blocks that lost least
    assert to_lattice([0.9, 0.3, 0.62, 0.58], 240, lo, hi).tolist() == [75, 45, 62, 58]


def test_mutations_keep_the_sum_and_the_bounds():
    rng = np.random.default_rng(0)
    lo, hi = np.full(6, 2), np.full(6, 5)
    parent, moved = np.array([2, 5, 3, 4, 2, 5]), 0
    for _ in range(300):
        child = mutate(parent, lo, hi, rng)
        assert child.sum() == parent.sum() and (child >= lo).all() and (child <= hi).all()
        assert np.abs(child - parent).sum() <= 6  # one to three switches, each one up and one down
        moved += not np.array_equal(child, parent)  # (a second switch may undo the first)
        parent = child
    assert moved > 250


def test_the_table_s_rank_correlation_within_each_generation_by_hand():
    from pruner.predictor.search import generation_rank_correlations

    history = [{"measured": 3}, {"measured": 3}, {"measured": 2}]
    pairs = [[1, 10], [2, 20], [3, 30],  # the table ranks the three as measured: +1
             [1, 30], [2, 20], [3, 10],  # reversed: −1
             [1, 5], [2, 6]]  # two children: no ρ
    assert generation_rank_correlations(history, pairs) == [pytest.approx(1.0), pytest.approx(-1.0), None]


def _hand_made(target):
    """A fitness and a prediction by hand: the squared distance to a target lattice point (the stage adds a
    constant, so stage 2's scale differs from stage 1's as real windows' do)."""
    target = np.asarray(target)
    return (lambda u, stage: float(((u - target) ** 2).sum() + stage)), (lambda u: float(((u - target) ** 2).sum()))


def _start(units, seed):
    return SearchState(units=list(units), fitness=float("inf"), rng=np.random.default_rng(seed).bit_generator.state)


def test_the_search_finds_a_hand_made_optimum_and_resumes_where_it_stopped():
    target, lo, hi = [50, 70, 60, 60], np.full(4, 45), np.full(4, 75)
    fitness, predict = _hand_made(target)
    done = evolve(_start([60, 60, 60, 60], 1), 60, lo, hi, fitness, (16, 64), predict)
    assert done.units == target and done.fitness == 1.0  # stage 2 adds 1
    assert all(sum(h) == 240 for h in [done.units])
    assert [h["generation"] for h in done.history] == list(range(1, 61))
    parents = 1 + sum(h["replaced"] for h in done.history)  # each parent scored once on stage 1's windows
    assert done.forward_tokens == 60 * (SEARCH_MEASURED * 16 + SEARCH_SURVIVORS * 64) + parents * 16
    # the parent's stage-1 fitness: the start's by hand, then each generation's parent's stage-2 score less stage 2's 1
    assert done.history[0]["parent_first"] == fitness(np.array([60, 60, 60, 60]), 0) == 200.0
    assert [h["parent_first"] for h in done.history[1:]] == [h["best"] - 1 for h in done.history[:-1]]
    assert done.history[-1]["rank_correlation"] > 0.9  # the prediction is the fitness less a constant
    # deterministic for a seed; another seed takes another path
    assert evolve(_start([60] * 4, 1), 60, lo, hi, fitness, (16, 64), predict).history == done.history
    assert evolve(_start([60] * 4, 2), 60, lo, hi, fitness, (16, 64), predict).history != done.history
    # stopped after 7 generations and saved as JSON, it ends exactly where the uninterrupted search did
    partial = evolve(_start([60] * 4, 1), 7, lo, hi, fitness, (16, 64), predict)
    resumed = evolve(SearchState.from_dict(json.loads(json.dumps(partial.to_dict()))), 60, lo, hi, fitness, (16, 64),
                     predict)
    assert resumed.to_dict() == done.to_dict()
    # without screening the same number of children is measured (the ablation's equal budget)
    blind = evolve(_start([60] * 4, 1), 60, lo, hi, fitness, (16, 64), predict, screen=False)
    children = lambda s: s.forward_tokens - 16 * (1 + sum(h["replaced"] for h in s.history))  # noqa: E731
    assert children(blind) == children(done) and blind.history != done.history


@pytest.fixture(scope="module")
def calibration_only_data(data_dir, tmp_path_factory) -> str:
    """The data folder without WikiText-2's test split: a search that read it would fail."""
    folder = tmp_path_factory.mktemp("no-test-split")
    (folder / "wikitext2").mkdir()
    (folder / "wikitext2" / "wiki.valid.raw").symlink_to(Path(data_dir) / "wikitext2" / "wiki.valid.raw")
    (folder / "c4").symlink_to(Path(data_dir) / "c4")
    return str(folder)


@pytest.fixture(scope="module")
def table_cache(tiny_folder, calibration_only_data, tmp_path_factory) -> Path:
    """A cache with the tiny Llama's statistics (4 × 64 calibration tokens) and its damage table around S = 0.6,
    built once for this module; a test copies it (``copy_measured``) rather than measuring the same table again."""
    from pruner.predictor.cache import get_damage_table
    from pruner.predictor.table import PredictorSpec

    cache = tmp_path_factory.mktemp("search-table")
    spec = StatsSpec(ModelSpec(tiny_folder), CalibSpec(nsamples=4, seqlen=64, data_dir=calibration_only_data))
    get_damage_table(PredictorSpec(spec, around=0.6), cache, data_dir=calibration_only_data)
    return cache


def _search_cli(tiny_folder, data, cache, generations, **popen):
    cmd = [sys.executable, "-m", "pruner", "allocate", "--model", tiny_folder, "--nsamples", "4", "--seqlen", "64",
           "--data-dir", data, "--cache-dir", str(cache), "--allocator", "search", "--sparsity", "0.6",
           "--generations", str(generations), "--json"]
    return subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_the_search_on_a_tiny_model_resumes_after_a_kill(tiny_folder, calibration_only_data, table_cache, tmp_path):
    """Through the CLI in real processes: one search killed (SIGKILL) after its second saved generation and run
    again goes on from that generation with its saved history; the mean is S exactly; WikiText-2's test split is
    absent from the data folder; the found allocation prunes a run."""
    from pruner.engine.artifacts import learned_key
    from pruner.store.layout import CacheLayout

    generations = 5
    spec = StatsSpec(ModelSpec(tiny_folder), CalibSpec(nsamples=4, seqlen=64, data_dir=calibration_only_data))
    key = learned_key(spec, "search", 0.6, {"reach": 0.15, "generations": generations, "screen": 0})
    killed = copy_measured(table_cache, tmp_path / "killed")
    checkpoint = CacheLayout.at(killed).search(key)
    proc = _search_cli(tiny_folder, calibration_only_data, killed, generations)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(checkpoint.read_text())["state"]["generation"] >= 2:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    assert proc.poll() is None, f"the search ended before it could be killed: {proc.communicate()[1][-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_state = json.loads(checkpoint.read_text())["state"]  # as the kill left it
    saved = killed_state["generation"]
    assert 2 <= saved < generations

    resumed = _search_cli(tiny_folder, calibration_only_data, killed, generations)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    learning = json.loads(out)["learning"]
    assert learning["resumed_from"] == saved and len(learning["history"]) == generations

    # it went on from the saved generation: its first generations are the killed search's, exactly (that an
    # interrupted search ends where an uninterrupted one does is shown on the generation loop itself, above)
    assert learning["history"][:saved] == killed_state["history"] and learning["seeds"] == killed_state["seeds"]

    units = np.asarray(learning["units"])
    assert units.sum() == block_units(0.6, len(units))  # Σ u_b = S · B / step: the mean is S exactly
    assert np.abs(units - 60).max() <= 15 and np.mean(learning["block_sparsity"]) == pytest.approx(0.6, abs=1e-12)
    assert learning["history"][-1]["best"] <= min(v["fitness"] for k, v in learning["seeds"].items() if k != "chosen")
    # the finished search's checkpoint is listed as stale (its result is the learned allocation)
    stale = [e for e in CacheLayout.at(killed).entries() if e.kind == "searches"]
    assert len(stale) == 1 and "finished" in stale[0].stale

    # the usual sequential prune with the found allocation
    from pruner.runs.execute import run_prune

    folder = run_prune(PruneSpec(model=spec.model, calib=spec.calib, allocator="search", method="wanda", sparsity=0.6,
                                 allocator_params={"generations": generations}), killed)
    manifest = json.loads((folder / "manifest.json").read_text())
    np.testing.assert_allclose(manifest["allocation"]["block_sparsity"], learning["block_sparsity"])


def test_a_damaged_or_foreign_checkpoint_is_not_resumed(tmp_path):
    """A truncated file, another search's, or another format: the search starts from its seeds (None), no crash."""
    from pruner.predictor.search import SEARCH_FORMAT, read_checkpoint

    path = tmp_path / "k.json"
    assert read_checkpoint(path, "k") is None  # no file
    good = {"key": "k", "format": SEARCH_FORMAT, "state": {"generation": 3}}
    path.write_text(json.dumps(good)[:-7])  # cut short
    assert read_checkpoint(path, "k") is None
    path.write_text(json.dumps([1, 2]))
    assert read_checkpoint(path, "k") is None
    path.write_text(json.dumps(good | {"key": "other"}))
    assert read_checkpoint(path, "k") is None
    path.write_text(json.dumps(good | {"format": SEARCH_FORMAT + 1}))
    assert read_checkpoint(path, "k") is None
    path.write_text(json.dumps(good))
    assert read_checkpoint(path, "k") == good


def _kl_of_full_forward(dense, pruned, tokens) -> float:
    """KL(p_dense ‖ p_pruned) per token, averaged over windows, from the models' own forward passes."""
    import torch

    with torch.no_grad():
        p = torch.log_softmax(dense(tokens).logits.double(), dim=-1)
        q = torch.log_softmax(pruned(tokens).logits.double(), dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean(-1).mean())


def _fitness_inputs(tiny_folder, data, table_cache, tmp_path):
    """The tiny Llama (4 × 64 calibration tokens, its table copied into ``tmp_path``): spec, loaded model,
    statistics, calibration tokens, the search's windows."""
    from pruner.allocation.registry import search_stage_windows
    from pruner.data import calibration_tokens
    from pruner.engine.artifacts import get_stats
    from pruner.model.loading import load_model

    spec = StatsSpec(ModelSpec(tiny_folder), CalibSpec(nsamples=4, seqlen=64, data_dir=data))
    copy_measured(table_cache, tmp_path)
    loaded = load_model(spec.model, tmp_path)
    stats = get_stats(spec, tmp_path, loaded=loaded)
    tokens = calibration_tokens(loaded.tokenizer, spec.calib)
    return spec, loaded, stats, tokens, tokens[:search_stage_windows(4, 64)[-1]]


def _final_prune(loaded, stats, tokens, method: str, units):
    """A copy of the model pruned sequentially by ``method`` to the block units (the run's final prune)."""
    import copy

    from pruner.engine.prune import layer_targets, prune_model
    from pruner.predictor.search import SEARCH_STEP

    final = copy.deepcopy(loaded.model)
    layer_sparsity = (np.asarray(units) * SEARCH_STEP)[stats.layer_block]
    prune_model(final, tokens, method, layer_targets(layer_sparsity, list(zip(stats.layer_block.tolist(),
                                                                               stats.layer_names)), None), "row")
    return final


def _weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_the_sequential_fitness_scores_a_parent_as_its_final_wanda_prune(tiny_folder, calibration_only_data, table_cache,
                                                                          tmp_path):
    """With ``sequential`` = 1 the fitness of a parent is the KL divergence of the model the final (sequential)
    Wanda prune of its allocation gives, on the search's own windows, computed here through the models' full
    forward passes; the one-shot fitness (dense norms) of the same allocation is not. Checked on an allocation far
    from uniform, and on what the learner reports for its result; the model is left dense."""
    import torch

    from pruner.engine.artifacts import learn_allocation
    from pruner.predictor.fitness import KLFitness
    from pruner.predictor.search import SEARCH_STEP

    spec, loaded, stats, tokens, windows = _fitness_inputs(tiny_folder, calibration_only_data, table_cache, tmp_path)
    before = _weights(loaded.model)

    def final_prune_kl(units) -> float:
        return _kl_of_full_forward(loaded.model, _final_prune(loaded, stats, tokens, "wanda", units), windows)

    fitness = KLFitness(loaded.model, stats, windows, (1, len(windows)), "cpu", SEARCH_STEP)
    try:
        units = np.array([45, 75, 50, 70])  # S = 0.6, far from uniform
        oneshot = fitness(units, 1)
        fitness.use_fit(fitness.sequential_fit(units, tokens))
        sequential = fitness(units, 1)
    finally:
        fitness.restore()
    assert all(torch.equal(p, before[n]) for n, p in loaded.model.named_parameters())  # dense again
    truth = final_prune_kl(units)
    assert sequential == pytest.approx(truth, rel=1e-4)
    assert abs(oneshot - truth) > 20 * abs(sequential - truth)  # the dense norms' masks are another model

    result = learn_allocation(spec, "search", 0.6, {"generations": 2, "sequential": 1}, tmp_path, loaded=loaded)
    assert all(torch.equal(p, before[n]) for n, p in loaded.model.named_parameters())
    assert result["fitness"] == pytest.approx(final_prune_kl(result["units"]), rel=1e-4)
    # each seed was scored under its own sequential norms: a calibration pass (from block 0, or from a block the
    # last pass kept: the 256 calibration tokens times the share of the 4 blocks it ran) and a stage-2 score apiece;
    # each generation scores its children on the two stages, and a refitted child takes such a pass and a score
    stage = result["stage_tokens"]
    passes = {256 * ran // 4 + stage[1] for ran in (1, 2, 3, 4)}
    seeds = [v["forward_tokens"] for v in result["seeds"].values() if isinstance(v, dict)]
    assert len(seeds) == 5 and set(seeds) <= passes
    counted, new_parent = sum(seeds), True  # a new parent is scored once on stage 1's windows
    for h in result["history"]:
        scored = 4 * stage[0] + 2 * stage[1] + (stage[0] if new_parent else 0)
        refit, counted, new_parent = h["forward_tokens"] - counted - scored, h["forward_tokens"], h["replaced"]
        assert refit in (passes if h["refitted"] else {0})
    assert counted == result["forward_tokens"]

    # resumed (its learned entry removed, its checkpoint at generation 2 of 2 kept): the saved generation is
    # reported before the saved parent's calibration pass (whose blocks each ask whether to cancel), and the result
    # is the finished search's
    import shutil

    from pruner.engine.artifacts import learned_key
    from pruner.store.layout import CacheLayout

    params = {"reach": 0.15, "generations": 2, "screen": 0, "sequential": 1}
    shutil.rmtree(CacheLayout.at(tmp_path).learned(learned_key(spec, "search", 0.6, params)))
    calls = []

    def asked() -> bool:
        calls.append("asked")
        return False

    again = learn_allocation(spec, "search", 0.6, params, tmp_path, loaded=loaded,
                             progress=lambda done, total: calls.append((done, total)), should_cancel=asked)
    assert again["resumed_from"] == 2 and calls.index((2, 2)) < calls.index("asked")
    assert (again["units"], again["fitness"], again["history"]) == (result["units"], result["fitness"],
                                                                     result["history"])


def test_the_sparsegpt_fitness_scores_a_parent_as_its_final_sparsegpt_prune(tiny_folder, calibration_only_data,
                                                                             table_cache, tmp_path):
    """With ``sparsegpt`` = 1 (and ``sequential`` = 1) a parent's fitness is the KL divergence of the model the final
    SparseGPT prune of its allocation gives (computed here through full forwards, on an allocation far from uniform
    and on the learner's result); a child scored under the parent's Hessians differs from its own final prune only
    downstream of the first block it moved; the model is left dense; without ``sequential`` it is refused; the
    keys of every search stored before this parameter existed are unchanged."""
    import torch

    from pruner.allocation import ALLOCATORS
    from pruner.engine.artifacts import learn_allocation, learned_key
    from pruner.predictor.fitness import KLFitness
    from pruner.predictor.search import SEARCH_STEP
    from pruner.store.formats import stable_hash

    spec, loaded, stats, tokens, windows = _fitness_inputs(tiny_folder, calibration_only_data, table_cache, tmp_path)
    before = _weights(loaded.model)

    def final_prune(units):
        return _final_prune(loaded, stats, tokens, "sparsegpt", units)

    def final_prune_kl(units) -> float:
        return _kl_of_full_forward(loaded.model, final_prune(units), windows)

    fitness = KLFitness(loaded.model, stats, windows, (1, len(windows)), "cpu", SEARCH_STEP, "sparsegpt")
    parent, child = np.array([45, 75, 50, 70]), np.array([45, 75, 55, 65])  # S = 0.6; the child moves blocks 2, 3
    try:
        with pytest.raises(RuntimeError, match="sequential SparseGPT pass must come first"):
            fitness(parent, 1)
        fitness.use_fit(fitness.sequential_fit(parent, tokens))
        scored, scored_weights = fitness(parent, 1), _weights(loaded.model)
        child_under_parent, child_weights = fitness(child, 1), _weights(loaded.model)
        again = fitness(parent, 1)  # back from the child: the parent's blocks as the pass left them
        fitness.use_fit(fitness.sequential_fit(child, tokens))
        child_own = fitness(child, 1)
    finally:
        fitness.restore()
    assert all(torch.equal(p, before[n]) for n, p in loaded.model.named_parameters())  # dense again
    # the parent's model is the final SparseGPT prune's, bit for bit; its KL through full forwards agrees up to the
    # float rounding of another evaluation order (the tiny model's KL is small: 3e-4)
    assert all(torch.equal(p, scored_weights[n]) for n, p in final_prune(parent).named_parameters())
    assert scored == again == pytest.approx(final_prune_kl(parent), rel=1e-3)
    assert child_own == pytest.approx(final_prune_kl(child), rel=1e-3)
    # the child under the parent's Hessians: block 2 sees the same inputs as in its own final prune (blocks 0 and 1
    # are unchanged), so only block 3 differs from the final prune's
    own = final_prune(child)
    differs = {n.split(".")[2] for n, p in own.named_parameters() if not torch.equal(p, child_weights[n])}
    assert differs == {"3"} and child_under_parent != child_own

    reports = []
    result = learn_allocation(spec, "search", 0.6, {"generations": 2, "sequential": 1, "sparsegpt": 1}, tmp_path,
                              loaded=loaded, progress=lambda done, total: reports.append((done, total)))
    assert reports[:6] == [(0, 5), (1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]  # the seeds, shown before the first
    assert all(torch.equal(p, before[n]) for n, p in loaded.model.named_parameters())
    assert result["fitness"] == pytest.approx(final_prune_kl(result["units"]), rel=1e-3)
    assert result["params"]["sparsegpt"] == 1

    with pytest.raises(ValueError, match="sparsegpt = 1 .* needs sequential = 1"):
        learn_allocation(spec, "search", 0.6, {"generations": 2, "sparsegpt": 1}, tmp_path, loaded=loaded)
    # the key of a search stored before ``sparsegpt`` was declared, spelled by hand without it
    settings = ALLOCATORS["search"].resolve_learner().settings
    old = stable_hash({"model": spec.model.identity(), "calib": spec.calib.identity(), "allocator": "search",
                       "sparsity": 0.6, "params": {"reach": 0.15, "generations": 2, "screen": 0, "sequential": 1},
                       "settings": settings})
    assert learned_key(spec, "search", 0.6, {"generations": 2, "sequential": 1}) == old
    assert learned_key(spec, "search", 0.6, {"generations": 2, "sequential": 1, "sparsegpt": 1}) != old
    run = PruneSpec(model=spec.model, calib=spec.calib, allocator="search", sparsity=0.6)
    assert "sparsegpt" not in run.identity()["allocator_params"] and run.allocator_params["sparsegpt"] == 0


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_child_s_pass_from_its_parent_s_kept_inputs_is_its_whole_pass(method, tiny_folder, calibration_only_data,
                                                                        table_cache, tmp_path):
    """The sequential pass of a child that moved blocks 2 and 3 of its parent starts at block 2 from the hidden
    states the parent's pass kept, takes the parent's results for blocks 0 and 1 (the same objects), and gives
    what the child's pass from block 0 gives, bit for bit (Wanda's norms; SparseGPT's factors of H⁻¹ and pruned
    weights), and the same fitness. The parent's own allocation needs no pass; other tokens start from block 0."""
    import torch

    from bench.search_refit import same_bits
    from pruner.predictor.fitness import KLFitness
    from pruner.predictor.search import SEARCH_STEP

    _, loaded, stats, tokens, windows = _fitness_inputs(tiny_folder, calibration_only_data, table_cache, tmp_path)
    fitness = KLFitness(loaded.model, stats, windows, (1, len(windows)), "cpu", SEARCH_STEP, method)
    parent, child = np.array([45, 75, 50, 70]), np.array([45, 75, 55, 65])  # S = 0.6; the child moves blocks 2, 3
    try:
        fitness.use_fit(fitness.sequential_fit(parent, tokens))
        parents = fitness.fit
        assert sorted(parents.inputs.kept) == [0, 1, 2, 3]  # 4 blocks: every block's inputs kept
        assert fitness.sequential_fit(parent, tokens) is parents
        restarted = fitness.sequential_fit(child, tokens)
        fitness.use_fit(restarted)
        scored_restarted = fitness(child, 1)
        fitness.use_fit(None)  # no fit in use: the child's pass runs from block 0
        whole = fitness.sequential_fit(child, tokens)
        fitness.use_fit(whole)
        scored_whole = fitness(child, 1)
        other_tokens = fitness.sequential_fit(parent, tokens.flip(0))  # other calibration tokens: from block 0
    finally:
        fitness.restore()
    assert (restarted.share_run, whole.share_run, other_tokens.share_run) == (0.5, 1.0, 1.0)
    assert all(a is b for a, b in zip(restarted.blocks[:2], parents.blocks[:2]))
    assert all(restarted.inputs.kept[b] is parents.inputs.kept[b] for b in (0, 1))  # shared, not copied
    assert all(a is b for a, b in zip(restarted.inputs.kept[2], parents.inputs.kept[2]))  # where it started

    assert len(restarted.blocks) == len(whole.blocks) == 4 and same_bits(restarted.blocks, whole.blocks)
    assert not same_bits(restarted.blocks, parents.blocks)  # blocks 2 and 3 did change
    assert all(torch.equal(a, b) for a, b in zip(restarted.inputs.kept[3], whole.inputs.kept[3]))
    assert scored_restarted == scored_whole


def test_a_new_parent_is_refitted_and_its_pass_counted():
    """``evolve``'s refit hook on the hand-made fitness: called for every child that beat the parent, which then
    replaces it only if its refitted fitness is still lower (a penalty of 1000 on children whose first block is odd
    makes those lose there); the refit's value becomes the parent's, and its tokens are counted."""
    target, lo, hi = [50, 70, 60, 60], np.full(4, 45), np.full(4, 75)
    fitness, predict = _hand_made(target)
    own = lambda u: fitness(u, 1) + 1000.0 * (u[0] % 2)  # noqa: E731 (the child's fitness under its own norms)
    refits = []

    def refit(units, below):
        refits.append((units.tolist(), below))
        return own(units), 1000, own(units) < below

    done = evolve(_start([60, 60, 60, 60], 1), 40, lo, hi, fitness, (16, 64), predict, refit=refit)
    refitted = [h for h in done.history if h["refitted"]]
    replaced = [h for h in done.history if h["replaced"]]
    assert len(refits) == len(refitted) and all(h["refitted"] for h in replaced)
    assert len(replaced) >= 3 and len(refitted) > len(replaced)  # some refitted children lost
    assert done.fitness == own(np.asarray(done.units))  # the refit's value, not the stage-2 score
    kept = [u for u, below in refits if own(np.asarray(u)) < below]
    assert kept[-1] == done.units and len(kept) == len(replaced)
    assert done.forward_tokens == (40 * (SEARCH_MEASURED * 16 + SEARCH_SURVIVORS * 64) + 1000 * len(refits)
                                   + 16 * (1 + len(replaced)))  # each parent's stage-1 score


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_dropped_sequential_fit_is_freed_with_its_last_reference(method, tiny_folder, calibration_only_data,
                                                                   table_cache, tmp_path):
    """A sequential fit the search lets go (a refitted child that lost to its parent, a seed that was not the best)
    is freed when its last reference goes, not whenever the cyclic garbage collector next runs: on SmolLM2 a
    SparseGPT fit holds ~0.8 GiB (factors of H⁻¹ and pruned weights), and fits kept alive by a reference cycle
    until then put the search's resident memory above its plan. Checked with the collector off."""
    import gc
    import weakref

    from pruner.predictor.fitness import KLFitness
    from pruner.predictor.search import SEARCH_STEP

    spec, loaded, stats, tokens, windows = _fitness_inputs(tiny_folder, calibration_only_data, table_cache, tmp_path)
    fitness = KLFitness(loaded.model, stats, windows, (1, len(windows)), "cpu", SEARCH_STEP, method)
    gc.collect()
    gc.disable()
    try:
        fit = fitness.sequential_fit(np.array([45, 75, 50, 70]), tokens)
        held = fit.blocks[-1][1][1] if method == "sparsegpt" else fit.blocks[-1]  # block 3's weights / norms
        tensors = [weakref.ref(t) for t in held.values()]
        states = [weakref.ref(state) for state, _ in fit.blocks[-1][0]] if method == "sparsegpt" else []
        del fit, held
        assert all(r() is None for r in tensors + states)
    finally:
        gc.enable()
        fitness.restore()
