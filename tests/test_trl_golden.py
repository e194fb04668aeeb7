"""advserve's `trl` preset against golden vectors computed by the real TRL 1.16.0.

The vectors live in tests/golden/trl_1.16.0.json, produced by tests/golden/make_trl_golden.py (TRL's own
GRPOTrainer / RLOOTrainer code run in a throwaway venv with trl==1.16.0; TRL is not a dependency of the
suite). Each case records TRL's configuration (`trl_config`); requests use the names proposed before the
preset existed, which `_loss_request` maps to the final ones. [B, T] expectations are multiplied by
response_mask. Everything is float64 and agrees to rounding.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import advserve
import golden_cases
import reference as ref_impl
from advserve.estimators import ESTIMATORS
from advserve.presets import TRL

DATA = golden_cases.load("trl_1.16.0.json", "trl", "1.16.0")
LOSS_CASES = {c["case"]: c for c in DATA["losses"]}
TOL = 1e-10


# --------------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------------

ADV_CASES = DATA["advantages"]
_EPS_PLACE = {"std": "outside", "var": "inside"}  # proposed whiten_eps_place -> whiten_eps_mode
# TRL's nanstd applies Bessel's correction as count / (count − 1) computed in float32: for n = 4 (4/3) and
# n = 8 (8/7) its std is off by ~1e-8 relative (below float32 resolution), where advserve's unbiased std
# is exact. An all-equal group whose float mean is inexact: TRL divides the rounding residue by 1e-4
# (±1e-12 here), advserve gives exactly 0. Everything else agrees to rounding.
ADV_TOL = {"grpo/binary-with-all-equal-group": 1e-7, "rloo/normalize-advantages": 1e-7,
           "grpo/all-equal-inexact-mean": 1e-10}


def _advantage_params(case: dict) -> dict:
    """The golden's parameters in advserve's final names."""
    return {("whiten_eps_mode" if k == "whiten_eps_place" else k): (_EPS_PLACE[v] if k == "whiten_eps_place" else v)
            for k, v in case["params"].items()}


def _request_from_trl_config(case: dict) -> tuple[str, dict]:
    """(estimator, params) from the case's TRL configuration alone, as the preset's options (the README's
    table) translate it; every other parameter is the preset's default."""
    cfg = case["trl_config"]
    if "scale_rewards" in cfg:  # GRPOTrainer
        option = TRL.options[f"GRPOConfig.scale_rewards='{cfg['scale_rewards']}'"]
        estimator = {"group": "grpo", "batch": "grpo", "none": "dr_grpo"}[cfg["scale_rewards"]]
        params = {"std_scope": "batch"} if cfg["scale_rewards"] == "batch" else {}
        assert f"estimator='{estimator}'" in option and all(f"params.{k}='{v}'" in option for k, v in params.items())
        return estimator, params
    params = {"kl_coef": cfg["beta"]}  # RLOOTrainer
    assert "params.kl_coef=B" in TRL.options["RLOOConfig.beta=B"]
    if cfg.get("normalize_advantages"):
        assert "params.whiten=true" in TRL.options["RLOOConfig.normalize_advantages=True"]
        params["whiten"] = True
    return "rloo", params


def test_advantage_tolerances_name_cases():
    assert set(ADV_TOL) <= {c["case"] for c in ADV_CASES}


@pytest.mark.parametrize("case", ADV_CASES, ids=[c["case"] for c in ADV_CASES])
def test_advantages(case):
    params = _advantage_params(case)
    assert set(params) <= set(ESTIMATORS[case["estimator"]].params) and case["estimator"] in TRL.estimators
    tol = ADV_TOL.get(case["case"], 1e-12)
    res = advserve.compute_advantages(case["estimator"], preset="trl", params=params, dtype=case["dtype"],
                                      **golden_cases.inputs(case["tensors"]))
    golden_cases.check_advantages(case, res, tol)


@pytest.mark.parametrize("case", ADV_CASES, ids=[c["case"] for c in ADV_CASES])
def test_advantages_from_the_trl_configuration(case):
    """Only TRL's own options, translated line by line; the preset supplies the rest."""
    estimator, params = _request_from_trl_config(case)
    assert estimator == case["estimator"]
    res = advserve.compute_advantages(estimator, preset="trl", params=params, dtype=case["dtype"],
                                      **golden_cases.inputs(case["tensors"]))
    golden_cases.check_array(case, "advantages", res.advantages, case["expected"]["advantages"], ADV_TOL.get(case["case"], 1e-12))


@pytest.mark.parametrize("case", ADV_CASES, ids=[c["case"] for c in ADV_CASES])
def test_advantages_reference_loop(case):
    """The naive float64 loops of tests/reference.py, which share no code with the engine, reproduce the
    library's numbers too."""
    params = {**TRL.estimators[case["estimator"]], **_advantage_params(case)}
    want_a, want_r = ref_impl.compute_advantages(case["estimator"], **golden_cases.inputs(case["tensors"]), **params)
    tol = max(ADV_TOL.get(case["case"], 1e-12), 1e-12)
    golden_cases.check_array(case, "advantages (reference)", want_a, case["expected"]["advantages"], tol)
    golden_cases.check_array(case, "returns (reference)", want_r, case["expected"]["returns"], tol)


# --------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------


def _loss_request(case: dict) -> dict:
    """The golden's request in advserve's final names: with `cispo_cap` set the cispo weight is
    min(ρ, cap) and clip_high is unused (the file sends null, which advserve does not accept)."""
    request = copy.deepcopy(case["request"])
    policy = request["policy_loss"]
    if policy.get("cispo_cap") is not None and policy.get("clip_high", 0.0) is None:
        del policy["clip_high"]
    return request


@pytest.mark.parametrize("case", DATA["losses"], ids=[c["case"] for c in DATA["losses"]])
def test_losses(case):
    res = advserve.compute_losses(preset="trl", dtype=case["dtype"], **_loss_request(case), **golden_cases.inputs(case["tensors"]))
    golden_cases.check_losses(case, res, TOL)


# The preset's defaults alone reproduce GRPOConfig's defaults: each request below sets only what the
# case's trl_config sets beyond them, translated with the README's table (loss_type -> agg, ...).
DEFAULT_REQUESTS = {
    "dapo/token-defaults-mask-gaps": {},  # loss_type "dapo", epsilon 0.2, no delta, no clamp
    "bnpo/token-defaults-mask-gaps": {},  # bnpo = the local token mean = dapo without num_items_in_batch
    "grpo/token-defaults-mask-gaps": {"policy_loss": {"agg": "seq-mean-token-mean"}},
    "grpo/empty-row": {"policy_loss": {"agg": "seq-mean-token-mean"}},  # empty rows count in B
    "dr_grpo/empty-row": {"policy_loss": {"agg": "seq-mean-token-sum-norm", "loss_scale_factor": 16}},
    "cispo/default-epsilon-high-is-absolute-0.2": {"policy_loss": {"mode": "cispo"}},
    "cispo/token-defaults-mask-gaps": {"policy_loss": {"mode": "cispo", "cispo_cap": 5.0}},
    "cispo/sequence-level": {"policy_loss": {"mode": "cispo", "cispo_cap": 1.2, "cispo_level": "sequence"}},
    "dapo/global-num-items": {"policy_loss": {"clip_high": 0.28}, "num_tokens": 113},
    "grpo/sequence-level-gspo": {"policy_loss": {"mode": "gspo", "clip_low": 3e-4, "clip_high": 4e-4,
                                                 "agg": "seq-mean-token-mean"}},
    "grpo/sequence-level-delta": {"policy_loss": {"mode": "gspo", "ratio_cap": 1.1, "agg": "seq-mean-token-mean"}},
    "grpo/delta-3": {"policy_loss": {"ratio_cap": 3.0, "agg": "seq-mean-token-mean"}},  # delta -> ratio_cap
    "dapo/delta-1.5-epsilon-high-0.28": {"policy_loss": {"ratio_cap": 1.5, "clip_high": 0.28}},
    # beta -> kl_loss.coef: k3, unclamped, × ρ (use_bias_correction_kl), the policy's aggregation
    "grpo/beta-0.04-k3-bias-corrected": {"policy_loss": {"agg": "seq-mean-token-mean"}, "kl_loss": {"coef": 0.04}},
    "dapo/beta-0.04-k3-plain": {"kl_loss": {"coef": 0.04, "importance_weighted": False}},
    "grpo/sequence-level-beta-bias-corrected": {"policy_loss": {"mode": "gspo", "agg": "seq-mean-token-mean"},
                                                "kl_loss": {"coef": 0.1}},
    "cispo/beta-0.02": {"policy_loss": {"mode": "cispo", "cispo_cap": 3.0}, "kl_loss": {"coef": 0.02}},
    # entropy_coef: always the local token mean
    "dapo/entropy-bonus": {"entropy_bonus": {"coef": 0.01}},
    "grpo/entropy-bonus": {"policy_loss": {"agg": "seq-mean-token-mean"}, "entropy_bonus": {"coef": 0.01}},
    # vllm_importance_sampling_mode "sequence_mask", clip_max 3.0, clip_min None, no log clamp
    "dapo/vllm-sequence_mask-None-3.0": {"rollout_correction": {}},
    "dapo/vllm-token_truncate-None-1.5": {"rollout_correction": {"level": "token", "mode": "truncate", "high": 1.5}},
    "grpo/vllm-token_mask-0.8-1.25": {"policy_loss": {"agg": "seq-mean-token-mean"},
                                      "rollout_correction": {"level": "token", "low": 0.8, "high": 1.25}},
    "combined/dapo-beta-vllm-token-truncate-entropy-delta": {
        "policy_loss": {"clip_high": 0.28, "ratio_cap": 2.0}, "kl_loss": {"coef": 0.05},
        "entropy_bonus": {"coef": 0.001}, "rollout_correction": {"level": "token", "mode": "truncate", "high": 1.2}},
}


@pytest.mark.parametrize("name", sorted(DEFAULT_REQUESTS))
def test_losses_from_preset_defaults(name):
    case = LOSS_CASES[name]
    res = advserve.compute_losses(preset="trl", dtype=case["dtype"], **DEFAULT_REQUESTS[name],
                                  **golden_cases.inputs(case["tensors"]))
    golden_cases.check_losses(case, res, TOL)


def test_losses_sequence_level_ratio_passes_its_gradient_through_the_mean():
    # TRL's s_i = exp(mean_t(lp − old)) reaches every token of the row. With a per-sequence advantage
    # and no token-level weight this equals verl's token trick; a token-level IS weight breaks the tie.
    case = LOSS_CASES["grpo/sequence-level-beta-bias-corrected"]
    request = _loss_request(case)
    request["policy_loss"]["sequence_ratio_gradient"] = "token_trick"
    res = advserve.compute_losses(preset="trl", dtype="float64", **request, **golden_cases.inputs(case["tensors"]))
    golden_cases.check_scalar(case, "loss", res.loss, case["expected"]["loss"], TOL)  # same value
    diff = np.abs(np.asarray(res.grad_logprobs) - np.asarray(case["expected"]["grad_logprobs"])).max()
    assert diff > 1e-6  # the KL's ratio gradient kl_t·∂s_i differs


def test_losses_trl_has_no_log_ratio_clamp():
    # with log-ratios beyond ±20 TRL's ratio overflows to what exp gives; verl's ±20 clamp would not
    case = LOSS_CASES["dapo/token-defaults-mask-gaps"]
    tensors = golden_cases.inputs(case["tensors"])
    tensors["logprobs"] = tensors["logprobs"] + 21.0 * tensors["response_mask"]
    trl = advserve.compute_losses(preset="trl", dtype="float64", **tensors)
    clamped = advserve.compute_losses(preset="trl", dtype="float64", policy_loss={"ratio_clamp": 20.0}, **tensors)
    assert trl.metrics["ratio_max"] > math.exp(21.0) * 0.99 and clamped.metrics["ratio_max"] <= math.exp(20.0) * 1.01
