"""The package's shape: layering, the cache's one owner and its cleanup, bad runs named not fatal, installability."""

import ast
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pruner.store.files import PROJECT_ROOT, writer_host
from pruner.store.layout import CacheLayout

PACKAGE = PROJECT_ROOT / "pruner"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


#: The package's floors, lowest first: a module may import only from its own floor or below (never up), and no
#: import, at module level or inside a function, may close a circle. A name is on the floor of the first entry it
#: equals or lies under; ``pruner`` itself (only ``__version__``) is the ground.
FLOORS = (
    ("pruner", "pruner.core"),  # parameters, scores, intervals, process memory
    ("pruner.store",),  # atomic files; the cache layout, its format versions and checksums
    ("pruner.model",),  # the torch-free catalogue; anatomy of blocks; loading; streaming
    ("pruner.allocation", "pruner.methods", "pruner.specs", "pruner.data"),
    ("pruner.engine",),  # calibration, statistics, pruning, BESA, LoRA, memory plans, cached artifacts
    ("pruner.evaluate",),  # perplexity, zero-shot, speed
    ("pruner.predictor",),  # the damage table: table, measurement, cache, optimal allocation, tuning
    ("pruner.runs",),  # executing a run, its manifest, metrics, groups
    ("pruner.jobs",),  # workflows, the job queue, sweeps, executors (local and Ray)
    ("pruner.cli", "pruner.charts", "pruner.__main__"),  # the faces: the CLI (the pages live outside the package)
)
#: No module under pruner/ is longer than this (lines): past it, a module holds more than one job.
MAX_MODULE_LINES = 500


def _floor(module: str) -> int:
    found = [i for i, names in enumerate(FLOORS) for name in names
             if module == name or (name != "pruner" and module.startswith(name + "."))]
    assert found, f"{module} is on no floor: add it to FLOORS"
    return max(found)


def _imports(path: Path) -> dict[str, int]:
    """Every pruner module ``path`` imports, with the line: module level, inside functions and under TYPE_CHECKING
    alike (``from pruner.x import y`` counts as importing pruner.x.y when that is a module)."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pruner") and not node.level:
            out.setdefault(node.module, node.lineno)
            for a in node.names:
                out.setdefault(f"{node.module}.{a.name}", node.lineno)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("pruner"):
                    out.setdefault(a.name, node.lineno)
    return out


def _graph() -> dict[str, dict[str, int]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {i: line for i, line in _imports(p).items() if i in modules and i != m} for m, p in modules.items()}


def test_no_streamlit_under_the_library():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "streamlit" for n in names), f"{path} imports streamlit"


def test_every_import_points_down_the_floors_and_none_closes_a_circle():
    graph = _graph()
    upward = [f"{m} (floor {_floor(m)}) imports {n} (floor {_floor(n)}) at line {line}"
              for m, deps in graph.items() for n, line in deps.items() if _floor(n) > _floor(m)]
    assert not upward, "imports that run up:\n" + "\n".join(upward)
    state: dict[str, int] = {}

    def visit(m, trail):
        if state.get(m) == 1:
            pytest.fail("import circle: " + " → ".join(trail[trail.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in graph[m]:
            visit(n, trail + [m])
        state[m] = 2

    for m in graph:
        visit(m, [])
    # the lowest modules import nothing of the package; the registries sit below the specs
    for m, allowed in {"pruner.core.params": set(), "pruner.core.scores": set(), "pruner.methods.masks": set(),
                       "pruner.model.catalogue": {"pruner.store.formats"}}.items():
        assert set(graph[m]) <= allowed, f"{m} imports {set(graph[m]) - allowed}"
    assert "pruner.specs" not in set(graph["pruner.methods"]) | set(graph["pruner.allocation.registry"])


def test_the_import_check_sees_function_local_imports_and_fails_on_an_upward_one(tmp_path):
    """The check above must be able to fail: an import inside a function that runs up is found, with its line."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pruner.jobs.queue import JobStore\n    return JobStore\n")
    found = _imports(module)
    assert found["pruner.jobs.queue"] == 2 and _floor("pruner.jobs.queue") > _floor("pruner.engine.prune")
    with pytest.raises(AssertionError, match="on no floor"):
        _floor("pruner_other.thing")


def test_no_module_is_longer_than_the_limit_and_the_cli_has_one_module_per_command_group():
    long = {str(p.relative_to(PROJECT_ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
    from pruner.cli import COMMAND_GROUPS, build_parser

    commands = {}
    for group in COMMAND_GROUPS:
        source = Path(group.__file__).read_text()
        for name in re.findall(r'sub\.add_parser\("([\w-]+)"', source):
            commands[name] = group.__name__
    parser_commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert set(commands) == parser_commands, "each command is added by exactly one command-group module"
    assert len(set(commands.values())) == len(COMMAND_GROUPS) >= 4


def _tiny_run(cache, tiny_folder, data_dir):
    from pruner.model.catalogue import ModelSpec
    from pruner.runs.execute import run_prune
    from pruner.specs import CalibSpec, PruneSpec

    spec = PruneSpec(model=ModelSpec(tiny_folder, device="cpu"), calib=CalibSpec(nsamples=2, seqlen=32, data_dir=data_dir),
                     allocator="uniform", method="magnitude", sparsity=0.5)
    return spec.key(), run_prune(spec, cache)


def test_cache_command_lists_kinds_and_removes_stale_and_named_entries(tiny_folder, data_dir, tmp_path, capsys):
    from pruner import cli
    from pruner.runs.manifest import run_zip

    key, folder = _tiny_run(tmp_path, tiny_folder, data_dir)
    run_zip(folder)
    layout = CacheLayout.at(tmp_path)
    assert layout.export(key).is_file()
    # what an interrupted write, an old run format, a zip of a deleted run and an old ONNX export leave behind
    finished = subprocess.Popen(["true"])
    finished.wait()
    (tmp_path / "runs" / f".{key}.tmp-{finished.pid}-abcdef12").mkdir()  # its writer is gone
    live = tmp_path / "runs" / f".{key}.tmp-{os.getpid()}-abcdef13-{writer_host()}"  # still being written: stays
    live.mkdir()
    old = tmp_path / "runs" / "00000000000000aa"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"key": old.name, "spec": {"allocator": "owl", "lam": 0.08}}))
    (tmp_path / "exports" / "00000000000000bb.zip").write_bytes(b"x" * 1000)
    onnx = layout.onnx("0123456789abcdef", "v1-b1-t128")
    onnx.mkdir(parents=True)
    (onnx / "decode.onnx").write_bytes(b"x" * 5000)
    (tmp_path / "bench-scratch").mkdir()  # not the cache's own: listed, never touched
    (tmp_path / "predictors").mkdir()  # the cache's own, even when empty

    assert cli.main(["cache", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    from pruner.store.layout import KINDS

    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:2 + len(KINDS)]}
    assert list(rows) == list(KINDS)
    # the run, two temporary folders (one of a gone writer), the old run
    assert rows["runs"][1:2] == ["4"] and rows["runs"][4] == "2"
    assert rows["exports"][1] == "2" and rows["dense"][1] == "1" and rows["dense"][4] == "1"
    assert "stale: runs/00000000000000aa: run format 1 (current 2" in out
    assert "stale: dense/v1-b1-t128: ONNX export version 1" in out
    assert "not the cache's own (left alone): bench-scratch" in out
    assert "not the cache's own (left alone): predictors" not in out

    assert cli.main(["cache", "--stale", "--cache-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([key, live.name])
    live.rmdir()
    assert [p.name for p in (tmp_path / "exports").iterdir()] == [f"{key}.zip"]
    assert not onnx.exists() and (tmp_path / "bench-scratch").is_dir()

    assert cli.main(["cache", "--remove", key, "--cache-dir", str(tmp_path)]) == 0
    assert list((tmp_path / "runs").iterdir()) == [] and list((tmp_path / "exports").iterdir()) == []
    assert cli.main(["cache", "--remove", "../../etc", "--cache-dir", str(tmp_path)]) == 2
    assert "--remove takes a kind" in capsys.readouterr().err


def test_a_corrupt_manifest_is_named_and_the_rest_still_lists(tiny_folder, data_dir, tmp_path):
    from pruner.runs.manifest import BadRun, list_runs, read_run

    key, folder = _tiny_run(tmp_path, tiny_folder, data_dir)
    bad = tmp_path / "runs" / "00000000000000cc"
    bad.mkdir()
    (bad / "manifest.json").write_text((folder / "manifest.json").read_text()[:200])  # truncated mid-write
    listing = list_runs(tmp_path)
    assert [r.key for r in listing.runs] == [key]
    assert listing.broken[0][0] == bad.name and "manifest.json is not valid JSON" in listing.broken[0][1]
    with pytest.raises(BadRun, match="run 00000000000000cc: manifest.json is not valid JSON"):
        read_run(bad)
    r = subprocess.run([sys.executable, "-m", "pruner", "jobs", "list", "--cache-dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "warning: run 00000000000000cc: manifest.json is not valid JSON" in r.stdout


def test_editable_install_gives_a_pruner_command_usable_from_anywhere(tmp_path):
    """`pip install -e .` in a fresh virtual environment; its dependencies come from this environment (a .pth
    line), so nothing is downloaded; then `pruner --help` and `import pruner` from another directory."""
    venv = tmp_path / "venv"
    # no pip or setuptools of its own: those of this environment (via the .pth line) build and install it
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                        "--no-index", "-e", str(PROJECT_ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([str(venv / "bin" / "pruner"), "--help"], capture_output=True, text=True, cwd=elsewhere,
                       timeout=120)
    assert r.returncode == 0 and "Layerwise sparsity allocation" in r.stdout, r.stderr
    assert "{model,stats,allocate,predict,prune,recover,sweep,eval,cache" in r.stdout
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import pruner; print(pruner.__file__)"],
                       capture_output=True, text=True, cwd=elsewhere, timeout=120)
    assert Path(r.stdout.strip()).parent == PACKAGE


def test_the_suite_s_longest_first_order_names_files_that_exist_and_leads_the_collection(request):
    """tests/conftest.py schedules ``LONGEST_FILES`` first (two xdist workers then finish together): a renamed or
    removed file there would silently fall back to collection order, so each must exist, and the collection this
    test belongs to must start with them, in that order."""
    from tests.conftest import LONGEST_FILES

    missing = [p for p in LONGEST_FILES if not (PROJECT_ROOT / p).is_file()]
    assert missing == [], f"LONGEST_FILES names files that do not exist: {missing}"
    assert list(LONGEST_FILES.values()) == sorted(LONGEST_FILES.values(), reverse=True)  # longest first
    collected = list(dict.fromkeys(Path(str(i.path)).relative_to(PROJECT_ROOT).as_posix()
                                   for i in request.session.items))
    ranked = [p for p in LONGEST_FILES if p in collected]  # all of them in a full run
    assert collected[:len(ranked)] == ranked, collected[:len(ranked) + 1]
