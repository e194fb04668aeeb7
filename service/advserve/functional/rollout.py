"""Importance weights correcting for the rollout engine's policy (π_old / π_rollout), as verl, TRL and
OpenRLHF apply them to the policy loss. Pure torch, no autograd: the weights are detached.

A *unit* is a token (`level` "token") or a sequence ("sequence": the product of the token ratios,
i.e. the sum of log-ratios; "sequence_mean": the geometric mean, i.e. the mean log-ratio). A gate
reads one statistic per unit (`gating`): the ratio itself, or a divergence between the two
policies' probabilities of the sampled token (OpenRLHF's "binary_kl" and "tv"; summed or meaned
over a sequence like the log-ratio). "truncate" clamps the unit's ratio into [low, high];
"mask" zeroes units outside [low, high] and gives survivors the unit's ratio (`weight` "unit") or
their own token ratio ("token", OpenRLHF).
"""

from __future__ import annotations

import torch
from torch import Tensor

ROLLOUT_LEVELS = ("token", "sequence", "sequence_mean")
ROLLOUT_GATINGS = ("ratio", "binary_kl", "tv")
ROLLOUT_WEIGHTS = ("unit", "token")
PROBABILITY_BOUND = 1e-6  # OpenRLHF clamps both probabilities to [1e-6, 1 − 1e-6] for the divergences


def _exp(log_w: Tensor, log_clamp: float | None) -> Tensor:
    return (log_w if log_clamp is None else log_w.clamp(-log_clamp, log_clamp)).exp()


def _per_unit(x: Tensor, mask: Tensor, level: str, lengths: Tensor | None) -> Tensor:
    """x [B, T] (0 at masked positions) per token, or its row sum / row mean on every position."""
    if level == "token":
        return x
    total = x.sum(dim=1, keepdim=True)
    if level == "sequence_mean":
        counts = mask.sum(dim=1) if lengths is None else lengths
        total = total / counts.to(x.dtype).clamp_min(1).unsqueeze(1)
    return total.expand_as(x)


def divergence(old: Tensor, rollout: Tensor, gating: str) -> Tensor:
    """Per-token divergence of the sampled token's probability, p = e^rollout vs q = e^old, both
    clamped to [1e-6, 1 − 1e-6]: binary_kl = p log(p/q) + (1 − p) log((1 − p)/(1 − q)), tv = |p − q|."""
    p = rollout.exp().clamp(PROBABILITY_BOUND, 1 - PROBABILITY_BOUND)
    q = old.exp().clamp(PROBABILITY_BOUND, 1 - PROBABILITY_BOUND)
    if gating == "binary_kl":
        return p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    if gating == "tv":
        return (p - q).abs()
    raise ValueError(f"unknown gating {gating!r}; valid: {', '.join(ROLLOUT_GATINGS)}")


def rollout_weights(
    old: Tensor,
    rollout: Tensor,
    mask: Tensor,
    *,
    level: str,
    mode: str,
    low: float | None,
    high: float | None,
    log_clamp: float | None,
    gating: str = "ratio",
    weight: str = "unit",
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(w, outside), both [B, T]: the weight multiplying each token's policy loss (0 at masked
    positions) and where a valid token's unit fell outside [low, high].

    old, rollout [B, T] log-probs, mask [B, T] bool, lengths [B] valid tokens per row (if known). Log-ratios d_t = old_t − rollout_t; a unit's
    ratio is exp(clamp(Σ d or mean d or d_t, ±log_clamp)) (`log_clamp` None: no clamp).
    truncate (gating "ratio"): w = clamp(ratio, low, high). mask: w = 1[low ≤ stat ≤ high] · (the
    unit's ratio, or exp(clamp(d_t, ±log_clamp)) with `weight` "token"); a bound of None is no bound.
    """
    log_w = torch.where(mask, old - rollout, 0)
    if gating == "ratio":
        stat = _exp(_per_unit(log_w, mask, level, lengths), log_clamp)
    else:
        stat = _per_unit(torch.where(mask, divergence(old, rollout, gating), 0), mask, level, lengths)
    keep = torch.ones_like(mask)
    if high is not None:
        keep &= stat <= high
    if low is not None:
        keep &= stat >= low
    if mode == "truncate":
        w = stat if low is None and high is None else stat.clamp(low, high)
    elif mode == "mask":
        w = torch.where(keep, _exp(log_w, log_clamp) if weight == "token" else stat, 0)
    else:
        raise ValueError(f"unknown rollout correction mode {mode!r}; valid: truncate, mask")
    return torch.where(mask, w, 0), ~keep & mask
