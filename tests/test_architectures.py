"""A representative dozen of the architecture walk (bench/architectures.py; the full table is docs/architectures.md):
mixture-of-experts and dense families pass every check, hybrid and state-space ones are refused with the reason,
and none of them fails."""

import pytest

from bench.architectures import PASS, REFUSED, check

EXPECTED = {
    # routed experts as fused 3-D parameters (GPT-OSS transposed and interleaved; DeepSeek-V3 with a dense block 0)
    "mixtral": PASS, "qwen3_moe": PASS, "olmoe": PASS, "qwen2_moe": PASS, "gpt_oss": PASS, "deepseek_v3": PASS,
    # dense families the tool had never run: fused qkv (Phi-3), q/k norms (Qwen3), soft-capping (Gemma 2), Falcon
    "phi3": PASS, "qwen3": PASS, "gemma2": PASS, "falcon": PASS,
    # weights the tool cannot prune: a state-space conv (Jamba, Falcon-H1), Llama-4's experts (no layout attributes)
    "jamba": REFUSED, "falcon_h1": REFUSED, "llama4_text": REFUSED,
    # a decoder whose cross-attention never runs without an encoder
    "bart": REFUSED,
}
REASONS = {"jamba": "mamba.conv1d.weight", "falcon_h1": "mamba.conv1d.weight",
           "llama4_text": "feed_forward.experts.gate_up_proj", "bart": "encoder_attn"}


@pytest.mark.parametrize("model_type", list(EXPECTED))
def test_architecture(model_type):
    outcome, detail, _ = check(model_type)
    assert outcome == EXPECTED[model_type], detail
    if outcome == REFUSED:
        assert REASONS[model_type] in detail
    else:
        assert "wanda" in detail and "sparsegpt" in detail
