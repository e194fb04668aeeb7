"""verl's names in advserve's errors: a verl spelling (an estimator, a KL estimator, a policy mode, an option,
a batch key) is refused as before, and the message says what advserve calls it (advserve.hints)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import advserve
from advserve import hints
from advserve.batch import ALL_TENSORS
from advserve.estimators import ESTIMATORS
from advserve.functional.kl import KL_ESTIMATORS
from advserve.functional.losses import POLICY_LOSS_MODES
from advserve.loss_specs import LOSS_TERMS

MASK = np.array([[1, 1, 0], [1, 1, 1]], bool)
LOSS = {"logprobs": np.full((2, 3), -1.0, np.float32), "old_logprobs": np.full((2, 3), -1.1, np.float32),
        "advantages": np.ones((2, 3), np.float32), "response_mask": MASK}
GROUP = {"rewards": np.array([1.0, 0.0], np.float32), "response_mask": MASK, "group_ids": ["q", "q"]}


def error(call, **kwargs) -> advserve.AdvserveError:
    with pytest.raises(advserve.AdvserveError) as caught:
        call(**kwargs)
    return caught.value


@pytest.mark.parametrize("request_, field, says", [
    ({"kl_loss": {"estimator": "low_var_kl"}}, "kl_loss.estimator", "'k3'"),
    ({"kl_loss": {"estimator": "k3+"}}, "kl_loss.estimator", "'k3' with kl_loss.gradient_estimator='k2'"),
    ({"kl_loss": {"estimator": "kl"}}, "kl_loss.estimator", "'k1'"),
    ({"policy_loss": {"mode": "vanilla"}}, "policy_loss.mode", "'ppo_clip'"),
    ({"policy_loss": {"clip_ratio": 0.2}}, "policy_loss.clip_ratio", "policy_loss.clip_low and policy_loss.clip_high"),
    ({"policy_loss": {"clip_ratio_c": 3.0}}, "policy_loss.clip_ratio_c", "policy_loss.dual_clip"),
    ({"policy_loss": {"loss_agg_mode": "token-mean"}}, "policy_loss.loss_agg_mode", "agg"),
    ({"vpreds": np.zeros((2, 3), np.float32)}, "tensors.vpreds", "values (and verl's values are old_values)"),
])
def test_loss_requests_name_advserves_spelling(request_, field, says):
    request_ = dict(request_)
    if "kl_loss" in request_:
        request_["ref_logprobs"] = LOSS["old_logprobs"]
    err = error(advserve.compute_losses, preset="verl", **LOSS, **request_)
    assert err.field == field
    assert "is advserve's " + says in err.message, err.message


@pytest.mark.parametrize("estimator, params, tensors, field, says", [
    ("reinforce_plus_plus", None, {}, "estimator", "'reinforce_pp'"),
    ("reinforce_plus_plus_baseline", None, {}, "estimator", "'reinforce_pp_baseline'"),
    ("rloo_vectorized", None, {}, "estimator", "'rloo' with params.singleton_groups='zero'"),
    ("grpo", {"kl_estimator": "low_var_kl"}, {}, "params.kl_estimator", "'k3'"),
    ("grpo", {"norm_adv_by_std_in_grpo": False}, {}, "params.norm_adv_by_std_in_grpo", "estimator 'dr_grpo'"),
    ("grpo", {"epsilon": 1e-6}, {}, "params.epsilon", "params.std_eps"),
    ("remax", None, {"reward_baselines": np.zeros(2, np.float32)}, "tensors.reward_baselines", "greedy_rewards"),
    ("grpo", None, {"uid": ["q", "q"]}, "tensors.uid", "group_ids"),
])
def test_advantage_requests_name_advserves_spelling(estimator, params, tensors, field, says):
    given = dict(GROUP, **tensors)
    if estimator == "remax":
        given.pop("group_ids")
    if "uid" in tensors:
        given.pop("group_ids")
    err = error(advserve.compute_advantages, estimator=estimator, preset="verl", params=params, **given)
    assert err.field == field
    assert "is advserve's " + says in err.message, err.message


def test_a_verl_option_given_as_a_keyword_or_a_top_level_field(client):
    """In process, compute_losses(clip_ratio=0.2) is read as a tensor: the hint names the term's fields;
    over REST a top-level verl option names them too."""
    err = error(advserve.compute_losses, preset="verl", clip_ratio=0.2, **LOSS)
    assert "verl's 'clip_ratio' is advserve's policy_loss.clip_low and policy_loss.clip_high" in err.message
    body = {"estimator": "grpo", "norm_adv_by_std_in_grpo": False,
            "tensors": {"rewards": [1, 0], "response_mask": MASK.astype(int).tolist(), "group_ids": ["q", "q"]}}
    answer = client.post("/v1/advantages", json=body)
    assert answer.status_code == 400
    assert "verl's 'norm_adv_by_std_in_grpo' is advserve's estimator 'dr_grpo'" in answer.json()["error"]["message"]


def test_every_hint_points_at_a_real_advserve_name():
    """The tables' targets exist: estimators, KL estimators, policy modes, tensors, loss-term parameters."""
    for target in hints.VERL_ESTIMATORS.values():
        assert re.match(r"'(\w+)'", target)[1] in ESTIMATORS
    for verl_name, target in hints.VERL_KL_ESTIMATORS.items():
        named = re.findall(r"'(\w+)'", target)
        assert all(name in KL_ESTIMATORS for name in named) and (named or verl_name == "full")
    for target in hints.VERL_POLICY_MODES.values():
        assert re.match(r"'(\w+)'", target)[1] in POLICY_LOSS_MODES
    for target in hints.VERL_TENSORS.values():
        assert target.split()[0] in ALL_TENSORS
    for target in hints.VERL_PARAMETERS.values():
        for term, name in re.findall(r"(\w+)\.(\w+)", target):
            assert term == "params" or name in LOSS_TERMS[term], (term, name)
    for name in [*hints.VERL_ESTIMATORS, *hints.VERL_TENSORS]:  # verl's spelling is not also advserve's
        assert name not in ESTIMATORS and name not in ALL_TENSORS


def test_readme_verl_table_is_the_presets_options():
    """README's "verl 0.9.1 options" table is the verl preset's options, row for row (GET /v1/estimators)."""
    from pathlib import Path

    from advserve.presets import VERL

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("\n### verl 0.9.1 options\n")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows == [f"| `{option}` | {request} |" for option, request in VERL.options.items()]
