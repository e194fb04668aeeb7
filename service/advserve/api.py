"""The in-process API: the engine without a network, numpy or torch arrays in and out.

    import advserve
    adv = advserve.compute_advantages("grpo", rewards=r, response_mask=m, group_ids=g)
    out = advserve.compute_losses(preset="verl", logprobs=lp, old_logprobs=old, advantages=adv.advantages,
                                  response_mask=m)
    logp.backward(out.grad_logprobs)   # torch; in JAX, feed it to the VJP of your log-prob function

Arrays come back as the caller sent them: torch tensors (on the device of the first torch input)
if any input was a torch tensor, numpy arrays otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import torch

from .analysis.batch import AnalysisRequest
from .analysis.batch import analyze as analyze_batch
from .device import to_host
from .engine import Engine
from .model import AdvantageRequest, AdvantageResult, LossRequest, LossResult, TermSpec


@functools.lru_cache(maxsize=None)
def _engine(device: str, kernels: str = "auto") -> Engine:
    return Engine(device, kernels=kernels)


def _converter(tensors: Mapping[str, Any]):
    """A function giving results the array kind of the inputs."""
    for value in tensors.values():
        if isinstance(value, torch.Tensor):
            device = value.device
            return lambda t: None if t is None else t.to(device)
    return lambda t: None if t is None else to_host(t.detach()).numpy()


def compute_advantages(
    estimator: str,
    *,
    preset: str | None = None,
    params: Mapping[str, Any] | None = None,
    dtype: str | None = None,
    layout: str | None = None,
    device: str = "auto",
    kernels: str = "auto",
    **tensors: Any,
) -> AdvantageResult:
    """Token advantages and returns of `estimator` (see `advserve.catalog()` and docs/semantics.md).

    tensors: rewards [B] or token_rewards [B, T], response_mask [B, T], and what the estimator needs:
    group_ids [B] (ints or strings), values [B, T], greedy_rewards [B], old_logprobs and
    ref_logprobs [B, T] (when kl_coef > 0). layout="packed": token tensors flat [N] with cu_seqlens
    [B + 1] (response_mask optional), results flat too. Returns `.advantages`, `.returns` [B, T], `.stats`,
    `.params` (the resolved parameters). Parameters go in `params` (params={"gamma": 1}); one given as
    a keyword argument is an error that says so. Raises `advserve.InvalidArgument` / `advserve.NotFound`.
    kernels: "auto" (the Triton kernels on a CUDA device when triton is installed, the numba ones on the
    CPU when numba is), "torch", "triton" or "numba" (`advserve.kernels`).
    """
    request = AdvantageRequest(estimator=estimator, tensors=tensors, preset=preset, params=params, dtype=dtype,
                               layout=layout)
    result = _engine(device, kernels).compute_advantages(request)
    return result.with_arrays(_converter(tensors))


def compute_losses(
    *,
    preset: str | None = None,
    policy_loss: TermSpec = None,
    kl_loss: TermSpec = None,
    value_loss: TermSpec = None,
    entropy_bonus: TermSpec = None,
    rollout_correction: TermSpec = None,
    token_loss: TermSpec = None,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
    dp_size: int | None = None,
    return_kl_values: bool | None = None,
    dtype: str | None = None,
    layout: str | None = None,
    device: str = "auto",
    kernels: str = "auto",
    **tensors: Any,
) -> LossResult:
    """The loss, its components and metrics, and its gradients with respect to the inputs.

    policy_loss: None for the preset's defaults (paper: ppo_clip, clip 0.2/0.2, seq-mean-token-sum; the
    seed's unclipped surrogate is {"mode": "reinforce"}), a dict of overrides, or False for no policy term.
    kl_loss, value_loss, entropy_bonus, rollout_correction, token_loss: off unless given (a dict, {} =
    defaults). num_tokens, num_sequences: global normalizers when this call is one micro-batch or shard
    (each only with an aggregation that reads it); dp_size: verl's data-parallel size (every term × D).
    return_kl_values: also return the KL term's per-token estimate `.kl_values`.
    tensors: logprobs, old_logprobs, advantages, response_mask [B, T]; ref_logprobs (kl_loss);
    values, old_values, returns (value_loss); entropy (entropy_bonus); token_losses (token_loss: any
    per-token loss matrix); rollout_logprobs (rollout_correction) or rollout_is_weights (precomputed
    importance weights of the policy term, >= 0). Returns `.loss`, `.components`, `.metrics`,
    `.grad_logprobs`, `.grad_values`, `.grad_entropy`, `.grad_token_losses`, `.kl_values` ([B, T] or
    None), `.params` (each term's resolved parameters; the policy term's those its mode reads). A loss
    parameter given as a keyword argument (clip_high=0.3) is an error naming its term.
    """
    request = LossRequest(tensors=tensors, preset=preset, policy_loss=policy_loss, kl_loss=kl_loss,
                          value_loss=value_loss, entropy_bonus=entropy_bonus, rollout_correction=rollout_correction,
                          token_loss=token_loss, num_tokens=num_tokens, num_sequences=num_sequences, dp_size=dp_size,
                          return_kl_values=return_kl_values, dtype=dtype, layout=layout)
    result = _engine(device, kernels).compute_losses(request)
    convert = _converter(tensors)
    return dataclasses.replace(result, **{name: convert(t) for name, t in result.output_tensors().items()})


def analyze(
    estimators: Sequence[str] | None = None,
    *,
    preset: str | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    dtype: str | None = None,
    layout: str | None = None,
    device: str = "auto",
    kernels: str = "auto",
    **tensors: Any,
) -> dict[str, Any]:
    """What each estimator makes of this batch, relative to the unbiased policy gradient (docs/analysis.md).

    tensors: as for `compute_advantages`, group_ids [B] required (groups of at least 2). estimators:
    names to analyse (None: every estimator of the preset the tensors allow); params: per-estimator
    overrides, {"grpo": {"std_eps": 1e-6}}. Returns the document of POST /v1/analysis: per group
    (pass rate, reward std, lengths, no-signal flag), per estimator (implied weight of each group,
    exact finite-group weight, normalised weights, summary statistics, share of zero-advantage
    groups) and the pairwise sign disagreement of the estimators' advantages.
    """
    request = AnalysisRequest(tensors=tensors, estimators=estimators, preset=preset, params=params, dtype=dtype,
                              layout=layout)
    return analyze_batch(_engine(device, kernels), request)


def catalog() -> dict[str, Any]:
    """Estimators, their tensors and parameters with the defaults of each preset; the loss terms."""
    return Engine.catalog()


__all__ = ["analyze", "compute_advantages", "compute_losses", "catalog"]
