"""Registry entries declare their parameters; the CLI flags, the validation and the runs follow from that alone."""

import json

import numpy as np
import pytest

from pruner import cli
from pruner.core.params import Param, check_params
from tests.toy_registry import GAMMA, registered, tilt


def test_param_checks_name_the_allowed_range():
    assert GAMMA.check(0.2) == 0.2 and GAMMA.check(0) == 0.0
    for bad in (-0.01, 0.21, float("nan"), "0.1", True, None):
        with pytest.raises(ValueError, match=r"γ \(gamma\) must be a number in \[0, 0.2\]"):
            GAMMA.check(bad)
    n = Param("n", "n", int, 3, "count", low=1)
    assert n.check(4.0) == 4 and isinstance(n.check(4.0), int)
    with pytest.raises(ValueError, match="n must be an integer ≥ 1; got 2.5"):
        n.check(2.5)
    with pytest.raises(ValueError, match="ρ \\(rho\\) must be a number > 0; got 0"):
        Param("rho", "ρ", float, 1.0, "penalty", low=0.0, low_open=True).check(0)
    with pytest.raises(ValueError, match="must be a number in"):  # a default outside its own range
        Param("x", "x", float, 2.0, "bad", low=0.0, high=1.0)
    assert check_params("toy", (GAMMA,), {}) == {"gamma": 0.05}
    with pytest.raises(ValueError, match="toy takes no parameter 'lam'; its parameters: γ \\(gamma\\)"):
        check_params("toy", (GAMMA,), {"lam": 0.1})


def test_a_slider_cannot_end_on_a_value_its_check_refuses():
    """λ's slider once ended at 0.5, outside λ ∈ [0, 0.5): dragging it there removed the OWL curve with an error."""
    from pruner.allocation import ALLOCATORS, EXPERT_PARAMS
    from pruner.methods import METHODS

    with pytest.raises(ValueError, match="the slider's end 0.5 is not allowed"):
        Param("lam", "λ", float, 0.08, "spread", low=0.0, high=0.5, high_open=True, slider=(0.0, 0.5))
    declared = [p for entry in [*ALLOCATORS.values(), *METHODS.values()] for p in entry.params] + list(EXPERT_PARAMS)
    for p in declared:
        for end in p.slider or ():
            assert p.check(end) == end, p.name


def test_tilt_formula_on_four_blocks():
    np.testing.assert_allclose(tilt(4, 0.5, 0.06), [0.44, 0.48, 0.52, 0.56], atol=1e-15)


def test_toy_entries_appear_in_cli_help_and_run_through_prune_and_allocate(tiny_folder, data_dir, tmp_path, capsys):
    with registered():
        help_text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["prune"].format_help().split())
        assert "toy_tilt" in help_text and "toy_power" in help_text
        assert "--gamma γ" in help_text and "[0, 0.2], default 0.05 (allocator toy_tilt)" in help_text
        assert "--power p" in help_text and "(method toy_power)" in help_text
        common = ["--model", tiny_folder, "--preset", "tiny", "--cache-dir", str(tmp_path), "--data-dir", data_dir]
        assert cli.main(["prune", *common, "--allocator", "toy_tilt", "--gamma", "0.1", "--method", "toy_power",
                         "--power", "2", "--sparsity", "0.5"]) == 0
        key = capsys.readouterr().out.split()[1].rstrip(":")
        manifest = json.loads((tmp_path / "runs" / key / "manifest.json").read_text())
        assert manifest["spec"]["allocator_params"] == {"gamma": 0.1}
        assert manifest["spec"]["method_params"] == {"power": 2.0}
        assert manifest["label"] == "toy_power (p=2) + toy_tilt (γ=0.1) @ 50%"
        np.testing.assert_allclose(manifest["allocation"]["block_sparsity"], tilt(4, 0.5, 0.1), atol=1e-12)
        # the toy method kept the weights of largest |W|² = of largest |W|: the achieved sparsity per block follows
        np.testing.assert_allclose(manifest["achieved"]["block"], tilt(4, 0.5, 0.1), atol=0.01)

        assert cli.main(["allocate", *common, "--allocator", "toy_tilt", "--gamma", "0.02", "--sparsity", "0.6",
                         "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["params"] == {"gamma": 0.02}
        np.testing.assert_allclose(out["block_sparsity"], tilt(4, 0.6, 0.02), atol=1e-12)

        assert cli.main(["allocate", *common, "--allocator", "toy_tilt", "--gamma", "0.5", "--sparsity", "0.6"]) == 2
        assert "γ (gamma) must be a number in [0, 0.2]; got 0.5" in capsys.readouterr().err
    assert "toy_tilt" not in cli.build_parser()._subparsers._group_actions[0].choices["prune"].format_help()


def test_alpha_pruning_epsilon_from_the_cli_sets_the_spread(tiny_folder, data_dir, tmp_path, capsys):
    common = ["--model", tiny_folder, "--preset", "tiny", "--cache-dir", str(tmp_path), "--data-dir", data_dir,
              "--allocator", "alpha", "--sparsity", "0.5", "--json"]
    spreads = {}
    for eps in ("0.1", "0.3"):
        assert cli.main(["allocate", *common, "--epsilon", eps]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["params"] == {"epsilon": float(eps)}
        spreads[eps] = max(out["block_sparsity"]) - min(out["block_sparsity"])
    # the block sparsities span 2ε·S before the mean is restored (a shift, which keeps the span)
    assert spreads["0.1"] == pytest.approx(2 * 0.1 * 0.5) and spreads["0.3"] == pytest.approx(2 * 0.3 * 0.5)
