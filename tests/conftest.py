import os
from pathlib import Path

import pytest

#: The suite runs in this many pytest-xdist worker processes (Makefile: ``pytest -n``); each computes with
#: ⌊CPUs ÷ workers⌋ threads, and so do the processes its tests start (job workers, the CLI, Streamlit), which
#: inherit these variables: two workers of two threads on two cores would oversubscribe them, and MKL's threaded
#: LAPACK then slows down 50–100× (docs/results.md, issue 12 fourth session).
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
THREADS = max(1, min(2, (os.cpu_count() or 1) // XDIST_WORKERS))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

import torch  # noqa: E402  (after the thread variables, which it reads when imported)

from pruner.store.files import default_data_dir  # noqa: E402

torch.set_num_threads(THREADS)

#: The longest test files, longest first, each with its measured seconds of work (setup + calls + teardown, one
#: xdist worker of 1 thread, idle 2-core EPYC, `pytest -n 2 --durations=0` at 723fb88). `make test` runs files in
#: collection order (``--no-loadscope-reorder``), and ``pytest_collection_modifyitems`` below puts these first:
#: longest-first is what keeps two workers finishing together. With xdist's own order (files with the most tests
#: first) the 2-test browser file ran last, alone, for 209 s of a 999 s run (sum of work 1,723 s).
LONGEST_FILES = {
    "tests/e2e/test_browser.py": 201, "tests/app/test_pages.py": 159, "tests/test_reliability.py": 126,
    "tests/test_jobs.py": 125, "tests/test_sweep.py": 116, "tests/test_predictor.py": 114, "tests/test_cli.py": 111,
    "tests/test_speed.py": 87, "tests/app/test_compare_eval.py": 85, "tests/test_streaming.py": 75,
    "tests/test_moe.py": 71, "tests/test_search.py": 66, "tests/test_openvino.py": 50,
}


def pytest_collection_modifyitems(session, config, items):
    """Put the files of ``LONGEST_FILES`` first, in its order; every other file keeps its collection order after
    them, and so does every test within its file. Every xdist worker computes the same order from the same list."""
    rank = {path: i for i, path in enumerate(LONGEST_FILES)}
    root = Path(str(config.rootpath))

    def file_rank(item) -> int:
        path = Path(str(item.path)).relative_to(root).as_posix()
        return rank.get(path, len(rank))

    items.sort(key=file_rank)  # a stable sort: the rest keeps collection order


def pytest_sessionstart(session):
    """Convert the bundled SmolLM2 into the project cache once, before any worker starts: workers converting it at
    the same moment would replace the folder under each other's feet."""
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist)
        from pruner.model.loading import convert_bundled

        convert_bundled("smollm2-135m")


def share_project_models(cache: Path) -> Path:
    """Let a test's cache folder reuse the project cache's converted bundled models through a symlink (converting
    SmolLM2 again costs ~20 s and 0.5 GB per folder); converts it there first when missing. Returns ``cache``."""
    from pruner.model.loading import convert_bundled
    from pruner.store.layout import CacheLayout

    convert_bundled("smollm2-135m")
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "models").exists():
        (cache / "models").symlink_to(CacheLayout.at(None).models)
    return cache


def copy_measured(source: Path, cache: Path) -> Path:
    """Copy the statistics and damage tables measured in ``source`` (a test module's shared cache) into a test's
    ``cache``, so that a test which only reads them does not measure them again. Returns ``cache``."""
    import shutil

    for part in ("stats", "predictors"):
        if (source / part).is_dir():
            shutil.copytree(source / part, cache / part, dirs_exist_ok=True)
    return cache


@pytest.fixture(scope="session")
def data_dir() -> str:
    """The offline data folder (CI has it at ../shared/data); its absence is a failure, not a skip."""
    path = Path(os.environ.get("PRUNER_DATA_DIR") or default_data_dir())
    assert (path / "wikitext2" / "wiki.test.raw").is_file(), f"data directory {path} is missing; set PRUNER_DATA_DIR"
    return str(path)


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M, converted once into the project cache (about 20 s the first time)."""
    from pruner.model.catalogue import ModelSpec
    from pruner.model.loading import load_model

    return load_model(ModelSpec("smollm2-135m", device="cpu"))


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder ``name`` made by ``build(folder)`` once per test run and shared by its xdist workers (the
    first worker to ask builds it under a file lock, the others wait and read it; a build that died half-way is
    redone). Only for what tests read and never change: the same bundled or seeded inputs give the same folder
    in every worker, so whichever worker builds it, every test sees the same thing."""
    import shutil

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder, above the workers'
    folder, done = root / name, root / f"{name}.built"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_folder(smollm2, tmp_path_factory) -> str:
    """A tiny random Llama saved as a local Hugging Face folder, with the bundled model's tokenizer; one folder for
    the whole run (``built_once``), so that what is keyed by its path (statistics, runs) is the same in every
    worker."""
    import transformers as tf

    def build(folder: Path):
        torch.manual_seed(0)
        config = tf.LlamaConfig(vocab_size=len(smollm2.tokenizer), hidden_size=32, intermediate_size=48,
                                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
        tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        smollm2.tokenizer.save_pretrained(folder)

    return str(built_once(tmp_path_factory, "tiny-llama", build))


@pytest.fixture(scope="session")
def smollm2_tiny_stats(smollm2, data_dir, tmp_path_factory) -> Path:
    """A cache holding only the bundled SmolLM2's statistics on the tiny calibration preset (what the app's pages
    read first), measured once per run (``built_once``; ~35 s with one thread); copy it with ``copy_measured``."""
    from pruner.engine import artifacts
    from pruner.model.catalogue import ModelSpec
    from pruner.specs import CalibSpec, StatsSpec

    def build(folder: Path):
        artifacts.get_stats(StatsSpec(ModelSpec("smollm2-135m"), CalibSpec.preset("tiny", data_dir=data_dir)),
                            folder, loaded=smollm2)

    return built_once(tmp_path_factory, "smollm2-tiny-stats", build)


@pytest.fixture(scope="session")
def tiny_run(tiny_folder, data_dir, tmp_path_factory):
    """(cache dir, run folder) of a stored Wanda + OWL run of the tiny Llama at 50% on 4×64 calibration tokens."""
    from pruner.model.catalogue import ModelSpec
    from pruner.runs.execute import run_prune
    from pruner.specs import CalibSpec, PruneSpec

    cache = share_project_models(tmp_path_factory.mktemp("tiny-run-cache"))  # pages opening on SmolLM2 read it
    spec = PruneSpec(model=ModelSpec(tiny_folder, device="cpu"), calib=CalibSpec(nsamples=4, seqlen=64, data_dir=data_dir),
                     allocator="owl", method="wanda", sparsity=0.5, allocator_params={"lam": 0.05, "m": 3})
    return cache, run_prune(spec, cache)


def copy_of_tiny_run(tiny_run, cache: Path) -> tuple[Path, Path]:
    """(cache dir, run folder) of a copy of ``tiny_run``'s cache at ``cache``, for tests that add to the run
    (evaluations merged into its manifest, runs recovered beside it): the session's run stays as it was built, so
    what one module stores cannot change what another module reads (the order of modules in a worker is not
    fixed)."""
    import shutil

    shutil.copytree(tiny_run[0], cache, symlinks=True)  # the shared models stay a link (not 0.5 GB copied)
    return cache, cache / "runs" / tiny_run[1].name


@pytest.fixture(scope="session")
def speed_timed_run(tiny_run, tmp_path_factory):
    """(cache dir, run folder, progress phases) of a copy of the session's tiny run whose speed was measured once
    per test run (``built_once``: the ONNX exports and the engine's timings cost ~45 s): DeepSparse where it runs,
    else the labelled ONNX Runtime fallback (engine "auto", 1 × 16 tokens), as the Compare page and the DeepSparse
    round trip read it. Copy the run folder before adding to it."""
    import json

    from pruner.evaluate.speed_spec import SpeedSpec
    from pruner.runs import metrics

    def build(folder: Path):
        cache, run = copy_of_tiny_run(tiny_run, folder / "cache")
        phases = []
        metrics.evaluate_speed(run, SpeedSpec(seqlen=16), cache, progress=lambda phase, done, total:
                               phases.append(phase))
        (folder / "phases.json").write_text(json.dumps(phases))

    folder = built_once(tmp_path_factory, "speed-timed-run", build)
    cache = folder / "cache"
    return cache, cache / "runs" / tiny_run[1].name, json.loads((folder / "phases.json").read_text())


@pytest.fixture
def own_tiny_run(tiny_run, tmp_path):
    """This test's own copy of the session's tiny run (``copy_of_tiny_run``)."""
    return copy_of_tiny_run(tiny_run, tmp_path / "own-tiny-run-cache")
