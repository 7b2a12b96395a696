"""`make results`: regenerate the cheap tables of docs/results.md from the code as it is now.

A generated table sits between two marker lines in the Markdown file:

    <!-- generated: lod -->
    ...replaced on every run...
    <!-- end generated: lod -->

Each run recomputes what the tables need from scratch (statistics in a temporary cache folder; only the converted
bundled model is reused), writes each table under a line naming the commit, the machine and the command, and
leaves everything outside the markers as it was. Expensive tables (full-test perplexities, seeds, zero-shot) are
not regenerated here; each of them names the commit and command that made it.

    python -m bench.results                  # every generated table (about 3 minutes here)
    python -m bench.results --only lod dense # some of them
    python -m bench.results --check          # only check that markers and generators match (no computation)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bench.common import git_rev, machine

RESULTS_MD = Path(__file__).resolve().parent.parent / "docs" / "results.md"
BEGIN = "<!-- generated: {} -->"
END = "<!-- end generated: {} -->"
_MARKER = re.compile(r"^<!-- (end )?generated: ([\w-]+) -->$", re.M)


def generated_sections(text: str) -> list[str]:
    """The names of the generated sections in ``text``, in order; raises ValueError on a marker without its pair
    or with another section inside it."""
    names, open_name = [], None
    for m in _MARKER.finditer(text):
        is_end, name = m.group(1) is not None, m.group(2)
        if not is_end:
            if open_name is not None:
                raise ValueError(f"generated section {name!r} starts inside {open_name!r}")
            if name in names:
                raise ValueError(f"generated section {name!r} appears twice")
            open_name = name
        else:
            if open_name != name:
                raise ValueError(f"'end generated: {name}' without its start")
            names.append(name)
            open_name = None
    if open_name is not None:
        raise ValueError(f"generated section {open_name!r} has no end marker")
    return names


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the lines between ``name``'s markers replaced by ``body`` (markers kept)."""
    begin, end = BEGIN.format(name), END.format(name)
    start = text.index(begin) + len(begin)
    stop = text.index(end, start)
    return text[:start] + "\n" + body.rstrip("\n") + "\n" + text[stop:]


@dataclass
class Session:
    """What the generators share in one run: the data folder, a fresh cache folder and lazily built inputs."""

    data_dir: str
    cache_dir: Path
    _memo: dict = field(default_factory=dict)

    def once(self, key: str, build: Callable[[], object]):
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def stats_spec(self):
        from pruner.model.catalogue import ModelSpec
        from pruner.specs import CalibSpec, StatsSpec

        return StatsSpec(ModelSpec("smollm2-135m"), CalibSpec.preset("cpu", data_dir=self.data_dir))

    def stats(self):
        from pruner.engine import artifacts

        return self.once("stats", lambda: artifacts.get_stats(self.stats_spec(), self.cache_dir))


#: The outlier thresholds of the LOD table (OWL's paper sweeps M ∈ {3, 5, 7}).
LOD_THRESHOLDS = (3.0, 5.0, 7.0)
#: Target sparsity S of the allocations table (the paper's headline setting).
ALLOCATION_SPARSITY = 0.7
#: Random (M, λ, S) draws in the latency table.
LATENCY_DRAWS = 500
#: Chunks of the dense model's quick perplexity (a partial evaluation, labelled so).
DENSE_CHUNKS = 8


def lod_table(session: Session) -> str:
    """SmolLM2's LOD per block at M = 3, 5, 7 (% of a block's Wanda scores above M × its mean), two columns of
    blocks side by side."""
    stats = session.stats()
    lod = np.stack([stats.lod(m) * 100 for m in LOD_THRESHOLDS], axis=1)  # (B, 3) in %
    half = (stats.n_blocks + 1) // 2
    ms = " | ".join(f"M={m:g}" for m in LOD_THRESHOLDS)
    lines = [f"| block | {ms} | | block | {ms} |", "|---" * (2 * len(LOD_THRESHOLDS) + 3) + "|"]
    for b in range(half):
        left = f"| {b} | " + " | ".join(f"{v:.3f}" for v in lod[b])
        right = (f" | | {b + half} | " + " | ".join(f"{v:.3f}" for v in lod[b + half])) if b + half < len(lod) else \
            " | |" + " |" * (len(LOD_THRESHOLDS) + 1)
        lines.append(left + right + " |")
    return "\n".join(lines)


def allocations_table(session: Session) -> str:
    """Every formula allocator at S = 0.7 with its default parameters: where it puts the most and the fewest zeros
    and the parameter-weighted mean it achieves (which must be S)."""
    from pruner.allocation import ALLOCATORS, allocate, formula_allocators

    stats = session.stats()
    S = ALLOCATION_SPARSITY
    lines = ["| allocator | parameters | min block sparsity (block) | max block sparsity (block) | first → last block "
             "| layer sparsities, min–max | parameter-weighted mean |", "|---|---|---|---|---|---|---|"]
    for name in formula_allocators():
        a = ALLOCATORS[name]
        params = a.check({})
        alloc = allocate(name, stats, S, **params)
        bs = alloc.block_sparsity
        shown = ", ".join(f"{p.symbol} = {params[p.name]:g}" for p in a.params) or "–"
        lines.append(f"| {a.label} | {shown} | {bs.min():.1%} ({int(bs.argmin())}) | {bs.max():.1%} ({int(bs.argmax())}) "
                     f"| {bs[0]:.1%} → {bs[-1]:.1%} | {alloc.layer_sparsity.min():.1%}–{alloc.layer_sparsity.max():.1%} "
                     f"| {alloc.overall:.4%} |")
    return "\n".join(lines)


def latency_table(session: Session) -> str:
    """What one slider move costs the server: OWL alone, and every formula allocator, from cached statistics."""
    from bench.allocation_latency import time_updates
    from pruner.allocation import formula_allocators

    names = formula_allocators()
    times = time_updates(session.stats(), LATENCY_DRAWS)
    owl, every = times["owl"], times["all"]
    lines = [f"{LATENCY_DRAWS} random draws of M ∈ [1, 20], S ∈ [0.1, 0.9], λ below its allowed maximum; target p95 ≤ 20 ms.",
             "", "| update | p50 ms | p95 ms | max ms |", "|---|---|---|---|"]
    for label, v in (("OWL (lod(M) + formula + expansion to layers)", owl),
                     (f"all {len(names)} formula allocators ({', '.join(names)})", every)):
        lines.append(f"| {label} | {np.percentile(v, 50):.3f} | {np.percentile(v, 95):.3f} | {np.max(v):.3f} |")
    return "\n".join(lines)


def dense_table(session: Session) -> str:
    """The dense model's WikiText-2 test perplexity on the first chunks, with its evaluation interval."""
    from pruner.core.intervals import Interval
    from pruner.model.catalogue import ModelSpec
    from pruner.runs.metrics import dense_perplexity

    r = dense_perplexity(ModelSpec("smollm2-135m"), session.data_dir, session.cache_dir, max_chunks=DENSE_CHUNKS)
    interval = Interval.from_dict(r["interval"])
    return (f"| model | chunks (partial) | tokens scored | perplexity [{interval.confidence:.0%} evaluation interval, "
            f"{interval.method}] |\n|---|---|---|---|\n"
            f"| SmolLM2-135M, dense | first {r['chunks']} of {r['chunks_total']} × {r['seqlen']} | {r['tokens_scored']:,} "
            f"| {interval.text(3)} |")


#: name → (what it shows, generator). Each runs in well under a minute once the statistics exist.
GENERATORS: dict[str, tuple[str, Callable[[Session], str]]] = {
    "lod": ("LOD per block, cpu calibration preset, seed 0", lod_table),
    "allocations": (f"formula allocators at S = {ALLOCATION_SPARSITY}", allocations_table),
    "latency": ("allocation update latency (a ratio to a 20 ms budget; other load on the machine shows in it)",
                latency_table),
    "dense": ("dense perplexity, partial", dense_table),
}


def stamp(name: str) -> str:
    """The line above a generated table: which commit, machine and command made it."""
    dirty = " (with uncommitted changes)" if _dirty() else ""
    return (f"_Generated by `make results` (`python -m bench.results --only {name}`) at commit {git_rev()}{dirty}, "
            f"{time.strftime('%Y-%m-%d')}; machine: {machine()}._\n")


def _dirty(cwd: Path = RESULTS_MD.parent) -> bool:
    """Whether tracked files differ from the commit, apart from docs/results.md itself: the run writes its tables
    one after another, so after the first every later stamp would call the tree dirty because of its own output."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, cwd=cwd, check=True).stdout
    except Exception:
        return False
    return any(line[3:].strip() != "docs/results.md" for line in out.splitlines() if line.strip())


def check(text: str) -> list[str]:
    """Problems with the generated sections of ``text``: markers without a generator and generators without a
    marker (empty when they match)."""
    names = generated_sections(text)
    problems = [f"section {n!r} has no generator (known: {', '.join(GENERATORS)})" for n in names if n not in GENERATORS]
    problems += [f"generator {n!r} has no section in the document" for n in GENERATORS if n not in names]
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(GENERATORS), help="regenerate only these tables")
    ap.add_argument("--check", action="store_true", help="check the markers against the generators and stop")
    ap.add_argument("--file", type=Path, default=RESULTS_MD, help="the Markdown file (default docs/results.md)")
    args = ap.parse_args(argv)
    text = args.file.read_text()
    problems = check(text)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    if args.check:
        print(f"{len(GENERATORS)} generated sections, all with generators: {', '.join(GENERATORS)}")
        return 0
    from pruner.store.files import PROJECT_ROOT, default_data_dir

    data_dir = os.environ.get("PRUNER_DATA_DIR") or str(default_data_dir())
    with tempfile.TemporaryDirectory(prefix="pruner-results-") as tmp:
        models = PROJECT_ROOT / "cache" / "models"
        if models.is_dir():  # the converted bundled model is an input, not a result: reuse it
            os.symlink(models, Path(tmp) / "models")
        session = Session(data_dir, Path(tmp))
        for name in args.only or list(GENERATORS):
            what, generate = GENERATORS[name]
            t0 = time.perf_counter()
            body = stamp(name) + "\n" + generate(session)
            text = replace_section(text, name, body)
            args.file.write_text(text)  # after each table, so an interruption keeps the finished ones
            print(f"{name}: {what} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
