"""Masked reductions, whitening, reward placement and loss-aggregation weights."""

from __future__ import annotations

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def is_right_padded(mask: Tensor) -> bool:
    """True when every row of `mask` [B, T] (bool) is a prefix of ones: no interior gaps."""
    if mask.shape[1] < 2:
        return True
    as_bytes = mask.view(torch.int8)
    return int(torch.sub(as_bytes[:, 1:], as_bytes[:, :-1]).max()) <= 0  # +1 marks a 0 followed by a 1


def last_valid_index(mask: Tensor) -> Tensor:
    """Index of the last True of each row of `mask` [B, T] (bool) -> [B] long; -1 for empty rows."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(dim=1)


def place_on_last_token(rewards: Tensor, mask: Tensor) -> Tensor:
    """Token rewards [B, T]: `rewards` [B] on each row's last valid token of `mask` [B, T], 0 elsewhere.

    Rows without a valid token get no reward token.
    """
    token_rewards = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    last = last_valid_index(mask)
    rows = torch.nonzero(last >= 0).squeeze(1)
    token_rewards[rows, last[rows]] = rewards[rows]
    return token_rewards


def masked_moments(x: Tensor, mask: Tensor, n: int) -> dict[str, float]:
    """mean, population std, min and max of `x` [B, T] over the `n` True positions of `mask` (0s if none).

    `x` must be 0 where the mask is False (the engine's invariant): then sums need no masking, and
    min/max need it only when 0 is an extreme and padding exists. Three reads, no copies.
    """
    if n == 0:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
    flat = x.reshape(-1)
    mean = float(flat.sum()) / n
    var = max(float(torch.dot(flat, flat)) / n - mean * mean, 0.0)
    low, high = (float(v) for v in torch.aminmax(flat))
    if n < mask.numel() and (low == 0.0 or high == 0.0):  # 0 may come from padding only
        low = float(torch.where(mask, x, torch.inf).amin())
        high = float(torch.where(mask, x, -torch.inf).amax())
    return {"mean": mean, "std": var**0.5, "min": low, "max": high}


WHITEN_EPS_MODES = ("inside", "floor", "outside")


def whiten(x: Tensor, valid: Tensor, *, ddof: int, eps: float, eps_mode: str = "inside", use_std: bool = True) -> Tensor:
    """Batch whitening over all valid positions: (x − μ) / d, 0 at masked positions.

    x [B, T] (0 at masked positions), valid [B, T] the 0/1 mask in x's dtype; or x [B] and valid [B]
    to whiten one value per sequence. μ and σ² are taken over every valid position (token-weighted),
    σ² with `ddof` (0: population, 1: unbiased; a single value has σ² = 0). The scale d by
    `eps_mode`: "inside" sqrt(σ² + eps) (verl), "floor" sqrt(max(σ², eps)) (OpenRLHF),
    "outside" σ + eps (TRL). `use_std` False: d = 1, only the mean is subtracted (OpenRLHF's
    no_std_norm). When d == 0 (all values equal, eps 0) the result is 0.
    """
    n = valid.sum()
    mean = x.sum() / n.clamp_min(1)
    centered = (x - mean).mul_(valid)
    if not use_std:
        return centered
    flat = centered.reshape(-1)
    var = torch.dot(flat, flat) / (n - ddof).clamp_min(1)
    if eps_mode == "inside":
        denom = (var + eps).sqrt()
    elif eps_mode == "floor":
        denom = var.clamp_min(eps).sqrt()
    elif eps_mode == "outside":
        denom = var.sqrt() + eps
    else:
        raise ValueError(f"unknown whitening eps_mode {eps_mode!r}; valid: {', '.join(WHITEN_EPS_MODES)}")
    return centered / denom if bool(denom > 0) else torch.zeros_like(centered)


def aggregation_weights(
    valid: Tensor,
    lengths: Tensor,
    agg: str,
    *,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
    loss_scale_factor: float | None = None,
    seq_denominator: str = "nonempty",
) -> Tensor:
    """Weight w [B, T] of each token's loss so that the aggregated loss is Σ_t w_t ℓ_t.

    valid [B, T]: the 0/1 mask in the compute dtype; lengths [B]: valid tokens per row, same dtype.
    N = `num_tokens` (default Σ L_i), S = `num_sequences` (default: rows with L_i > 0, or all B rows
    with `seq_denominator` "all"), C = `loss_scale_factor` (default: the padded width T).

    token-mean: m/N · token-sum: m · seq-mean-token-mean: m/(S·L_i) · seq-mean-token-sum: m/S ·
    seq-mean-token-sum-norm: m/(S·C).
    """
    if agg == "token-mean":
        n = max(float(lengths.sum()), 1.0) if num_tokens is None else float(num_tokens)
        return valid / n
    if agg == "token-sum":
        return valid
    if num_sequences is not None:
        s = float(num_sequences)
    else:
        s = max(float(lengths.numel() if seq_denominator == "all" else (lengths > 0).sum()), 1.0)
    if agg == "seq-mean-token-mean":
        return valid / (s * lengths.clamp_min(1)).unsqueeze(1)
    if agg == "seq-mean-token-sum":
        return valid / s
    if agg == "seq-mean-token-sum-norm":
        c = float(valid.shape[1]) if loss_scale_factor is None else float(loss_scale_factor)
        return valid / (s * c)
    raise ValueError(f"unknown aggregation mode {agg!r}; valid: {', '.join(AGG_MODES)}")
