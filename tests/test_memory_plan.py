"""The pre-flight memory plan (pruner/memory_plan.py): hand-computed parts, the limit setting, refusal."""

import pytest
import transformers as tf

from pruner import memory_plan
from pruner.memory_plan import MemoryPlan, check_fits, parse_bytes, plan_prune

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
        check_fits(plan, streamed=False)
    message = str(err.value)
    assert "needs about 2.00 GiB (runtime 1.00 GiB, weights 1.00 GiB), but 1.00 GiB is allowed (PRUNER_MEMORY_LIMIT)" \
        in message and "--stream" in message and "--nsamples" in message
    with pytest.raises(ValueError) as err:
        check_fits(plan, streamed=True)
    assert "--stream" not in str(err.value)  # already streamed: not offered again
    check_fits(MemoryPlan({"runtime": 2**29}), streamed=False)  # fits: no error


def test_cli_refuses_a_prune_that_cannot_fit_before_it_starts(tiny_folder, tmp_path, data_dir):
    """A real subprocess with a limit far below the plan: exit 2, one line, nothing cached."""
    import os
    import subprocess
    import sys

    from pruner.store import PROJECT_ROOT

    cmd = [sys.executable, "-m", "pruner", "prune", "--model", tiny_folder, "--preset", "tiny", "--allocator",
           "uniform", "--method", "sparsegpt", "--sparsity", "0.5", "--cache-dir", str(tmp_path), "--data-dir",
           data_dir]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300,
                       env={**os.environ, "PRUNER_MEMORY_LIMIT": "200MiB"})
    assert r.returncode == 2, r.stderr
    assert "this prune needs about" in r.stderr and "but 0.20 GiB is allowed (PRUNER_MEMORY_LIMIT)" in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
