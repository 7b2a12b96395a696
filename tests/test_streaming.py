"""Streamed blocks (pruner/streaming.py): the same pruned weights as in memory, written as loadable shards."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pruner.methods import METHODS
from pruner.model.catalogue import ModelSpec
from pruner.model.streaming import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, Checkpoint, ShardWriter, build_skeleton
from pruner.runs.execute import load_run, run_prune
from pruner.specs import CalibSpec, PruneSpec
from tests.conftest import share_project_models


@pytest.fixture(scope="module")
def sharded_folder(tiny_folder, tmp_path_factory) -> str:
    """The tiny Llama saved again in several shards with an index (as large checkpoints come)."""
    import transformers as tf

    folder = tmp_path_factory.mktemp("tiny-sharded")
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    model.save_pretrained(folder, max_shard_size="1MB")
    tf.AutoTokenizer.from_pretrained(tiny_folder).save_pretrained(folder)
    assert (folder / SAFETENSORS_INDEX).is_file()
    return str(folder)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint(folder)
    return checkpoint.read(checkpoint.names())


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb)
    different = [n for n in wa if not torch.equal(wa[n], wb[n])]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.mark.parametrize("method", list(METHODS))
def test_streamed_prune_equals_in_memory_for_every_method(sharded_folder, data_dir, tmp_path, method):
    spec = PruneSpec(model=ModelSpec(sharded_folder, device="cpu"),
                     calib=CalibSpec(nsamples=4, seqlen=32, data_dir=data_dir),
                     allocator="owl", method=method, sparsity=0.6, allocator_params={"lam": 0.05, "m": 3})
    in_memory = run_prune(spec, tmp_path).rename(tmp_path / "in-memory")  # statistics stay cached
    streamed = run_prune(spec, tmp_path, stream=True)
    _assert_same_weights(in_memory, streamed)
    manifest = json.loads((streamed / "manifest.json").read_text())
    assert manifest["execution"] == {"streamed": True, "device": "cpu", "offload_activations": False,
                                     "torch_threads": torch.get_num_threads()}
    assert manifest["achieved"]["overall"] == pytest.approx(0.6, abs=0.01)
    # the streamed run loads like any run and computes what the in-memory one does
    a, _ = load_run(in_memory)
    b, _ = load_run(streamed)
    ids = torch.arange(20)[None]
    assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_streamed_statistics_equal_in_memory(sharded_folder, data_dir):
    from pruner.engine.artifacts import compute_stats
    from pruner.model.loading import load_model
    from pruner.specs import StatsSpec

    spec = StatsSpec(ModelSpec(sharded_folder, device="cpu"), CalibSpec(nsamples=4, seqlen=32, data_dir=data_dir))
    a = compute_stats(spec, loaded=load_model(spec.model))
    b = compute_stats(spec, loaded=load_model(spec.model, stream=True))
    assert np.array_equal(a.score_hist, b.score_hist) and np.array_equal(a.lod(3.0), b.lod(3.0))


def test_streamed_smollm2_equals_in_memory(smollm2, data_dir, tmp_path):
    """The bundled model (tied head, single-file checkpoint), pruned with Wanda block after block from the pruned
    blocks' outputs. Every method (SparseGPT's weight update included), and the streamed statistics pass, are
    compared on the tiny Llama above: SparseGPT here took 62 s of the suite's budget against Wanda's 31 s."""
    for method in ("wanda",):
        spec = PruneSpec(model=ModelSpec("smollm2-135m", device="cpu"),
                         calib=CalibSpec(nsamples=4, seqlen=64, data_dir=data_dir),
                         allocator="uniform", method=method, sparsity=0.7)
        in_memory = run_prune(spec, _sharing_models(tmp_path / f"memory-{method}"))
        streamed = run_prune(spec, _sharing_models(tmp_path / f"streamed-{method}"), stream=True)
        _assert_same_weights(in_memory, streamed)
        # the tied head is stored once, as save_pretrained does
        assert "lm_head.weight" not in Checkpoint(streamed).names()


def test_streamed_besa_learns_and_prunes_as_in_memory(sharded_folder, data_dir, tmp_path):
    """BESA learned inside a streamed prune (blocks read from the shards for their turn, activations offloaded),
    each in its own cache: the same learned sparsities and the same pruned weights as in memory."""
    import dataclasses

    spec = PruneSpec(model=ModelSpec(sharded_folder, device="cpu"),
                     calib=CalibSpec(nsamples=4, seqlen=32, data_dir=data_dir),
                     allocator="besa", method="wanda", sparsity=0.6)
    offloaded = dataclasses.replace(spec, model=dataclasses.replace(spec.model, offload_activations=True))
    assert offloaded.key() == spec.key()  # where activations live is not what the weights are
    in_memory = run_prune(spec, tmp_path / "a")
    streamed = run_prune(offloaded, tmp_path / "b", stream=True)
    _assert_same_weights(in_memory, streamed)
    learned = [json.loads(next((tmp_path / side / "learned").glob("*/learned.json")).read_text())
               for side in ("a", "b")]
    assert learned[0]["layer_sparsity"] == learned[1]["layer_sparsity"]
    manifest = json.loads((streamed / "manifest.json").read_text())
    assert manifest["execution"] == {"streamed": True, "device": "cpu", "offload_activations": True,
                                     "torch_threads": torch.get_num_threads()}
    assert "BESA's per-weight state" in manifest["memory"]["plan_gb"]  # the plan counted the learning


def _sharing_models(cache: Path) -> Path:
    """A cache folder that reuses the project's converted bundled model (converting it again takes ~20 s)."""
    return share_project_models(cache)


def test_the_skeleton_holds_no_block_weights(sharded_folder):
    model = build_skeleton(sharded_folder, torch.float32)
    block_params = [p for n, p in model.named_parameters() if ".layers." in n]
    assert block_params and all(p.is_meta for p in block_params)
    assert not any(p.is_meta for n, p in model.named_parameters() if ".layers." not in n)


def test_shard_writer_names_shards_and_writes_an_index(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=100)
    writer.add({"a": torch.zeros(20), "b": torch.ones(20)})  # 80 bytes each: one shard per tensor
    writer.add({"c": torch.arange(3)})
    files = writer.close()
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", SAFETENSORS_INDEX]
    index = json.loads((tmp_path / SAFETENSORS_INDEX).read_text())
    assert index["metadata"]["total_size"] == 80 + 80 + 24
    assert index["weight_map"] == {"a": files[0], "b": files[1], "c": files[2]}
    back = Checkpoint(tmp_path).read(["a", "b", "c"])
    assert torch.equal(back["b"], torch.ones(20)) and torch.equal(back["c"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # no temporary files left


def test_shard_writer_single_file_and_duplicates(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.add({"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="'a' was written twice"):
        writer.add({"a": torch.zeros(2)})
    assert writer.close() == [SAFETENSORS_SINGLE]


def test_a_folder_without_safetensors_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no safetensors weights"):
        Checkpoint(tmp_path)


def test_a_failed_streamed_prune_leaves_no_run(sharded_folder, data_dir, tmp_path):
    """Cancelled half-way: the shards already written go with the temporary folder."""
    from pruner.engine.calibrate import Cancelled

    spec = PruneSpec(model=ModelSpec(sharded_folder, device="cpu"),
                     calib=CalibSpec(nsamples=4, seqlen=32, data_dir=data_dir), allocator="uniform",
                     method="wanda", sparsity=0.5)
    calls = []
    with pytest.raises(Cancelled):
        run_prune(spec, tmp_path, stream=True, should_cancel=lambda: calls.append(1) or len(calls) > 2)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cli_prune_stream(sharded_folder, tmp_path, data_dir):
    """`prune --stream` in a real subprocess: a streamed run with the checkpoint's shard layout."""
    from tests.test_cli import run_cli

    r = run_cli("prune", "--model", sharded_folder, "--preset", "tiny", "--allocator", "uniform", "--method",
                "wanda", "--sparsity", "0.5", "--stream", cache=tmp_path, data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    key = r.stdout.split()[1].rstrip(":")
    folder = tmp_path / "runs" / key
    assert json.loads((folder / "manifest.json").read_text())["execution"]["streamed"] is True
    assert set(Checkpoint(folder).names()) == set(Checkpoint(sharded_folder).names())


def test_cli_allocate_besa_stream(sharded_folder, tmp_path, data_dir):
    """`allocate --allocator besa --stream` in a real subprocess learns block by block from the shards; the
    sparsities equal an in-memory learning in the library."""
    from pruner.engine.artifacts import learn_allocation
    from pruner.specs import StatsSpec
    from tests.test_cli import run_cli

    r = run_cli("allocate", "--model", sharded_folder, "--nsamples", "4", "--seqlen", "32", "--allocator", "besa",
                "--sparsity", "0.5", "--stream", "--json", cache=tmp_path / "cli", data_dir=data_dir)
    assert r.returncode == 0, r.stderr
    streamed = json.loads(r.stdout)["learning"]
    spec = StatsSpec(ModelSpec(sharded_folder), CalibSpec(nsamples=4, seqlen=32, data_dir=data_dir))
    in_memory = learn_allocation(spec, "besa", 0.5, cache_dir=tmp_path / "library")
    assert streamed["layer_sparsity"] == in_memory["layer_sparsity"]


def test_streamed_perplexity_equals_whole_model(sharded_folder, data_dir, tmp_path):
    """Block by block over all chunks, blocks read from the shards: the same per-chunk NLLs as the whole model."""
    from pruner.runs import metrics

    spec = PruneSpec(model=ModelSpec(sharded_folder, device="cpu"),
                     calib=CalibSpec(nsamples=4, seqlen=32, data_dir=data_dir), allocator="uniform",
                     method="wanda", sparsity=0.5)
    folder = run_prune(spec, tmp_path, stream=True)
    whole = metrics.evaluate_perplexity(folder, data_dir, max_chunks=3, seqlen=64)
    blockwise = metrics.evaluate_perplexity(folder, data_dir, max_chunks=3, seqlen=64, stream=True, reuse=False)
    assert blockwise["chunk_mean_nll"] == pytest.approx(whole["chunk_mean_nll"], rel=1e-6)
    assert blockwise["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)


def test_streamed_dense_perplexity_of_smollm2(smollm2, data_dir, tmp_path):
    """The bundled model's first chunk, whole model vs blocks streamed from its checkpoint (tied head)."""
    from pruner.model.loading import load_model
    from pruner.runs.metrics import dense_perplexity

    spec = ModelSpec("smollm2-135m", device="cpu")
    whole = dense_perplexity(spec, data_dir, _sharing_models(tmp_path / "a"), max_chunks=1, seqlen=256,
                             loaded=smollm2)
    streamed = dense_perplexity(spec, data_dir, _sharing_models(tmp_path / "b"), max_chunks=1, seqlen=256,
                                loaded=load_model(spec, stream=True))
    assert streamed["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)


def test_cli_stream_refuses_what_needs_the_whole_model(tmp_path, data_dir):
    from tests.test_cli import run_cli

    r = run_cli("eval", "--run", "0123456789abcdef", "--zeroshot", "--stream", cache=tmp_path, data_dir=data_dir)
    assert r.returncode == 2 and "--stream applies to --ppl only" in r.stderr
