"""Golden prune runs: the weights a fixed set of specs gives, as digests, so a refactor of the layer around the core
can be checked to change nothing.

``tests/golden/prune_digests.json`` holds, per case, the sha256 of the pruned weights, of their zero pattern, and
the perplexity on the first 2 × 64 tokens of WikiText-2 test, and, once, the sha256 of the dense statistics
(‖X_j‖₂, block mean scores, LOD counts, score histograms) with the block mean scores in clear; written by
``python -m tests.golden_runs --write`` on the commit, CPU and torch named in the file. The statistics are the
finest check: a change of accumulation precision (Σx² in float32 instead of float64) moves them in the last bits
while, on these 4 × 64 tokens, it flips no mask of any case. The weights digests were first written at commit 4c0f106 (before the
workflow layer) and are unchanged since. float32 CPU kernels are deterministic on one CPU and torch build but may
differ in the last bit on another, so elsewhere the test holds the masks exactly and the perplexity to 1e-5.
Each case is written as registry names and parameters, not as a spec, so old and new spec code can build it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import cpu_name

GOLDEN = Path(__file__).parent / "golden" / "prune_digests.json"

#: (case id, allocator, allocator parameters, method, method parameters, sparsity, N:M)
CASES = [
    ("magnitude-uniform-50", "uniform", {}, "magnitude", {}, 0.5, None),
    ("wanda-owl-60", "owl", {"lam": 0.05, "m": 3.0}, "wanda", {}, 0.6, None),
    ("sparsegpt-er-60", "er", {}, "sparsegpt", {}, 0.6, None),
    ("admm-alpha-50", "alpha", {}, "admm", {}, 0.5, None),
    ("admm-gradual-uniform-50", "uniform", {}, "admm-gradual", {}, 0.5, None),
    ("wanda-besa-50", "besa", {"beta": 20.0}, "wanda", {}, 0.5, None),
    ("wanda-owl_inverse-2:4", "owl_inverse", {"lam": 0.04, "m": 5.0}, "wanda", {}, 0.5, "2:4"),
]


def tiny_llama_folder(folder: Path, tokenizer) -> Path:
    """A 4-block random Llama (hidden 32) saved as a Hugging Face folder, seed 0, with ``tokenizer``."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_spec(case, model_folder: str, data_dir: str):
    from pruner.model.catalogue import ModelSpec
    from pruner.specs import CalibSpec, PruneSpec

    _, allocator, a_params, method, m_params, sparsity, nm = case
    return PruneSpec(model=ModelSpec(model_folder, device="cpu"),
                     calib=CalibSpec(nsamples=4, seqlen=64, data_dir=data_dir),
                     allocator=allocator, allocator_params=a_params, method=method, method_params=m_params,
                     sparsity=sparsity, nm=nm)


def weights_digest(run_folder: Path) -> str:
    """sha256 over every tensor of the run's safetensors files (name, dtype, shape and bytes, in name order)."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    tensors = {}
    for f in sorted(Path(run_folder).glob("*.safetensors")):
        tensors.update(load_file(f))
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def mask_digest(run_folder: Path) -> str:
    """sha256 over the zero pattern of every 2-D weight (which weights were pruned), in name order."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    tensors = {}
    for f in sorted(Path(run_folder).glob("*.safetensors")):
        tensors.update(load_file(f))
    for name in sorted(n for n, t in tensors.items() if t.ndim == 2 and ".layers." in n):
        h.update(name.encode())
        h.update((tensors[name] == 0).numpy().tobytes())
    return h.hexdigest()


#: The golden perplexity: WikiText-2 test, the first PPL_CHUNKS chunks of PPL_SEQLEN tokens.
PPL_CHUNKS, PPL_SEQLEN = 2, 64


def statistics_digest(stats) -> dict:
    """sha256 over the dense statistics' float64 and count arrays, and the block mean scores Ā_b in clear."""
    import numpy as np

    h = hashlib.sha256()
    for array in [*stats.input_norms, stats.block_mean_score, stats.ratio_counts_above, stats.score_hist]:
        h.update(np.ascontiguousarray(array).tobytes())
    return {"digest": h.hexdigest(), "block_mean_score": [float(v) for v in stats.block_mean_score]}


def golden_statistics(model_folder: str, data_dir: str, cache_dir: Path) -> dict:
    """The statistics every case's calibration set gives (computed, or cached by ``run_cases`` in ``cache_dir``)."""
    from pruner.engine.artifacts import get_stats

    return statistics_digest(get_stats(build_spec(CASES[1], model_folder, data_dir).stats_spec, cache_dir))


def run_cases(model_folder: str, data_dir: str, cache_dir: Path) -> dict[str, dict]:
    """Each case through the prune workflow (the one the CLI, the worker and the pages use) → its weights digest,
    mask digest and perplexity on the first PPL_CHUNKS × PPL_SEQLEN tokens of WikiText-2 test."""
    from pruner.jobs.workflows import Context, PruneRequest, run
    from pruner.runs.metrics import evaluate_perplexity

    out = {}
    for case in CASES:
        folder = Path(run(PruneRequest(build_spec(case, model_folder, data_dir)), Context(cache_dir))["folder"])
        ppl = evaluate_perplexity(folder, data_dir, max_chunks=PPL_CHUNKS, seqlen=PPL_SEQLEN)["perplexity"]
        out[case[0]] = {"weights": weights_digest(folder), "masks": mask_digest(folder), "perplexity": ppl}
    return out


def main() -> None:
    import os
    import tempfile

    from pruner.model.catalogue import ModelSpec
    from pruner.model.loading import load_model
    from pruner.store.files import default_data_dir

    data_dir = os.environ.get("PRUNER_DATA_DIR") or str(default_data_dir())
    tokenizer = load_model(ModelSpec("smollm2-135m", device="cpu")).tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_llama_folder(Path(tmp) / "tiny", tokenizer)
        cases = run_cases(str(folder), data_dir, Path(tmp) / "cache")
        statistics = golden_statistics(str(folder), data_dir, Path(tmp) / "cache")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    payload = {"commit": commit, "command": "python -m tests.golden_runs --write", "torch": torch.__version__,
               "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cases": cases,
               "statistics": statistics}
    if "--write" in sys.argv:
        GOLDEN.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
