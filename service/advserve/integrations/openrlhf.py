"""advserve in OpenRLHF 0.11.2: its advantages and returns computed by advserve (preset "openrlhf").

OpenRLHF has no registry or plugin hook for advantages: its trainer calls
`RemoteExperienceMaker.compute_advantages_and_returns(experiences)` (openrlhf/trainer/ppo_utils/
experience_maker.py) inside the PPOTrainer Ray actor. The smallest hook is that one method, wrapped:
OpenRLHF's own code still runs first (length penalties, its logging info), then advserve's advantages
and returns replace its own. `install()` wraps it in the process that calls it; the launcher installs it
in every Ray worker too (Ray's `worker_process_setup_hook`), with the server list in ADVSERVE_ADDRESS:

    python -m advserve.integrations.openrlhf --advserve.url http://h1:8000,http://h2:8000 <train_ppo_ray's flags>

in place of `python -m openrlhf.cli.train_ppo_ray <flags>`. `--advserve.url` takes a comma-separated list,
like OpenRLHF's `--reward.remote_url`: the calls go to the servers in turn; without it, advserve runs in
process. Every OpenRLHF option that shapes the advantages is translated (README's OpenRLHF table):
`--algo.advantage.estimator`, `gamma`, `lambd`, `no_std_norm`, `--reward.clip_range`, the KL in the
reward (`--algo.kl.init_coef` / the adaptive controller's current value, `--algo.kl.estimator`, from the
experiences' action_log_probs and base_action_log_probs), `--rollout.n_samples_per_prompt` (groups by
each sample's position, as OpenRLHF forms them).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import torch

from ._backend import ADDRESS_ENV, backend

# OpenRLHF's --algo.advantage.estimator -> advserve's estimator (preset "openrlhf")
ESTIMATORS = {"gae": "gae", "reinforce": "reinforce_pp", "reinforce_baseline": "reinforce_pp_baseline",
              "rloo": "rloo", "group_norm": "grpo", "dr_grpo": "dr_grpo", "flash_reinforce": "flash_reinforce"}
GROUPED = {"rloo", "grpo", "dr_grpo", "reinforce_pp_baseline"}
WHITENED = {"gae", "reinforce_pp", "reinforce_pp_baseline"}
SETUP_HOOK = "advserve.integrations.openrlhf.install"


def _get(namespace: Any, path: str, default: Any = None) -> Any:
    for key in path.split("."):
        namespace = getattr(namespace, key, None)
        if namespace is None:
            return default
    return namespace


def request(maker: Any, experiences: Sequence[Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(estimator, params, tensors) of the one packed advserve request for all `experiences` (each row of
    each experience a packed sequence of its width, action_mask its response_mask)."""
    args = maker.strategy.args
    name = _get(args, "algo.advantage.estimator", "gae")
    if name not in ESTIMATORS:
        raise ValueError(f"OpenRLHF's advantage estimator {name!r} has no advserve equivalent; valid: "
                         f"{', '.join(ESTIMATORS)}")
    estimator = ESTIMATORS[name]
    masks = [e.action_mask for e in experiences]
    widths = [int(m.shape[1]) for m in masks for _ in range(m.shape[0])]
    dtype = torch.promote_types(experiences[0].rewards.dtype, torch.float32)
    tensors: dict[str, Any] = {
        "rewards": torch.cat([e.rewards for e in experiences]).to(dtype),
        "response_mask": torch.cat([m.reshape(-1) for m in masks]).bool(),
        "cu_seqlens": torch.tensor([0, *torch.tensor(widths).cumsum(0).tolist()], dtype=torch.int64),
    }
    params: dict[str, Any] = {}
    if estimator in GROUPED:
        n = int(_get(args, "rollout.n_samples_per_prompt", 1))
        tensors["group_ids"] = torch.tensor([i for e in experiences for i in e.index]) // n
    if estimator == "gae":
        tensors["values"] = torch.cat([e.values.reshape(-1) for e in experiences]).to(dtype)
        params.update(gamma=float(_get(args, "algo.advantage.gamma", 1.0)),
                      lam=float(_get(args, "algo.advantage.lambd", 1.0)))
    elif estimator == "reinforce_pp":
        params["gamma"] = float(_get(args, "algo.advantage.gamma", 1.0))
    if estimator in WHITENED:
        params["whiten_std"] = not _get(args, "algo.advantage.no_std_norm", False)
    clip = _get(args, "reward.clip_range")
    if clip:
        params.update(reward_clip_low=float(clip[0]), reward_clip_high=float(clip[1]))
    kl_coef = float(getattr(getattr(maker, "kl_ctl", None), "value", 0.0) or 0.0)
    if kl_coef > 0 and not _get(args, "algo.kl.use_loss", False):
        if any(getattr(e, "base_action_log_probs", None) is None for e in experiences):
            raise ValueError("KL in the reward needs each experience's action_log_probs and base_action_log_probs")
        params.update(kl_coef=kl_coef, kl_estimator=_get(args, "algo.kl.estimator", "k1"))
        tensors["old_logprobs"] = torch.cat([e.action_log_probs.reshape(-1) for e in experiences]).to(dtype)
        tensors["ref_logprobs"] = torch.cat([e.base_action_log_probs.reshape(-1) for e in experiences]).to(dtype)
    else:
        params["kl_coef"] = 0.0
    return estimator, params, tensors


def advserve_advantages(maker: Any, experiences: Sequence[Any]) -> Sequence[Any]:
    """Set each experience's advantages and returns [B_i, A_i] to advserve's (one request for the whole
    list, as OpenRLHF whitens over all of it; 0 at masked positions, where OpenRLHF leaves its whitening's
    shift), in the dtype of the advantages OpenRLHF's own method left (its KL's) or else the rewards'
    promoted dtype; returns `experiences`."""
    estimator, params, tensors = request(maker, experiences)
    dtype = tensors["rewards"].dtype
    result = backend().compute_advantages(estimator, preset="openrlhf", params=params, layout="packed",
                                          dtype="float64" if dtype == torch.float64 else "float32", **tensors)
    sizes = [e.action_mask.numel() for e in experiences]
    advantages = torch.as_tensor(result.advantages).to(dtype).split(sizes)
    returns = torch.as_tensor(result.returns).to(dtype).split(sizes)
    for experience, advantage, ret in zip(experiences, advantages, returns):
        like = getattr(experience, "advantages", None)  # OpenRLHF's own, when its method ran first: its dtype
        out_dtype = like.dtype if isinstance(like, torch.Tensor) else dtype
        device = experience.action_mask.device
        experience.advantages = advantage.reshape(experience.action_mask.shape).to(device=device, dtype=out_dtype)
        experience.returns = ret.reshape(experience.action_mask.shape).to(device=device, dtype=out_dtype)
    return experiences


def install() -> None:
    """Wrap RemoteExperienceMaker.compute_advantages_and_returns in this process (idempotent): OpenRLHF's own
    method first (length penalties, logging), then advserve's advantages and returns."""
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

    original = RemoteExperienceMaker.compute_advantages_and_returns
    if getattr(original, "advserve", False):
        return

    def compute_advantages_and_returns(self: Any, experiences: list) -> list:
        return advserve_advantages(self, original(self, experiences))

    compute_advantages_and_returns.advserve = True  # type: ignore[attr-defined]
    compute_advantages_and_returns.__wrapped__ = original  # type: ignore[attr-defined]
    RemoteExperienceMaker.compute_advantages_and_returns = compute_advantages_and_returns


def split_argv(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """(the --advserve.url value or None, OpenRLHF's own flags); `--advserve.url=URLS` works too."""
    address, rest, items = None, [], iter(argv)
    for item in items:
        if item == "--advserve.url":
            address = next(items, None)
            if address is None:
                raise SystemExit("--advserve.url needs a URL or a comma-separated list of URLs")
        elif item.startswith("--advserve.url="):
            address = item.split("=", 1)[1]
        else:
            rest.append(item)
    return address, rest


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m advserve.integrations.openrlhf [--advserve.url URL[,URL...]] <train_ppo_ray's flags>`:
    starts Ray with the hook in every worker (and ADVSERVE_ADDRESS), then runs openrlhf.cli.train_ppo_ray
    as its own `__main__` (OpenRLHF calls ray.init only when Ray is not running)."""
    import runpy

    import ray

    address, argv = split_argv(sys.argv[1:] if argv is None else argv)
    if address:
        os.environ[ADDRESS_ENV] = address
    env_vars = {key: os.environ.get(key, default) for key, default in (
        ("TOKENIZERS_PARALLELISM", "true"), ("NCCL_DEBUG", "WARN"), ("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1"))}
    if os.environ.get(ADDRESS_ENV):
        env_vars[ADDRESS_ENV] = os.environ[ADDRESS_ENV]
    install()
    ray.init(runtime_env={"env_vars": env_vars, "worker_process_setup_hook": SETUP_HOOK})
    sys.argv = ["openrlhf.cli.train_ppo_ray", *argv]
    runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)


__all__ = ["ESTIMATORS", "advserve_advantages", "install", "main", "request", "split_argv"]

if __name__ == "__main__":
    main()
