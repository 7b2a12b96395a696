"""Side-by-side with llm-compressor: the same dense weights, the same calibration windows, uniform sparsity.

    .venv/bin/python bench/peer.py                      # 3 rounds, Wanda and SparseGPT at 70%
    .venv/bin/python bench/peer.py --rounds 5 --methods wanda --sparsity 0.5

llm-compressor gets a virtual environment of its own (``.venv-llmcompressor``, built on first use: torch pinned to
the local CPU wheel, llm-compressor pinned below). Each round runs, one after the other on an otherwise idle
machine: our CLI with no cached statistics ("cold"), llm-compressor, our CLI with the statistics cached ("warm").
Both tools are whole processes started the same way (``bench/hwm_launch.py``), so each wall time covers imports,
loading, calibration, pruning and saving, and each peak RSS is that process's VmHWM. Afterwards one evaluator
(ours) measures WikiText-2 perplexity of both tools' outputs on the same chunks, and the share of pruned positions
the two masks have in common. It is a bench, not a test: a round of both methods takes about 6 minutes here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import git_rev, machine  # noqa: E402

PEER_VENV = ROOT / ".venv-llmcompressor"
PEER_PACKAGES = ["torch==2.13.0", "llmcompressor==0.14.0.1"]  # torch==2.13.0 resolves to the local CPU wheel
OURS_PYTHON = ROOT / ".venv" / "bin" / "python"
LAUNCH = ROOT / "bench" / "hwm_launch.py"
PEER_SCRIPT = ROOT / "bench" / "peer_llmcompressor.py"
MODEL = "smollm2-135m"
PRESET = "cpu"


def ensure_peer_venv() -> Path:
    python = PEER_VENV / "bin" / "python"
    probe = [str(python), "-c", "import llmcompressor, torch; print(llmcompressor.__version__, torch.__version__)"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"building {PEER_VENV.name} ({' '.join(PEER_PACKAGES)}); a few minutes", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    subprocess.run(probe, check=True)
    return python


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` through the VmHWM launcher; (wall seconds, peak RSS GiB). Output goes to ``log``."""
    hwm = log.with_suffix(".hwm")
    env = {**os.environ, "HWM_FILE": str(hwm), "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed (exit {proc.returncode}); see {log}")
    return wall, int(hwm.read_text()) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--max-chunks", type=int, default=8, help="perplexity on the first N WikiText-2 test chunks")
    p.add_argument("--work", default=str(ROOT / "cache" / "bench-peer"), help="scratch folder (cache, outputs)")
    args = p.parse_args()

    import torch

    from pruner.data import calibration_tokens
    from pruner.model.catalogue import ModelSpec
    from pruner.model.loading import load_model
    from pruner.specs import CalibSpec, PruneSpec, StatsSpec
    from pruner.store.files import default_data_dir

    data_dir = str(Path(os.environ.get("PRUNER_DATA_DIR") or default_data_dir()).resolve())
    work = Path(args.work)
    cache = work / "cache"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    peer_python = ensure_peer_venv()
    lm = load_model(ModelSpec(MODEL), cache)  # converts the bundled GGUF once into cache/models/<name>
    dense_folder = cache / "models" / MODEL
    calib = CalibSpec.preset(PRESET, data_dir=data_dir)
    tokens_file = work / "calibration.pt"
    torch.save(calibration_tokens(lm.tokenizer, calib), tokens_file)
    stats_spec = StatsSpec(ModelSpec(MODEL), calib)
    saved_stats = work / "stats-saved" / stats_spec.key()  # the key names the statistics format too
    if not saved_stats.exists():  # computed once, untimed; restored for every warm run
        subprocess.run([str(OURS_PYTHON), "-m", "pruner", "stats", "--model", MODEL, "--preset", PRESET,
                        "--cache-dir", str(cache), "--data-dir", data_dir], check=True, cwd=ROOT,
                       env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.DEVNULL)
        shutil.copytree(cache / "stats" / stats_spec.key(), saved_stats)
    del lm

    print(f"# peer bench, commit {git_rev()}, {time.strftime('%Y-%m-%d %H:%M')}\n# {machine()}")
    rows, outputs = [], {}
    for method in args.methods.split(","):
        spec = PruneSpec(model=ModelSpec(MODEL), calib=calib, allocator="uniform", method=method,
                         sparsity=args.sparsity)
        ours_cmd = [str(OURS_PYTHON), str(LAUNCH), "-m", "pruner", "prune", "--model", MODEL, "--preset", PRESET,
                    "--allocator", "uniform", "--method", method, "--sparsity", str(args.sparsity), "--force",
                    "--cache-dir", str(cache), "--data-dir", data_dir]
        peer_out = work / f"llmcompressor-{method}"
        peer_cmd = [str(peer_python), str(LAUNCH), str(PEER_SCRIPT), "--dense", str(dense_folder), "--tokens",
                    str(tokens_file), "--method", method, "--sparsity", str(args.sparsity), "--out", str(peer_out)]
        for r in range(1, args.rounds + 1):
            shutil.rmtree(cache / "stats", ignore_errors=True)
            cold = timed(ours_cmd, logs / f"{method}-{r}-ours-cold.log")
            shutil.rmtree(peer_out, ignore_errors=True)
            peer = timed(peer_cmd, logs / f"{method}-{r}-peer.log")
            shutil.copytree(saved_stats, cache / "stats" / stats_spec.key())
            warm = timed(ours_cmd, logs / f"{method}-{r}-ours-warm.log")
            row = {"method": method, "round": r, "ours_cold_s": cold[0], "ours_warm_s": warm[0], "peer_s": peer[0],
                   "ours_cold_gib": cold[1], "ours_warm_gib": warm[1], "peer_gib": peer[1]}
            rows.append(row)
            print(f"{method:9s} round {r}: ours cold {cold[0]:6.1f} s, warm {warm[0]:6.1f} s, llm-compressor "
                  f"{peer[0]:6.1f} s; ratios {cold[0] / peer[0]:.3f} / {warm[0] / peer[0]:.3f}; peak RSS "
                  f"{cold[1]:.2f} / {warm[1]:.2f} / {peer[1]:.2f} GiB", flush=True)
        outputs[method] = (cache / "runs" / spec.key(), peer_out)

    print("\n| method | round | ours cold s | ours warm s | llm-compressor s | cold ÷ peer | warm ÷ peer | "
          "peak RSS ours cold / warm / peer GiB |\n|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['round']} | {row['ours_cold_s']:.1f} | {row['ours_warm_s']:.1f} | "
              f"{row['peer_s']:.1f} | {row['ours_cold_s'] / row['peer_s']:.3f} | {row['ours_warm_s'] / row['peer_s']:.3f} | "
              f"{row['ours_cold_gib']:.2f} / {row['ours_warm_gib']:.2f} / {row['peer_gib']:.2f} |")
    print("\nmedian over rounds of the per-round ratio:")
    for method in outputs:
        mine = [r for r in rows if r["method"] == method]
        cold = statistics.median(r["ours_cold_s"] / r["peer_s"] for r in mine)
        warm = statistics.median(r["ours_warm_s"] / r["peer_s"] for r in mine)
        rss = {k: statistics.median(r[k] for r in mine) for k in ("ours_cold_gib", "ours_warm_gib", "peer_gib")}
        print(f"  {method}: cold {cold:.3f}, warm {warm:.3f}; peak RSS median ours cold {rss['ours_cold_gib']:.2f} / "
              f"warm {rss['ours_warm_gib']:.2f} GiB vs llm-compressor {rss['peer_gib']:.2f} GiB (max "
              f"{max(max(r['ours_cold_gib'], r['ours_warm_gib']) for r in mine):.2f} vs "
              f"{max(r['peer_gib'] for r in mine):.2f})")
    evaluate(outputs, data_dir, args.max_chunks)


def evaluate(outputs: dict, data_dir: str, max_chunks: int) -> None:
    """Perplexity of both tools' outputs with our evaluator, and how many pruned positions their masks share."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pruner.evaluate.perplexity import wikitext2_perplexity
    from pruner.model.anatomy import find_blocks, prunable_layers, weight_matrix

    print(f"\nWikiText-2 test perplexity, first {max_chunks} chunks of 2048 (a partial evaluation), one evaluator:")
    for method, (ours, peer) in outputs.items():
        models = {name: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
                  for name, folder in (("ours", ours), ("llm-compressor", peer))}
        tokenizer = AutoTokenizer.from_pretrained(ours)
        ppl = {name: wikitext2_perplexity(m, tokenizer, data_dir, max_chunks=max_chunks)["perplexity"]
               for name, m in models.items()}
        shared = total = 0
        first_differing = None
        blocks = [find_blocks(m)[1] for m in models.values()]
        for i, (a, b) in enumerate(zip(*blocks)):
            same_block = True
            for (name, la), lb in zip(prunable_layers(a).items(), prunable_layers(b).values()):
                za, zb = weight_matrix(la) == 0, weight_matrix(lb) == 0
                shared += int((za & zb).sum())
                total += int(za.sum())
                same_block &= bool(torch.equal(za, zb))
            if not same_block and first_differing is None:
                first_differing = i
        print(f"  {method}: ours {ppl['ours']:.2f}, llm-compressor {ppl['llm-compressor']:.2f}; pruned positions "
              f"in common {shared / total:.4f}; masks identical up to block "
              f"{'all' if first_differing is None else first_differing - 1}")


if __name__ == "__main__":
    main()
