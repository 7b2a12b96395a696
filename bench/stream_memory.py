"""Streamed pruning of models with LLaMA-7B block shapes: is memory flat in depth and time per block constant?

Builds random-init Llama checkpoints (hidden 4096, intermediate 11008, 32 heads, SmolLM2's tokenizer and its
49,152-token vocabulary, tied head) at several depths, written block by block as sharded safetensors (the model
is never whole in memory, here either), then prunes each with `python -m pruner prune --stream` in a fresh
process (tiny calibration preset, uniform 50%) and reports that process's peak RSS (VmHWM) and prune time per
block. Targets (issue 14): peak at the deepest ≤ 1.25 × the peak at the shallowest; time per block within 1.2×.

    python -m bench.stream_memory [--depths 2 4 8] [--methods wanda sparsegpt] [--keep DIR]
    python -m bench.stream_memory --capped 8     # prune and evaluate under a memory cap of half the fp32 weights

`--capped` puts the prune and a streamed perplexity (2 chunks of 128 tokens) in a cgroup-v1 memory group whose
limit is half the checkpoint's size (page cache counts and is reclaimed; resident memory cannot exceed it).

Needs about 1 GB of disk per block for the checkpoint and as much for the pruned run (deleted afterwards unless
--keep).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import git_rev, machine
from bench.prune_speed import REPORT_PEAK
from pruner.store.files import PROJECT_ROOT, default_data_dir

#: LLaMA-7B's block shapes (Touvron et al. 2023).
HIDDEN, INTERMEDIATE, HEADS = 4096, 11008, 32
#: Initialisation scale of the random weights (the Llama config's initializer_range).
INIT_STD = 0.02


def borrowed_tokenizer() -> Path:
    """The converted SmolLM2's folder, whose tokenizer (and 49,152-token vocabulary) the random checkpoints use."""
    folder = PROJECT_ROOT / "cache" / "models" / "smollm2-135m"
    if not folder.is_dir():
        raise SystemExit("run `python -m pruner stats --preset tiny` once first: the bench borrows the converted "
                         "SmolLM2's tokenizer")
    return folder


def build_checkpoint(folder: Path, depth: int, tokenizer_folder: Path) -> int:
    """A random Llama of ``depth`` blocks written block by block into shards; returns its parameter count."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(tokenizer_folder)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                            num_hidden_layers=depth, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                            max_position_embeddings=2048, tie_word_embeddings=True,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return write_random_checkpoint(config, folder, tokenizer)


def write_random_checkpoint(config, folder: Path, tokenizer, block_tensors=None) -> int:
    """The model ``config`` describes, random-init (normal(0, INIT_STD) matrices, ones for norms and vectors), written
    block by block into shards with the tokenizer (the model is never whole in memory); its parameter count.
    ``block_tensors(state) -> state`` may rename or split a block's tensors as they are written."""
    from pruner.model.anatomy import find_blocks
    from pruner.model.streaming import ShardWriter, empty_model, outside_blocks_state

    model = empty_model(config, torch.float32)
    path, blocks = find_blocks(model)
    writer = ShardWriter(folder)
    generator = torch.Generator().manual_seed(0)
    count = 0

    def fill(module: torch.nn.Module) -> None:
        module.to_empty(device="cpu")
        for name, p in module.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight") or p.dim() == 1:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, INIT_STD, generator=generator)

    for i, block in enumerate(blocks):
        fill(block)
        state = block.state_dict()
        writer.add({f"{path}.{i}.{n}": t for n, t in (block_tensors(state) if block_tensors else state).items()})
        count += sum(p.numel() for p in block.parameters())
        block.to("meta")
    base = model.base_model
    fill(base.embed_tokens)
    fill(base.norm)
    model.tie_weights()
    outside = outside_blocks_state(model)
    count += sum(t.numel() for t in outside.values())
    writer.add(outside)
    writer.close()
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return count


def prune_streamed(folder: Path, method: str, cache: Path, data_dir: str,
                   allocator: str = "uniform") -> tuple[float, dict]:
    """Peak RSS (GiB) of a fresh `prune --stream` process and its manifest (a learned ``allocator`` such as BESA
    learns its allocation streamed in the same process first)."""
    cmd = [sys.executable, "-c", REPORT_PEAK, "prune", "--model", str(folder), "--stream", "--preset", "tiny",
           "--allocator", allocator, "--method", method, "--sparsity", "0.5", "--cache-dir", str(cache),
           "--data-dir", data_dir]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"prune failed:\n{r.stderr[-3000:]}")
    peak = int(r.stderr.strip().splitlines()[-1].split()[-1]) / 2**20
    key = r.stdout.split()[1].rstrip(":")
    manifest = json.loads((cache / "runs" / key / "manifest.json").read_text())
    shutil.rmtree(cache / "runs" / key)
    return peak, manifest


def _memory_cgroup_root() -> Path:
    """This process's cgroup-v1 memory group (where a child group with a limit can be made)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    raise SystemExit("no cgroup-v1 memory controller here: --capped needs one (or run under systemd-run -p MemoryMax)")


def capped_run(folder: Path, method: str, cache: Path, data_dir: str) -> None:
    """Prune ``folder`` streamed, then its streamed perplexity, both in a memory group capped at half its weights."""
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    limit = weights // 2
    group = _memory_cgroup_root() / f"pruner-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        if (group / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
        enter = f"echo $$ > {group}/cgroup.procs && exec \"$@\""
        base = ["sh", "-c", enter, "sh", sys.executable, "-c", REPORT_PEAK]
        common = ["--cache-dir", str(cache), "--data-dir", data_dir]
        t0 = time.perf_counter()
        r = subprocess.run(base + ["prune", "--model", str(folder), "--stream", "--preset", "tiny", "--allocator",
                                   "uniform", "--method", method, "--sparsity", "0.5"] + common,
                           capture_output=True, text=True, cwd=PROJECT_ROOT)
        if r.returncode != 0:
            raise SystemExit(f"capped prune failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
        prune_peak = int(r.stderr.strip().splitlines()[-1].split()[-1]) / 2**20
        key = r.stdout.split()[1].rstrip(":")
        t_prune = time.perf_counter() - t0
        r = subprocess.run(base + ["eval", "--run", key, "--ppl", "--stream", "--max-chunks", "2", "--eval-seqlen",
                                   "128"] + common, capture_output=True, text=True, cwd=PROJECT_ROOT)
        if r.returncode != 0:
            raise SystemExit(f"capped evaluation failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
        eval_peak = int(r.stderr.strip().splitlines()[-1].split()[-1]) / 2**20
        ppl_line = next(line for line in r.stdout.splitlines() if "perplexity" in line)
        group_peak = int((group / "memory.max_usage_in_bytes").read_text()) / 2**30
        failcnt = int((group / "memory.failcnt").read_text())
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            (group.parent / "cgroup.procs").write_text(pid)
        group.rmdir()
    print(f"# capped: {folder.name}, fp32 weights {weights / 2**30:.2f} GiB, cap {limit / 2**30:.2f} GiB "
          f"(weights ÷ cap = {weights / limit:.2f})")
    print(f"prune --stream ({method}): completed in {t_prune:.0f} s, peak RSS {prune_peak:.2f} GiB")
    print(f"eval --ppl --stream (2 × 128 tokens): peak RSS {eval_peak:.2f} GiB; {ppl_line.strip()}")
    print(f"the group's peak usage, page cache included: {group_peak:.2f} GiB; times the cap was hit "
          f"(page cache reclaimed): {failcnt}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--allocator", default="uniform",
                    help="allocator of every prune (besa: its allocation is learned, streamed, inside the job)")
    ap.add_argument("--keep", type=Path, help="build the checkpoints here and keep them")
    ap.add_argument("--capped", type=int, metavar="DEPTH",
                    help="only: prune (first --methods) and evaluate a DEPTH-block model capped at half its weights")
    args = ap.parse_args()
    data_dir = str(default_data_dir())
    tokenizer_folder = borrowed_tokenizer()
    root = args.keep or Path(tempfile.mkdtemp(prefix="stream-bench-", dir=PROJECT_ROOT / "cache"))
    root.mkdir(parents=True, exist_ok=True)
    if args.capped:
        folder = root / f"llama7b-shape-{args.capped}"
        try:
            if not (folder / "config.json").is_file():
                folder.mkdir(parents=True, exist_ok=True)
                build_checkpoint(folder, args.capped, tokenizer_folder)
            print(f"# machine: {machine()}; commit {git_rev()}")
            capped_run(folder, args.methods[0], root / "cache", data_dir)
        finally:
            if args.keep is None:
                shutil.rmtree(root, ignore_errors=True)
        return
    print(f"# streamed prune, random Llama with LLaMA-7B blocks ({HIDDEN} hidden, {INTERMEDIATE} intermediate), "
          f"fp32, calibration preset tiny (8 × 128), {args.allocator} 50%")
    print(f"# machine: {machine()}; commit {git_rev()}")
    print("| method | blocks | fp32 weights GiB | peak RSS GiB | peak ÷ shallowest | planned GiB | peak ÷ planned "
          "| prune s | s per block | per block ÷ shallowest |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    try:
        rows = {m: [] for m in args.methods}
        for depth in args.depths:
            folder = root / f"llama7b-shape-{depth}"
            if not (folder / "config.json").is_file():
                folder.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                params = build_checkpoint(folder, depth, tokenizer_folder)
                print(f"# built {folder.name}: {params / 1e9:.2f} B parameters in {time.perf_counter() - t0:.0f} s",
                      flush=True)
            weights_gb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**30
            for method in args.methods:
                peak, manifest = prune_streamed(folder, method, root / "cache", data_dir, args.allocator)
                per_block = manifest["timings_s"]["prune"] / depth
                rows[method].append((depth, peak, per_block))
                first = rows[method][0]
                planned = manifest["memory"]["planned_peak_gb"]
                print(f"| {method} | {depth} | {weights_gb:.2f} | {peak:.2f} | {peak / first[1]:.3f} | {planned:.2f} "
                      f"| {peak / planned:.3f} | {manifest['timings_s']['prune']:.1f} | {per_block:.1f} "
                      f"| {per_block / first[2]:.3f} |", flush=True)
            if args.keep is None:
                shutil.rmtree(folder)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
