"""Sequential pruning on tiny random models: exact per-layer sparsities, sequential inputs, store, perplexity."""

import copy
import math

import numpy as np
import pytest
import torch

from pruner.allocation import allocate
from pruner.core.scores import wanda_score
from pruner.engine.calibrate import Cancelled
from pruner.engine.prune import LayerTarget, layer_targets, prune_model
from pruner.engine.stats import collect_stats
from pruner.evaluate.perplexity import chunk_stream, perplexity_of_chunks
from pruner.methods import NM
from pruner.methods.masks import lowest_mask, prune_count
from pruner.model.anatomy import find_blocks, prunable_layers, weight_matrix
from tests.test_calibrate import direct_input_norms
from tests.tiny_models import tiny_model, tiny_tokens


def _owl_targets(model, tokens, S=0.6, lam=0.1):
    stats = collect_stats(model, tokens, "cpu")
    alloc = allocate("owl", stats, S, lam=lam, m=1.5)
    keys = list(zip(stats.layer_block.tolist(), stats.layer_names))
    return layer_targets(alloc.layer_sparsity, keys, None), alloc


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_per_layer_sparsity(family, method):
    model = tiny_model(family)
    tokens = tiny_tokens(8, 16)
    targets, alloc = _owl_targets(model, tokens)
    assert len(set(np.round(alloc.block_sparsity, 6))) > 1  # OWL gives the blocks different sparsities
    scope = {"magnitude": "layer", "wanda": "row", "sparsegpt": "row"}[method]
    report = prune_model(model, tokens, method, targets, scope)
    _, blocks = find_blocks(model)
    for layer_report in report.layers:
        W = weight_matrix(prunable_layers(blocks[layer_report.block])[layer_report.name])
        target = targets[(layer_report.block, layer_report.name)].sparsity
        zeros_per_row = (W == 0).sum(dim=1)
        if method == "wanda":  # every row (comparison group) has exactly round(s · in) zeros
            assert (zeros_per_row == prune_count(W.shape[1], target)).all()
        elif method == "magnitude":
            assert int((W == 0).sum()) == prune_count(W.numel(), target)
        else:  # sparsegpt: exact per block of 128 columns; these layers are narrower than one block
            assert int((W == 0).sum()) == prune_count(W.numel(), target)
        assert abs(layer_report.achieved - target) <= 1 / W.shape[1]


def test_blocks_see_inputs_from_already_pruned_blocks():
    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    tokens = tiny_tokens(8, 16)
    targets = {k: LayerTarget(0.5, None) for k in
               [(i, n) for i, b in enumerate(find_blocks(model)[1]) for n in prunable_layers(b)]}
    prune_model(model, tokens, "wanda", targets, "row")
    # Block 2's q_proj input is produced by blocks 0 and 1, already pruned: a direct forward of the final pruned
    # model gives that input, and Wanda's mask from it on the dense weight is exactly the pruned pattern.
    norms = direct_input_norms(model, tokens)[(2, "self_attn.q_proj")].float()
    W_dense = weight_matrix(prunable_layers(find_blocks(dense)[1][2])["self_attn.q_proj"])
    expected = lowest_mask(wanda_score(W_dense, norms), 0.5, "row")
    pruned = weight_matrix(prunable_layers(find_blocks(model)[1][2])["self_attn.q_proj"]) == 0
    assert torch.equal(pruned, expected)
    # ... and it differs from the mask the dense model's inputs would give
    dense_norms = direct_input_norms(dense, tokens)[(2, "self_attn.q_proj")].float()
    assert not torch.equal(lowest_mask(wanda_score(W_dense, dense_norms), 0.5, "row"), expected)


def test_mixed_nm_per_block():
    keys = [(0, "a"), (1, "a"), (2, "a")]
    targets = layer_targets(np.array([0.375, 0.5, 0.625]), keys, NM(4, 8))
    assert [str(targets[k].nm) for k in keys] == ["5:8", "4:8", "3:8"]
    with pytest.raises(ValueError, match="keep 0 of every 8"):
        layer_targets(np.array([0.97]), [(0, "a")], targets[(1, "a")].nm)


def test_nm_pruning_pattern():
    model = tiny_model("llama")
    tokens = tiny_tokens(8, 16)
    targets = {k: LayerTarget(0.5, NM(2, 4)) for k in
               [(i, n) for i, b in enumerate(find_blocks(model)[1]) for n in prunable_layers(b)]}
    prune_model(model, tokens, "sparsegpt", targets, "row")
    W = weight_matrix(prunable_layers(find_blocks(model)[1][1])["mlp.down_proj"])
    assert ((W == 0).reshape(W.shape[0], -1, 4).sum(-1) == 2).all()


def test_cancel_leaves_model_partially_pruned_but_raises():
    model = tiny_model("llama")
    targets = {k: LayerTarget(0.5, None) for k in
               [(i, n) for i, b in enumerate(find_blocks(model)[1]) for n in prunable_layers(b)]}
    with pytest.raises(Cancelled):
        prune_model(model, tiny_tokens(), "wanda", targets, "row", should_cancel=lambda: True)


def test_chunking():
    ids = torch.arange(10)
    assert chunk_stream(ids, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert chunk_stream(ids, 3, max_chunks=2).shape == (2, 3)
    with pytest.raises(ValueError, match="fewer than seqlen=20"):
        chunk_stream(ids, 20)


def test_perplexity_equals_direct_full_sequence_computation():
    model = tiny_model("llama")
    chunks = tiny_tokens(5, 16, seed=7)
    ppl, count, chunk_nll = perplexity_of_chunks(model, chunks, "cpu", batch_size=2)
    # direct: Hugging Face's own loss (mean NLL of the 15 predicted tokens) per chunk; equal counts → mean of means
    losses = [float(model(input_ids=c[None], labels=c[None]).loss) for c in chunks]
    assert count == 5 * 15
    assert ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert chunk_nll == pytest.approx(losses, rel=1e-5)  # each chunk's own mean NLL, kept for the interval


def test_summed_nll_by_hand_and_sliced(monkeypatch):
    from pruner.evaluate import perplexity

    IGN = perplexity.IGNORE
    logits = torch.zeros(5, 4)  # uniform over 4 tokens: each scored row costs log 4
    targets = torch.tensor([0, 1, IGN, 3, 2])
    assert perplexity.summed_nll(logits, targets) == pytest.approx(4 * math.log(4))
    # slices of 2 rows (3 slices for 5 rows) give the same sum as one cross-entropy over everything
    monkeypatch.setattr(perplexity, "NLL_SLICE_BYTES", 2 * 4 * 4)
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    whole = float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGN, reduction="sum"))
    assert perplexity.summed_nll(logits, targets) == pytest.approx(whole, rel=1e-6)
    model = tiny_model("llama")  # and perplexity over slices equals Hugging Face's own loss
    chunks = tiny_tokens(2, 16, seed=7)
    losses = [float(model(input_ids=c[None], labels=c[None]).loss) for c in chunks]
    assert perplexity_of_chunks(model, chunks, "cpu")[0] == pytest.approx(math.exp(sum(losses) / 2), rel=1e-5)


def test_layers_fed_the_same_tensor_share_one_state():
    from pruner.engine.calibrate import run_blockwise
    from pruner.engine.prune import PruningObserver

    model = tiny_model("llama")
    targets = {k: LayerTarget(0.5, None) for k in
               [(i, n) for i, b in enumerate(find_blocks(model)[1]) for n in prunable_layers(b)]}
    shared = []

    class Spy(PruningObserver):
        def finish(self, index, block, layers):
            s = self._state
            shared.append((s["self_attn.q_proj"] is s["self_attn.k_proj"] is s["self_attn.v_proj"],
                           s["mlp.gate_proj"] is s["mlp.up_proj"],
                           len({id(v) for v in s.values()})))
            return super().finish(index, block, layers)

    run_blockwise(model, tiny_tokens(), Spy("sparsegpt", targets, "row", torch.device("cpu")))
    assert shared == [(True, True, 4)] * 3  # q/k/v, o, gate/up, down


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_first_pass_skipping_the_last_layer_gives_the_same_model(family, method, monkeypatch):
    """The first pass skips the last-running layer's matmul (its output only feeds the discarded block output):
    the pruned weights must be exactly those of full first passes."""
    from pruner.engine.prune import PruningObserver

    tokens = tiny_tokens(8, 16)
    results = {}
    for skip in (True, False):
        model = tiny_model(family)
        targets, _ = _owl_targets(copy.deepcopy(model), tokens)
        monkeypatch.setattr(PruningObserver, "first_pass_outputs_unused", skip)
        prune_model(model, tokens, method, targets, "row", batch_size=2)  # four mini-batches: three skip
        results[skip] = model.state_dict()
    assert all(torch.equal(results[True][k], results[False][k]) for k in results[True])


def test_first_pass_skips_one_matmul_per_mini_batch_after_the_first():
    from pruner.engine.prune import PruningObserver

    model = tiny_model("llama")
    tokens = tiny_tokens(8, 16)
    calls = {}
    for block in find_blocks(model)[1]:
        for name, layer in prunable_layers(block).items():
            layer.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(
                name, calls.get(name, 0) + bool(o.abs().sum() > 0)))
    targets = {k: LayerTarget(0.5, None) for k in
               [(i, n) for i, b in enumerate(find_blocks(model)[1]) for n in prunable_layers(b)]}
    observer = PruningObserver("wanda", targets, "row", torch.device("cpu"))
    from pruner.engine.calibrate import run_blockwise

    run_blockwise(model, tokens, observer, batch_size=2)
    n_blocks = len(find_blocks(model)[1])
    # 4 mini-batches: every layer computes 4 (first pass) + 4 (second pass) times per block, but the MLP's output
    # projection computes only on the first mini-batch of the first pass
    assert calls["mlp.down_proj"] == n_blocks * (1 + 4)
    assert calls["mlp.up_proj"] == n_blocks * (4 + 4)
