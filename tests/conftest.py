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


@pytest.fixture(scope="session")
def tiny_folder(smollm2, tmp_path_factory) -> str:
    """A tiny random Llama saved as a local Hugging Face folder, with the bundled model's tokenizer."""
    import transformers as tf

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(smollm2.tokenizer), hidden_size=32, intermediate_size=48,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    smollm2.tokenizer.save_pretrained(folder)
    return str(folder)


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


@pytest.fixture
def own_tiny_run(tiny_run, tmp_path):
    """This test's own copy of the session's tiny run (``copy_of_tiny_run``)."""
    return copy_of_tiny_run(tiny_run, tmp_path / "own-tiny-run-cache")
