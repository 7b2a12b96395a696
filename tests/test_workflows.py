"""The workflow layer: same weights as before the refactor, typed requests that round-trip, one dispatch."""

import json

import pytest

from tests.golden_runs import GOLDEN, build_spec, golden_statistics, run_cases, tiny_llama_folder


def test_prune_runs_are_bit_identical_to_the_code_before_the_workflow_layer(smollm2, data_dir, tmp_path):
    """Seven runs (every method; uniform, OWL, OWL-inverse, ER, AlphaPruning, BESA; 2:4) give exactly the weights
    the pre-refactor run_prune wrote (tests/golden/prune_digests.json, with the commit, CPU and torch that wrote
    it). This is also the golden check of numerics: any change in what is pruned or how fails here and must be
    made deliberately, with `python -m tests.golden_runs --write` and the documented tables redone. On another CPU
    or torch build float32 kernels may differ in the last bit: there the masks must match exactly and the
    perplexity to 1e-5. The dense statistics behind the allocations are held the same way (bits on the writing
    machine, block mean scores to 1e-6 elsewhere): they catch a change of accumulation precision that flips no
    mask at this size."""
    import torch

    from bench.common import cpu_name

    golden = json.loads(GOLDEN.read_text())
    folder = tiny_llama_folder(tmp_path / "tiny", smollm2.tokenizer)
    got = run_cases(str(folder), data_dir, tmp_path / "cache")
    assert set(got) == set(golden["cases"])
    # the model name alone does not fix the float32 kernels: "AMD EPYC" names AVX2 and AVX-512 machines alike (on an
    # AVX2 one the perplexity differed by 5e-7 with identical weights); the kernel path torch picks does
    same_machine = (golden["cpu"] == cpu_name() and golden["torch"] == torch.__version__
                    and golden.get("cpu_capability") == torch.backends.cpu.get_cpu_capability())
    for name, want in golden["cases"].items():
        assert got[name]["masks"] == want["masks"], f"{name}: other weights were pruned"
        assert got[name]["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5), name
        if same_machine:
            assert got[name]["weights"] == want["weights"], f"{name}: the pruned weights changed"
            assert got[name]["perplexity"] == want["perplexity"], name
    stats = golden_statistics(str(folder), data_dir, tmp_path / "cache")  # cached by the cases above
    assert stats["block_mean_score"] == pytest.approx(golden["statistics"]["block_mean_score"], rel=1e-6)
    if same_machine:
        assert stats["digest"] == golden["statistics"]["digest"], "the dense statistics changed"


def test_requests_round_trip_through_the_job_table_form(tiny_folder, data_dir):
    from pruner.engine.recover import RecoverSpec
    from pruner.evaluate.speed_spec import SpeedSpec
    from pruner.jobs.workflows import (EvalRequest, LearnRequest, PerplexityOptions, PredictorRequest, PruneRequest,
                                       RecoverRequest, StatsRequest, ZeroshotOptions, request_from_dict)
    from pruner.predictor.table import PredictorSpec
    from pruner.specs import StatsSpec
    from tests.golden_runs import CASES

    spec = build_spec(CASES[1], tiny_folder, data_dir)
    stats = StatsSpec(spec.model, spec.calib)
    requests = [StatsRequest(stats), StatsRequest(stats, stream=True), LearnRequest(stats, "besa", 0.6, {"beta": 7.0}),
                PruneRequest(spec, PerplexityOptions(3), data_dir=data_dir),
                PruneRequest(spec, stream=True, tune=True),
                EvalRequest("0123456789abcdef", zeroshot=ZeroshotOptions(("boolq",), 5, batch_size=2),
                            speed=SpeedSpec(seqlen=32)),
                RecoverRequest(RecoverSpec("0123456789abcdef", steps=3), PerplexityOptions(2)),
                PredictorRequest(PredictorSpec(stats, windows=3, window_tokens=64, grid=(0.5, 0.9)), data_dir=data_dir),
                PredictorRequest(PredictorSpec(stats, around=0.7), data_dir=data_dir)]
    for r in requests:
        payload = json.loads(json.dumps(r.to_dict()))  # what the job table stores
        back = request_from_dict(r.kind, payload)
        assert back == r and back.label() == r.label()


def test_a_request_whose_calibration_exceeds_the_context_is_refused_when_built():
    """The check the CLI makes is the request's own, so a page or a job payload gets it too."""
    from pruner.jobs.workflows import PruneRequest, StatsRequest
    from pruner.specs import CalibSpec, PruneSpec, StatsSpec

    long = CalibSpec(seqlen=100_000)
    for request in (lambda: PruneRequest(PruneSpec(calib=long)), lambda: StatsRequest(StatsSpec(calib=long))):
        with pytest.raises(ValueError, match="seqlen 100000 is longer than smollm2-135m's context of 8192 tokens"):
            request()


@pytest.mark.parametrize("bad, message", [
    (dict(kind="eval", payload={"run": "../../etc", "perplexity": {}}), "16 hexadecimal digits"),
    (dict(kind="eval", payload={"run": "0123456789abcdef"}), "nothing to evaluate"),
    (dict(kind="learn", payload={"spec": None, "allocator": "owl", "sparsity": 0.5}), "learned allocator"),
    (dict(kind="sweep", payload={}), "request kind must be one of"),
])
def test_bad_requests_are_refused_when_built(bad, message):
    from pruner.jobs.workflows import request_from_dict

    with pytest.raises(ValueError, match=message):
        request_from_dict(bad["kind"], bad["payload"])


def test_method_parameters_reach_the_method(smollm2, data_dir, tmp_path):
    """ADMM's iterations and ρ, set in the spec, change the weights and are stored with the run."""
    from dataclasses import replace

    from pruner.jobs.workflows import Context, PruneRequest, run
    from pruner.runs.manifest import read_run
    from tests.golden_runs import CASES, weights_digest

    folder = tiny_llama_folder(tmp_path / "tiny", smollm2.tokenizer)
    default = build_spec(CASES[3], str(folder), data_dir)  # admm + AlphaPruning at 50%
    assert default.method == "admm" and default.method_params == {"iterations": 20, "rho": 1.0}
    short = replace(default, method_params={"iterations": 1, "rho": 0.5})
    folders = [run(PruneRequest(s), Context(tmp_path / "cache"))["folder"] for s in (default, short)]
    assert weights_digest(folders[0]) != weights_digest(folders[1])
    stored = read_run(folders[1])
    assert stored.method_params == {"iterations": 1, "rho": 0.5} and "ρ=0.5" in stored.label
    assert stored.parameters_text() == "ε=0.3; iterations=1, ρ=0.5"
