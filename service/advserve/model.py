"""The domain model: what a caller asks the engine and what it gets back, independent of transport."""

from __future__ import annotations

from dataclasses import dataclass, field
import functools
from typing import Any, Callable, Mapping

from torch import Tensor


@dataclass(frozen=True)
class AdvantageRequest:
    estimator: str
    tensors: Mapping[str, Any]
    preset: str | None = None
    params: Mapping[str, Any] | None = None
    dtype: str | None = None
    layout: str | None = None  # "padded" (default) or "packed" (flat [N] token tensors + cu_seqlens)


class AdvantageResult:
    """advantages, returns [B, T] (0 at masked positions); params as resolved; `stats` (what a trainer
    logs) computed on first access, so a caller that never reads them never pays for them.
    `deferred_checks`: the request's value checks are read with the stats (`check()`)."""

    def __init__(self, estimator: str, preset: str, advantages: Any, returns: Any, params: dict[str, Any],
                 stats_fn: Callable[[], dict[str, Any]], deferred_checks: bool = False):
        self.estimator = estimator
        self.preset = preset
        self.advantages = advantages
        self.returns = returns
        self.params = params
        self._stats_fn = stats_fn
        self.deferred_checks = deferred_checks

    @functools.cached_property
    def stats(self) -> dict[str, Any]:
        return self._stats_fn()

    def check(self) -> None:
        """Raise the request's validation error where its value checks were left to be read with the
        results (`Engine.prepare_advantages(defer_checks=True)` on a device) and one failed: they come
        with the stats, in the same host read. Nothing otherwise."""
        if self.deferred_checks:
            _ = self.stats

    def with_arrays(self, convert: Callable[[Any], Any]) -> "AdvantageResult":
        """The same result with `convert` applied to advantages and returns (stats shared)."""
        return AdvantageResult(self.estimator, self.preset, convert(self.advantages), convert(self.returns),
                               self.params, lambda: self.stats)

    def tensors(self) -> list[Any]:
        """The result tensors a response carries (what the scheduler marks ready, `device.mark_ready`)."""
        return [self.advantages, self.returns]

    def __repr__(self) -> str:
        return f"AdvantageResult(estimator={self.estimator!r}, preset={self.preset!r}, params={self.params!r})"


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
    layout: str | None = None
    token_loss: TermSpec = None  # off unless given
    dp_size: int | None = None  # verl's agg_loss dp_size (None: 1)
    return_kl_values: bool | None = None  # True: the result carries kl_values [B, T]


@dataclass(frozen=True)
class LossResult:
    """loss = policy + kl.coef·kl + value.coef·value − entropy.coef·entropy + token_loss.coef·token_loss;
    gradients [B, T]; params: the resolved parameters of each term that was on, the policy term's those
    its mode reads (loss_specs.POLICY_MODE_PARAMS). grad_token_losses: ∂loss/∂token_losses (token_loss
    term); kl_values: the KL term's per-token estimate kl_t (0 at masked positions) when asked for."""

    preset: str
    loss: float
    components: dict[str, float | None]
    metrics: dict[str, float]
    grad_logprobs: Tensor | None
    grad_values: Tensor | None
    grad_entropy: Tensor | None
    params: dict[str, Any] = field(default_factory=dict)
    grad_token_losses: Tensor | None = None
    kl_values: Tensor | None = None

    def tensors(self) -> list[Tensor | None]:
        """The result tensors a response carries (what the scheduler marks ready, `device.mark_ready`)."""
        return [self.grad_logprobs, self.grad_values, self.grad_entropy, self.grad_token_losses, self.kl_values]

    def output_tensors(self) -> dict[str, Tensor | None]:
        """Every output tensor by its wire name, in the order the transports carry them (None: not produced)."""
        return {"grad_logprobs": self.grad_logprobs, "grad_values": self.grad_values,
                "grad_entropy": self.grad_entropy, "grad_token_losses": self.grad_token_losses,
                "kl_values": self.kl_values}
