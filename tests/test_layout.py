"""The package's shape: layering, the cache's one owner and its cleanup, bad runs named not fatal, installability."""

import ast
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pruner.cache import CacheLayout
from pruner.store import PROJECT_ROOT, writer_host

PACKAGE = PROJECT_ROOT / "pruner"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """pruner modules imported at module level (not inside functions)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pruner"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("pruner"))
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {i for i in _top_level_imports(p) if i in modules and i != m} for m, p in modules.items()}


def test_no_streamlit_under_the_library():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "streamlit" for n in names), f"{path} imports streamlit"


def test_module_level_imports_form_no_cycle_and_the_lowest_modules_import_nothing_above():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m, trail):
        if state.get(m) == 1:
            pytest.fail("import cycle: " + " → ".join(trail + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in graph[m]:
            visit(n, trail + [m])
        state[m] = 2

    for m in graph:
        visit(m, [])
    lowest = {"pruner.params": set(), "pruner.scores": set(), "pruner.methods.masks": set(),
              "pruner.allocation": {"pruner.params"}}
    for m, allowed in lowest.items():
        assert graph[m] <= allowed, f"{m} imports {graph[m] - allowed}"
    # the registries sit below the specs, and the specs below everything that runs
    assert "pruner.specs" not in graph["pruner.methods"] | graph["pruner.allocation"]


def _tiny_run(cache, tiny_folder, data_dir):
    from pruner.runs import run_prune
    from pruner.specs import CalibSpec, ModelSpec, PruneSpec

    spec = PruneSpec(model=ModelSpec(tiny_folder, device="cpu"), calib=CalibSpec(nsamples=2, seqlen=32, data_dir=data_dir),
                     allocator="uniform", method="magnitude", sparsity=0.5)
    return spec.key(), run_prune(spec, cache)


def test_cache_command_lists_kinds_and_removes_stale_and_named_entries(tiny_folder, data_dir, tmp_path, capsys):
    from pruner import cli
    from pruner.store import run_zip

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
    from pruner.cache import KINDS

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
    from pruner.runs import BadRun, list_runs, read_run

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
    assert "{model,stats,allocate,predict,prune,eval,recover,cache" in r.stdout
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import pruner; print(pruner.__file__)"],
                       capture_output=True, text=True, cwd=elsewhere, timeout=120)
    assert Path(r.stdout.strip()).parent == PACKAGE
