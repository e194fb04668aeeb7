"""advserve's `verl` preset against golden vectors computed by the real verl 0.9.1.

The vectors live in tests/golden/verl_0.9.1.json and are produced by tests/golden/make_verl_golden.py
(run with a venv holding verl==0.9.1; see that script). Every [B, T] expectation is already multiplied by
response_mask: advserve defines masked positions as exactly 0.
"""

from __future__ import annotations


import pytest

import advserve
import golden_cases

DATA = golden_cases.load("verl_0.9.1.json", "verl", "0.9.1")
# float64: verl's masked_mean divides by N + 1e-8, which advserve does not copy: whitened outputs differ
# by < 1e-8/N relative (nothing in float32, where N + 1e-8 == N). Everything else agrees to ~1e-15.
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
    res = advserve.compute_losses(preset="verl", dtype=case["dtype"], **case["request"],
                                  **golden_cases.inputs(case["tensors"]))
    golden_cases.check_losses(case, res, TOL[case["dtype"]])
