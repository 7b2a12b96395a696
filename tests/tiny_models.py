"""Tiny random-init causal LMs of several families, built from configs (no download)."""

import torch
import transformers as tf

VOCAB = 96
TINY_CONFIGS = {
    "llama": lambda: tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2),
    "mistral": lambda: tf.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
    "qwen2": lambda: tf.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2),
    # sliding window shorter than the sequence: blocks get different masks and rotary tables
    "gemma3": lambda: tf.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=8, sliding_window=4,
                                          layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=3,
                                num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64),
    "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64),
}
EXPECTED_LAYERS = {
    "llama": 7, "mistral": 7, "qwen2": 7, "gemma3": 7, "opt": 6, "gpt2": 4, "gpt_neox": 4,
}


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(TINY_CONFIGS[family](), dtype=torch.float32)
    return model.eval().requires_grad_(False)


def tiny_tokens(n: int = 6, seqlen: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)


#: Tiny mixture-of-experts configs (hidden 64, 2 blocks, 4 experts, top-2): transformers 5 keeps their routed
#: experts as fused 3-D parameters. Qwen2-MoE adds a shared expert with its own scalar gate (a router), GPT-OSS
#: stores the experts transposed with gate and up interleaved and adds expert biases. Experts are sized so that, as
#: in real MoE models, they hold most of a block's weights (routers, norms and biases under 1%).
MOE_CONFIGS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=48,
                      head_dim=16),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=48),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=48,
                      shared_expert_intermediate_size=48),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48, head_dim=16,
                    layer_types=["sliding_attention", "full_attention"]),
}


def tiny_moe_config(family: str, vocab_size: int = VOCAB):
    return tf.AutoConfig.for_model(family, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
                                   **MOE_CONFIGS[family])


def tiny_moe_model(family: str, seed: int = 0, vocab_size: int = VOCAB):
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_moe_config(family, vocab_size), dtype=torch.float32)
    return model.eval().requires_grad_(False)
