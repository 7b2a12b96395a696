"""Why do Wanda runs that should agree drift apart? One thing varied at a time, next to the seed spread.

    .venv/bin/python bench/wanda_drift.py                           # uniform Wanda at 50% and 70%, all variants
    .venv/bin/python bench/wanda_drift.py --sparsities 0.7 --variants library,batch1 --allocator owl
    .venv/bin/python bench/wanda_drift.py --report                  # the table from docs/wanda_drift.jsonl

Every variant prunes a fresh copy of the dense SmolLM2 on the cpu calibration preset (32 × 512 C4 windows, seed 0
unless the variant changes the seed), then WikiText-2 test perplexity on the first --max-chunks chunks (a
partial evaluation, labelled so) with one evaluator. Variants:

* ``library``   — the library as it is (float64 Σx² and scores, mini-batches of 4, q/k/v and gate/up share one
                  state; the forward in float32)
* ``float32``   — Σx² and scores in float32, as the library had them up to commit a127db9
* ``float64``   — (rows of commit a127db9 only, when the library was float32) Σx² accumulated in float64
* ``batch1``    — calibration mini-batches of 1 in the pruning pass
* ``batch1-all``— mini-batches of 1 in the statistics pass too (what `prune --batch-size 1` does; differs from
                  ``batch1`` only for allocators that read the statistics)
* ``noshare``   — every layer accumulates its own Σx² (no shared state)
* ``fresh``     — block i's inputs come from a fresh forward of the partly pruned model, not from the loop
* ``perturb-K`` — block-0 inputs multiplied by (1 + 10⁻⁶·ε), ε ~ N(0, 1) drawn with seed K: a change far below
                  anything the variants above can make; its spread is what chaos alone gives
* ``seed-K``    — calibration windows drawn with seed K (a different calibration set)
* ``plain``     — tests/plain_wanda.py: float64 model, one sample at a time, argsort per row, no sharing

Mask agreement is reported against ``library`` (or ``--against``; same sparsity and allocator): per block, the lowest over its
layers of |pruned here ∩ pruned there| / |pruned here|. Each run appends one JSON line to docs/wanda_drift.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import git_rev, machine  # noqa: E402

OUT = ROOT / "docs" / "wanda_drift.jsonl"
DEFAULT_VARIANTS = ("library,float32,batch1,noshare,perturb-1,perturb-2,perturb-3,seed-1,seed-2,fresh,plain")
REPORT_BLOCKS = (2, 10, 20, 29)
PERTURBATION = 1e-6  # relative size of the block-0 input perturbation


class WandaFloat32:
    """Wanda as the library had it before commit 'Wanda in float64' (Σx² and scores in float32), registered under
    a bench-only name."""

    @staticmethod
    def make():
        from pruner.methods.masks import select
        from pruner.methods.wanda import Wanda

        class Wanda32(Wanda):
            name = "wanda-float32"

            def __init__(self, in_features, device="cpu", scope=None):
                super().__init__(in_features, device, scope)
                self.sumsq = torch.zeros(in_features, dtype=torch.float32, device=self.device)

            def accumulate(self, x):
                x = x.float()
                self.sumsq += (x * x).sum(dim=0)

            def prune(self, weight, sparsity, nm=None):
                score = weight.detach().abs().float() * self.sumsq.sqrt().unsqueeze(0)  # (out, in) float32
                mask = select(score, sparsity, nm, self.scope)
                return weight.masked_fill(mask, 0.0), mask

        return Wanda32


def _targets(model, alloc, stats):
    from pruner.engine.prune import layer_targets

    return layer_targets(alloc.layer_sparsity, list(zip(stats.layer_block.tolist(), stats.layer_names)), None)


def _fresh_inputs_prune(model, tokens, observer, batch):
    """The loop with block i's inputs taken from a forward of the whole (partly pruned) model each time."""
    from pruner.engine.calibrate import _Recorder, _run_block, capture_block_inputs
    from pruner.model.anatomy import find_blocks, prunable_layers

    _, blocks = find_blocks(model)
    base = model.base_model if hasattr(model, "base_model") else model
    for i, block in enumerate(blocks):
        store = {"hidden": [], "calls": {}}
        originals = list(blocks)
        captured = []
        hook = block.register_forward_pre_hook(lambda m, a, kw: captured.append(a[0] if a else kw["hidden_states"]),
                                               with_kwargs=True)
        try:
            for j in range(i + 1, len(blocks)):
                blocks[j] = _Recorder(j, originals[j], store)
            with torch.no_grad():
                for start in range(0, len(tokens), batch):
                    base(input_ids=tokens[start: start + batch], use_cache=False)
        finally:
            hook.remove()
            for j in range(len(blocks)):
                blocks[j] = originals[j]
        _, calls = capture_block_inputs(model, tokens[:batch], torch.device("cpu"), batch)
        layers = prunable_layers(block)
        handles = observer.attach(i, block, layers)
        try:
            _run_block(block, captured, calls[i], torch.device("cpu"))
        finally:
            for h in handles:
                h.remove()
        observer.finish(i, block, layers)
    return observer.report


def prune_variant(variant, dense, tokenizer, calib, allocator, sparsity, stats_cache):
    """A pruned copy of ``dense`` for one variant; (model, seconds)."""
    import pruner.engine.calibrate as calibrate
    from pruner.allocation import ALLOCATORS, NEEDS_STATISTICS, allocate
    from pruner.data import calibration_tokens
    from pruner.engine.calibrate import run_blockwise
    from pruner.engine.layout import ModelLayout
    from pruner.engine.prune import PruningObserver
    from pruner.engine.stats import collect_stats
    from pruner.methods import METHODS
    from tests.plain_wanda import plain_wanda

    seed = int(variant.split("-")[1]) if variant.startswith("seed-") else calib.seed
    calib = type(calib)(**{**calib.__dict__, "seed": seed})
    tokens = calibration_tokens(tokenizer, calib)
    batch = 1 if variant in ("batch1", "batch1-all") else 4
    if ALLOCATORS[allocator].needs != NEEDS_STATISTICS:
        stats = ModelLayout.of(dense, weights=True)
    else:  # the allocation's statistics on this calibration set (dense model), once per seed and batch size
        stats_batch = batch if variant == "batch1-all" else 4  # batch1-all: as `prune --batch-size 1` does
        if (seed, stats_batch) not in stats_cache:
            stats_cache[seed, stats_batch] = collect_stats(dense, tokens, "cpu", batch_size=stats_batch)
        stats = stats_cache[seed, stats_batch]
    alloc = allocate(allocator, stats, sparsity)
    model = copy.deepcopy(dense)
    targets = _targets(model, alloc, stats)
    t0 = time.perf_counter()
    if variant == "plain":
        if allocator != "uniform":
            raise ValueError("the plain reference prunes every layer to one sparsity: uniform only")
        plain_wanda(model, tokens, sparsity)
        model.float()
        return model, time.perf_counter() - t0
    method = "wanda"
    if variant == "float32":
        METHODS["wanda-float32"] = WandaFloat32.make()
        method = "wanda-float32"
    observer = PruningObserver(method, targets, "row", torch.device("cpu"), share_inputs=variant != "noshare")
    original_capture = calibrate.capture_block_inputs
    if variant.startswith("perturb-"):
        g = torch.Generator().manual_seed(int(variant.split("-")[1]))

        def perturbed(*args, **kwargs):
            hidden, calls = original_capture(*args, **kwargs)
            return [h * (1 + PERTURBATION * torch.randn(h.shape, generator=g)) for h in hidden], calls

        calibrate.capture_block_inputs = perturbed
    try:
        if variant == "fresh":
            _fresh_inputs_prune(model, tokens, observer, batch)
        else:
            run_blockwise(model, tokens, observer, batch_size=batch)
    finally:
        calibrate.capture_block_inputs = original_capture
        METHODS.pop("wanda-float32", None)
    return model, time.perf_counter() - t0


def pruned_sets(model):
    from pruner.model.anatomy import find_blocks, prunable_layers, weight_matrix

    return [{n: (weight_matrix(l) == 0).clone() for n, l in prunable_layers(b).items()} for b in find_blocks(model)[1]]


def agreement(mine, theirs) -> list[float]:
    """Per block, the lowest over layers of |mine ∩ theirs| / |mine|."""
    return [min(float((a & theirs[i][n]).sum()) / max(1, int(a.sum())) for n, a in block.items())
            for i, block in enumerate(mine)]


def run(args) -> None:
    from pruner.evaluate.perplexity import wikitext2_perplexity
    from pruner.model.catalogue import ModelSpec
    from pruner.model.loading import load_model
    from pruner.specs import CalibSpec
    from pruner.store.files import default_data_dir

    data_dir = str(default_data_dir())
    lm = load_model(ModelSpec("smollm2-135m"))
    calib = CalibSpec.preset(args.preset, data_dir=data_dir)
    commit, host = git_rev(), machine()
    stats_cache: dict = {}
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        reference = None
        for variant in args.variants.split(","):
            model, seconds = prune_variant(variant, lm.model, lm.tokenizer, calib, args.allocator, sparsity,
                                           stats_cache)
            sets = pruned_sets(model)
            if variant == args.against:
                reference = sets
            ppl = wikitext2_perplexity(model, lm.tokenizer, data_dir, max_chunks=args.max_chunks)
            row = {"commit": commit, "machine": host, "preset": args.preset, "allocator": args.allocator,
                   "sparsity": sparsity, "against": args.against,
                   "variant": variant, "perplexity": ppl["perplexity"], "chunks": ppl["chunks"],
                   "chunks_total": ppl["chunks_total"], "prune_s": round(seconds, 1)}
            if reference is not None:
                agree = agreement(sets, reference)
                row["agreement"] = [round(a, 6) for a in agree]
                row["identical_blocks"] = next((i for i, a in enumerate(agree) if a < 1), len(agree))
            print(json.dumps({k: v for k, v in row.items() if k not in ("agreement", "machine")}), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            del model, sets


def report(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest = {}
    for r in rows:  # the newest line per (allocator, sparsity, variant)
        latest[(r["commit"], r["allocator"], r["sparsity"], r["variant"], r.get("against", "library"))] = r
    commits = sorted({r["commit"] for r in latest.values()})
    print(f"commits {', '.join(commits)}; perplexity on the first {rows[-1]['chunks']} of "
          f"{rows[-1]['chunks_total']} WikiText-2 test chunks (partial)\n")
    cols = " | ".join(f"agree. blk {b}" for b in REPORT_BLOCKS)
    print(f"| commit | allocator | S | variant | perplexity | masks compared with | identical in blocks | {cols} |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(REPORT_BLOCKS))
    for (commit, alloc, s, variant, against), r in latest.items():
        agree = r.get("agreement")
        cells = " | ".join(f"{agree[b]:.4f}" if agree and b < len(agree) else "–" for b in REPORT_BLOCKS)
        ident = r.get("identical_blocks")
        ident = "–" if ident is None else ("all" if agree and ident == len(agree) else f"0–{ident - 1}" if ident else "none")
        print(f"| {commit} | {alloc} | {s:.0%} | {variant} | {r['perplexity']:.1f} | {against} | {ident} | {cells} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", default="0.5,0.7")
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--allocator", default="uniform")
    p.add_argument("--against", default="library", help="the variant whose masks the others are compared with "
                   "(list it first in --variants)")
    p.add_argument("--max-chunks", type=int, default=8)
    p.add_argument("--preset", default="cpu", help="calibration preset (tiny: a quick check of the script)")
    p.add_argument("--out", type=Path, default=OUT, help="JSON lines file (appended to)")
    p.add_argument("--report", action="store_true", help="print the table from docs/wanda_drift.jsonl and exit")
    args = p.parse_args()
    if args.report:
        report(args.out)
    else:
        torch.set_num_threads(2)
        run(args)


if __name__ == "__main__":
    main()
