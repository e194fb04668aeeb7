"""Per-token policy and value losses with their analytic gradients.

Each function returns the per-token loss ℓ [B, T] and ∂ℓ/∂input [B, T]; the caller aggregates with
weights w (`masks.aggregation_weights`): loss = Σ w ℓ, gradient = w · ∂ℓ. Where a branch is chosen by
max/min, the gradient follows torch's rule (the chosen branch; half each on an exact tie), so the
result equals torch autograd of the same expression.

A sequence ratio s_i (gspo, CISPO at sequence level) can pass its gradient two ways
(`sequence_ratio_gradient`): "token_trick" (verl: token t's ratio is sg(s_i)·exp(lp_t − sg(lp_t)), so
∂ℓ_t reaches lp_t only) or "through_mean" (OpenRLHF, TRL: s_i = exp(mean_t(lp − old)), so every
token's loss reaches every token of its row, each getting 1/L_i of the row's sum). `Ratio.spread`
marks the second case: the caller weights the per-token gradient and passes it to `spread_over_row`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .kl import kl_and_grad

POLICY_LOSS_MODES = ("ppo_clip", "gspo", "cispo", "reinforce")
SEQUENCE_RATIO_GRADIENTS = ("token_trick", "through_mean")


def _maximum_grad(a: Tensor, b: Tensor, da: Tensor, db: Tensor) -> Tensor:
    """Gradient of torch.maximum(a, b) given the gradients of a and b."""
    return torch.where(a > b, da, torch.where(b > a, db, 0.5 * (da + db)))


def _tie_split(x: Tensor, bound: Tensor, below: bool) -> Tensor:
    """∂/∂x of torch.minimum(x, bound) (below=True) or torch.maximum(x, bound): 1 where x is the
    strict winner, ½ at a tie, 0 where the bound wins."""
    wins = x < bound if below else x > bound
    return torch.where(wins, 1.0, torch.where(x == bound, 0.5, 0.0)).to(x.dtype)


def _clamped(x: Tensor, low: float | None, high: float | None) -> tuple[Tensor, Tensor | None]:
    """(clamp(x, low, high), 1 where the clamp passes the gradient else 0; None without bounds)."""
    if low is None and high is None:
        return x, None
    passes = torch.ones_like(x, dtype=torch.bool)
    if low is not None:
        passes &= x >= low
    if high is not None:
        passes &= x <= high
    return x.clamp(low, high), passes.to(x.dtype)


@dataclass(frozen=True)
class Ratio:
    """An importance ratio ρ [B, T] and its derivative.

    value: ρ_t; for a sequence ratio s_i on every position of row i. grad: ∂ρ_t/∂lp_t for token ratios
    and for sequence ratios under "token_trick"; ∂s_i/∂(log s_i) (= s_i where no clamp binds) when
    `spread`, the caller then passing Σ over the row through the mean (`spread_over_row`).
    """

    value: Tensor
    grad: Tensor
    spread: bool = False


def importance_ratio(logp: Tensor, old: Tensor, log_clamp: float | None) -> tuple[Tensor, Tensor]:
    """ρ = exp(clamp(logp − old, ±log_clamp)) and ∂ρ/∂logp, both [B, T]."""
    log_ratio, passes = _clamped(logp - old, -log_clamp if log_clamp is not None else None, log_clamp)
    ratio = log_ratio.exp()
    return ratio, ratio if passes is None else ratio * passes  # (read only: the two may be one tensor)


def _row_lengths(mask: Tensor, lengths: Tensor | None, dtype: torch.dtype) -> Tensor:
    """max(L_i, 1) [B, 1] in `dtype`, from `lengths` [B] when the caller has them, else from mask."""
    counts = mask.sum(dim=1) if lengths is None else lengths
    return counts.to(dtype).clamp_min(1).unsqueeze(1)


def sequence_log_ratio(logp: Tensor, old: Tensor, mask: Tensor, lengths: Tensor | None = None) -> Tensor:
    """GSPO's log s_i = mean over valid tokens of (logp − old), [B, T] -> [B] (0 for empty rows).
    lengths [B]: valid tokens per row, if known (else counted from mask)."""
    return torch.where(mask, logp - old, 0).sum(dim=1) / _row_lengths(mask, lengths, logp.dtype).squeeze(1)


def spread_over_row(x: Tensor, mask: Tensor, lengths: Tensor | None = None) -> Tensor:
    """The gradient through a row mean: m_u · Σ_t x_t / max(L_i, 1) for every token u, [B, T] -> [B, T].

    x [B, T] is 0 at masked positions (the caller's weights are), mask [B, T] bool, lengths [B] the
    valid tokens per row if known (else counted from mask).
    """
    return torch.where(mask, x.sum(dim=1, keepdim=True) / _row_lengths(mask, lengths, x.dtype), 0)


def policy_ratio(
    mode: str,
    logp: Tensor,
    old: Tensor,
    mask: Tensor,
    *,
    ratio_clamp: float | None,
    cispo_level: str = "token",
    sequence_ratio_gradient: str = "token_trick",
    lengths: Tensor | None = None,
) -> Ratio:
    """The ratio a policy mode uses, [B, T].

    Token ratio ρ_t = exp(clamp(lp − old, ±ratio_clamp)) for ppo_clip, reinforce and token-level cispo;
    sequence ratio s_i = exp(min(mean_t(lp − old), ratio_clamp)) (upper bound only) for gspo and
    sequence-level cispo, its gradient passed per `sequence_ratio_gradient`.
    """
    if mode == "gspo" or (mode == "cispo" and cispo_level == "sequence"):
        log_s = sequence_log_ratio(logp, old, mask, lengths).unsqueeze(1).expand_as(logp)
        log_s, passes = _clamped(log_s, None, ratio_clamp)
        s = log_s.exp()
        return Ratio(s, s if passes is None else s * passes, spread=sequence_ratio_gradient == "through_mean")
    ratio, dratio = importance_ratio(logp, old, ratio_clamp)
    return Ratio(ratio, dratio)


def clipped_surrogate(
    ratio: Tensor,
    dratio: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    ratio_cap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate (with optional dual clip, arXiv:1912.09729) given ρ and ∂ρ/∂logp.

    ℓ = max(−A min(ρ, δ), −A clip(ρ, 1 − clip_low, 1 + clip_high)) with δ = `ratio_cap` (TRL's
    `delta`; None: no cap); for A < 0 with dual clip c: ℓ = min(ℓ, −cA). Returns (ℓ, ∂ℓ/∂logp):
    −A ∂ρ where the branch taken passes the ratio unclipped and uncapped, else 0. (Without a cap the
    clipped branch wins strictly only where the clip binds, and there it has no gradient; on a tie
    both branches have the same gradient. A tie with the dual-clip cap, ρ = c exactly, takes the
    uncapped branch's gradient where autograd would take half of it.)
    """
    neg_adv = -advantages
    unclipped = neg_adv * ratio
    clipped = neg_adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    if ratio_cap is None:
        loss = torch.maximum(unclipped, clipped)
        grad = (neg_adv * dratio).mul_(clipped <= unclipped)
    else:  # the capped branch may lose to an unclipped ratio inside [1 − clip_low, 1 + clip_high]
        unclipped = neg_adv * ratio.clamp(max=ratio_cap)
        loss = torch.maximum(unclipped, clipped)
        inside = (ratio >= 1 - clip_low) & (ratio <= 1 + clip_high)
        grad = torch.where(clipped <= unclipped, neg_adv * dratio * (ratio <= ratio_cap), neg_adv * dratio * inside)
    if dual_clip is not None:
        cap = neg_adv * dual_clip
        dual = (advantages < 0) & (cap < loss)
        loss = torch.where(dual, cap, loss)
        grad.mul_(~dual)
    return loss, grad


def policy_loss(
    mode: str,
    ratio: Ratio,
    logp: Tensor,
    advantages: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    ratio_cap: float | None = None,
    cispo_cap: float | None = None,
) -> tuple[Tensor, Tensor, bool]:
    """Per-token policy loss for `mode` on `ratio` (`policy_ratio`); returns (ℓ, g, spread) [B, T].

    g is ∂ℓ_t/∂lp_t, or, when `spread`, ∂ℓ_t/∂log s_i to be passed through the row mean.
    ppo_clip and gspo (arXiv:2507.18071): the clipped surrogate (dual clip, ratio cap). cispo
    (arXiv:2506.13585): −sg(ŵ) A logp with ŵ = clip(ρ, 1 − clip_low, 1 + clip_high), or min(ρ, cispo_cap)
    (TRL: an absolute cap, no floor). reinforce: −Aρ (the seed's surrogate (5)).
    """
    if mode in ("ppo_clip", "gspo"):
        loss, grad = clipped_surrogate(ratio.value, ratio.grad, advantages, clip_low, clip_high, dual_clip, ratio_cap)
        return loss, grad, ratio.spread
    if mode == "cispo":
        if cispo_cap is None:
            weight = ratio.value.clamp(1 - clip_low, 1 + clip_high)
        else:
            weight = ratio.value.clamp(max=cispo_cap)
        return -weight * advantages * logp, -weight * advantages, False
    if mode == "reinforce":
        return -advantages * ratio.value, -advantages * ratio.grad, ratio.spread
    raise ValueError(f"unknown policy loss mode {mode!r}; valid: {', '.join(POLICY_LOSS_MODES)}")


KL_IS_WEIGHT_CAP = 10.0  # OpenRLHF's KL_IS_WEIGHT_CLIP: bound on w of the unbiased KL gradient


def kl_loss(
    logp: Tensor,
    ref: Tensor,
    estimator: str,
    clamp: float | None,
    *,
    old: Tensor | None = None,
    unbiased_gradient: bool = False,
    ratio: Ratio | None = None,
    gradient_estimator: str | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-token KL loss ℓ [B, T] of logp vs ref with its gradient: (ℓ, g, g_spread).

    ℓ = kl_t (`functional.kl`, with `clamp`); g = ∂ℓ_t/∂lp_t. Variants:
    * `gradient_estimator` (straight-through, verl's "k3+" = k3 with gradient_estimator "k2"): the
      value stays, the gradient is that of `gradient_estimator`'s estimate, unclamped (verl's
      backward_score − sg(backward_score) + sg(forward_score)).
    * `unbiased_gradient` (OpenRLHF `algo.kl.unbiased_gradient`): the value stays, the gradient is
      w (lp − ref) with w = sg(min(e^{lp − old}, 10)) for every estimator, no clamp on it.
    * `ratio` (TRL `use_bias_correction_kl`): ℓ = kl_t · ρ_t with the policy's ratio, differentiable:
      g = ρ ∂kl + kl ∂ρ; when the ratio spreads (a sequence ratio through the mean) the kl ∂ρ part is
      returned as g_spread, to be weighted and passed to `spread_over_row` by the caller.
    """
    value, grad = kl_and_grad(logp, ref, estimator, clamp)
    if gradient_estimator is not None:
        grad = kl_and_grad(logp, ref, gradient_estimator, None)[1]
    if unbiased_gradient:
        grad = (logp - old).exp().clamp(max=KL_IS_WEIGHT_CAP) * (logp - ref)
    if ratio is None:
        return value, grad, None
    through_ratio = value * ratio.grad
    grad = grad * ratio.value
    if ratio.spread:
        return value * ratio.value, grad, through_ratio
    return value * ratio.value, grad + through_ratio, None


VALUE_CLIP_FORMS = ("bounds", "delta")


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None,
               clip_ties: str = "pass", clip_form: str = "bounds") -> tuple[Tensor, Tensor, Tensor | None]:
    """½ max((v − G)², (v_c − G)²) per token, its gradient in v, and where the clipped branch is the
    larger (the clip fraction's numerator; None without a clip), all [B, T].

    `clip` None: ½ (v − G)². `clip_form`, how the clipped value v_c is computed: "bounds"
    clip(v, v_old − c, v_old + c) (verl, TRL); "delta" v_old + clip(v − v_old, −c, c) (OpenRLHF), whose
    rounding differs: v − v_old may exceed c by an ulp where v_c still equals v, a tie of the outer
    max that torch.max splits while the clamp passes no gradient (OpenRLHF's dL/dv is then half of
    v − G). `clip_ties`: the gradient the clip passes where v (bounds) or v − v_old (delta) sits exactly
    on a bound: "pass" all of it (torch.clamp), "split" half at each tied min/max, as verl's
    max(min(v, v_old + c), v_old − c) under autograd (with the tied outer max: ¾ (v − G) there).
    """
    unclipped = (values - returns).square()
    d_unclipped = values - returns
    if clip is None:
        return 0.5 * unclipped, d_unclipped, None
    if clip_form == "delta":
        x, low, high = values - old_values, torch.full_like(values, -clip), torch.full_like(values, clip)
    elif clip_form == "bounds":
        x, low, high = values, old_values - clip, old_values + clip
    else:
        raise ValueError(f"unknown value clip form {clip_form!r}; valid: {', '.join(VALUE_CLIP_FORMS)}")
    capped = torch.minimum(x, high)
    clipped_x = torch.maximum(capped, low)
    if clip_ties == "split":
        passes = _tie_split(x, high, below=True) * _tie_split(capped, low, below=False)
    else:
        passes = ((x >= low) & (x <= high)).to(values.dtype)
    clipped_v = old_values + clipped_x if clip_form == "delta" else clipped_x
    clipped = (clipped_v - returns).square()
    d_clipped = (clipped_v - returns) * passes
    loss = 0.5 * torch.maximum(unclipped, clipped)
    return loss, _maximum_grad(unclipped, clipped, d_unclipped, d_clipped), clipped > unclipped
