"""Which causal-LM architectures this tool prunes: every model type transformers maps to a causal LM, built from a
tiny random config, through statistics → OWL allocation → Wanda and SparseGPT → perplexity → save and reload.

    python -m bench.architectures                    # every architecture; the table (markdown) on stdout
    python -m bench.architectures --only mixtral qwen3_moe mamba
    python -m bench.architectures --out docs/architectures.md

Outcome per architecture:

* **pass** — statistics (OWL's LOD), the OWL allocation at S = 0.5, Wanda and SparseGPT prunes, a perplexity on the
  calibration tokens and a save/``from_pretrained`` round trip all ran, and the checks held: every prunable unit
  (routed experts included) holds its allocated share of zeros (± one weight per row), the weights counted as pruned
  plus the ones listed as not pruned are every parameter of the blocks, the perplexity is finite, and the reloaded
  model gives the pruned model's logits.
* **refused** — the tool stopped with its own clear error (a ``ValueError`` raised by the tool: weights it cannot
  prune, a layer that never runs as a module, no list of decoder blocks), naming the reason. Nothing was mis-pruned.
* **not built** — transformers could not build or run the model from a tiny generic config (its own error), so the
  tool was never reached: not a verdict on the tool.
* **fail** — anything else: an exception from the tool's code, or a check above that did not hold. These are bugs.

The tiny config keeps the architecture's own defaults and shrinks every size field it has: hidden 64, 2 blocks,
4 heads (2 KV heads), head_dim 16, intermediate 128, 4 routed experts of intermediate 64 with top-2.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
import traceback

import torch

#: Size fields shrunk when the config has them (the name → the tiny value); anything else keeps its default.
TINY_SIZES = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "decoder_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 128, "ffn_dim": 128, "decoder_ffn_dim": 128, "n_inner": 128, "ffn_hidden_size": 128,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_intermediate_size": 64, "expert_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "max_position_embeddings": 256, "n_positions": 256,
    "vocab_size": 128,
    # multi-head latent attention (DeepSeek-V2/V3, Kimi, GLM-MoE-DSA ...): its own head sizes and ranks
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "q_lora_rank": 16, "kv_lora_rank": 16,
    "first_k_dense_replace": 1,  # DeepSeek-style models: the first block dense, the second with experts
    "n_group": 1, "topk_group": 1,  # their grouped routing: one group of the 4 experts
}
#: Special token ids that must lie inside the tiny vocabulary (set to 0 when the config has them).
TOKEN_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")
VOCAB = TINY_SIZES["vocab_size"]
SPARSITY = 0.5
#: Calibration: random token ids, (samples, tokens).
CALIBRATION_SHAPE = (4, 32)

PASS, REFUSED, NOT_BUILT, FAIL = "pass", "refused", "not built", "fail"


def tiny_config(model_type: str):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    targets = [config]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:
        targets.append(text)
    for c in targets:
        for name, value in TINY_SIZES.items():
            if hasattr(c, name) and isinstance(getattr(c, name), int) and not isinstance(getattr(c, name), bool):
                try:
                    setattr(c, name, value)
                except AttributeError:  # a derived property (Falcon's head_dim): it follows the fields it derives from
                    pass
        if hasattr(c, "qk_rope_head_dim") and hasattr(c, "head_dim"):  # MLA: the rotary part is the head_dim
            c.head_dim = c.qk_rope_head_dim
        for name in TOKEN_ID_FIELDS:
            if isinstance(getattr(c, name, None), int) and getattr(c, name) >= VOCAB:
                setattr(c, name, 0)
        layers = getattr(c, "num_hidden_layers", None)
        for name in ("layer_types", "layers_block_type", "mlp_layer_types", "attn_layer_indices"):
            value = getattr(c, name, None)
            if isinstance(value, list) and layers and len(value) > layers and name != "attn_layer_indices":
                setattr(c, name, value[:layers])
    return config


#: A "tiny" model over this many parameters kept sizes the generic config fields do not reach (e.g. byte-level
#: models' hash embeddings): it is reported as not built rather than built at gigabytes.
MAX_TINY_PARAMETERS = 20_000_000


def build(model_type: str):
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    type(config).from_dict(config.to_dict())  # the validation transformers runs on loading a saved config
    with torch.device("meta"):  # count first, at no memory cost
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_TINY_PARAMETERS:
        raise ValueError(f"the tiny config still has {size / 1e6:.0f} M parameters (sizes it does not shrink)")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval().requires_grad_(False)


def _check_units(model, report) -> str | None:
    """None when every prunable unit holds its allocated zeros (± one weight per row) and every block weight is
    either pruned or listed as not pruned; else what is wrong."""
    from pruner.model.anatomy import PRUNED, block_weights, find_blocks, prunable_layers, weight_matrix

    allocated = {(l.block, l.name): l.allocated for l in report.layers}
    for i, block in enumerate(find_blocks(model)[1]):
        for name, layer in prunable_layers(block).items():
            w = weight_matrix(layer)
            want = allocated[(i, name)] * w.numel()
            zeros = int((w == 0).sum())
            if abs(zeros - want) > w.shape[0]:
                return f"block {i} {name}: {zeros} zeros, allocated {want:.0f}"
        accounted = sum(w.numel for w in block_weights(block))
        if accounted != sum(p.numel() for p in block.parameters()):
            return f"block {i}: the accounting misses parameters"
        if not any(w.role == PRUNED for w in block_weights(block)):
            return f"block {i}: nothing pruned"
    return None


def check(model_type: str) -> tuple[str, str, float]:
    """(outcome, detail, seconds) for one architecture."""
    from transformers import AutoModelForCausalLM

    from pruner.allocation import allocate
    from pruner.engine.prune import layer_targets, prune_model
    from pruner.engine.stats import collect_stats
    from pruner.model.anatomy import experts_layout, find_blocks, unsupported_message, unsupported_weights

    t0 = time.perf_counter()
    try:
        model = build(model_type)
        tokens = torch.randint(0, VOCAB, CALIBRATION_SHAPE, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model(input_ids=tokens[:1], use_cache=False)
    except Exception as err:  # transformers' own limits on a generic tiny config
        return NOT_BUILT, f"{type(err).__name__}: {str(err).splitlines()[0][:140]}", time.perf_counter() - t0
    step = "anatomy"
    try:
        blocks = find_blocks(model)[1]
        unsupported = unsupported_weights(blocks)
        if unsupported:  # what run_prune refuses (without --leave-unsupported-dense)
            return REFUSED, unsupported_message(unsupported, type(model).__name__)[:220], time.perf_counter() - t0
        step = "statistics"
        stats = collect_stats(model, tokens, "cpu", batch_size=2)
        alloc = allocate("owl", stats, SPARSITY)
        targets = layer_targets(alloc.layer_sparsity, list(zip(stats.layer_block.tolist(), stats.layer_names)), None)
        details = []
        experts = experts_layout(blocks)
        if experts:
            details.append(f"{max(experts['experts_per_block'])} experts/block")
        for method in ("wanda", "sparsegpt"):
            step = f"{method} prune"
            pruned = copy.deepcopy(model)
            report = prune_model(pruned, tokens, method, targets, "row", batch_size=2)
            problem = _check_units(pruned, report)
            if problem:
                return FAIL, f"{method}: {problem}", time.perf_counter() - t0
            with torch.no_grad():
                out = pruned(input_ids=tokens, labels=tokens, use_cache=False)
            ppl = math.exp(float(out.loss))
            if not math.isfinite(ppl):
                return FAIL, f"{method}: perplexity {ppl}", time.perf_counter() - t0
            step = f"{method}: save and from_pretrained"
            with tempfile.TemporaryDirectory() as tmp:
                pruned.save_pretrained(tmp)
                reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
                with torch.no_grad():
                    again = reloaded(input_ids=tokens, use_cache=False).logits
            if not torch.allclose(again, out.logits, rtol=1e-4, atol=1e-4):
                return FAIL, f"{method}: reloaded logits differ by {float((again - out.logits).abs().max()):.2e}", \
                    time.perf_counter() - t0
            details.append(f"{method} {report.decoder_overall():.3f} of block weights")
        return PASS, "; ".join(details), time.perf_counter() - t0
    except ValueError as err:
        if "/pruner/" in traceback.extract_tb(err.__traceback__)[-1].filename:  # the tool's own refusal
            return REFUSED, str(err).splitlines()[0][:220], time.perf_counter() - t0
        return FAIL, f"{step}: {_where(err)}", time.perf_counter() - t0
    except Exception as err:
        return FAIL, f"{step}: {_where(err)}", time.perf_counter() - t0


def _where(err: Exception) -> str:
    """The error and the innermost frame of the tool's own code it passed through (else the innermost)."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if "/pruner/" in f.filename] or frames
    frame = ours[-1]
    return f"{type(err).__name__} at {frame.filename.split('/')[-1]}:{frame.lineno}: {str(err).splitlines()[0][:140]}"


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def table(rows: list[tuple[str, str, str, float]]) -> str:
    counts = {o: sum(r[1] == o for r in rows) for o in (PASS, REFUSED, NOT_BUILT, FAIL)}
    lines = [", ".join(f"{n} {o}" for o, n in counts.items()), "",
             "| architecture | outcome | detail | s |", "|---|---|---|---|"]
    for name, outcome, detail, seconds in rows:
        lines.append(f"| {name} | {outcome} | {detail.replace('|', '/')} | {seconds:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import warnings

    from transformers.utils import logging as hf_logging

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", help="model types (default: every causal-LM model type)")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    names = args.only or causal_lm_types()
    rows = []
    for i, name in enumerate(names):
        outcome, detail, seconds = check(name)
        rows.append((name, outcome, detail, seconds))
        print(f"[{i + 1}/{len(names)}] {name}: {outcome} ({seconds:.1f} s) {detail}", flush=True)
    text = table(rows)
    print(text)
    if args.out:
        from pathlib import Path

        from bench.common import machine

        Path(args.out).write_text(text + "\n")
        print(f"written to {args.out} ({machine()})")
    return 1 if any(r[1] == FAIL for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
