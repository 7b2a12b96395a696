"""A table of bad inputs and faults through the CLI (``pruner.cli.main``, the code behind `python -m pruner`, run in
this process: each case needs no Python start-up). For each: the exit code (2: the user's input; 3: the machine or
the cache), exactly one line on stderr that names the problem, no traceback, and the cache folder unchanged (a
snapshot of every path and size before and after). Memory cases run under a small ``PRUNER_MEMORY_LIMIT``. Signals,
job states and real full or read-only disks have tests of their own (tests/test_reliability.py, tests/test_jobs.py,
and the last two below)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pruner.store.files import PROJECT_ROOT
from tests.conftest import copy_of_tiny_run

BAD_INPUT, ENVIRONMENT = 2, 3
MODEL = ("--model", "{tiny}", "--device", "cpu")
CALIB = ("--nsamples", "4", "--seqlen", "64")  # the cached tiny run's calibration set
SMALL_MEMORY = {"PRUNER_MEMORY_LIMIT": "1GiB"}

#: (id, argv with {placeholders}, environment, exit code, what the one line must say)
CASES = [
    # target sparsity and N:M
    ("sparsity above 1", ["prune", *MODEL, "--sparsity", "1.5"], {}, BAD_INPUT, "sparsity"),
    ("sparsity 0", ["prune", *MODEL, "--sparsity", "0"], {}, BAD_INPUT, "sparsity"),
    ("negative sparsity", ["prune", *MODEL, "--sparsity", "-0.1"], {}, BAD_INPUT, "sparsity"),
    ("sparsity nan", ["prune", *MODEL, "--sparsity", "nan"], {}, BAD_INPUT, "sparsity"),
    ("N above M", ["prune", *MODEL, "--nm", "5:4"], {}, BAD_INPUT, "5:4"),
    ("N:M against S", ["prune", *MODEL, "--nm", "2:4", "--sparsity", "0.6"], {}, BAD_INPUT, "with N:M 2:4"),
    # registries and their parameters
    ("unknown allocator", ["prune", *MODEL, "--sparsity", "0.5", "--allocator", "nope"], {}, BAD_INPUT,
     "invalid choice"),
    ("unknown method", ["prune", *MODEL, "--sparsity", "0.5", "--method", "nope"], {}, BAD_INPUT, "invalid choice"),
    ("OWL lambda at its open end", ["prune", *MODEL, "--sparsity", "0.5", "--lam", "0.5"], {}, BAD_INPUT, "λ"),
    ("negative M", ["prune", *MODEL, "--sparsity", "0.5", "--m", "-1"], {}, BAD_INPUT, "M"),
    ("a parameter of another method", ["prune", *MODEL, "--sparsity", "0.5", "--method", "wanda", "--rho", "2"], {},
     BAD_INPUT, "--rho does not apply here"),
    ("unknown expert split", ["prune", *MODEL, "--sparsity", "0.5", "--expert-split", "nope"], {}, BAD_INPUT,
     "invalid choice"),
    ("DLP alpha out of range", ["allocate", *MODEL, *CALIB, "--allocator", "dlp", "--alpha", "0.6", "--sparsity",
                                "0.7"], {}, BAD_INPUT, "α"),
    ("OWL that cannot reach S", ["allocate", *MODEL, *CALIB, "--allocator", "owl", "--sparsity", "0.97"], {},
     BAD_INPUT, "λ"),
    ("M of 0 in stats", ["stats", *MODEL, *CALIB, "--m", "0"], {}, BAD_INPUT, "M"),
    ("learned allocator in predict", ["predict", *MODEL, "--sparsity", "0.5", "--allocator", "besa"], {}, BAD_INPUT,
     "invalid choice"),
    ("one held-out window", ["predict", *MODEL, "--sparsity", "0.5", "--windows", "1"], {}, BAD_INPUT,
     "held-out windows must be an integer ≥ 2"),
    # prune's own flags
    ("no seeds", ["prune", *MODEL, "--sparsity", "0.5", "--seeds", "0"], {}, BAD_INPUT, "--seeds must be ≥ 1"),
    ("tune with seeds", ["prune", *MODEL, "--sparsity", "0.5", "--tune", "--seeds", "2"], {}, BAD_INPUT,
     "--tune picks parameters"),
    ("drop weights without evaluating", ["prune", *MODEL, "--sparsity", "0.5", "--drop-weights"], {}, BAD_INPUT,
     "add --ppl"),
    ("out with seeds", ["prune", *MODEL, "--sparsity", "0.5", "--out", "{new}", "--seeds", "2"], {}, BAD_INPUT,
     "--out copies one run"),
    ("out at a file", ["prune", *MODEL, "--sparsity", "0.5", "--out", "{file}"], {}, BAD_INPUT, "is a file"),
    ("out under a file", ["prune", *MODEL, "--sparsity", "0.5", "--out", "{file}/sub"], {}, BAD_INPUT,
     "is a file, not a folder"),
    ("no chunks", ["prune", *MODEL, "--sparsity", "0.5", "--ppl", "--max-chunks", "0"], {}, BAD_INPUT, "max-chunks"),
    ("no calibration samples", ["prune", *MODEL, "--sparsity", "0.5", "--nsamples", "0"], {}, BAD_INPUT,
     "nsamples"),
    ("calibration longer than the context", ["prune", *MODEL, "--sparsity", "0.5", "--seqlen", "100000"], {},
     BAD_INPUT, "context"),
    # models and data
    ("missing model folder", ["prune", "--model", "/nonexistent/model", "--sparsity", "0.5"], {}, BAD_INPUT,
     "does not exist"),
    ("not a model name", ["prune", "--model", "notamodel", "--sparsity", "0.5"], {}, BAD_INPUT, "unknown model"),
    ("folder without config", ["prune", "--model", "{noconfig}", "--sparsity", "0.5"], {}, BAD_INPUT,
     "no config.json"),
    ("corrupt config", ["allocate", "--model", "{badconfig}", "--allocator", "uniform", "--sparsity", "0.5"], {},
     BAD_INPUT, "badconfig"),
    ("truncated weights", ["prune", "--model", "{truncated}", "--sparsity", "0.5", "--method", "magnitude",
                           "--allocator", "uniform"], {}, BAD_INPUT, "truncated"),
    ("missing data folder", ["prune", *MODEL, "--sparsity", "0.5", "--data-dir", "/nonexistent/data"], {},
     BAD_INPUT, "data directory /nonexistent/data does not exist"),
    # evaluation
    ("nothing to evaluate", ["eval", "--run", "{run}"], {}, BAD_INPUT, "nothing to evaluate"),
    ("malformed run key", ["eval", "--run", "../../etc", "--ppl"], {}, BAD_INPUT, "16 hexadecimal digits"),
    ("unknown run", ["eval", "--run", "0123456789abcdef", "--ppl"], {}, BAD_INPUT, "0123456789abcdef"),
    ("window longer than the context", ["eval", "--run", "{run}", "--ppl", "--eval-seqlen", "100000"], {},
     BAD_INPUT, "context"),
    ("too few timed calls", ["eval", "--run", "{run}", "--speed", "--runs", "5"], {}, BAD_INPUT, "runs must be ≥ 30"),
    ("no rounds", ["eval", "--run", "{run}", "--speed", "--rounds", "0"], {}, BAD_INPUT, "rounds must be between"),
    ("unknown zero-shot task", ["eval", "--run", "{run}", "--zeroshot", "--tasks", "nope"], {}, BAD_INPUT, "nope"),
    ("no zero-shot documents", ["eval", "--run", "{run}", "--zeroshot", "--limit", "0"], {}, BAD_INPUT, "limit"),
    # recovery, cache, jobs, sweeps
    ("recover a malformed key", ["recover", "--run", "abc"], {}, BAD_INPUT, "16 hexadecimal digits"),
    ("recover with no steps", ["recover", "--run", "{run}", "--steps", "0"], {}, BAD_INPUT, "steps"),
    ("recover with rank 0", ["recover", "--run", "{run}", "--rank", "0"], {}, BAD_INPUT, "rank"),
    ("remove an unknown entry", ["cache", "--remove", "nothing"], {}, BAD_INPUT, "--remove takes a kind"),
    ("cancel without an id", ["jobs", "cancel"], {}, BAD_INPUT, "needs a job id"),
    ("cancel in a new cache", ["jobs", "cancel", "5", "--cache-dir", "{new}"], {}, BAD_INPUT, "holds no job table"),
    ("wait in a new cache", ["jobs", "wait", "5", "--cache-dir", "{new}"], {}, BAD_INPUT, "holds no job table"),
    ("sweep above 1", ["sweep", *MODEL, "--sparsities", "1.2"], {}, BAD_INPUT, "sparsity"),
    ("sweep grid of words", ["sweep", *MODEL, "--sparsities", "0.5", "--grid", "lam=abc"], {}, BAD_INPUT, "lam"),
    # memory, planned before any model is loaded
    ("statistics of a huge calibration set", ["stats", *MODEL, "--nsamples", "100000", "--seqlen", "2048"],
     SMALL_MEMORY, BAD_INPUT, "this statistics pass needs"),
    ("allocate on a huge calibration set", ["allocate", *MODEL, "--allocator", "owl", "--sparsity", "0.5",
                                            "--nsamples", "100000", "--seqlen", "2048"], SMALL_MEMORY, BAD_INPUT,
     "this statistics pass needs"),
    ("learn on a huge calibration set", ["allocate", *MODEL, "--allocator", "besa", "--sparsity", "0.5",
                                         "--nsamples", "100000", "--seqlen", "2048"], SMALL_MEMORY, BAD_INPUT,
     "this learning pass needs"),
    ("prune a huge calibration set", ["prune", *MODEL, "--sparsity", "0.5", "--nsamples", "100000", "--seqlen",
                                      "2048"], SMALL_MEMORY, BAD_INPUT, "this prune needs"),
    ("LoRA on a huge sequence", ["recover", "--run", "{run}", "--train-seqlen", "100000"], SMALL_MEMORY, BAD_INPUT,
     "training of run"),
    ("speed of a huge prefill", ["eval", "--run", "{run}", "--speed", "--speed-seqlen", "100000"], SMALL_MEMORY,
     BAD_INPUT, "speed of run"),
    ("perplexity in too little memory", ["eval", "--run", "{run}", "--ppl"], {"PRUNER_MEMORY_LIMIT": "100MiB"},
     BAD_INPUT, "--stream"),
    ("a huge damage table", ["predict", *MODEL, *CALIB, "--sparsity", "0.5", "--windows", "100000",
                             "--window-tokens", "2048"], SMALL_MEMORY, BAD_INPUT, "damage table"),
    ("zero-shot of a huge batch", ["eval", *MODEL, "--zeroshot", "--zeroshot-batch", "100000"], SMALL_MEMORY,
     BAD_INPUT, "zero-shot"),
    # the environment: the cache folder and what is in it
    ("cache folder is a file", ["stats", *MODEL, "--cache-dir", "{file}"], {}, ENVIRONMENT, "is a file, not a folder"),
    ("cache folder under a file", ["prune", *MODEL, "--sparsity", "0.5", "--cache-dir", "{file}/sub"], {},
     ENVIRONMENT, "is a file, not a folder"),
    ("corrupt statistics", ["allocate", *MODEL, *CALIB, "--allocator", "owl", "--sparsity", "0.5", "--cache-dir",
                            "{damaged}"], {}, ENVIRONMENT, "cached statistics"),
    ("altered run weights", ["eval", "--run", "{run}", "--ppl", "--cache-dir", "{damaged}"], {}, ENVIRONMENT,
     "cached run"),
    ("truncated manifest, eval", ["eval", "--run", "{run}", "--ppl", "--cache-dir", "{no_manifest}"], {},
     ENVIRONMENT, "manifest.json is not valid JSON"),
    ("truncated manifest, recover", ["recover", "--run", "{run}", "--cache-dir", "{no_manifest}"], {}, ENVIRONMENT,
     "manifest.json is not valid JSON"),
]


def _snapshot(root: Path) -> dict:
    """Every path under ``root`` with its size (folders: -1); {} when it does not exist."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (-1 if p.is_dir() else p.stat().st_size) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def world(tiny_run, tiny_folder, data_dir, tmp_path_factory):
    """A private cache holding a copy of the tiny run; a damaged copy (statistics truncated, one weight byte
    flipped); a copy whose run manifest is cut; broken model folders; a regular file."""
    root = tmp_path_factory.mktemp("faults")
    cache, run = copy_of_tiny_run(tiny_run, root / "cache")
    damaged, _ = copy_of_tiny_run(tiny_run, root / "damaged")
    (stats,) = (damaged / "stats").iterdir()
    (stats / "stats.npz").write_bytes((stats / "stats.npz").read_bytes()[:1000])
    weights = damaged / "runs" / run.name / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    no_manifest, _ = copy_of_tiny_run(tiny_run, root / "no-manifest")
    manifest = no_manifest / "runs" / run.name / "manifest.json"
    manifest.write_text(manifest.read_text()[:200])
    noconfig = root / "noconfig"
    noconfig.mkdir()
    (noconfig / "model.safetensors").write_bytes(b"\0" * 16)
    badconfig = root / "badconfig"
    shutil.copytree(tiny_folder, badconfig)
    (badconfig / "config.json").write_text("{not json")
    truncated = root / "truncated"
    shutil.copytree(tiny_folder, truncated)
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:1000])
    afile = root / "afile"
    afile.write_text("a file, not a folder")
    return {"tiny": tiny_folder, "cache": str(cache), "run": run.name, "data": data_dir, "file": str(afile),
            "new": str(root / "new"), "damaged": str(damaged), "no_manifest": str(no_manifest),
            "noconfig": str(noconfig), "badconfig": str(badconfig), "truncated": str(truncated), "root": root}


def test_the_table_has_at_least_sixty_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, argv, env, code, message", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_or_fault_ends_in_one_line_with_its_code_and_changes_nothing(world, capsys, monkeypatch, name, argv,
                                                                                   env, code, message):
    from pruner.cli import main

    args = [a.format(**world) for a in argv]
    if "--cache-dir" not in args:
        args += ["--cache-dir", world["cache"]]
    if args[0] in ("stats", "allocate", "predict", "prune", "eval", "recover", "sweep") and "--data-dir" not in args:
        args += ["--data-dir", world["data"]]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    watched = [Path(world[k]) for k in ("cache", "damaged", "no_manifest", "new")]
    before = [_snapshot(p) for p in watched]
    capsys.readouterr()
    try:
        got = main(args)
    except SystemExit as stop:  # argparse's usage errors end the program
        got = stop.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert got == code, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert [_snapshot(p) for p in watched] == before, f"{name} changed the cache"
    assert not Path(world["new"]).exists()


def _mounted(root: Path, options: str):
    """A fresh tmpfs at ``root`` (``options``, e.g. size=40m or ro), or skip where this machine does not allow
    mounting (a container without the privilege)."""
    root.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(root)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to make a real full or read-only disk: {r.stderr.strip()}")


def _unmount(root: Path):
    subprocess.run(["umount", str(root)], capture_output=True)


def _cli(*args, cache: Path, data_dir: str):
    return subprocess.run([sys.executable, "-m", "pruner", *args, "--cache-dir", str(cache), "--data-dir", data_dir],
                          capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)


def test_a_full_disk_is_refused_before_the_prune_with_nothing_left_behind(tiny_folder, data_dir, tmp_path):
    """A real 8 MB filesystem, 7 MB of it taken: the tiny model's 12.6 MB of pruned weights cannot fit, so the prune
    is refused before it starts (exit 3, one line naming the space), and the disk holds what it held (no job
    table, no temporary folder)."""
    disk = tmp_path / "disk"
    _mounted(disk, "size=8m")
    try:
        (disk / "filler").write_bytes(b"\0" * 7 * 2**20)
        before = _snapshot(disk)
        r = _cli("prune", "--model", tiny_folder, "--device", "cpu", "--sparsity", "0.5", "--method", "magnitude",
                 "--allocator", "uniform", cache=disk / "cache", data_dir=data_dir)
        assert r.returncode == ENVIRONMENT, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "GiB free" in lines[0] and "Traceback" not in r.stderr, r.stderr
        assert _snapshot(disk) == before
    finally:
        _unmount(disk)


def test_a_read_only_cache_is_refused_before_any_work(tiny_folder, data_dir, tmp_path):
    disk = tmp_path / "ro"
    _mounted(disk, "ro,size=1m")
    try:
        r = _cli("stats", "--model", tiny_folder, "--device", "cpu", *CALIB, cache=disk, data_dir=data_dir)
        assert r.returncode == ENVIRONMENT, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "read-only" in lines[0] and "Traceback" not in r.stderr, r.stderr
        assert _snapshot(disk) == {}
    finally:
        _unmount(disk)


def test_a_reader_that_goes_away_stops_the_command_quietly(tmp_path):
    """`python -m pruner cache | head -1`: the reader closes the pipe before the table is written. A real process,
    its standard output a pipe whose reading end is already closed, so the first write fails: the command stops with
    128 + SIGPIPE, as a shell reports a tool the signal ended, and says nothing (before: "error: Broken pipe:", exit 3)."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, "-m", "pruner", "cache", "--cache-dir", str(tmp_path / "cache")],
                           cwd=PROJECT_ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert (r.returncode, r.stderr) == (141, "")
