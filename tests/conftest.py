import os
from pathlib import Path

import pytest
import torch

from pruner.store import default_data_dir

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def data_dir() -> str:
    """The offline data folder (CI has it at ../shared/data); its absence is a failure, not a skip."""
    path = Path(os.environ.get("PRUNER_DATA_DIR") or default_data_dir())
    assert (path / "wikitext2" / "wiki.test.raw").is_file(), f"data directory {path} is missing; set PRUNER_DATA_DIR"
    return str(path)


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M, converted once into the project cache (about 20 s the first time)."""
    from pruner.models import load_model
    from pruner.specs import ModelSpec

    return load_model(ModelSpec("smollm2-135m", device="cpu"))
