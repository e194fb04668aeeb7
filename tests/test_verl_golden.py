"""advserve's `verl` preset against golden vectors computed by the real verl 0.9.1.

The vectors live in tests/golden/verl_0.9.1.json and are produced by tests/golden/make_verl_golden.py
(run with a venv holding verl==0.9.1; see that script). Every [B, T] expectation is already multiplied by
response_mask: advserve defines masked positions as exactly 0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import advserve
import golden_cases

DATA = golden_cases.load("verl_0.9.1.json", "verl", "0.9.1")
# float64: verl's masked_mean divides by N + 1e-8, which advserve does not copy: whitened outputs differ
# by |μ|·1e-8/(N·σ) absolute, < 1e-8/N relative where |μ| ≲ σ as in these cases (a near-constant batch
# shows more; tests/golden/fuzz_libraries.py bounds it). Nothing in float32, where N + 1e-8 == N.
# Everything else agrees to ~1e-15.
TOL = {"float64": 1e-8, "float32": 1e-5}


@pytest.mark.parametrize("case", DATA["advantages"], ids=[c["case"] for c in DATA["advantages"]])
def test_verl_advantages(case):
    tol = TOL[case["dtype"]]
    res = advserve.compute_advantages(
        case["estimator"], preset="verl", params=case["params"], dtype=case["dtype"], **golden_cases.inputs(case["tensors"])
    )
    golden_cases.check_advantages(case, res, tol)


@pytest.mark.parametrize("case", DATA["losses"], ids=[c["case"] for c in DATA["losses"]])
def test_verl_losses(case):
    # verl's ppo_loss passes batch_num_tokens and global_batch_size whatever the mode and agg_loss ignores
    # the one its mode does not read; advserve refuses a normalizer no term reads, so it is left out here
    request = dict(case["request"])
    agg = request["policy_loss"]["agg"]  # every term of these cases aggregates as the policy does
    if agg != "token-mean":
        request.pop("num_tokens", None)
    if not agg.startswith("seq-mean"):
        request.pop("num_sequences", None)
    res = advserve.compute_losses(preset="verl", dtype=case["dtype"], **request,
                                  **golden_cases.inputs(case["tensors"]))
    golden_cases.check_losses(case, res, TOL[case["dtype"]])


# Cases found by tests/golden/fuzz_libraries.py (verl's own numbers, same format): the value-clip tie.
FUZZ = json.loads((golden_cases.GOLDEN_DIR / "verl_0.9.1_fuzz.json").read_text())
assert FUZZ["library"] == "verl" and FUZZ["version"] == "0.9.1"


@pytest.mark.parametrize("case", FUZZ["losses"], ids=[c["case"] for c in FUZZ["losses"]])
def test_verl_value_clip_exact_tie(case):
    """A token with values exactly old_values ± clip: verl's clip_by_value (torch.max(torch.min(v, old + c),
    old − c)) and the tied outer max give v ¾ of the gradient there; the verl preset's
    value_loss.clip_ties='split' reproduces it, and 'pass' (torch.clamp's convention) gives all of it."""
    tensors = golden_cases.inputs(case["tensors"])
    clip = case["request"]["value_loss"]["clip"]
    tie = (tensors["values"] == tensors["old_values"] + clip) | (tensors["values"] == tensors["old_values"] - clip)
    tie &= tensors["response_mask"] > 0
    assert tie.any()
    res = advserve.compute_losses(preset="verl", dtype=case["dtype"], **case["request"], **tensors)
    golden_cases.check_losses(case, res, TOL[case["dtype"]])
    request = {**case["request"], "value_loss": {**case["request"]["value_loss"], "clip_ties": "pass"}}
    passing = advserve.compute_losses(preset="verl", dtype=case["dtype"], **request, **tensors)
    want = np.asarray(case["expected"]["grad_values"])
    np.testing.assert_allclose(np.asarray(passing.grad_values)[tie], want[tie] / 0.75, rtol=1e-12, atol=1e-15)
