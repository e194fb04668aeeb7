"""advserve's `verl` preset against golden vectors computed by the real verl 0.9.1.

The vectors live in tests/golden/verl_0.9.1.json and are produced by tests/golden/make_verl_golden.py
(run with a venv holding verl==0.9.1; see that script). Every [B, T] expectation is already multiplied by
response_mask: advserve defines masked positions as exactly 0.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest

import advserve

GOLDEN = pathlib.Path(__file__).parent / "golden" / "verl_0.9.1.json"
DATA = json.loads(GOLDEN.read_text())
# float64: verl's masked_mean divides by N + 1e-8, which advserve does not copy: whitened outputs differ
# by < 1e-8/N relative (nothing in float32, where N + 1e-8 == N). Everything else agrees to ~1e-15.
TOL = {"float64": 1e-8, "float32": 1e-5}


def _inputs(tensors: dict) -> dict:
    out = {}
    for name, value in tensors.items():
        if name == "group_ids" and any(isinstance(g, str) for g in value):
            out[name] = list(value)  # string ids go in as a list of str
        else:
            out[name] = np.asarray(value)
    return out


def _case_doc(case: dict) -> str:
    return f"{case['case']}" + (f" (note: {case['note']})" if "note" in case else "")


def _check_array(case, field, got, expected, tol):
    assert got is not None, f"{case['case']}: {field} is None, expected an array"
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, f"{case['case']}: {field} shape {got.shape} != {expected.shape}"
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol, err_msg=f"{_case_doc(case)}: {field}")


def _check_scalar(case, field, got, expected, tol):
    assert got is not None, f"{case['case']}: {field} is None, expected {expected!r}"
    got = float(got)
    assert math.isclose(got, expected, rel_tol=tol, abs_tol=tol), (
        f"{_case_doc(case)}: {field}: expected {expected!r}, got {got!r} (diff {got - expected:.3g})"
    )


def test_golden_metadata():
    assert DATA["library"] == "verl"
    assert DATA["version"] == "0.9.1"
    names = [c["case"] for c in DATA["advantages"]] + [c["case"] for c in DATA["losses"]]
    assert len(names) == len(set(names))
    assert DATA["advantages"] and DATA["losses"]


@pytest.mark.parametrize("case", DATA["advantages"], ids=[c["case"] for c in DATA["advantages"]])
def test_verl_advantages(case):
    tol = TOL[case["dtype"]]
    res = advserve.compute_advantages(
        case["estimator"], preset="verl", params=case["params"], dtype=case["dtype"], **_inputs(case["tensors"])
    )
    _check_array(case, "advantages", res.advantages, case["expected"]["advantages"], tol)
    _check_array(case, "returns", res.returns, case["expected"]["returns"], tol)


@pytest.mark.parametrize("case", DATA["losses"], ids=[c["case"] for c in DATA["losses"]])
def test_verl_losses(case):
    tol = TOL[case["dtype"]]
    exp = case["expected"]
    res = advserve.compute_losses(preset="verl", dtype=case["dtype"], **case["request"], **_inputs(case["tensors"]))
    _check_scalar(case, "loss", res.loss, exp["loss"], tol)
    for name, value in exp["components"].items():
        got = res.components.get(name)
        if value is None:
            assert got is None, f"{case['case']}: components[{name!r}] should be None (term absent), got {got!r}"
        else:
            _check_scalar(case, f"components[{name!r}]", got, value, tol)
    _check_array(case, "grad_logprobs", res.grad_logprobs, exp["grad_logprobs"], tol)
    for name in ("grad_values", "grad_entropy"):
        got = getattr(res, name)
        if exp[name] is None:
            assert got is None, f"{case['case']}: {name} should be None (term absent)"
        else:
            _check_array(case, name, got, exp[name], tol)
