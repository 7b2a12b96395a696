"""The pre-flight memory plan (pruner/memory_plan.py): hand-computed parts, the limit setting, refusal."""

import pytest
import transformers as tf

from pruner.engine import memory_plan
from pruner.engine.memory_plan import MemoryPlan, check_fits, parse_bytes, plan_prune, plan_whole_model, prune_ways_out

#: hidden 32, intermediate 48, 4 heads of 8, 2 key-value heads, vocabulary 100, 3 blocks, untied head
CONFIG = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
#: q 32×32, k 16×32, v 16×32, o 32×32, gate 48×32, up 48×32, down 32×48, two norms of 32
BLOCK_PARAMS = 1024 + 512 + 512 + 1024 + 1536 + 1536 + 1536 + 64
#: embeddings 100×32, head 100×32, final norm 32
OUTSIDE_PARAMS = 3200 + 3200 + 32


def test_streamed_sparsegpt_plan_by_hand():
    plan = plan_prune(CONFIG, dtype_bytes=4, method="sparsegpt", nsamples=8, seqlen=16, batch_size=4, streamed=True)
    p = plan.parts
    assert p["runtime"] == memory_plan.RUNTIME_BYTES
    assert p["weights outside the blocks"] == OUTSIDE_PARAMS * 4
    assert p["one block"] == BLOCK_PARAMS * 4
    assert p["shard writer buffer"] == (OUTSIDE_PARAMS + 3 * BLOCK_PARAMS) * 4  # the whole model is smaller
    assert p["calibration activations"] == 2 * 8 * 16 * 32 * 4
    assert p["one mini-batch inside a block"] == 4 * 16 * (2 * 48 + 4 * 32) * 4 + 4 * 4 * 16 * 16 * 4
    assert p["Hessians"] == (6 * 32 * 32 + 48 * 48) * 4  # one per layer: six read 32 inputs, down_proj 48
    assert p["reconstruction workspace"] == 2 * (48 * 32) * 4 + 2 * 48 * 48 * 4
    assert plan.total == sum(p.values())


def test_in_memory_wanda_plan_by_hand_and_bf16_halves_the_weights():
    plan = plan_prune(CONFIG, dtype_bytes=4, method="wanda", nsamples=8, seqlen=16, batch_size=4, streamed=False)
    assert plan.parts["weights"] == (OUTSIDE_PARAMS + 3 * BLOCK_PARAMS) * 4
    assert plan.parts["scores and mask"] == 48 * 32 * 9
    half = plan_prune(CONFIG, dtype_bytes=2, method="wanda", nsamples=8, seqlen=16, batch_size=4, streamed=False)
    assert half.parts["weights"] * 2 == plan.parts["weights"]
    magnitude = plan_prune(CONFIG, dtype_bytes=4, method="magnitude", nsamples=8, seqlen=16, batch_size=4,
                           streamed=False, needs_inputs=False)
    assert "calibration activations" not in magnitude.parts


@pytest.mark.parametrize("text, expected", [("1500", 1500), ("2KiB", 2048), ("1.5 GiB", 3 * 2**29),
                                            ("512MB", 512 * 2**20), ("3g", 3 * 2**30)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_names_the_setting():
    with pytest.raises(ValueError, match="PRUNER_MEMORY_LIMIT='lots': expected a size such as 6GiB"):
        parse_bytes("lots")


def test_a_plan_over_the_limit_is_refused_with_the_numbers_and_ways_out(monkeypatch):
    monkeypatch.setenv("PRUNER_MEMORY_LIMIT", "1GiB")
    plan = MemoryPlan({"runtime": 2**30, "weights": 2**30})
    with pytest.raises(ValueError) as err:
        check_fits(plan, ways=prune_ways_out(streamed=False, offloaded=False, device="cpu"))
    message = str(err.value)
    assert ("needs about 2.00 GiB (runtime 1.00 GiB, weights 1.00 GiB), but 1.00 GiB of host memory is allowed "
            "(PRUNER_MEMORY_LIMIT)") in message and "--stream" in message and "--nsamples" in message
    assert "--offload-activations" not in message  # on CPU the activations are in host memory anyway
    with pytest.raises(ValueError) as err:
        check_fits(plan, ways=prune_ways_out(streamed=True, offloaded=False, device="cpu"))
    assert "--stream" not in str(err.value)  # already streamed: not offered again
    assert "--offload-activations" in " ".join(prune_ways_out(streamed=True, offloaded=False, device="cuda"))
    check_fits(MemoryPlan({"runtime": 2**29}), ways=[])  # fits: no error


def test_cli_refuses_a_prune_that_cannot_fit_before_it_starts(tiny_folder, tmp_path, data_dir):
    """A real subprocess with a limit far below the plan: exit 2, one line, nothing cached."""
    import os
    import subprocess
    import sys

    from pruner.store.files import PROJECT_ROOT

    cmd = [sys.executable, "-m", "pruner", "prune", "--model", tiny_folder, "--preset", "tiny", "--allocator",
           "uniform", "--method", "sparsegpt", "--sparsity", "0.5", "--cache-dir", str(tmp_path), "--data-dir",
           data_dir]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300,
                       env={**os.environ, "PRUNER_MEMORY_LIMIT": "200MiB"})
    assert r.returncode == 2, r.stderr
    assert "this prune needs about" in r.stderr and "but 0.20 GiB of host memory is allowed (PRUNER_MEMORY_LIMIT)" \
        in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


ACTIVATIONS = 8 * 16 * 32 * 4  # nsamples × seqlen × hidden float32
ONE_BATCH = 4 * 16 * (2 * 48 + 4 * 32) * 4 + 4 * 4 * 16 * 16 * 4


def test_on_a_gpu_the_block_work_is_device_memory_and_offload_moves_the_activations_to_the_host():
    """Planned from the config alone: no GPU is needed to plan for one."""
    plan = plan_prune(CONFIG, dtype_bytes=4, method="wanda", nsamples=8, seqlen=16, batch_size=4, streamed=True,
                      device="cuda")
    assert plan.parts == {"runtime": memory_plan.RUNTIME_BYTES, "weights outside the blocks": OUTSIDE_PARAMS * 4,
                          "shard writer buffer": (OUTSIDE_PARAMS + 3 * BLOCK_PARAMS) * 4}
    assert plan.device_parts == {"one block": BLOCK_PARAMS * 4, "weights outside the blocks": OUTSIDE_PARAMS * 4,
                                 "calibration activations": 2 * ACTIVATIONS, "one mini-batch inside a block": ONE_BATCH,
                                 "scores and mask": 48 * 32 * 9,
                                 "counting a block's zeros": 48 * 32}  # a byte per weight of the largest tensor
    offloaded = plan_prune(CONFIG, dtype_bytes=4, method="wanda", nsamples=8, seqlen=16, batch_size=4, streamed=True,
                           device="cuda", offload=True)
    assert offloaded.parts["calibration activations"] == 2 * ACTIVATIONS
    assert "calibration activations" not in offloaded.device_parts
    assert offloaded.total + offloaded.device_total == plan.total + plan.device_total
    assert "on cuda (one block" in plan.text()
    cpu = plan_prune(CONFIG, dtype_bytes=4, method="wanda", nsamples=8, seqlen=16, batch_size=4, streamed=True)
    assert not cpu.device_parts and "one block" in cpu.parts  # on CPU everything is host memory


def test_learning_besa_in_the_job_is_planned_by_hand():
    plan = plan_prune(CONFIG, dtype_bytes=4, method="wanda", nsamples=8, seqlen=16, batch_size=4, streamed=False,
                      learning=True)
    assert plan.parts["BESA's recorded block inputs and outputs"] == 2 * ACTIVATIONS
    assert plan.parts["BESA's per-weight state"] == BLOCK_PARAMS * (8 + 8 + 2 * 4)  # float32: no copy
    half = plan_prune(CONFIG, dtype_bytes=2, method="wanda", nsamples=8, seqlen=16, batch_size=4, streamed=False,
                      learning=True)
    assert half.parts["BESA's per-weight state"] == BLOCK_PARAMS * (8 + 8 + 2 * 4 + 4)  # bf16: a float32 copy
    assert plan.parts["BESA's autograd of one mini-batch"] == 2 * ONE_BATCH
    # magnitude reads no calibration inputs, but learning BESA does
    magnitude = plan_prune(CONFIG, dtype_bytes=4, method="magnitude", nsamples=8, seqlen=16, batch_size=4,
                           streamed=False, needs_inputs=False, learning=True)
    assert magnitude.parts["calibration activations"] == 2 * ACTIVATIONS


def test_the_allocation_search_is_planned_by_hand():
    plan = plan_prune(CONFIG, dtype_bytes=4, method="wanda", nsamples=8, seqlen=16, batch_size=4, streamed=False,
                      learning="search")
    p = plan.parts
    assert p["the search's dense copy of the blocks' weights"] == 3 * BLOCK_PARAMS * 4
    assert p["the search's score ranks"] == 3 * BLOCK_PARAMS * 2  # int16: rows of at most 48 weights
    # its last stage scores 2,048 tokens, but this calibration set holds 8 windows of 16
    assert p["the dense model's next-token log-probabilities"] == 8 * 16 * 100 * 4
    assert p["one window's logits and KL divergence"] == 3 * 16 * 100 * 4
    assert "BESA's per-weight state" not in p and plan.total == sum(p.values())
    assert "the search's kept block inputs (two passes')" not in p  # one-shot masks: no sequential passes
    # sequential passes keep the inputs of blocks 0, 1, 2 (every ⌈3 ÷ 8⌉ = 1 block), of two passes at once
    sequential = plan_prune(CONFIG, dtype_bytes=4, method="wanda", nsamples=8, seqlen=16, batch_size=4,
                            streamed=False, learning="search-sequential").parts
    assert sequential["the search's kept block inputs (two passes')"] == 2 * 3 * ACTIVATIONS
    assert {k: v for k, v in sequential.items() if "kept block inputs" not in k} == p
    # with SparseGPT's candidates: no ranks; per block the factors of H⁻¹, counted per layer (q, k, v, o and gate,
    # up read 32 inputs, down 48), and the pruned blocks, three times each (while the seeds are scored: the best
    # seed's, the last one's, the next one's); 4 children × 2 blocks × 3 switches of kept levels of the largest block
    sparse = plan_prune(CONFIG, dtype_bytes=4, method="sparsegpt", nsamples=8, seqlen=16, batch_size=4,
                        streamed=False, learning="search-sparsegpt").parts
    assert "the search's score ranks" not in sparse
    assert sparse["the search's SparseGPT factors of H⁻¹ (up to three passes' at once)"] == 3 * 3 * (
        6 * 32 * 32 + 48 * 48) * 4
    assert sparse["the search's pruned blocks of up to three passes"] == 3 * 3 * BLOCK_PARAMS * 4
    assert sparse["the search's blocks pruned at other levels, kept"] == 24 * BLOCK_PARAMS * 4
    assert sparse["the search's kept block inputs (two passes')"] == 2 * 3 * ACTIVATIONS
    assert memory_plan.learning_kind("search", {"sparsegpt": 1, "sequential": 1}) == "search-sparsegpt"
    assert memory_plan.learning_kind("search", {"sparsegpt": 0, "sequential": 1}) == "search-sequential"
    assert memory_plan.learning_kind("search", {"sparsegpt": 0, "sequential": 0}) == "search"
    assert memory_plan.learning_kind("besa", {"beta": 50}) is True


def test_whole_model_evaluations_are_planned_by_hand():
    weights = (OUTSIDE_PARAMS + 3 * BLOCK_PARAMS) * 4
    zs = plan_whole_model(CONFIG, what="zero-shot", batch_size=8)
    tokens = memory_plan.LONGEST_ZEROSHOT_TOKENS  # below the config's 2048 context
    assert zs.parts == {"runtime": memory_plan.RUNTIME_BYTES, "weights": weights,
                        "logits and their log-softmax": 2 * 8 * tokens * 100 * 4,
                        "activations inside a block": 8 * tokens * (2 * 48 + 4 * 32) * 4 + 8 * 4 * tokens * tokens * 4}
    ppl = plan_whole_model(CONFIG, what="perplexity", seqlen=64)
    assert ppl.parts["logits and their log-softmax"] == 2 * 64 * 100 * 4
    speed = plan_whole_model(CONFIG, what="speed", models=2, batch_size=2, seqlen=16)
    assert speed.parts["weights"] == 2 * weights and speed.parts["ONNX export copy of the weights"] == weights
    # the export's forward of B × T tokens: a block's transient tensors, attention scores and the logits
    assert speed.parts["the export's forward"] == (2 * 16 * (2 * 48 + 4 * 32) * 4 + 2 * 4 * 16 * 16 * 4
                                                   + 2 * 16 * 100 * 4)
    # LoRA training keeps every block's activations for the backward pass (3 blocks, twice a block's transients)
    train = plan_whole_model(CONFIG, what="training", batch_size=2, seqlen=16)
    one_block = 2 * 16 * (2 * 48 + 4 * 32) * 4 + 2 * 4 * 16 * 16 * 4
    assert train.parts == {"runtime": memory_plan.RUNTIME_BYTES, "weights": weights,
                           "activations kept for the backward pass": 3 * 2 * one_block,
                           "logits, their log-softmax and gradient": 3 * 2 * 16 * 100 * 4}
    # the damage table keeps the held-out windows' hidden states entering each of the 3 blocks and the head
    table = plan_whole_model(CONFIG, what="damage table", batch_size=4, seqlen=8)
    assert table.parts["held-out hidden states entering every block"] == 4 * 4 * 8 * 32 * 4
    assert table.parts["logits and their log-softmax"] == 2 * 4 * 8 * 100 * 4
    # the attention scores grow with T²: a 100,000-token speed shape is refused long before it is exported
    assert plan_whole_model(CONFIG, what="speed", seqlen=100_000).total > 4 * 100_000**2 * 4
    with pytest.raises(ValueError, match="what must be one of perplexity, zero-shot, speed, training, damage table"):
        plan_whole_model(CONFIG, what="accuracy")


def test_zero_shot_that_cannot_fit_is_refused_before_loading(tiny_run, data_dir):
    """`eval --zeroshot` in a real subprocess under a limit: the tiny Llama has SmolLM2's 49,152-token vocabulary,
    so lm-eval's longest batch of 8 needs 8 × 1,300 × 49,152 float32 logits twice (3.8 GiB); refused, nothing
    stored; a batch of 1 fits under the same limit's plan."""
    import os
    import subprocess
    import sys

    from pruner.store.files import PROJECT_ROOT

    cache, folder = tiny_run
    before = (folder / "manifest.json").read_text()
    cmd = [sys.executable, "-m", "pruner", "eval", "--run", folder.name, "--zeroshot", "--tasks", "rte",
           "--cache-dir", str(cache), "--data-dir", data_dir]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300,
                       env={**os.environ, "PRUNER_MEMORY_LIMIT": "2GiB"})
    assert r.returncode == 2, r.stderr
    assert "zero-shot of" in r.stderr and "(the whole model in memory) needs about" in r.stderr
    assert "logits and their log-softmax 3.81 GiB" in r.stderr and "--zeroshot-batch" in r.stderr
    assert (folder / "manifest.json").read_text() == before  # nothing stored (the run is shared by other tests)
    small = plan_whole_model(__import__("transformers").AutoConfig.from_pretrained(folder), what="zero-shot",
                             batch_size=1)
    assert small.total < 2 * 2**30
