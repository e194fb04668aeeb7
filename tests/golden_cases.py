"""What the library golden tests share: loading a golden file and comparing advserve's answers with
the library's (every [B, T] expectation is already multiplied by response_mask).

A golden file (tests/golden/<library>_<version>.json, written by tests/golden/make_<library>_golden.py)
holds `library`, `version`, `advantages` cases (estimator, params, dtype, tensors, expected.{advantages,
returns}) and `losses` cases (request, dtype, tensors, expected.{loss, components, grad_*}).
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"


def load(filename: str, library: str, version: str) -> dict:
    """The golden file, after checking its library and version and that its case names are unique."""
    data = json.loads((GOLDEN_DIR / filename).read_text())
    assert data["library"] == library and data["version"] == version, (data["library"], data["version"])
    names = [c["case"] for c in data["advantages"]] + [c["case"] for c in data["losses"]]
    assert data["advantages"] and data["losses"] and len(names) == len(set(names))
    return data


def inputs(tensors: dict) -> dict:
    """A case's tensors as advserve takes them: numpy arrays; string group ids as a list of str."""
    out = {}
    for name, value in tensors.items():
        if name == "group_ids" and any(isinstance(g, str) for g in value):
            out[name] = list(value)
        else:
            out[name] = np.asarray(value)
    return out


def describe(case: dict) -> str:
    """The case name with what the file says about it (its library configuration, a note)."""
    config = case.get("trl_config") or ""
    return f"{case['case']}{' ' + str(config) if config else ''}" + (f" (note: {case['note']})" if "note" in case else "")


def check_array(case: dict, field: str, got, expected, tol: float) -> None:
    assert got is not None, f"{case['case']}: {field} is None, expected an array"
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, f"{case['case']}: {field} shape {got.shape} != {expected.shape}"
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol, err_msg=f"{describe(case)}: {field}")


def check_scalar(case: dict, field: str, got, expected: float, tol: float) -> None:
    assert got is not None, f"{case['case']}: {field} is None, expected {expected!r}"
    assert math.isclose(float(got), expected, rel_tol=tol, abs_tol=tol), (
        f"{describe(case)}: {field}: expected {expected!r}, got {got!r} (diff {float(got) - expected:.3g})")


def check_advantages(case: dict, result, tol: float) -> None:
    check_array(case, "advantages", result.advantages, case["expected"]["advantages"], tol)
    check_array(case, "returns", result.returns, case["expected"]["returns"], tol)


def check_losses(case: dict, result, tol: float) -> None:
    """The loss, its components (None where the library had no such term) and the gradients."""
    expected = case["expected"]
    check_scalar(case, "loss", result.loss, expected["loss"], tol)
    for name, value in expected["components"].items():
        got = result.components.get(name)
        if value is None:
            assert got is None, f"{case['case']}: components[{name!r}] should be None (term absent), got {got!r}"
        else:
            check_scalar(case, f"components[{name!r}]", got, value, tol)
    check_array(case, "grad_logprobs", result.grad_logprobs, expected["grad_logprobs"], tol)
    for name in ("grad_values", "grad_entropy"):
        if expected[name] is None:
            assert getattr(result, name) is None, f"{case['case']}: {name} should be None (term absent)"
        else:
            check_array(case, name, getattr(result, name), expected[name], tol)
