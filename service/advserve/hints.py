"""Where a misplaced name belongs: a parameter passed as a keyword argument of the in-process API (where
tensors go) or as a top-level field of a REST body. The callers raise InvalidArgument with the text."""

from __future__ import annotations

from typing import Any, Callable

from .batch import ALL_TENSORS
from .estimators import ESTIMATORS
from .loss_specs import LOSS_TERMS

TERMS = ", ".join(LOSS_TERMS)


def _owner(name: str, kind: str, estimator: str | None) -> tuple[str, str] | None:
    """(who takes parameter `name`, the field it goes in) for a request to POST /v1/`kind`, e.g.
    ("estimator 'gae'", "params"), ("loss term policy_loss", "policy_loss"); None if nobody does."""
    if kind == "losses":
        terms = [term for term, specs in LOSS_TERMS.items() if name in specs]
        if not terms:
            return None
        return (f"loss term {terms[0]}" if len(terms) == 1 else f"loss terms {', '.join(terms)}"), terms[0]
    owners = [e.name for e in ESTIMATORS.values() if name in e.params]
    if not owners:
        return None
    if estimator in owners:
        return f"estimator {estimator!r}", "params"
    who = f"estimator {owners[0]!r}" if len(owners) == 1 else f"estimators {', '.join(owners)}"
    return who, "params"


def _value(value: Any) -> str:
    return repr(value) if value is None or isinstance(value, (bool, int, float, str)) else "..."


def _example(name: str, value: str, kind: str, quote: Callable[[str], str]) -> str:
    """{name: value} as a Python dict or JSON object (`quote`), inside its estimator's entry for an analysis."""
    given = f"{{{quote(name)}: {value}}}"
    return f"{{{quote('<estimator>')}: {given}}}" if kind == "analysis" else given


def _json_string(text: str) -> str:
    return f'"{text}"'


def keyword_hint(name: str, value: Any, kind: str, estimator: str | None = None) -> str | None:
    """The fix for keyword argument `name`=`value`, read as a tensor, of advserve.compute_advantages
    (kind "advantages", `estimator` the one requested), compute_losses ("losses") or analyze
    ("analysis"); None when `name` is a tensor's name or no parameter (the tensor checks answer)."""
    if name in ALL_TENSORS:
        return None
    if kind == "losses" and name == "params":
        return f"compute_losses has no params: give each term's parameters as its own argument ({TERMS})"
    found = _owner(name, kind, estimator)
    if found is None:
        return f"{name!r} is no advserve parameter{verl_hint('parameter', name)}" if name in VERL_PARAMETERS else None
    who, place = found
    if kind == "advantages" and estimator in ESTIMATORS and name not in ESTIMATORS[estimator].params:
        return f"{name!r} is a parameter of {who}, not of {estimator!r}, and not a tensor: leave it out"
    return f"{name!r} is a parameter of {who}, not a tensor: pass {place}={_example(name, _value(value), kind, repr)}"


def field_hint(name: str, kind: str) -> str | None:
    """The fix for a top-level field `name` that the body of POST /v1/`kind` (advantages, losses,
    analysis) does not have; None when `name` is nothing advserve knows."""
    if name in ALL_TENSORS:
        return f"{name!r} is a tensor: put it in \"tensors\": {{\"{name}\": ...}}"
    if kind == "losses" and name == "params":
        return f"loss parameters go in their term's field: {TERMS}"
    found = _owner(name, kind, None)
    if found is None:
        return f"{name!r} is no advserve field{verl_hint('parameter', name)}" if name in VERL_PARAMETERS else None
    who, place = found
    return f"{name!r} is a parameter of {who}: put it in \"{place}\": {_example(name, '...', kind, _json_string)}"


# --- verl's names --------------------------------------------------------------------------------------
# verl 0.9.1 spells some of advserve's names otherwise (its config options, their values, its batch keys);
# an error that refuses such a name says what advserve calls it (README, "verl 0.9.1" options table).

VERL_ESTIMATORS = {
    "reinforce_plus_plus": "'reinforce_pp'",
    "reinforce_plus_plus_baseline": "'reinforce_pp_baseline'",
    "grpo_vectorized": "'grpo' (one implementation)",
    "rloo_vectorized": "'rloo' with params.singleton_groups='zero'",
}
# verl's kl_penalty / kl_loss_type values; a trailing "+" is verl's straight-through gradient (k2's)
VERL_KL_ESTIMATORS = {
    "kl": "'k1'", "low_var_kl": "'k3'", "mse": "'k2'", "abs": "'abs'",
    "k1+": "'k1' with kl_loss.gradient_estimator='k2'", "kl+": "'k1' with kl_loss.gradient_estimator='k2'",
    "k3+": "'k3' with kl_loss.gradient_estimator='k2'", "low_var_kl+": "'k3' with kl_loss.gradient_estimator='k2'",
    "k2+": "'k2'", "mse+": "'k2'", "abs+": "'abs' with kl_loss.gradient_estimator='k2'",
    "full": "none: verl's full-vocabulary KL needs the logits; send per-token KL as token_losses (token_loss term)",
}
VERL_POLICY_MODES = {"vanilla": "'ppo_clip'"}
# verl's option names -> where advserve takes them
VERL_PARAMETERS = {
    "clip_ratio": "policy_loss.clip_low and policy_loss.clip_high (verl's clip_ratio is both)",
    "clip_ratio_low": "policy_loss.clip_low",
    "clip_ratio_high": "policy_loss.clip_high",
    "clip_ratio_c": "policy_loss.dual_clip (dppo: policy_loss.ratio_cap)",
    "loss_agg_mode": "agg (of the term)",
    "kl_loss_coef": "kl_loss.coef",
    "kl_loss_type": "kl_loss.estimator",
    "kl_penalty": "params.kl_estimator",
    "use_kl_in_reward": "params.kl_coef > 0 (with old_logprobs and ref_logprobs)",
    "use_kl_loss": "a kl_loss term",
    "entropy_coeff": "entropy_bonus.coef",
    "cliprange_value": "value_loss.clip",
    "norm_adv_by_std_in_grpo": "estimator 'dr_grpo' for False (grpo_passk, gdpo: params.scale_by_std=false)",
    "epsilon": "params.std_eps",
    "ppo_kl_coef": "policy_loss.kl_cov_coef",
    "rollout_is_threshold": "rollout_correction.high (bypass_mode: policy_loss.bypass_is_high)",
    "global_batch_size": "num_sequences",
    "batch_num_tokens": "num_tokens",
}
# verl's batch keys -> advserve's tensors (verl's `values` are the old critic's: advserve's old_values,
# and its `vpreds` the new predictions: advserve's values)
VERL_TENSORS = {
    "vpreds": "values (and verl's values are old_values)",
    "token_level_rewards": "token_rewards",
    "token_level_scores": "token_rewards",
    "reward_baselines": "greedy_rewards",
    "log_prob": "logprobs",
    "log_probs": "logprobs",
    "old_log_prob": "old_logprobs",
    "old_log_probs": "old_logprobs",
    "ref_log_prob": "ref_logprobs",
    "rollout_log_probs": "rollout_logprobs",
    "rollout_log_prob": "rollout_logprobs",
    "index": "group_ids",
    "uid": "group_ids",
    "loss_mat": "token_losses (the token_loss term)",
}


def verl_hint(kind: str, name: Any, field: str = "") -> str:
    """' (verl's `name` is advserve's ...)' when `name` is verl's spelling of one of advserve's names, else
    ''. kind: 'estimator', 'parameter', 'tensor', or 'value' (a choice's value; `field` the parameter,
    e.g. 'kl_loss.estimator', 'params.kl_estimator', 'policy_loss.mode')."""
    if not isinstance(name, str):
        return ""
    if kind == "value":
        table = (VERL_KL_ESTIMATORS if field.endswith(("kl_estimator", "kl_loss.estimator", "gradient_estimator"))
                 else VERL_POLICY_MODES if field.endswith("policy_loss.mode") else {})
    else:
        table = {"estimator": VERL_ESTIMATORS, "parameter": VERL_PARAMETERS, "tensor": VERL_TENSORS}.get(kind, {})
    ours = table.get(name)
    return f" (verl's {name!r} is advserve's {ours})" if ours else ""
