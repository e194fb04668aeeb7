"""The domain model: what a caller asks the engine and what it gets back, independent of transport."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import Tensor


@dataclass(frozen=True)
class AdvantageRequest:
    estimator: str
    tensors: Mapping[str, Any]
    preset: str | None = None
    params: Mapping[str, Any] | None = None
    dtype: str | None = None


@dataclass(frozen=True)
class AdvantageResult:
    """advantages, returns [B, T] (0 at masked positions); stats for logging; params as resolved."""

    estimator: str
    preset: str
    advantages: Tensor
    returns: Tensor
    stats: dict[str, Any]
    params: dict[str, Any]


# A loss term is given as None (not requested; for policy_loss: the preset's defaults), False (off),
# or a mapping of parameter overrides ({} = the preset's defaults).
TermSpec = Mapping[str, Any] | bool | None


@dataclass(frozen=True)
class LossRequest:
    tensors: Mapping[str, Any]
    preset: str | None = None
    policy_loss: TermSpec = None
    kl_loss: TermSpec = None
    value_loss: TermSpec = None
    entropy_bonus: TermSpec = None
    rollout_correction: TermSpec = None
    num_tokens: float | None = None
    num_sequences: float | None = None
    dtype: str | None = None


@dataclass(frozen=True)
class LossResult:
    """loss = policy + kl.coef·kl + value.coef·value − entropy.coef·entropy; gradients [B, T]."""

    preset: str
    loss: float
    components: dict[str, float | None]
    metrics: dict[str, float]
    grad_logprobs: Tensor | None
    grad_values: Tensor | None
    grad_entropy: Tensor | None
    params: dict[str, Any] = field(default_factory=dict)
