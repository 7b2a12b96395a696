"""The blockwise loop on tiny random models: its statistics equal a direct computation on the full forward."""

import numpy as np
import pytest
import torch
from torch import nn

from pruner.engine.calibrate import Cancelled, capture_block_inputs, mini_batch_size, run_blockwise
from pruner.engine.stats import StatsCollector, collect_stats
from pruner.model.anatomy import describe_layers, find_blocks, prunable_layers, weight_matrix
from tests.tiny_models import EXPECTED_LAYERS, TINY_CONFIGS, tiny_model, tiny_tokens


def direct_input_norms(model, tokens):
    """‖X_j‖₂ of every prunable layer's input, from one ordinary full forward pass with hooks."""
    _, blocks = find_blocks(model)
    sums, handles = {}, []
    for i, block in enumerate(blocks):
        for name, layer in prunable_layers(block).items():
            def hook(mod, args, out, key=(i, name)):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + (x * x).sum(0)
            handles.append(layer.register_forward_hook(hook))
    try:
        model(input_ids=tokens, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: v.sqrt() for k, v in sums.items()}


def direct_lod(model, norms, m):
    """The official OWL computation: per block, concatenate all layers' scores, count > M · mean."""
    _, blocks = find_blocks(model)
    out = []
    for i, block in enumerate(blocks):
        scores = torch.cat([(weight_matrix(l).abs().double() * norms[(i, n)][None, :]).flatten()
                            for n, l in prunable_layers(block).items()])
        out.append(float((scores > m * scores.mean()).double().mean()))
    return np.array(out)


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_stats_match_full_forward(family):
    model = tiny_model(family)
    tokens = tiny_tokens()
    assert len(describe_layers(model)) == 3 * EXPECTED_LAYERS[family]
    stats = collect_stats(model, tokens, "cpu", batch_size=4)  # gcd(6, 4) = 2 samples per mini-batch
    assert _no_hooks(model)
    norms = direct_input_norms(model, tokens)
    assert len(stats.input_norms) == len(norms)
    for l, (b, name) in enumerate(zip(stats.layer_block, stats.layer_names)):
        np.testing.assert_allclose(stats.input_norms[l], norms[(int(b), name)].numpy(), rtol=2e-5, atol=1e-6,
                                   err_msg=f"{family} block {b} {name}")
    n_per_block = stats.block_numel[0]
    for m in (0.5, 1.0, 2.5, 5.0):
        np.testing.assert_allclose(stats.lod(m), direct_lod(model, norms, m), atol=1.5 / n_per_block)


def test_gemma3_blocks_get_their_own_masks():
    model = tiny_model("gemma3")
    _, calls = capture_block_inputs(model, tiny_tokens(2, 16), torch.device("cpu"), 2)
    masks = [kwargs["attention_mask"] for _, kwargs in calls]
    assert isinstance(masks[0], torch.Tensor) and not masks[0][0, 0, -1, 0]  # sliding: far tokens masked out
    assert masks[1] is None or bool(masks[1][0, 0, -1, 0])  # full attention (None means plain causal)
    assert torch.equal(masks[0], masks[2])
    rope = [kwargs["position_embeddings"][0] for _, kwargs in calls]  # local and global rotary bases differ
    assert not torch.equal(rope[0], rope[1]) and torch.equal(rope[0], rope[2])


def test_result_does_not_depend_on_batch_size():
    model = tiny_model("llama")
    tokens = tiny_tokens(6)
    a = collect_stats(model, tokens, "cpu", batch_size=1)
    b = collect_stats(model, tokens, "cpu", batch_size=6)
    for x, y in zip(a.input_norms, b.input_norms):
        np.testing.assert_allclose(x, y, rtol=1e-5)
    np.testing.assert_array_equal(a.ratio_counts_above, b.ratio_counts_above)


def test_mini_batch_size_divides():
    assert mini_batch_size(32, 4) == 4
    assert mini_batch_size(6, 4) == 2
    assert mini_batch_size(7, 4) == 1


def test_hooks_removed_and_blocks_restored_on_error():
    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    originals = list(blocks)

    class Failing(StatsCollector):
        def finish(self, index, block, layers):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_blockwise(model, tiny_tokens(), Failing())
    assert _no_hooks(model)
    assert list(find_blocks(model)[1]) == originals


def test_cancel_between_blocks():
    model = tiny_model("llama")
    seen = []
    with pytest.raises(Cancelled, match="before block 2"):
        run_blockwise(model, tiny_tokens(), StatsCollector(), progress=lambda d, t: seen.append(d),
                      should_cancel=lambda: seen[-1:] == [2])
    assert seen == [0, 1, 2] and _no_hooks(model)  # 0: the inputs are captured, the first block starts


def test_observer_that_changes_weights_feeds_modified_outputs_forward():
    """A block whose weights the observer zeroes must be re-run: the next block then sees zeros' effect."""
    model = tiny_model("llama")
    tokens = tiny_tokens()

    class ZeroFirstBlock(StatsCollector):
        def finish(self, index, block, layers):
            super().finish(index, block, layers)
            if index == 0:
                for layer in layers.values():
                    layer.weight.zero_()
                return True
            return False

    observer = ZeroFirstBlock()
    run_blockwise(model, tokens, observer)
    # with block 0's linears zeroed it is the identity (residual only): block 1's q_proj input is
    # RMSNorm(embeddings), which a direct forward of the now-modified model reproduces
    direct = direct_input_norms(model, tokens)
    stats = observer.result()
    l = stats.layer_names.index("self_attn.q_proj", 7)
    np.testing.assert_allclose(stats.input_norms[l], direct[(1, "self_attn.q_proj")].numpy(), rtol=2e-5)


def test_unsupported_architecture_error_names_what_was_looked_for():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stuff = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"no list of decoder blocks found at model\.layers, model\.decoder\.layers"):
        find_blocks(Odd())


def test_gpt2_conv1d_weight_is_out_by_in():
    model = tiny_model("gpt2")
    layers = prunable_layers(find_blocks(model)[1][0])
    assert weight_matrix(layers["attn.c_attn"]).shape == (96, 32)  # fused q, k, v: out = 3 × 32
    assert weight_matrix(layers["mlp.c_fc"]).shape == (128, 32)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: blocks get their own masks and rotary tables
def test_a_pass_started_at_a_kept_block_is_the_full_pass_from_there(family):
    """A pass that keeps the hidden states entering its blocks, and a second pass, on another copy of the model,
    started at block 1 with them: the second sees blocks 1 and 2 only, and its outputs and block weights are the
    full pass's bit for bit; the kept tensors are left as they were; a start it cannot take is refused."""
    import copy

    from pruner.engine.calibrate import BlockInputs

    class HalveEveryBlock(StatsCollector):  # changes each block, so each pass feeds the next block changed outputs
        def __init__(self):
            super().__init__()
            self.seen = []

        def finish(self, index, block, layers):
            super().finish(index, block, layers)
            self.seen.append(index)
            for layer in layers.values():
                weight_matrix(layer).mul_(0.5)
            return True

    model, tokens = tiny_model(family), tiny_tokens()
    other = copy.deepcopy(model)
    keep = BlockInputs(every=1)
    full = run_blockwise(model, tokens, HalveEveryBlock(), batch_size=2, keep=keep)
    batches = tokens.shape[0] // mini_batch_size(tokens.shape[0], 2)
    assert sorted(keep.kept) == [0, 1, 2] and len(keep.kept[1]) == batches > 1
    entering = [h.clone() for h in keep.kept[1]]
    observer, reports = HalveEveryBlock(), []
    again = run_blockwise(other, tokens, observer, batch_size=2, start=(1, keep.kept[1]),
                          progress=lambda done, total: reports.append(done))
    assert observer.seen == [1, 2] and reports == [1, 2, 3]
    assert torch.equal(again, full)
    ours, theirs = dict(other.named_parameters()), dict(model.named_parameters())
    changed = {n for n, p in ours.items() if not torch.equal(p, theirs[n])}
    assert changed and all(".0." in n for n in changed)  # block 0 was not run: still dense there
    assert all(torch.equal(a, b) for a, b in zip(keep.kept[1], entering))
    with pytest.raises(ValueError, match=f"starts at a block 0 … 2 with one tensor per mini-batch \\({batches}\\)"):
        run_blockwise(other, tokens, HalveEveryBlock(), batch_size=2, start=(1, keep.kept[1][:1]))
    with pytest.raises(ValueError, match="got block 3"):
        run_blockwise(other, tokens, HalveEveryBlock(), batch_size=2, start=(3, keep.kept[1]))


def test_kept_block_inputs_by_hand():
    from pruner.allocation.registry import search_checkpoint_every
    from pruner.engine.calibrate import BlockInputs

    kept = BlockInputs(every=4, kept={0: [], 4: [], 8: []})
    assert [kept.wants(i) for i in range(6)] == [True, False, False, False, True, False]
    assert [kept.start_for(b) for b in (0, 3, 4, 7, 8, 29)] == [0, 0, 4, 4, 8, 8]
    assert sorted(kept.before(8).kept) == [0, 4] and kept.before(8).every == 4
    assert BlockInputs(every=1).start_for(5) == 0  # nothing kept: from the beginning
    with pytest.raises(ValueError, match="every 1 or more blocks; got every = 0"):
        BlockInputs(every=0)
    # SmolLM2's 30 blocks: 8 kept (0, 4, …, 28); 3 blocks: all; 9: 0, 2, 4, 6, 8
    assert [search_checkpoint_every(b) for b in (30, 3, 8, 9, 64)] == [4, 1, 1, 2, 8]
