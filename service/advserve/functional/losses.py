"""Per-token policy and value losses with their analytic gradients.

Each function returns the per-token loss ℓ [B, T] and ∂ℓ/∂input [B, T]; the caller aggregates with
weights w (`masks.aggregation_weights`): loss = Σ w ℓ, gradient = w · ∂ℓ. Where a branch is chosen by
max/min, the gradient follows torch's rule (the chosen branch; half each on an exact tie), so the
result equals torch autograd of the same expression.
"""

from __future__ import annotations

import torch
from torch import Tensor

POLICY_LOSS_MODES = ("ppo_clip", "gspo", "cispo", "reinforce")


def _maximum_grad(a: Tensor, b: Tensor, da: Tensor, db: Tensor) -> Tensor:
    """Gradient of torch.maximum(a, b) given the gradients of a and b."""
    return torch.where(a > b, da, torch.where(b > a, db, 0.5 * (da + db)))


def _clamped(x: Tensor, low: float | None, high: float | None) -> tuple[Tensor, Tensor]:
    """(clamp(x, low, high), 1 where the clamp passes the gradient else 0)."""
    if low is None and high is None:
        return x, torch.ones_like(x)
    passes = torch.ones_like(x, dtype=torch.bool)
    if low is not None:
        passes &= x >= low
    if high is not None:
        passes &= x <= high
    return x.clamp(low, high), passes.to(x.dtype)


def importance_ratio(logp: Tensor, old: Tensor, log_clamp: float | None) -> tuple[Tensor, Tensor]:
    """ρ = exp(clamp(logp − old, ±log_clamp)) and ∂ρ/∂logp, both [B, T]."""
    log_ratio, passes = _clamped(logp - old, -log_clamp if log_clamp is not None else None, log_clamp)
    ratio = log_ratio.exp()
    return ratio, ratio * passes


def clipped_surrogate(
    ratio: Tensor, dratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float, dual_clip: float | None
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate (with optional dual clip, arXiv:1912.09729) given ρ and ∂ρ/∂logp.

    ℓ = max(−Aρ, −A clip(ρ, 1 − clip_low, 1 + clip_high)); for A < 0 with dual clip c:
    ℓ = min(ℓ, −cA). Returns (ℓ, ∂ℓ/∂logp): −A ∂ρ where the unclipped branch is taken, else 0.
    (The clipped branch wins strictly only where the clip binds, and there it has no gradient; on a
    tie both branches have the same gradient. A tie with the dual-clip cap, ρ = c exactly, takes the
    uncapped branch's gradient where autograd would take half of it.)
    """
    neg_adv = -advantages
    unclipped = neg_adv * ratio
    clipped = neg_adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    grad = (neg_adv * dratio).mul_(clipped <= unclipped)
    if dual_clip is not None:
        cap = neg_adv * dual_clip
        capped = (advantages < 0) & (cap < loss)
        loss = torch.where(capped, cap, loss)
        grad.mul_(~capped)
    return loss, grad


def sequence_log_ratio(logp: Tensor, old: Tensor, mask: Tensor) -> Tensor:
    """GSPO's log s_i = mean over valid tokens of (logp − old), [B, T] -> [B] (0 for empty rows)."""
    lengths = mask.sum(dim=1).clamp_min(1)
    return torch.where(mask, logp - old, 0).sum(dim=1) / lengths


def policy_loss(
    mode: str,
    logp: Tensor,
    old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    ratio_clamp: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token policy loss for `mode`; returns (ℓ, ∂ℓ/∂logp, ρ) [B, T].

    ppo_clip: clipped surrogate on ρ = exp(logp − old). gspo (arXiv:2507.18071): the same on the
    token ratio sg(s_i)·exp(logp − sg(logp)), s_i = exp(mean_t(logp − old)), log clamped from above
    at `ratio_clamp`, no dual clip. cispo (arXiv:2506.13585): −sg(clip(ρ)) A logp. reinforce: −Aρ
    (the seed's surrogate (5)).
    """
    if mode == "gspo":
        log_s = sequence_log_ratio(logp, old, mask).unsqueeze(1).expand_as(logp)
        log_s, passes = _clamped(log_s, None, ratio_clamp)
        ratio = log_s.exp()
        loss, grad = clipped_surrogate(ratio, ratio * passes, advantages, clip_low, clip_high, None)
        return loss, grad, ratio
    ratio, dratio = importance_ratio(logp, old, ratio_clamp)
    if mode == "ppo_clip":
        loss, grad = clipped_surrogate(ratio, dratio, advantages, clip_low, clip_high, dual_clip)
    elif mode == "cispo":
        weight = ratio.clamp(1 - clip_low, 1 + clip_high)
        loss, grad = -weight * advantages * logp, -weight * advantages
    elif mode == "reinforce":
        loss, grad = -advantages * ratio, -advantages * dratio
    else:
        raise ValueError(f"unknown policy loss mode {mode!r}; valid: {', '.join(POLICY_LOSS_MODES)}")
    return loss, grad, ratio


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None) -> tuple[Tensor, Tensor]:
    """½ max((v − G)², (clip(v, v_old ± clip) − G)²) per token and its gradient in v, [B, T].

    `clip` None: ½ (v − G)².
    """
    unclipped = (values - returns).square()
    d_unclipped = values - returns
    if clip is None:
        return 0.5 * unclipped, d_unclipped
    low, high = old_values - clip, old_values + clip
    clipped_v = torch.maximum(torch.minimum(values, high), low)
    passes = ((values >= low) & (values <= high)).to(values.dtype)
    clipped = (clipped_v - returns).square()
    d_clipped = (clipped_v - returns) * passes
    loss = 0.5 * torch.maximum(unclipped, clipped)
    return loss, _maximum_grad(unclipped, clipped, d_unclipped, d_clipped)
