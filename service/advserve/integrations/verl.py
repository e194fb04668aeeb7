"""advserve in verl: advantage estimators and policy losses registered in verl's own registries
(`verl.trainer.ppo.core_algos.register_adv_est`, `register_policy_loss`), chosen by verl's config alone.

    algorithm.adv_estimator=advserve_grpo                     # any name of ESTIMATORS, prefixed advserve_
    actor_rollout_ref.actor.policy_loss.loss_mode=advserve    # PPO's clip (verl's vanilla); advserve_gspo, ...

Importing this module registers them (`register()`); verl imports it by itself when advserve is installed
in verl's environment (the `verl.plugins` entry point, which verl 0.9.1 loads on `import verl` in every
process, Ray workers included), or by `actor_rollout_ref.model.external_lib=advserve.integrations.verl`.
The functions call a remote advserve through the thin client when `ADVSERVE_ADDRESS` is set ("host:port"
or "http://host:port" for REST, "grpc://host:port" for gRPC; verl's config sets it for every Ray process
with `+ray_kwargs.ray_init.runtime_env.env_vars.ADVSERVE_ADDRESS=...`), and the in-process engine
otherwise. They always use the `verl` preset, take verl's arguments and option names (translated
below), and return exactly what verl's own functions return: (advantages, returns) [B, T], and
(loss tensor, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}) with the loss's gradient
flowing into log_prob (the service's exact gradient, through `ServiceLoss`).

Not reachable through verl's registries: GAE (verl's trainer calls its own GAE directly, and a registered
estimator receives no `values`), and the KL, entropy and value losses (computed by verl's `ppo_loss`
and `value_loss` themselves, not looked up in a registry).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from typing import Any, Callable, Mapping

import numpy as np
import torch

from advserve_client.integrations.torch import loss_with_gradients

from ._backend import backend

PREFIX = "advserve_"

# verl's algorithm.adv_estimator -> advserve's estimator (preset "verl"); registered as advserve_<key>
ESTIMATORS: dict[str, str] = {
    "grpo": "grpo",
    "grpo_vectorized": "grpo",
    "rloo": "rloo",
    "rloo_vectorized": "rloo",
    "reinforce_plus_plus": "reinforce_pp",
    "reinforce_plus_plus_baseline": "reinforce_pp_baseline",
    "remax": "remax",
    "grpo_passk": "grpo_passk",
    "opo": "opo",
    "gpg": "gpg",
    "gdpo": "gdpo",
    "optimal_token_baseline": "optimal_token_baseline",
    "tir_optimal_token_baseline": "tir_optimal_token_baseline",
}
# advserve estimators that read verl's algorithm.gamma
_GAMMA = {"reinforce_pp"}
# verl estimators that read algorithm.norm_adv_by_std_in_grpo from the config (verl's trainer passes the flag
# as an argument to its own grpo only: grpo_vectorized and gdpo, reached through the registry, read only
# their argument, default True; grpo_passk reads only the config)
_NORM_FLAG = {"grpo", "grpo_passk"}
# estimators whose std division is params.scale_by_std (grpo's is the estimator dr_grpo)
_SCALE_BY_STD = {"grpo_passk", "gdpo"}
# torch dtypes the engine computes in as they are (others, e.g. bfloat16, in float32)
_DTYPES = {torch.float32: "float32", torch.float64: "float64"}

# verl's actor.policy_loss.loss_mode -> advserve's policy_loss.mode; registered as advserve_<key>, and
# vanilla (verl's default, PPO's clip with dual clip) as plain "advserve" too
POLICY_LOSSES: dict[str, str] = {
    "vanilla": "ppo_clip",
    "gspo": "gspo",
    "cispo": "cispo",
    "dppo_tv": "dppo_tv",
    "dppo_kl": "dppo_kl",
    "sapo": "sapo",
    "gpg": "gpg",
    "clip_cov": "clip_cov",
    "kl_cov": "kl_cov",
    "geo_mean": "geo_mean",
    "dro": "dro",
}
# modes that read verl's clip_ratio_low / clip_ratio_high (dppo: its divergence bounds; geo_mean: log space)
_CLIPS = {"ppo_clip", "gspo", "cispo", "dppo_tv", "dppo_kl", "clip_cov", "geo_mean"}
# the mode's parameter <- (where in verl's ActorConfig, verl's default where the config lacks it)
_MODE_OPTIONS: dict[str, dict[str, tuple[tuple[str, ...], Any]]] = {
    "ppo_clip": {"dual_clip": (("clip_ratio_c",), 3.0)},
    "dppo_tv": {"ratio_cap": (("clip_ratio_c",), 20.0)},
    "dppo_kl": {"ratio_cap": (("clip_ratio_c",), 20.0)},
    "sapo": {"tau_pos": (("tau_pos",), 1.0), "tau_neg": (("tau_neg",), 1.05)},
    "clip_cov": {"clip_cov_ratio": (("policy_loss", "clip_cov_ratio"), 0.0002),
                 "clip_cov_lb": (("policy_loss", "clip_cov_lb"), 1.0),
                 "clip_cov_ub": (("policy_loss", "clip_cov_ub"), 5.0)},
    "kl_cov": {"kl_cov_ratio": (("policy_loss", "kl_cov_ratio"), 0.0002),
               "kl_cov_coef": (("policy_loss", "ppo_kl_coef"), 1.0)},
    "dro": {"dro_beta": (("policy_loss", "dro_beta"), None)},
}
# modes that aggregate their own way whatever loss_agg_mode says (verl 0.9.1): sapo seq-mean-token-mean
# (with the global normalizers), geo_mean the mean of its B sequence losses (none)
_OWN_AGG: dict[str, str | None] = {"sapo": "seq-mean-token-mean", "geo_mean": None}


# --- the backend: a remote advserve, or the in-process engine ---------------------------------------


# --- configs: verl passes DictConfigs or its dataclass configs (both are Mappings with .get) ---------


def _get(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def _number(value: Any) -> float | None:
    """A verl count (an int, a 0-dim tensor, None) as a float."""
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _ids(index: Any) -> Any:
    """verl's `index` (a numpy object array of uids) as a list the wire takes."""
    return index.tolist() if isinstance(index, np.ndarray) else index


# --- advantage estimators ----------------------------------------------------------------------------


def estimator_request(verl_name: str, config: Any, norm_adv_by_std_in_grpo: bool = True,
                      epsilon: float = 1e-6) -> tuple[str, dict[str, Any]]:
    """(advserve estimator, params) for verl's estimator `verl_name` under algorithm config `config`:
    norm_adv_by_std_in_grpo=False (the argument; for grpo also the config's, which verl's trainer passes
    to its own grpo only; grpo_passk reads the config's alone) turns grpo into dr_grpo and sets
    scale_by_std=False on grpo_passk and gdpo; epsilon is the std_eps of those three; rloo_vectorized is
    rloo with singleton_groups 'zero'; gamma goes to the
    estimators that read it. KL in the reward (use_kl_in_reward) is already in verl's
    token_level_rewards, so the estimators run with kl_coef 0 (the preset's default)."""
    if verl_name not in ESTIMATORS:
        raise ValueError(f"advserve has no verl estimator {verl_name!r}; valid: {', '.join(ESTIMATORS)}")
    estimator = ESTIMATORS[verl_name]
    if verl_name == "grpo_passk":
        norm_adv_by_std_in_grpo = _get(config, "norm_adv_by_std_in_grpo", True)
    elif verl_name in _NORM_FLAG:
        norm_adv_by_std_in_grpo = norm_adv_by_std_in_grpo and _get(config, "norm_adv_by_std_in_grpo", True)
    params: dict[str, Any] = {}
    if estimator == "grpo" and not norm_adv_by_std_in_grpo:
        estimator = "dr_grpo"
    elif estimator in ("grpo", "grpo_passk", "gdpo") and epsilon != 1e-6:
        params["std_eps"] = float(epsilon)
    if estimator in _SCALE_BY_STD and not norm_adv_by_std_in_grpo:
        params["scale_by_std"] = False
    if verl_name == "rloo_vectorized":
        params["singleton_groups"] = "zero"  # verl's rloo_vectorized: a group of one gets 0
    if estimator in _GAMMA:
        params["gamma"] = float(_get(config, "gamma", 1.0))
    return estimator, params


def _advantages(estimator: str, params: Mapping[str, Any], token_level_rewards: torch.Tensor,
                response_mask: torch.Tensor, **tensors: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] of `estimator` (preset verl) with verl's token_level_rewards as
    token_rewards, in the rewards' dtype and on their device."""
    tensors = {name: value for name, value in tensors.items() if value is not None}
    result = backend().compute_advantages(estimator, preset="verl", params=dict(params) or None,
                                          dtype=_DTYPES.get(token_level_rewards.dtype),
                                          token_rewards=token_level_rewards, response_mask=response_mask, **tensors)
    dtype, device = token_level_rewards.dtype, token_level_rewards.device
    return (torch.as_tensor(result.advantages).to(device=device, dtype=dtype),
            torch.as_tensor(result.returns).to(device=device, dtype=dtype))


def _group_estimator(verl_name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """verl's grpo, grpo_vectorized, grpo_passk, gdpo: (token_level_rewards, response_mask, index, epsilon,
    norm_adv_by_std_in_grpo, config, **kwargs). gdpo: one reward dimension, token_level_rewards (verl's
    trainer passes the per-dimension rewards to its own 'gdpo' only)."""

    def estimator(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any, epsilon: float = 1e-6,
                  norm_adv_by_std_in_grpo: bool = True, config: Any = None, **_: Any,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        name, params = estimator_request(verl_name, config, norm_adv_by_std_in_grpo, epsilon)
        return _advantages(name, params, token_level_rewards, response_mask, group_ids=_ids(index))

    return estimator


def _baseline_estimator(verl_name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """verl's rloo, rloo_vectorized, reinforce_plus_plus_baseline, opo: (token_level_rewards, response_mask,
    index, epsilon, config, **kwargs); epsilon is unused by all four, in verl too."""

    def estimator(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any, epsilon: float = 1e-6,
                  config: Any = None, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        name, params = estimator_request(verl_name, config)
        return _advantages(name, params, token_level_rewards, response_mask, group_ids=_ids(index))

    return estimator


def _reinforce_pp(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config: Any = None,
                  **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's reinforce_plus_plus: (token_level_rewards, response_mask, config, **kwargs); γ = config.gamma."""
    name, params = estimator_request("reinforce_plus_plus", config)
    return _advantages(name, params, token_level_rewards, response_mask)


def _remax(token_level_rewards: torch.Tensor, reward_baselines: torch.Tensor, response_mask: torch.Tensor,
           config: Any = None, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's remax: (token_level_rewards, reward_baselines, response_mask, config, **kwargs);
    reward_baselines [B] are advserve's greedy_rewards."""
    name, params = estimator_request("remax", config)
    return _advantages(name, params, token_level_rewards, response_mask, greedy_rewards=reward_baselines)


def _gpg(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any, epsilon: float = 1e-6,
         f_norm: float = 1.0, alpha: float = 1.0, config: Any = None, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's gpg: (token_level_rewards, response_mask, index, epsilon, f_norm, alpha, config, **kwargs); the
    advantages divided by f_norm; alpha is recomputed from the batch (B / nonzero scores), as verl does."""
    name, params = estimator_request("gpg", config)
    advantages, returns = _advantages(name, params, token_level_rewards, response_mask, group_ids=_ids(index))
    return (advantages / f_norm, returns / f_norm) if f_norm != 1.0 else (advantages, returns)


def _token_baseline(verl_name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """verl's optimal_token_baseline, tir_optimal_token_baseline: (token_level_rewards, response_mask, index,
    old_log_probs, sum_pi_squared, rollout_is_weights, handle_zero_tail, epsilon, **kwargs). verl's trainer
    passes old_log_probs and sum_pi_squared to its own two names only, so these are for direct calls."""

    def estimator(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any,
                  old_log_probs: torch.Tensor | None = None, sum_pi_squared: torch.Tensor | None = None,
                  rollout_is_weights: torch.Tensor | None = None, handle_zero_tail: bool = True,
                  epsilon: float = 1e-8, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if old_log_probs is None or sum_pi_squared is None:
            raise ValueError(f"advserve_{verl_name} needs old_log_probs and sum_pi_squared, which verl's trainer "
                             f"passes only to its own {verl_name!r}: call the function with them")
        name, params = estimator_request(verl_name, None)
        params.update(handle_zero_tail=bool(handle_zero_tail), baseline_eps=float(epsilon))
        return _advantages(name, params, token_level_rewards, response_mask, group_ids=_ids(index),
                           old_logprobs=old_log_probs, sum_pi_squared=sum_pi_squared,
                           rollout_is_weights=rollout_is_weights)

    return estimator


_ESTIMATOR_MAKERS: dict[str, Callable[[], Callable[..., Any]]] = {
    "rloo_vectorized": lambda: _baseline_estimator("rloo_vectorized"),
    "grpo_passk": lambda: _group_estimator("grpo_passk"),
    "gdpo": lambda: _group_estimator("gdpo"),
    "opo": lambda: _baseline_estimator("opo"),
    "gpg": lambda: _gpg,
    "optimal_token_baseline": lambda: _token_baseline("optimal_token_baseline"),
    "tir_optimal_token_baseline": lambda: _token_baseline("tir_optimal_token_baseline"),
    "grpo": lambda: _group_estimator("grpo"),
    "grpo_vectorized": lambda: _group_estimator("grpo_vectorized"),
    "rloo": lambda: _baseline_estimator("rloo"),
    "reinforce_plus_plus_baseline": lambda: _baseline_estimator("reinforce_plus_plus_baseline"),
    "reinforce_plus_plus": lambda: _reinforce_pp,
    "remax": lambda: _remax,
}


def make_estimator(verl_name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The function registered as advserve_<verl_name>: the signature of verl's own `verl_name` (same
    positional order and keywords, **kwargs for what verl's trainer adds), returning (advantages,
    returns) [B, T] as verl's does."""
    estimator = _ESTIMATOR_MAKERS[verl_name]()
    estimator.__name__ = estimator.__qualname__ = PREFIX + verl_name
    estimator.__doc__ = f"verl's {verl_name!r} estimator computed by advserve (preset 'verl'). " + (
        estimator.__doc__ or "")
    return estimator


# --- policy losses -----------------------------------------------------------------------------------


def _option(config: Any, path: tuple[str, ...], default: Any) -> Any:
    for key in path:
        config = _get(config, key)
    return default if config is None else config


def policy_loss_term(verl_mode: str, loss_agg_mode: str, config: Any) -> dict[str, Any]:
    """advserve's policy_loss term for verl's `actor.policy_loss.loss_mode=verl_mode` under actor config
    `config`: clip_ratio_low / clip_ratio_high (each defaulting to clip_ratio) -> clip_low / clip_high,
    clip_ratio_c -> dual_clip (vanilla; inf: none) or ratio_cap (dppo), tau_pos / tau_neg (sapo),
    policy_loss.clip_cov_* / kl_cov_ratio / ppo_kl_coef / dro_beta -> clip_cov_*, kl_cov_ratio, kl_cov_coef,
    dro_beta, loss_agg_mode -> agg (not sapo's and geo_mean's, which aggregate their own way),
    loss_scale_factor -> loss_scale_factor."""
    if verl_mode not in POLICY_LOSSES:
        raise ValueError(f"advserve has no verl policy loss {verl_mode!r}; valid: {', '.join(POLICY_LOSSES)}")
    mode = POLICY_LOSSES[verl_mode]
    term: dict[str, Any] = {"mode": mode}
    if mode in _CLIPS:
        clip = _get(config, "clip_ratio", 0.2)
        term.update(clip_low=float(_get(config, "clip_ratio_low", clip)),
                    clip_high=float(_get(config, "clip_ratio_high", clip)))
    for name, (path, default) in _MODE_OPTIONS.get(mode, {}).items():
        value = _option(config, path, default)
        if value is not None:
            value = float(value)
            term[name] = value if math.isfinite(value) else None  # clip_ratio_c = inf: no dual clip
    if mode not in _OWN_AGG:
        term["agg"] = loss_agg_mode
    info = _get(config, "global_batch_info", {}) or {}
    scale = info.get("loss_scale_factor", _get(config, "loss_scale_factor"))
    if scale is not None and term.get("agg") == "seq-mean-token-sum-norm":
        term["loss_scale_factor"] = float(scale)
    return term


def normalizers(loss_agg_mode: str, global_batch_info: Mapping[str, Any]) -> dict[str, Any]:
    """The request's dp_size, num_tokens or num_sequences reproducing verl's agg_loss(dp_size,
    batch_num_tokens, global_batch_size): token-mean divides by batch_num_tokens, the seq-mean modes by
    global_batch_size, each times dp_size; token-sum is multiplied by dp_size. Raises ValueError where
    verl's agg_loss does (dp_size > 1 without the global count), with verl's message."""
    dp = int(_number(global_batch_info.get("dp_size")) or 1)
    out: dict[str, Any] = {"dp_size": dp} if dp != 1 else {}
    if loss_agg_mode == "token-sum":
        return out
    key, count = (("num_tokens", "batch_num_tokens") if loss_agg_mode == "token-mean"
                  else ("num_sequences", "global_batch_size"))
    total = _number(global_batch_info.get(count))
    if total is None:
        if dp > 1:
            raise ValueError(f"(global) {count} is required when dp_size > 1")
        return out
    return {**out, key: total}


def verl_metrics(verl_mode: str, metrics: Mapping[str, float], abs_kl: float | None = None) -> dict[str, float]:
    """advserve's policy metrics under verl's names, the keys verl's `verl_mode` returns: pg_clipfrac (the
    tokens whose clipped branch is active: clip_fraction_high + clip_fraction_low; geo_mean: the high side;
    clip_cov: its selected tokens, cov_selected_fraction), ppo_kl (approx_kl, the mean of old − new
    log-prob; kl_cov: the mean of |new − old|, `abs_kl`), pg_clipfrac_lower (the dual clip's share; dppo:
    the capped ratios', ratio_cap_fraction; geo_mean: the low side; 0 where verl returns 0); gpg: none."""
    get = metrics.get
    kl = get("approx_kl", 0.0)
    if verl_mode == "gpg":
        return {}
    if verl_mode in ("dro",):
        return {"actor/ppo_kl": kl}
    if verl_mode == "kl_cov":
        return {"actor/ppo_kl": abs_kl if abs_kl is not None else 0.0}
    if verl_mode == "clip_cov":
        return {"actor/pg_clipfrac": get("cov_selected_fraction", 0.0), "actor/ppo_kl": kl}
    both = get("clip_fraction_high", 0.0) + get("clip_fraction_low", 0.0)
    if verl_mode == "geo_mean":
        return {"actor/pg_clipfrac": get("clip_fraction_high", 0.0), "actor/ppo_kl": kl,
                "actor/pg_clipfrac_lower": get("clip_fraction_low", 0.0)}
    lower = get("ratio_cap_fraction", 0.0) if verl_mode.startswith("dppo") else get("dual_clip_fraction", 0.0)
    return {"actor/pg_clipfrac": both, "actor/ppo_kl": kl, "actor/pg_clipfrac_lower": lower}


def make_policy_loss(verl_mode: str) -> Callable[..., tuple[torch.Tensor, dict[str, Any]]]:
    """The function registered as advserve_<verl_mode>: verl's PolicyLossFn signature (old_log_prob,
    log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights) returning (loss,
    metrics) like verl's own: the loss a 0-dim tensor whose backward applies the service's gradient."""

    def policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                    rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        term = policy_loss_term(verl_mode, loss_agg_mode, config)
        agg = _OWN_AGG.get(POLICY_LOSSES[verl_mode], loss_agg_mode)
        counts = normalizers(agg, _get(config, "global_batch_info", {}) or {}) if agg else {}
        loss, result = loss_with_gradients(
            backend().compute_losses, preset="verl", policy_loss=term, logprobs=log_prob, old_logprobs=old_log_prob,
            advantages=advantages, response_mask=response_mask, rollout_is_weights=rollout_is_weights,
            dtype=_DTYPES.get(log_prob.dtype), **counts)
        abs_kl = None
        if verl_mode == "kl_cov":  # verl's kl_cov logs the mean |new − old| (computed here: a metric only)
            with torch.no_grad():
                valid = response_mask.to(log_prob.dtype)
                abs_kl = float(((log_prob - old_log_prob).abs() * valid).sum() / (valid.sum() + 1e-8))
        return loss, verl_metrics(verl_mode, result.metrics, abs_kl)

    policy_loss.__name__ = policy_loss.__qualname__ = f"advserve_{verl_mode}"
    policy_loss.__doc__ = f"verl's {verl_mode!r} policy loss computed by advserve (preset 'verl')."
    return policy_loss


# --- the whole actor loss (verl.workers.utils.losses.ppo_loss): policy, entropy and KL terms ------------

# verl's kl_loss_type / kl_penalty -> advserve's kl_loss.estimator; a trailing "+" is verl's straight-through
# gradient (k2's): kl_loss.gradient_estimator "k2"
KL_ESTIMATORS = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


def kl_loss_term(kl_loss_type: str, coef: float, loss_agg_mode: str) -> dict[str, Any]:
    """advserve's kl_loss term for verl's actor.kl_loss_type (low_var_kl is k3; "k3+", "low_var_kl+", ...:
    the estimator's value with k2's gradient, kl_loss.gradient_estimator) and kl_loss_coef, aggregated
    with the actor's loss_agg_mode as verl's ppo_loss does."""
    base = kl_loss_type[:-1] if kl_loss_type.endswith("+") else kl_loss_type
    if base not in KL_ESTIMATORS:
        raise ValueError(f"verl's kl_loss_type {kl_loss_type!r} has no advserve estimator ('full' needs the logits); "
                         f"valid: {', '.join(KL_ESTIMATORS)} and each with '+'")
    term: dict[str, Any] = {"coef": float(coef), "estimator": KL_ESTIMATORS[base], "agg": loss_agg_mode}
    if kl_loss_type.endswith("+") and KL_ESTIMATORS[base] != "k2":
        term["gradient_estimator"] = "k2"
    return term


def _loss_mode(config: Any) -> str:
    """The actor's policy_loss.loss_mode as verl's own name (advserve's registered names map back)."""
    mode = _option(config, ("policy_loss", "loss_mode"), "vanilla")
    return "vanilla" if mode == "advserve" else mode.removeprefix(PREFIX)


def actor_loss_request(config: Any, entropy: bool, kl: bool) -> dict[str, Any]:
    """The losses request of verl's ppo_loss under actor config `config`: the policy term (policy_loss_term
    of config.policy_loss.loss_mode), entropy_bonus {coef: entropy_coeff} when there is an entropy, kl_loss
    (kl_loss_term) when use_kl_loss, both aggregated with loss_agg_mode, and the global normalizers."""
    loss_agg_mode = _get(config, "loss_agg_mode", "token-mean")
    verl_mode = _loss_mode(config)
    request: dict[str, Any] = {"preset": "verl", "policy_loss": policy_loss_term(verl_mode, loss_agg_mode, config)}
    if entropy:
        request["entropy_bonus"] = {"coef": float(_get(config, "entropy_coeff", 0.0)), "agg": loss_agg_mode}
    if kl and _get(config, "use_kl_loss", False):
        request["kl_loss"] = kl_loss_term(_get(config, "kl_loss_type", "low_var_kl"),
                                          _get(config, "kl_loss_coef", 0.001), loss_agg_mode)
    request.update(normalizers(loss_agg_mode, _get(config, "global_batch_info", {}) or {}))
    return request


def compute_actor_loss(config: Any, log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                       response_mask: torch.Tensor, entropy: torch.Tensor | None = None,
                       ref_log_prob: torch.Tensor | None = None, rollout_is_weights: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's ppo_loss (verl.workers.utils.losses) in one advserve call: pg_loss − entropy_coeff · entropy_loss
    + kl_loss_coef · kl_loss, each aggregated with the actor's loss_agg_mode and global batch info, for a
    trainer that calls its actor loss itself. Returns (loss, metrics): the loss a 0-dim tensor whose
    backward reaches log_prob and entropy; the metrics under verl's names (the policy's, actor/pg_loss,
    actor/entropy_loss, kl_loss, kl_coef) as floats."""
    request = actor_loss_request(config, entropy is not None, ref_log_prob is not None)
    loss, result = loss_with_gradients(
        backend().compute_losses, logprobs=log_prob, entropy=entropy, old_logprobs=old_log_prob,
        advantages=advantages, response_mask=response_mask, ref_logprobs=ref_log_prob if "kl_loss" in request else None,
        rollout_is_weights=rollout_is_weights, dtype=_DTYPES.get(log_prob.dtype), **request)
    metrics = verl_metrics(_loss_mode(config), result.metrics)
    metrics["actor/pg_loss"] = result.components["policy"]
    if "entropy_bonus" in request:
        metrics["actor/entropy_loss"] = result.components["entropy"]
    if "kl_loss" in request:
        metrics["kl_loss"] = result.components["kl"]
        metrics["kl_coef"] = request["kl_loss"]["coef"]
    return loss, metrics


def compute_value_loss(vpreds: torch.Tensor, returns: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
                       cliprange_value: float, loss_agg_mode: str = "token-mean", dp_size: int = 1,
                       batch_num_tokens: int | None = None, global_batch_size: int | None = None,
                       loss_scale_factor: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's core_algos.compute_value_loss (its signature and results) computed by advserve: verl's
    `vpreds` (the critic's new predictions) are advserve's values, its `values` (the old ones)
    old_values; cliprange_value is value_loss.clip; the aggregation and global normalizers as verl's
    agg_loss. Returns (vf_loss, a 0-dim tensor whose gradient reaches vpreds; vf_clipfrac, the share of
    valid tokens where the clipped loss is the larger, as verl counts it)."""
    term: dict[str, Any] = {"coef": 1.0, "clip": float(cliprange_value), "agg": loss_agg_mode}
    if loss_scale_factor is not None and loss_agg_mode == "seq-mean-token-sum-norm":
        term["loss_scale_factor"] = float(loss_scale_factor)
    counts = normalizers(loss_agg_mode, {"dp_size": dp_size, "batch_num_tokens": batch_num_tokens,
                                         "global_batch_size": global_batch_size})
    loss, _ = loss_with_gradients(backend().compute_losses, preset="verl", policy_loss=False, value_loss=term,
                                  values=vpreds, old_values=values, returns=returns, response_mask=response_mask,
                                  dtype=_DTYPES.get(vpreds.dtype), **counts)
    with torch.no_grad():  # verl's vf_clipfrac: a metric, computed here as verl defines it
        clipped = torch.clamp(vpreds, values - cliprange_value, values + cliprange_value)
        larger = ((clipped - returns) ** 2 > (vpreds - returns) ** 2).to(vpreds.dtype)
        valid = response_mask.to(vpreds.dtype)
        clipfrac = (larger * valid).sum() / (valid.sum() + 1e-8)
    return loss, clipfrac


ESTIMATOR_FUNCTIONS = {PREFIX + name: make_estimator(name) for name in ESTIMATORS}
POLICY_LOSS_FUNCTIONS = {PREFIX + name: make_policy_loss(name) for name in POLICY_LOSSES}
POLICY_LOSS_FUNCTIONS["advserve"] = POLICY_LOSS_FUNCTIONS[PREFIX + "vanilla"]


def register(core_algos: Any = None) -> list[str]:
    """Register every advserve estimator and policy loss in verl's registries (`core_algos`: default
    `verl.trainer.ppo.core_algos`; anything with register_adv_est and register_policy_loss). Idempotent.
    Returns the registered names."""
    if core_algos is None:
        from verl.trainer.ppo import core_algos
    for name, function in ESTIMATOR_FUNCTIONS.items():
        core_algos.register_adv_est(name)(function)
    for name, function in POLICY_LOSS_FUNCTIONS.items():
        core_algos.register_policy_loss(name)(function)
    return [*ESTIMATOR_FUNCTIONS, *POLICY_LOSS_FUNCTIONS]


def _verl_installed() -> bool:
    try:
        return "verl" in sys.modules or importlib.util.find_spec("verl") is not None
    except ValueError:  # a module without a spec
        return True


if _verl_installed():  # imported by verl (its entry point, external_lib) or in verl's environment: register
    register()
