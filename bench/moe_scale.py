"""Streamed pruning of a mixture-of-experts model with realistic expert shapes: time per block and peak memory
against the memory plan.

Builds a random-init checkpoint with Qwen3-30B-A3B's block shapes (hidden 2048, 32 query / 4 key-value heads of
128, 128 routed experts of intermediate 768, top-8; Qwen3-MoE architecture), 2 blocks by default, SmolLM2's
tokenizer and 49,152-token vocabulary with a tied head (the vocabulary does not change a block's work). It is
written block by block as sharded safetensors, each expert as its own tensors as transformers' save_pretrained
writes them (so the streamed prune fuses them as it reads), then pruned with `python -m pruner prune --stream`
(tiny calibration preset: 8 × 128 tokens, about 64 routed to each expert; uniform 50%) in a fresh process whose
peak RSS (VmHWM) is reported beside the plan's figure.

    python -m bench.moe_scale [--blocks 2] [--methods wanda sparsegpt] [--keep DIR]

Needs about 5 GB of disk per block-pair for the checkpoint and as much for each pruned run (deleted afterwards).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import git_rev, machine
from bench.stream_memory import borrowed_tokenizer, prune_streamed, write_random_checkpoint
from pruner.store.files import PROJECT_ROOT, default_data_dir

#: Qwen3-30B-A3B's shapes (its config.json on the hub: hidden_size 2048, num_attention_heads 32,
#: num_key_value_heads 4, head_dim 128, num_experts 128, num_experts_per_tok 8, moe_intermediate_size 768).
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 2048, 32, 4, 128
EXPERTS, TOP_K, EXPERT_INTERMEDIATE = 128, 8, 768


def build_checkpoint(folder: Path, blocks: int, tokenizer_folder: Path) -> int:
    """A random Qwen3-MoE of ``blocks`` blocks, written block by block with per-expert tensors; its parameter count."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(tokenizer_folder)
    config = tf.Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=blocks,
                               num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                               num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=EXPERT_INTERMEDIATE,
                               intermediate_size=6144, max_position_embeddings=2048, tie_word_embeddings=True,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)

    return write_random_checkpoint(config, folder, tokenizer,
                                   lambda state: per_expert_tensors(state, EXPERTS, EXPERT_INTERMEDIATE))


def per_expert_tensors(state: dict, experts: int, intermediate: int) -> dict:
    """A block's state with its fused expert tensors split as save_pretrained writes Qwen3-MoE: each expert's own
    gate_proj, up_proj and down_proj (so that a streamed prune fuses them as it reads)."""
    out = {}
    for name, tensor in state.items():
        parent = name.rsplit(".", 1)[0]
        if name.endswith("experts.gate_up_proj"):
            for e in range(experts):
                out[f"{parent}.{e}.gate_proj.weight"] = tensor[e, :intermediate].clone()
                out[f"{parent}.{e}.up_proj.weight"] = tensor[e, intermediate:].clone()
        elif name.endswith("experts.down_proj"):
            for e in range(experts):
                out[f"{parent}.{e}.down_proj.weight"] = tensor[e].clone()
        else:
            out[name] = tensor
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--keep", type=Path, help="build the checkpoint here and keep it")
    args = ap.parse_args()
    data_dir = str(default_data_dir())
    tokenizer_folder = borrowed_tokenizer()
    root = args.keep or Path(tempfile.mkdtemp(prefix="moe-bench-", dir=PROJECT_ROOT / "cache"))
    folder = root / f"qwen3-30b-a3b-shape-{args.blocks}"
    try:
        if not (folder / "config.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            params = build_checkpoint(folder, args.blocks, tokenizer_folder)
            print(f"# built {folder.name}: {params / 1e9:.2f} B parameters in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        weights_gb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**30
        print(f"# streamed prune, random Qwen3-MoE with Qwen3-30B-A3B blocks ({HIDDEN} hidden, {EXPERTS} experts of "
              f"{EXPERT_INTERMEDIATE}, top-{TOP_K}), {args.blocks} blocks, fp32 weights {weights_gb:.2f} GiB, "
              "calibration preset tiny (8 × 128), uniform 50%")
        print(f"# machine: {machine()}; commit {git_rev()}")
        print("| method | peak RSS GiB | planned GiB | peak ÷ planned | prune s | s per block | experts by fallback "
              "| decoder sparsity |")
        print("|---|---|---|---|---|---|---|---|")
        for method in args.methods:
            peak, manifest = prune_streamed(folder, method, root / "cache", data_dir)
            planned = manifest["memory"]["planned_peak_gb"]
            prune_s = manifest["timings_s"]["prune"]
            fallback = sum(manifest["achieved"]["expert_fallback"]["per_block"])
            print(f"| {method} | {peak:.2f} | {planned:.2f} | {peak / planned:.2f} | {prune_s:.0f} | "
                  f"{prune_s / args.blocks:.0f} | {fallback} | {manifest['achieved']['decoder_overall']:.4f} |",
                  flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
