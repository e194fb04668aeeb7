"""advserve's `openrlhf` preset against golden vectors computed by the real OpenRLHF 0.11.2.

The vectors live in tests/golden/openrlhf_0.11.2.json, produced by tests/golden/make_openrlhf_golden.py
(run in a throwaway venv with openrlhf==0.11.2; OpenRLHF is not a dependency of the suite). Requests in
the file use the names proposed before the preset existed; `_loss_request` maps them to the final ones.
Every [B, T] expectation is already multiplied by response_mask. Each case carries its tolerance: 1e-6
where OpenRLHF computes in float32 (KL, whitening), 1e-12 otherwise.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import advserve
import golden_cases
import reference as ref_impl
from advserve.estimators import ESTIMATORS
from advserve.presets import OPENRLHF

DATA = golden_cases.load("openrlhf_0.11.2.json", "openrlhf", "0.11.2")
LOSS_CASES = {c["case"]: c for c in DATA["losses"]}


# --------------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------------

ADV_CASES = DATA["advantages"]
# proposed parameters advserve does without: OpenRLHF computes the KL estimator and the whitening
# statistics in float32, advserve in the request's dtype; in float64 the results agree to 3e-7, inside
# the cases' tol of 1e-6, and a float32 request is OpenRLHF's computation (test_advantages_float32)
_DROPPED = {"kl_dtype": "float32", "whiten_dtype": "float32"}
_EPS_MODE = {"clamp": "floor", "add": "inside"}  # proposed whiten_eps_mode values -> final ones


def _advantage_params(case: dict) -> dict:
    """The golden's parameter table in advserve's final names."""
    accepted = set(ESTIMATORS[case["estimator"]].params)
    out = {}
    for name, value in case["params"].items():
        if name in _DROPPED:
            assert value == _DROPPED[name], (name, value)
        elif name == "whiten_eps_mode":
            out[name] = _EPS_MODE[value]
        elif name == "returns_pre_whiten":
            out["returns_whitened"] = not value
        elif name == "mask_gaps" and name not in accepted:
            # mask_gaps exists where γ can be < 1 (gae, reinforce_pp, reinforce_rtg); OpenRLHF forces γ = 1
            # for the other estimators, where "step" and "skip" give the same values
            assert value == "step"
        else:
            out[name] = value
    return out


@pytest.mark.parametrize("case", ADV_CASES, ids=[c["case"] for c in ADV_CASES])
def test_advantages_parameters_and_options(case):
    """Every proposed parameter has its final name and the estimator takes it; the preset's options name the
    estimator of OpenRLHF's --algo.advantage.estimator."""
    params = _advantage_params(case)
    assert set(params) <= set(ESTIMATORS[case["estimator"]].params)
    assert case["estimator"] in OPENRLHF.estimators
    option = OPENRLHF.options[f"--algo.advantage.estimator {case['openrlhf_estimator']}"]
    assert f"estimator='{case['estimator']}'" in option, option


# what the cases set on purpose; every other parameter of a case is OpenRLHF's default, so the preset's
_CASE_OVERRIDES = {"kl_coef", "kl_estimator", "gamma", "lam", "whiten_std", "reward_clip_low", "reward_clip_high"}


@pytest.mark.parametrize("case", ADV_CASES, ids=[c["case"] for c in ADV_CASES])
def test_advantages_preset_defaults_are_openrlhf_defaults(case):
    params = _advantage_params(case)
    defaults = OPENRLHF.estimators[case["estimator"]]
    differ = {k for k, v in params.items() if defaults[k] != v}
    assert differ <= _CASE_OVERRIDES, {k: (params[k], defaults[k]) for k in differ - _CASE_OVERRIDES}


@pytest.mark.parametrize("case", ADV_CASES, ids=[c["case"] for c in ADV_CASES])
def test_advantages(case):
    res = advserve.compute_advantages(case["estimator"], preset="openrlhf", params=_advantage_params(case),
                                      dtype=case["dtype"], **golden_cases.inputs(case["tensors"]))
    golden_cases.check_advantages(case, res, case["tol"])


@pytest.mark.parametrize("case", ADV_CASES, ids=[c["case"] for c in ADV_CASES])
def test_advantages_float32(case):
    """In float32 (OpenRLHF's precision for KL and whitening) within float32 rounding of the library."""
    res = advserve.compute_advantages(case["estimator"], preset="openrlhf", params=_advantage_params(case),
                                      dtype="float32", **golden_cases.inputs(case["tensors"]))
    scale = max(1.0, float(np.abs(case["expected"]["advantages"]).max()))
    for name in ("advantages", "returns"):
        np.testing.assert_allclose(np.asarray(getattr(res, name), np.float64), case["expected"][name], rtol=1e-5,
                                   atol=1e-5 * scale, err_msg=f"{golden_cases.describe(case)}: {name}")


@pytest.mark.parametrize("case", ADV_CASES, ids=[c["case"] for c in ADV_CASES])
def test_advantages_reference_loop(case):
    """The naive float64 loops of tests/reference.py, which share no code with the engine, reproduce the
    library's numbers too."""
    params = {**OPENRLHF.estimators[case["estimator"]], **_advantage_params(case)}
    want_a, want_r = ref_impl.compute_advantages(case["estimator"], **golden_cases.inputs(case["tensors"]), **params)
    tol = case["tol"]
    golden_cases.check_array(case, "advantages (reference)", want_a, case["expected"]["advantages"], tol)
    golden_cases.check_array(case, "returns (reference)", want_r, case["expected"]["returns"], tol)


# --------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------


def _loss_request(case: dict) -> dict:
    """The golden's request in advserve's final names: OpenRLHF's sequence-level IS gate is the
    geometric mean of the ratio (the mean of a divergence), level "sequence_mean"."""
    request = copy.deepcopy(case["request"])
    rc = request.get("rollout_correction")
    if rc and rc["level"] == "sequence":
        rc["level"] = "sequence_mean"
    return request


@pytest.mark.parametrize("case", DATA["losses"], ids=[c["case"] for c in DATA["losses"]])
def test_losses(case):
    res = advserve.compute_losses(preset="openrlhf", dtype=case["dtype"], **_loss_request(case),
                                  **golden_cases.inputs(case["tensors"]))
    golden_cases.check_losses(case, res, case["tol"])


# The preset's defaults alone reproduce OpenRLHF's defaults: each case below sends only what its
# OpenRLHF command line sets beyond the defaults.
DEFAULT_REQUESTS = {
    "ppo_clip/token-mean": {},  # actor.eps_clip 0.2, no dual clip, token-mean, log-ratio clamp ±20
    "ppo_clip/dual-clip-3": {"policy_loss": {"dual_clip": 3.0}},
    "ppo_clip/eps-low-high": {"policy_loss": {"clip_high": 0.28}},
    "ppo_clip/seq-mean-token-mean": {"policy_loss": {"agg": "seq-mean-token-mean"}},
    # policy_loss_type gspo: seq-mean-token-mean forced, no log clamp, gradient through the mean
    "gspo/seq": {"policy_loss": {"mode": "gspo", "clip_low": 3e-4, "clip_high": 4e-4}},
    "gspo/dual-clip": {"policy_loss": {"mode": "gspo", "clip_low": 0.01, "clip_high": 0.01, "dual_clip": 1.05}},
    # algo.kl.use_loss with estimator k1 (the CLI default), init_coef 0.01, ±10 clamp, token-mean
    "kl_loss/k1": {"policy_loss": {"agg": "seq-mean-token-mean"}, "kl_loss": {}},
    "kl_loss/k3-unbiased-gradient": {"kl_loss": {"estimator": "k3", "unbiased_gradient": True}},
    "entropy/token-mean": {"policy_loss": {"agg": "seq-mean-token-mean"}, "entropy_bonus": {"coef": 0.01}},
    "value_loss/clip-0.5": {"value_loss": {}},  # critic.value_clip 0.5
    "is/icepop-token-mask": {"rollout_correction": {"low": 0.8, "high": 1.5}},  # is_correction_mode mask
    "is/tis-token-clip": {"rollout_correction": {"mode": "truncate", "low": 0.8, "high": 1.5}},
    "is/seq-mask-tis": {"rollout_correction": {"level": "sequence_mean", "low": 0.8, "high": 1.25}},
    "is/seq-binary-kl": {"rollout_correction": {"level": "sequence_mean", "gating": "binary_kl", "low": None,
                                                "high": 0.05}},
    "is/token-tv": {"rollout_correction": {"gating": "tv", "low": None, "high": 0.1}},
}


@pytest.mark.parametrize("name", sorted(DEFAULT_REQUESTS))
def test_losses_from_preset_defaults(name):
    case = LOSS_CASES[name]
    res = advserve.compute_losses(preset="openrlhf", dtype=case["dtype"], **DEFAULT_REQUESTS[name],
                                  **golden_cases.inputs(case["tensors"]))
    golden_cases.check_losses(case, res, case["tol"])


def test_losses_gspo_gradient_through_the_mean_is_what_openrlhf_computes():
    # per-token advantages: verl's token trick gives another gradient (same loss), which the golden rejects
    case = LOSS_CASES["gspo/seq"]
    request = _loss_request(case)
    request["policy_loss"]["sequence_ratio_gradient"] = "token_trick"
    res = advserve.compute_losses(preset="openrlhf", dtype="float64", **request, **golden_cases.inputs(case["tensors"]))
    golden_cases.check_scalar(case, "loss", res.loss, case["expected"]["loss"], 1e-12)
    diff = np.abs(np.asarray(res.grad_logprobs) - np.asarray(case["expected"]["grad_logprobs"])).max()
    assert diff > 1e-4


def test_losses_float32_kl_within_the_golden_tolerance():
    # OpenRLHF computes the KL in float32; advserve in the request's dtype: the float64 result is within
    # the recorded tolerance, and the float32 request agrees with OpenRLHF to float32 resolution
    for name in ("kl_loss/k1", "kl_loss/k2", "kl_loss/k3", "kl_loss/k3-unbiased-gradient", "all-terms"):
        case = LOSS_CASES[name]
        res = advserve.compute_losses(preset="openrlhf", dtype="float32", **_loss_request(case),
                                      **golden_cases.inputs(case["tensors"]))
        golden_cases.check_losses(case, res, 2e-6)
