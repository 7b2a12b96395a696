"""LoRA recovery: settings, the learning-rate schedule by hand, and a real recovery of the tiny stored run (library,
store, zip and the CLI in a subprocess)."""

import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from pruner.engine.recover import RecoverSpec, learning_rate, train_lora
from pruner.runs import metrics
from pruner.runs.execute import load_run, recover_run
from pruner.runs.manifest import LORA_SUBFOLDER, run_zip
from pruner.store.files import PROJECT_ROOT, read_manifest
from tests.conftest import copy_of_tiny_run
from tests.tiny_models import tiny_model, tiny_tokens


def test_settings_are_checked():
    with pytest.raises(ValueError, match="steps must be an integer ≥ 1"):
        RecoverSpec("abc", steps=0)
    with pytest.raises(ValueError, match="lr must be a number > 0"):
        RecoverSpec("abc", lr=float("nan"))
    assert RecoverSpec("abc").key() != RecoverSpec("abc", steps=50).key() != RecoverSpec("abd").key()


def test_learning_rate_warms_up_then_decays_linearly():
    # 20 steps: warm-up over round(0.1 · 20) = 2 steps, then (20 − t) / 18 of the peak
    assert [learning_rate(t, 20, 1.0) for t in (0, 1, 2, 11, 19)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 1 / 18])


def test_lora_result_depends_on_its_seed_not_on_the_process_random_state():
    tokens = tiny_tokens(n=3, seqlen=16)
    spec = RecoverSpec("abc", steps=3, seqlen=16, lr=1e-2)
    runs = []
    for process_seed, seed in ((1, 7), (2, 7), (1, 8)):
        model = tiny_model("llama")  # (seeds the generator itself)
        torch.manual_seed(process_seed)
        state = torch.random.get_rng_state()
        _, losses = train_lora(model, tokens, spec, seed=seed)
        assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is left as it was
        runs.append(losses)
    assert runs[0] == runs[1]  # same seed, different process state: the same training
    assert runs[0][1:] != runs[2][1:]  # another seed: other adapters (step 1's loss is the base model's: B = 0)


@pytest.fixture(scope="module")
def recovered(tiny_run, data_dir, tmp_path_factory):
    cache, parent = copy_of_tiny_run(tiny_run, tmp_path_factory.mktemp("recovered") / "cache")
    spec = RecoverSpec(read_manifest(parent)["key"], steps=12, seqlen=32, lr=1e-2)
    phases = []
    folder = recover_run(parent, spec, data_dir, cache, progress=lambda ph, d, t: phases.append((ph, d, t)))
    return cache, parent, folder, spec, phases


def test_recovery_is_a_new_run_linked_to_its_parent(recovered):
    cache, parent, folder, spec, phases = recovered
    assert phases[-1] == ("LoRA steps", 12, 12)
    m, p = read_manifest(folder), read_manifest(parent)
    assert m["parent"] == p["key"] and m["key"] == folder.name != p["key"]
    assert m["label"] == f"{p['label']} + LoRA r=8, 12 steps"
    assert m["achieved"] == p["achieved"] and m["spec"]["recover"]["steps"] == 12
    rec = m["recovery"]
    assert len(rec["losses"]) == 12 and rec["loss_last"] < rec["loss_first"]
    assert rec["merged"] is False and rec["trainable_params"] > 0
    assert recover_run(parent, spec, None, cache) == folder  # stored: not trained again (no data needed)


def test_pruned_weights_are_untouched_and_the_adapters_change_the_output(recovered):
    _, parent, folder, _, _ = recovered
    assert load_file(folder / "model.safetensors").keys() == load_file(parent / "model.safetensors").keys()
    for name, tensor in load_file(parent / "model.safetensors").items():
        assert torch.equal(load_file(folder / "model.safetensors")[name], tensor)
    adapters = load_file(folder / LORA_SUBFOLDER / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapters.items())  # B starts at 0; it was trained
    base, _ = load_run(parent)
    model, _ = load_run(folder)
    assert type(model).__name__ == "PeftModelForCausalLM"
    ids = torch.arange(1, 17)[None]
    assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits)
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(q, base.model.layers[0].self_attn.q_proj.weight)  # the zeros are where they were


def test_zip_carries_the_adapters_and_a_recovered_run_is_not_recovered_again(recovered, data_dir):
    cache, _, folder, _, _ = recovered
    with zipfile.ZipFile(run_zip(folder)) as z:
        names = z.namelist()
    assert f"{folder.name}/lora/adapter_config.json" in names and f"{folder.name}/model.safetensors" in names
    with pytest.raises(ValueError, match="is already a LoRA recovery; recover its parent"):
        recover_run(folder, RecoverSpec(folder.name, steps=1), data_dir, cache)
    with pytest.raises(ValueError, match="is a LoRA recovery: its unmerged adapters are a dense branch"):
        metrics.evaluate_speed(folder, None, cache)


def test_zero_shot_runs_on_the_recovered_model(recovered, data_dir):
    _, _, folder, _, _ = recovered
    result = metrics.evaluate_zeroshot(folder, data_dir, tasks=["rte"], limit=2)
    assert result["tasks"]["rte"]["n"] == 2
    assert read_manifest(folder)["metrics"]["zeroshot:local:limit2"]["tasks"]["rte"]["acc"] == result["tasks"]["rte"]["acc"]


def test_cli_recover_prints_perplexity_before_and_after(own_tiny_run, data_dir):
    cache, parent = own_tiny_run
    key = parent.name
    cmd = [sys.executable, "-m", "pruner", "recover", "--run", key, "--steps", "3", "--train-seqlen", "32",
           "--max-chunks", "1", "--device", "cpu", "--cache-dir", str(cache), "--data-dir", data_dir]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"(parent {key})" in r.stdout and "not merged" in r.stdout and "LoRA steps" in r.stderr
    assert "before (pruned): WikiText-2 test perplexity" in r.stdout and "after LoRA: WikiText-2" in r.stdout
    bad = subprocess.run(cmd[:4] + ["--run", "0123456789abcdef", "--cache-dir", str(cache)], capture_output=True,
                         text=True, cwd=PROJECT_ROOT, timeout=60)
    assert bad.returncode == 2 and "no run '0123456789abcdef'" in bad.stderr
