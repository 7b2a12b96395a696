"""One llm-compressor prune, run by ``bench/peer.py`` inside llm-compressor's own virtual environment.

It imports nothing from this project: it loads the dense model folder it is given, builds a calibration dataset
from the token windows the driver saved (the very windows our own prune uses), runs llm-compressor's ``oneshot``
with its Wanda or SparseGPT modifier at a uniform sparsity, saves the result as a plain (uncompressed) Hugging Face
folder and prints one JSON line with its phases' wall times.
"""

import argparse
import json
import time
from pathlib import Path

T_START = time.perf_counter()

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dense", required=True, help="dense Hugging Face folder")
    p.add_argument("--tokens", required=True, help="torch file of the (nsamples, seqlen) calibration windows")
    p.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    p.add_argument("--sparsity", type=float, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dampening", type=float, default=0.01, help="SparseGPT's dampening (ours: 1% of mean diag H)")
    args = p.parse_args()

    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    t_import = time.perf_counter() - T_START
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.dense, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.dense)
    tokens = torch.load(args.tokens)
    data = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    t_load = time.perf_counter() - t0
    common = dict(sparsity=args.sparsity, mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"])
    if args.method == "wanda":
        recipe = WandaPruningModifier(**common)
    else:
        recipe = SparseGPTModifier(**common, block_size=128, dampening_frac=args.dampening)
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe, num_calibration_samples=len(tokens),
            max_seq_length=tokens.shape[1], shuffle_calibration_samples=False, pipeline="sequential")
    t_prune = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = Path(args.out)
    model.save_pretrained(out, save_compressed=False)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)  # a dense folder: any transformers loads it without compressed-tensors
    (out / "config.json").write_text(json.dumps(config, indent=2))
    t_save = time.perf_counter() - t0
    print(json.dumps({"import_s": t_import, "load_s": t_load, "prune_s": t_prune, "save_s": t_save,
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
