"""Mixture-of-experts models: every expert is pruned to its allocated share, calibrated on the tokens routed to it,
and every weight of a block is accounted for (issue: MoE models were left with dense experts while the target was
reported as reached)."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers as tf

from pruner.engine.prune import LayerTarget, prune_model
from pruner.model.anatomy import (ROUTER, UNSUPPORTED, block_weights, find_blocks, is_fused_experts, prunable_layers,
                                  routed_through_slices, unsupported_weights, weight_matrix)
from tests.tiny_models import MOE_CONFIGS, tiny_moe_model

FAMILIES = list(MOE_CONFIGS)
SPARSITY = 0.5


@pytest.fixture(scope="module")
def moe_folders(smollm2, tmp_path_factory):
    """family → a tiny random MoE model saved as a Hugging Face folder with the bundled model's tokenizer."""
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(f"tiny-{family}")
        tiny_moe_model(family, vocab_size=len(smollm2.tokenizer)).save_pretrained(folder)
        smollm2.tokenizer.save_pretrained(folder)
        out[family] = str(folder)
    return out


def _expert_units(block):
    return {n: l for n, l in prunable_layers(block).items() if ".experts." in n}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_matrix_is_a_unit_and_slices_compute_what_the_model_computes(family):
    model = tiny_moe_model(family)
    block = find_blocks(model)[1][0]
    (experts,) = [m for m in block.modules() if is_fused_experts(m)]
    units = _expert_units(block)
    parts = {n.rsplit(".", 1)[-1] for n in units}
    assert parts == {"gate_proj", "up_proj", "down_proj"}
    assert len(units) == 3 * MOE_CONFIGS[family].get("num_local_experts", MOE_CONFIGS[family].get("num_experts"))
    # writes through a slice land in the fused parameter (same storage)
    w = weight_matrix(units["mlp.experts.2.down_proj"])
    with torch.no_grad():
        w[0, 0] = 12345.0
    assert (experts.down_proj == 12345.0).sum() == 1
    # the same logits through the slices as through transformers' own experts implementation
    model = tiny_moe_model(family)
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = model(tokens).logits
        with routed_through_slices(find_blocks(model)[1][0]), routed_through_slices(find_blocks(model)[1][1]):
            sliced = model(tokens).logits
    torch.testing.assert_close(sliced, native, rtol=1e-5, atol=1e-5)
    # routers are never prunable units, and are named as routers
    roles = {w.name: w.role for w in block_weights(block)}
    routers = [n for n, r in roles.items() if r == ROUTER]
    assert routers and all(n.startswith(("mlp.gate.", "mlp.router.", "mlp.shared_expert_gate.")) for n in routers)
    assert not any(n.rsplit(".", 1)[0] in prunable_layers(block) for n in routers)
    if family == "qwen2_moe":
        assert "mlp.shared_expert_gate" not in prunable_layers(block)  # an nn.Linear, but a router
        assert roles["mlp.shared_expert_gate.weight"] == ROUTER
        assert "mlp.shared_expert.down_proj" in prunable_layers(block)  # a shared expert is an ordinary MLP


def _check_run(folder, sparsity=SPARSITY, per_row=True):
    """The stored run loads with from_pretrained; each expert slice holds its allocated share of zeros (± one weight
    per row), in every row when ``per_row`` (Wanda; SparseGPT chooses its mask across the rows of each block of
    columns); the decoder blocks are ``sparsity`` ± 0.5% sparse counting every weight."""
    manifest = json.loads((folder / "manifest.json").read_text())
    allocated = {(l["block"], l["name"]): l["allocated"] for l in manifest["achieved"]["layers"]}
    model = tf.AutoModelForCausalLM.from_pretrained(folder)
    zeros = numel = 0
    experts_seen = 0
    for i, block in enumerate(find_blocks(model)[1]):
        for name, layer in _expert_units(block).items():
            w = weight_matrix(layer)
            target = allocated[(i, name)] * w.shape[1]
            rows = (w == 0).sum(dim=1).double()
            assert abs(rows.sum() - target * w.shape[0]) <= w.shape[0], f"block {i} {name}: {rows.sum()} zeros"
            if per_row:
                assert (rows - target).abs().max() <= 1, f"block {i} {name}: rows {rows.tolist()} vs {target}"
            experts_seen += 1
        for p in block.parameters():
            zeros += int((p == 0).sum())
            numel += p.numel()
    assert experts_seen > 0
    assert abs(zeros / numel - sparsity) <= 0.005, zeros / numel
    assert manifest["achieved"]["decoder_overall"] == pytest.approx(zeros / numel)
    return manifest


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,stream", [("wanda", False), ("sparsegpt", False), ("wanda", True),
                                           ("sparsegpt", True)])
def test_owl_prune_reaches_every_expert(moe_folders, data_dir, tmp_path, family, method, stream):
    from pruner.model.catalogue import ModelSpec
    from pruner.runs.execute import run_prune
    from pruner.specs import CalibSpec, PruneSpec

    spec = PruneSpec(model=ModelSpec(moe_folders[family], device="cpu"),
                     calib=CalibSpec(nsamples=4, seqlen=64, data_dir=data_dir), allocator="owl", method=method,
                     sparsity=SPARSITY)
    folder = run_prune(spec, tmp_path, stream=stream)
    manifest = _check_run(folder, per_row=method == "wanda")
    assert manifest["achieved"]["expert_fallback"]["per_block"] == [0, 0]
    not_pruned = {w["name"]: w["role"] for w in manifest["model_summary"]["not_pruned"]}
    assert ROUTER in not_pruned.values() and UNSUPPORTED not in not_pruned.values()
    assert manifest["model_summary"]["experts_per_block"] == [4, 4]


def test_streamed_and_in_memory_moe_prunes_are_identical(moe_folders, data_dir, tmp_path):
    from pruner.model.catalogue import ModelSpec
    from pruner.runs.execute import run_prune
    from pruner.specs import CalibSpec, PruneSpec

    spec = PruneSpec(model=ModelSpec(moe_folders["mixtral"], device="cpu"),
                     calib=CalibSpec(nsamples=4, seqlen=64, data_dir=data_dir), allocator="owl", method="sparsegpt",
                     sparsity=SPARSITY)
    memory = tf.AutoModelForCausalLM.from_pretrained(run_prune(spec, tmp_path / "a")).state_dict()
    streamed = tf.AutoModelForCausalLM.from_pretrained(run_prune(spec, tmp_path / "b", stream=True)).state_dict()
    assert memory.keys() == streamed.keys()
    for name in memory:
        assert torch.equal(memory[name], streamed[name]), name


# -- the routed calibration, pinned to a plain float64 reference ---------------------------------------------------

#: Smallest relative gap between the k-th and (k+1)-th lowest reference score of any row, and between the router's
#: top-k and next probability of any token: below it float32 and float64 may order two values differently.
TIE_GAP = 1e-4


def _plain_routed_wanda_block0(model, tokens, sparsity):
    """Wanda masks of block 0's experts computed plainly in float64: the MLP input of the dense model, the router's
    softmax and top-k done here, each expert's ‖X_j‖₂ over the tokens routed to it (its down_proj over its own
    intermediate activations act(X W_gateᵀ) ⊙ X W_upᵀ), each row's round(s·n) lowest |W|·‖X‖₂ pruned."""
    ref = copy.deepcopy(model).double()
    ref.config._experts_implementation = "eager"  # transformers' grouped matmul takes no float64
    block = find_blocks(ref)[1][0]
    captured = []
    handle = block.mlp.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        ref(input_ids=tokens, use_cache=False)
    handle.remove()
    x = torch.cat(captured)  # (tokens, H) float64
    experts = block.mlp.experts
    probs = torch.softmax(x @ block.mlp.gate.weight.T, dim=-1)  # (tokens, E)
    k = model.config.num_experts_per_tok
    ordered = probs.sort(dim=-1, descending=True).values
    gap = float(((ordered[:, k - 1] - ordered[:, k]) / ordered[:, k - 1]).min())
    top = probs.topk(k, dim=-1).indices
    masks, score_gaps, routed = {}, [], {}
    n_inter = experts.down_proj.shape[-1]
    for e in range(experts.down_proj.shape[0]):
        xe = x[(top == e).any(dim=-1)]
        routed[e] = xe.shape[0]
        w_gate, w_up = experts.gate_up_proj[e, :n_inter], experts.gate_up_proj[e, n_inter:]
        inter = experts.act_fn(xe @ w_gate.T) * (xe @ w_up.T)
        for part, w, inputs in (("gate_proj", w_gate, xe), ("up_proj", w_up, xe),
                                ("down_proj", experts.down_proj[e], inter)):
            score = w.abs() * (inputs * inputs).sum(0).sqrt()[None, :]
            cut = int(round(sparsity * w.shape[1]))
            s = score.sort(dim=1).values
            score_gaps.append(float(((s[:, cut] - s[:, cut - 1]) / s[:, cut].clamp_min(1e-30)).min()))
            order = torch.argsort(score, dim=1, stable=True)[:, :cut]
            masks[f"mlp.experts.{e}.{part}"] = torch.zeros_like(w, dtype=torch.bool).scatter_(1, order, True)
    return masks, min(gap, min(score_gaps)), routed


def test_expert_wanda_masks_equal_a_plain_float64_routed_reference():
    model = tiny_moe_model("mixtral", seed=0)
    tokens = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(3))  # seeds with no near-tie
    expected, gap, routed = _plain_routed_wanda_block0(model, tokens, SPARSITY)
    assert gap > TIE_GAP  # no near-ties in routing or at the cut: exact masks are a fair demand
    assert all(n > 0 for n in routed.values()) and sum(routed.values()) == 2 * tokens.numel()
    targets = {(i, n): LayerTarget(SPARSITY, None)
               for i, b in enumerate(find_blocks(model)[1]) for n in prunable_layers(b)}
    report = prune_model(model, tokens, "wanda", targets, "row", batch_size=2)
    block0 = find_blocks(model)[1][0]
    for name, mask in expected.items():
        got = weight_matrix(prunable_layers(block0)[name]) == 0
        assert torch.equal(got, mask), f"{name}: {(got != mask).sum()} positions differ"
    tokens_seen = {l.name: l.tokens for l in report.layers if l.block == 0}
    for e, n in routed.items():
        assert tokens_seen[f"mlp.experts.{e}.down_proj"] == n


def test_an_expert_with_no_routed_tokens_is_pruned_by_magnitude_and_counted(moe_folders, data_dir, tmp_path):
    """GPT-OSS's router has a bias: a very negative one for expert 3 means no token is ever routed there."""
    from pruner.model.catalogue import ModelSpec
    from pruner.runs.execute import run_prune
    from pruner.runs.manifest import read_run
    from pruner.specs import CalibSpec, PruneSpec

    model = tf.AutoModelForCausalLM.from_pretrained(moe_folders["gpt_oss"])
    for block in find_blocks(model)[1]:
        with torch.no_grad():
            block.mlp.router.bias[3] = -1e4
    folder = tmp_path / "starved"
    model.save_pretrained(folder)
    tf.AutoTokenizer.from_pretrained(moe_folders["gpt_oss"]).save_pretrained(folder)
    dense = {n: weight_matrix(l).clone() for n, l in prunable_layers(find_blocks(model)[1][1]).items()}
    spec = PruneSpec(model=ModelSpec(str(folder), device="cpu"),
                     calib=CalibSpec(nsamples=4, seqlen=64, data_dir=data_dir), allocator="uniform", method="wanda",
                     sparsity=SPARSITY)
    run = run_prune(spec, tmp_path / "cache")
    manifest = _check_run(run)
    assert manifest["achieved"]["expert_fallback"]["per_block"] == [3, 3]  # expert 3's gate, up and down
    starved = [l for l in manifest["achieved"]["layers"] if ".experts.3." in l["name"]]
    assert {l["fallback"] for l in starved} == {"magnitude"} and {l["tokens"] for l in starved} == {0}
    assert all(l["fallback"] is None and l["tokens"] > 0 for l in manifest["achieved"]["layers"]
               if ".experts.3." not in l["name"])
    # the fallback is magnitude within each row: the lowest |W| of every row of expert 3 are the zeros
    pruned = tf.AutoModelForCausalLM.from_pretrained(run)
    w = weight_matrix(prunable_layers(find_blocks(pruned)[1][1])["mlp.experts.3.down_proj"])
    w0 = dense["mlp.experts.3.down_proj"]
    cut = int(round(SPARSITY * w0.shape[1]))
    expected = torch.zeros_like(w0, dtype=torch.bool).scatter_(1, torch.argsort(w0.abs(), dim=1, stable=True)[:, :cut],
                                                              True)
    assert torch.equal(w == 0, expected)
    assert any("pruned by magnitude instead" in line for line in read_run(run).accounting_lines())


# -- weights the tool cannot prune ----------------------------------------------------------------------------------


def _mamba_folder(tokenizer, folder):
    config = tf.MambaConfig(vocab_size=len(tokenizer), hidden_size=32, state_size=4, num_hidden_layers=2,
                            expand=2, conv_kernel=4)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_weights_that_cannot_be_pruned_make_the_prune_refuse_unless_left_dense_on_request(smollm2, data_dir,
                                                                                           tmp_path):
    """A state-space (Mamba) block holds a 3-D causal-conv weight and a 2-D A_log: never pruned silently. Its
    dt_proj is an nn.Linear whose weight the model reads directly, so a method that needs activations refuses too."""
    folder = _mamba_folder(smollm2.tokenizer, tmp_path / "mamba")
    model = tf.AutoModelForCausalLM.from_pretrained(folder)
    names = unsupported_weights(find_blocks(model)[1])
    assert "0.mixer.conv1d.weight" in names and "0.mixer.A_log" in names
    summary = subprocess.run([sys.executable, "-m", "pruner", "model", "--model", str(folder)], capture_output=True,
                             text=True, timeout=300)
    assert summary.returncode == 0, summary.stderr
    assert "not pruned: mixer.A_log (" in summary.stdout and "not supported" in summary.stdout
    assert "a prune refuses this model unless --leave-unsupported-dense" in summary.stdout
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "pruner", "prune", "--model", str(folder), "--allocator", "uniform", "--sparsity",
           "0.5", "--nsamples", "2", "--seqlen", "32", "--data-dir", data_dir, "--cache-dir", str(cache),
           "--device", "cpu"]

    def refused(args, *needles):
        out = subprocess.run(cmd + args, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr and all(n in out.stderr for n in needles), out.stderr
        assert not (cache / "runs").exists() or not any((cache / "runs").iterdir())

    refused(["--method", "magnitude"], "mixer.conv1d.weight", "--leave-unsupported-dense")
    refused(["--method", "wanda", "--leave-unsupported-dense"], "mixer.dt_proj never ran as a module")
    done = subprocess.run(cmd + ["--method", "magnitude", "--leave-unsupported-dense"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "of all decoder-block weights" in done.stdout
    assert "not pruned: mixer.conv1d.weight" in done.stdout and "not supported" in done.stdout
    (run,) = (cache / "runs").iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert "0.mixer.conv1d.weight" in manifest["left_dense_unsupported"]
    assert manifest["spec"]["leave_unsupported_dense"] is True
    # what the method pruned is at S; counting every block weight it is below S, and the manifest says so
    assert manifest["achieved"]["overall"] == pytest.approx(0.5)
    assert manifest["achieved"]["decoder_overall"] < 0.5


def test_dense_models_account_for_every_block_weight(smollm2):
    block = find_blocks(smollm2.model)[1][0]
    roles = {w.name: w.role for w in block_weights(block)}
    assert sorted(n for n, r in roles.items() if r == "pruned") == sorted(f"{n}.weight" for n in prunable_layers(block))
    assert sorted(n for n, r in roles.items() if r != "pruned") == ["input_layernorm.weight",
                                                                  "post_attention_layernorm.weight"]
    assert {roles["input_layernorm.weight"]} == {"norm"}
    assert np.isclose(sum(w.numel for w in block_weights(block)), sum(p.numel() for p in block.parameters()))



# -- the dashboard ----------------------------------------------------------------------------------------------------


def test_model_and_outliers_pages_show_the_experts(moe_folders, data_dir, tmp_path, monkeypatch):
    """AppTest on a tiny Qwen2-MoE (shared expert + scalar shared-expert gate) with cached statistics."""
    from pruner.engine import artifacts
    from pruner.model.catalogue import ModelSpec
    from pruner.specs import CalibSpec, StatsSpec
    from tests.app.test_pages import figures, go, tiny_app, values

    folder = moe_folders["qwen2_moe"]
    stats = artifacts.get_stats(StatsSpec(ModelSpec(folder), CalibSpec.preset("tiny", data_dir=data_dir)), tmp_path)
    assert stats.experts_per_block == 4 and stats.layer_tokens is not None
    at = tiny_app(tmp_path, folder, data_dir, monkeypatch)
    go(at, "model")
    text = " ".join(m.value for m in at.markdown)
    assert "4 routed experts per block" in text and "routers are never pruned" in text
    assert any("`mlp.experts.*.down_proj`" in c.value for c in at.caption)
    shown = at.dataframe[0].value
    assert {"mlp.gate.weight", "mlp.shared_expert_gate.weight"} <= set(shown["weight"])
    go(at, "outliers")
    lod, heat, experts, share, dist = figures(at)
    assert "mlp.experts.*.gate_proj" in heat["data"][0]["y"]
    np.testing.assert_allclose(values(experts["data"][0]["z"]).reshape(4, 2).T, stats.expert_matrix(5.0) * 100)
    np.testing.assert_allclose(values(share["data"][0]["z"]).reshape(4, 2).sum(axis=0), [100, 100])
    # the token shares are the routed counts: top-2 of 4 experts, every calibration token counted twice
    routed = stats.layer_tokens[[i for i, n in enumerate(stats.layer_names) if n.endswith("up_proj")
                                 and ".experts." in n]]
    assert routed.sum() == 2 * 2 * 8 * 128  # 2 blocks × top-2 × the tiny preset's 8 × 128 tokens


# -- sharing a block's sparsity among its experts -------------------------------------------------------------------


def test_split_experts_by_hand():
    from pruner.allocation import AllocationRefused, split_experts

    # one block: a non-expert layer of 4 weights, experts 0 and 1 of 2 weights each; values 0.1 and 0.3, λₑ = 0.1:
    # scaled [0, 0.2], mean 0.1, so expert 0 (lower value) +0.1 and expert 1 −0.1; the block mean stays 0.5
    s = split_experts([0.5, 0.5, 0.5], [0, 0, 0], [-1, 0, 1], [4, 2, 2], [[0.1, 0.3]], 0.1)
    np.testing.assert_allclose(s, [0.5, 0.6, 0.4])
    # unequal sizes: expert 0 has 1 weight, expert 1 three; the mean of the scaled values is weighted: 0.15
    s = split_experts([0.5, 0.5], [0, 0], [0, 1], [1, 3], [[0.0, 1.0]], 0.1)
    np.testing.assert_allclose(s, [0.65, 0.45])
    assert (s * [1, 3]).sum() / 4 == pytest.approx(0.5)
    # two blocks split independently; an expert a block does not have is NaN and unused
    s = split_experts([0.4, 0.4, 0.6, 0.6], [0, 0, 1, 1], [0, 1, 0, 1], [1, 1, 1, 1], [[1.0, 2.0], [5.0, 5.0]], 0.05)
    np.testing.assert_allclose(s, [0.45, 0.35, 0.6, 0.6])
    with pytest.raises(AllocationRefused, match="λₑ=0.45 is too wide"):
        split_experts([0.9, 0.9], [0, 0], [0, 1], [1, 1], [[0.0, 1.0]], 0.45)
    with pytest.raises(ValueError, match="no routed experts"):
        split_experts([0.5], [0], [-1], [4], [[0.0]], 0.1)


def test_routing_split_prunes_rarely_used_experts_more_and_keeps_the_block_mean(moe_folders, data_dir, tmp_path):
    from pruner.model.catalogue import ModelSpec
    from pruner.runs.execute import run_prune
    from pruner.specs import CalibSpec, PruneSpec

    spec = PruneSpec(model=ModelSpec(moe_folders["olmoe"], device="cpu"),
                     calib=CalibSpec(nsamples=4, seqlen=64, data_dir=data_dir), allocator="owl", method="wanda",
                     sparsity=SPARSITY, expert_split="routing", expert_params={"expert_lam": 0.1})
    assert spec.key() != PruneSpec(**{**spec.__dict__, "expert_split": "uniform", "expert_params": {}}).key()
    manifest = _check_run(run_prune(spec, tmp_path))
    layers = manifest["achieved"]["layers"]
    blocks = manifest["allocation"]["block_sparsity"]
    for b in (0, 1):
        mine = [l for l in layers if l["block"] == b]
        # the block's parameter-weighted mean is the block allocator's
        mean = sum(l["allocated"] * l["numel"] for l in mine) / sum(l["numel"] for l in mine)
        assert mean == pytest.approx(blocks[b], abs=1e-12)
        # attention keeps the block's sparsity; experts are ordered by their routed tokens (fewer: pruned more)
        assert {round(l["allocated"], 12) for l in mine if ".experts." not in l["name"]} == {round(blocks[b], 12)}
        downs = sorted((l["tokens"], l["allocated"]) for l in mine if l["name"].endswith("down_proj")
                       and ".experts." in l["name"])
        assert [a for _, a in downs] == sorted([a for _, a in downs], reverse=True)
        assert downs[0][1] - downs[-1][1] == pytest.approx(0.2)  # the span is 2λₑ
    assert manifest["allocation"]["expert_split"] == {"split": "routing", "expert_lam": 0.1, "expert_m": 5.0}


def test_blocks_of_unequal_size_are_shifted_to_the_parameter_weighted_mean():
    """A DeepSeek-style model: a small dense block 0 and a large expert block 1 (1 : 3 weights). OWL's formula gives
    [0.6, 0.4] (unweighted mean 0.5, weighted 0.45); the whole curve moves by +0.05 to [0.65, 0.45]."""
    from types import SimpleNamespace

    from pruner.allocation import allocate, to_parameter_mean

    inputs = SimpleNamespace(layer_block=np.array([0, 1]), layer_shapes=np.array([[1, 1], [3, 1]]), n_blocks=2,
                             lod=lambda m: np.array([0.0, 1.0]))
    alloc = allocate("owl", inputs, 0.5, lam=0.1)
    np.testing.assert_allclose(alloc.block_sparsity, [0.65, 0.45])
    assert alloc.overall == pytest.approx(0.5)
    np.testing.assert_array_equal(to_parameter_mean([0.6, 0.4], [2, 2], 0.5), [0.6, 0.4])  # equal sizes: untouched


def test_moe_models_get_a_new_identity_so_older_statistics_and_runs_are_not_reused(moe_folders, tiny_folder):
    """Statistics and runs of MoE models made before experts were units left the experts out: their keys must differ."""
    from pruner.model.catalogue import ModelSpec, model_identity

    assert model_identity(ModelSpec(moe_folders["mixtral"]))["expert_units"] == 1
    assert "expert_units" not in model_identity(ModelSpec(tiny_folder))
