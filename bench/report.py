"""Render docs/prune_table.jsonl (written by bench.prune_table) as the markdown tables of docs/results.md.

Run: `.venv/bin/python -m bench.report [docs/prune_table.jsonl]`
"""

import json
import sys
from collections import defaultdict


def fmt(v: float) -> str:
    if v >= 1e5:
        return f"{v:.1e}"
    return f"{v:,.1f}" if v >= 100 else f"{v:.2f}"


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "docs/prune_table.jsonl"
    rows = [json.loads(line) for line in open(path)]
    header = next(r for r in rows if r["kind"] == "header")
    runs = [r for r in rows if r["kind"] == "run"]
    default = [r for r in runs if r["lam"] in (None, 0.08) and r["m"] in (None, 5.0)]
    print(f"Dense perplexity: {header['dense']['perplexity']:.3f} (first {header['max_chunks']} chunks of 2048 tokens).")
    print(f"Calibration {header['calib'][0]} × {header['calib'][1]}; plain forward over it {header['plain_forward_s']:.2f} s.")
    print()
    sparsities = sorted({r["sparsity"] for r in default})
    table = defaultdict(dict)
    for r in default:
        table[(r["method"], r["allocator"])][r["sparsity"]] = r
    print("| method | allocator | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |")
    print("|---|---|" + "---|" * len(sparsities))
    for (method, alloc), by_s in table.items():
        cells = []
        for s in sparsities:
            r = by_s.get(s)
            cells.append("–" if r is None else ("error" if "error" in r else fmt(r["ppl"])))
        print(f"| {method} | {alloc} | " + " | ".join(cells) + " |")
    sweep = [r for r in runs if r not in default and "ppl" in r]
    if sweep:
        print()
        print("| M \\ λ | " + " | ".join(f"{l:g}" for l in sorted({r['lam'] for r in sweep})) + " |")
        lams = sorted({r["lam"] for r in sweep})
        print("|---|" + "---|" * len(lams))
        for m in sorted({r["m"] for r in sweep}):
            cells = [next((fmt(r["ppl"]) for r in sweep if r["m"] == m and r["lam"] == l), "–") for l in lams]
            print(f"| {m:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
