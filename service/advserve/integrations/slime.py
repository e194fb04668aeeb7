"""advserve as slime's custom advantage function (THUDM/slime, `--custom-advantage-function-path`).

    --custom-advantage-function-path advserve.integrations.slime.compute_advantages

slime (slime/backends/megatron_utils/loss.py, `compute_advantages_and_returns`) loads the function named by
that flag and calls it as `custom_adv_fn(args, rollout_data)` after computing the per-token KL, on the
last pipeline stage; the function must fill `rollout_data["advantages"]` and `rollout_data["returns"]`,
one [R_i] tensor per sample, as slime's own estimators do. rollout_data holds per-sample lists:
"rewards" (floats, after slime's reward post-processing), "loss_masks", "log_probs", "ref_log_probs",
"values" ([R_i] each), "response_lengths", "total_lengths", "kl".

The samples go to advserve as one packed batch (`layout="packed"`: the [R_i] tensors concatenated, with
`cu_seqlens`), with no padding, and come back split the same way. Settings, from the environment (slime
passes its own argparse namespace; a Ray job sets the variables with `--runtime-env-json`):

* ADVSERVE_ADDRESS: a remote advserve ("host:port", "http://...", "grpc://host:port"); unset: in process.
* ADVSERVE_ESTIMATOR: any advserve estimator; default: slime's `--advantage-estimator` translated
  (grpo, gspo, cispo -> grpo, or dr_grpo under `--disable-grpo-std-normalization`; ppo -> gae;
  reinforce_plus_plus -> reinforce_pp; reinforce_plus_plus_baseline -> reinforce_pp_baseline).
* ADVSERVE_PRESET: the preset (default "paper").

Groups are consecutive blocks of `args.n_samples_per_prompt` samples, the order slime keeps them in;
`--kl-coef` > 0 puts the KL in the advantage (advserve's kl_coef, with `--kl-loss-type` as its estimator:
low_var_kl is k3); `--gamma` and `--lambd` are GAE's γ and λ. Context parallelism must be 1 (with more,
each rank holds a slice of every response). Let advserve do the group baseline: keep slime's own
reward normalization off (`--disable-rewards-normalization`).
"""

from __future__ import annotations

import os
from argparse import Namespace
from typing import Any

import torch

from ._backend import backend

# slime's --advantage-estimator -> advserve's estimator
ESTIMATORS = {"grpo": "grpo", "gspo": "grpo", "cispo": "grpo", "ppo": "gae", "reinforce_plus_plus": "reinforce_pp",
              "reinforce_plus_plus_baseline": "reinforce_pp_baseline"}
# slime's --kl-loss-type -> advserve's KL estimator
KL_ESTIMATORS = {"k1": "k1", "k2": "k2", "k3": "k3", "low_var_kl": "k3", "kl": "k1", "mse": "k2", "abs": "abs"}
GROUPED = {"grpo", "grpo_original", "dapo", "dr_grpo", "rloo", "reinforce_pp_baseline", "opo", "gpg", "gdpo",
           "grpo_passk"}


def estimator_of(args: Namespace) -> str:
    """ADVSERVE_ESTIMATOR, or slime's --advantage-estimator translated (grpo without std: dr_grpo)."""
    chosen = os.environ.get("ADVSERVE_ESTIMATOR", "").strip()
    if chosen:
        return chosen
    slime_name = getattr(args, "advantage_estimator", "grpo")
    if slime_name not in ESTIMATORS:
        raise ValueError(f"slime's advantage estimator {slime_name!r} has no advserve equivalent; set "
                         f"ADVSERVE_ESTIMATOR (valid slime names: {', '.join(ESTIMATORS)})")
    estimator = ESTIMATORS[slime_name]
    if estimator == "grpo" and not getattr(args, "grpo_std_normalization", True):
        estimator = "dr_grpo"
    return estimator


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.as_tensor(t).reshape(-1) for t in tensors])


def compute_advantages(args: Namespace, rollout_data: dict[str, Any]) -> None:
    """slime's custom advantage function: fills rollout_data["advantages"] and ["returns"] (a [R_i] tensor
    per sample, on the samples' device, float32) with advserve's estimator (see the module's docstring)."""
    lengths = [int(n) for n in rollout_data["response_lengths"]]
    masks = rollout_data["loss_masks"]
    if [int(torch.as_tensor(m).numel()) for m in masks] != lengths:
        raise ValueError("advserve's slime function needs whole responses: loss_masks shorter than "
                         "response_lengths (context parallelism > 1?)")
    device = torch.as_tensor(masks[0]).device if masks else torch.device("cpu")
    estimator = estimator_of(args)
    params: dict[str, Any] = {}
    tensors: dict[str, Any] = {
        "rewards": torch.as_tensor(rollout_data["rewards"], dtype=torch.float32, device=device),
        "response_mask": _flat(masks).to(device=device, dtype=torch.bool),
        "cu_seqlens": torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64),
    }
    if estimator in GROUPED:
        size = int(getattr(args, "n_samples_per_prompt", 1))
        tensors["group_ids"] = torch.arange(len(lengths)) // size
    if estimator in ("gae", "orz"):
        tensors["values"] = _flat(rollout_data["values"]).to(device=device, dtype=torch.float32)
        if estimator == "gae":
            params.update(gamma=float(getattr(args, "gamma", 1.0)), lam=float(getattr(args, "lambd", 1.0)))
    elif estimator in ("reinforce_pp", "reinforce_rtg"):
        params["gamma"] = float(getattr(args, "gamma", 1.0))
    kl_coef = float(getattr(args, "kl_coef", 0.0) or 0.0)
    if kl_coef > 0 and rollout_data.get("log_probs") and rollout_data.get("ref_log_probs"):
        params.update(kl_coef=kl_coef, kl_estimator=KL_ESTIMATORS.get(getattr(args, "kl_loss_type", "k1"), "k1"))
        tensors["old_logprobs"] = _flat(rollout_data["log_probs"]).to(device=device, dtype=torch.float32)
        tensors["ref_logprobs"] = _flat(rollout_data["ref_log_probs"]).to(device=device, dtype=torch.float32)
    result = backend().compute_advantages(estimator, preset=os.environ.get("ADVSERVE_PRESET") or "paper",
                                          params=params or None, layout="packed", **tensors)
    advantages = torch.as_tensor(result.advantages).to(device=device, dtype=torch.float32)
    returns = torch.as_tensor(result.returns).to(device=device, dtype=torch.float32)
    rollout_data["advantages"] = list(advantages.split(lengths))
    rollout_data["returns"] = list(returns.split(lengths))


__all__ = ["ESTIMATORS", "compute_advantages", "estimator_of"]
