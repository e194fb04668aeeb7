"""Masked reductions, whitening, reward placement and loss-aggregation weights."""

from __future__ import annotations

from dataclasses import dataclass

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

    Rows without a valid token get no reward token. One scatter, no read of the device. Inside
    `scan.use_kernels("triton")`: `advserve.kernels.scan.place_on_last_token`, one launch, the same values.
    """
    from .scan import active_kernels  # here: scan imports this module

    if active_kernels() == "triton":
        from ..kernels import scan as fused
        return fused.place_on_last_token(rewards, mask)
    token_rewards = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    last = last_valid_index(mask)
    placed = torch.where(last >= 0, rewards, 0)  # an empty row writes the 0 already at its column 0
    return token_rewards.scatter_(1, last.clamp_min(0).unsqueeze(1), placed.unsqueeze(1))


def host_reads_are_free(device: torch.device) -> bool:
    """Whether reading a tensor's value on `device` costs no device synchronization (the CPU). Where it
    does (a GPU), the statistics and branches below are computed on the device instead of being chosen
    by a value read on the host."""
    return device.type == "cpu"


def masked_sums(x: Tensor, mask: Tensor, n: int | None) -> dict[str, Tensor]:
    """The reductions behind `moments` as 0-d tensors: sum and sum of squares of `x` [B, T] and its min
    and max over the True positions of `mask` (`masked_extremes`). `x` must be 0 where the mask is
    False (the engine's invariant): then sums need no masking. `n`: the count of True positions when
    known on the host, else None."""
    flat = x.reshape(-1)
    low, high = masked_extremes(x, mask, n)
    return {"sum": flat.sum(), "sumsq": torch.dot(flat, flat), "min": low, "max": high}


def masked_extremes(x: Tensor, mask: Tensor, n: int | None) -> tuple[Tensor, Tensor]:
    """(min, max) of `x` [B, T] over the True positions of `mask` as 0-d tensors (0 where there are none;
    `x` is 0 where the mask is False). Without padding: of all of x. On the CPU (reads are free, `n`
    known): masked only when 0 is an extreme and padding exists. Elsewhere nothing is read on the host:
    always masked on the device, one valid value put in place of the padding (one more pass over x)."""
    flat = x.reshape(-1)
    if flat.numel() == 0:
        return flat.new_zeros(()), flat.new_zeros(())
    if n == mask.numel():
        return torch.aminmax(flat)
    if n is not None and host_reads_are_free(x.device):
        low, high = torch.aminmax(flat)
        if n and (low == 0.0 or high == 0.0):  # 0 may come from padding only
            low = torch.where(mask, x, torch.inf).amin()
            high = torch.where(mask, x, -torch.inf).amax()
        return low, high
    first = mask.reshape(-1).view(torch.uint8).argmax().reshape(1)  # a tensor index: not read on the host
    some_valid = flat.index_select(0, first)  # [1]: the first valid value (x[0] if none)
    return torch.aminmax(torch.where(mask, x, some_valid))


def moments(sums: dict[str, float], n: int) -> dict[str, float]:
    """mean, population std, min and max over `n` positions from the host values of `masked_sums` (0s if
    n is 0)."""
    if n == 0:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
    mean = sums["sum"] / n
    var = max(sums["sumsq"] / n - mean * mean, 0.0)
    return {"mean": mean, "std": var**0.5, "min": sums["min"], "max": sums["max"]}


WHITEN_EPS_MODES = ("inside", "floor", "outside")


@dataclass(frozen=True)
class Whitening:
    """The form of a `whiten`: its keyword arguments ddof, eps, eps_mode and use_std."""

    ddof: int
    eps: float
    eps_mode: str = "inside"
    use_std: bool = True


def whiten(x: Tensor, valid: Tensor, *, ddof: int, eps: float, eps_mode: str = "inside", use_std: bool = True,
           statistics: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
    """Batch whitening over all valid positions: (x − μ) / d, 0 at masked positions.

    x [B, T] (0 at masked positions), valid [B, T] the 0/1 mask in x's dtype; or x [B] and valid [B]
    to whiten one value per sequence. μ and σ² are taken over every valid position (token-weighted),
    σ² with `ddof` (0: population, 1: unbiased; a single value has σ² = 0). The scale d by
    `eps_mode`: "inside" sqrt(σ² + eps) (verl), "floor" sqrt(max(σ², eps)) (OpenRLHF),
    "outside" σ + eps (TRL). `use_std` False: d = 1, only the mean is subtracted (OpenRLHF's
    no_std_norm). When d == 0 (all values equal, eps 0) the result is 0. `statistics`: (μ, d) given
    (`whitening_statistics` of a larger batch that x is a shard of; d None without `use_std`).
    Inside `scan.use_kernels("triton")`: `advserve.kernels.whiten`, the same values to rounding; inside
    `use_kernels("numba")`, for x [B, T] on the CPU: `advserve.kernels.cpu.whiten` (float64 row moments,
    the bits of the numba scan's own whitening), the same values to rounding.
    """
    from .scan import active_kernels  # here: scan imports this module

    if statistics is not None:
        mean, denom = statistics
        centered = (x - mean).mul_(valid)
    elif active_kernels() == "triton":
        from ..kernels import whiten as fused
        return fused.whiten(x, valid, ddof=ddof, eps=eps, eps_mode=eps_mode, use_std=use_std)
    elif active_kernels() == "numba" and x.dim() == 2 and x.device.type == "cpu":
        from ..kernels import cpu
        return cpu.whiten(x, valid != 0, Whitening(ddof, eps, eps_mode, use_std))
    else:
        mean, centered, denom = _whitening_moments(x, valid, ddof=ddof, eps=eps, eps_mode=eps_mode, use_std=use_std)
    if denom is None:
        return centered
    if host_reads_are_free(denom.device):
        return centered / denom if bool(denom > 0) else torch.zeros_like(centered)
    return torch.where(denom > 0, centered / denom, 0.0)  # on a GPU: no read of denom, one more pass


def whitening_statistics(x: Tensor, valid: Tensor, *, ddof: int, eps: float, eps_mode: str = "inside",
                         use_std: bool = True) -> tuple[Tensor, Tensor | None]:
    """(μ, d) of `whiten` over x and valid (0-d tensors; d None without `use_std`): what a shard of
    this batch is whitened with to get its rows of the whole batch's result."""
    mean, _, denom = _whitening_moments(x, valid, ddof=ddof, eps=eps, eps_mode=eps_mode, use_std=use_std)
    return mean, denom


def _whitening_moments(x: Tensor, valid: Tensor, *, ddof: int, eps: float, eps_mode: str,
                       use_std: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """μ, (x − μ)·valid and d (None without `use_std`), as `whiten` defines them. μ in two passes: the
    sum's mean, then the mean of what is left, so that an all-equal batch has its value as μ exactly
    (the first mean can be an ulp off, and whitening would blow that up to ±1) and whitens to 0."""
    n = valid.sum()
    count = n.clamp_min(1)
    mean = x.sum() / count
    mean = mean + ((x - mean) * valid).sum() / count
    centered = (x - mean).mul_(valid)
    if not use_std:
        return mean, centered, None
    flat = centered.reshape(-1)
    var = torch.dot(flat, flat) / (n - ddof).clamp_min(1)
    return mean, centered, whitening_scale(var, eps=eps, eps_mode=eps_mode)


def whitening_scale(var: Tensor, *, eps: float, eps_mode: str) -> Tensor:
    """`whiten`'s scale d from the variance σ² (a 0-d tensor, in its dtype): sqrt(σ² + eps) "inside",
    sqrt(max(σ², eps)) "floor", σ + eps "outside"."""
    if eps_mode == "inside":
        return (var + eps).sqrt()
    if eps_mode == "floor":
        return var.clamp_min(eps).sqrt()
    if eps_mode == "outside":
        return var.sqrt() + eps
    raise ValueError(f"unknown whitening eps_mode {eps_mode!r}; valid: {', '.join(WHITEN_EPS_MODES)}")


def aggregation_weights(
    valid: Tensor,
    lengths: Tensor,
    agg: str,
    *,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
    loss_scale_factor: float | None = None,
    seq_denominator: str = "nonempty",
    dp_size: int = 1,
) -> Tensor:
    """Weight w [B, T] of each token's loss so that the aggregated loss is Σ_t w_t ℓ_t.

    valid [B, T]: the 0/1 mask in the compute dtype; lengths [B]: valid tokens per row, same dtype.
    N = `num_tokens` (default Σ L_i), S = `num_sequences` (default: rows with L_i > 0, or all B rows
    with `seq_denominator` "all"), C = `loss_scale_factor` (default: the padded width T), D = `dp_size`
    (verl's agg_loss: data-parallel ranks whose gradients are averaged, so each rank's loss is × D).

    token-mean: D·m/N · token-sum: D·m · seq-mean-token-mean: D·m/(S·L_i) · seq-mean-token-sum: D·m/S ·
    seq-mean-token-sum-norm: D·m/(S·C).
    """
    w = _aggregation_weights(valid, lengths, agg, num_tokens, num_sequences, loss_scale_factor, seq_denominator)
    return w if dp_size == 1 else w * dp_size


def _aggregation_weights(valid: Tensor, lengths: Tensor, agg: str, num_tokens: float | None,
                         num_sequences: float | None, loss_scale_factor: float | None, seq_denominator: str) -> Tensor:
    """`aggregation_weights` with D = 1."""
    on_device = not host_reads_are_free(valid.device)  # counts from the device stay 0-d tensors there
    if agg == "token-mean":
        if num_tokens is None and on_device:
            return valid / lengths.sum().clamp_min(1.0)
        n = max(float(lengths.sum()), 1.0) if num_tokens is None else float(num_tokens)
        return valid / n
    if agg == "token-sum":
        return valid
    if num_sequences is not None:
        s = float(num_sequences)
    elif seq_denominator == "all":
        s = max(float(lengths.numel()), 1.0)
    elif on_device:  # a 0-d count in the dtype the kernels compute in, as a Python number is used there
        return _seq_weights_on_device(valid, lengths, agg, (lengths > 0).sum().clamp_min(1), loss_scale_factor)
    else:
        s = max(float((lengths > 0).sum()), 1.0)
    if agg == "seq-mean-token-mean":
        return valid / (s * lengths.clamp_min(1)).unsqueeze(1)
    if agg == "seq-mean-token-sum":
        return valid / s
    if agg == "seq-mean-token-sum-norm":
        c = float(valid.shape[1]) if loss_scale_factor is None else float(loss_scale_factor)
        return valid / (s * c)
    raise ValueError(f"unknown aggregation mode {agg!r}; valid: {', '.join(AGG_MODES)}")


def _seq_weights_on_device(valid: Tensor, lengths: Tensor, agg: str, s: Tensor,
                           loss_scale_factor: float | None) -> Tensor:
    """`aggregation_weights`' sequence modes with S a 0-d integer tensor on the device: computed in the
    precision a Python S gets (float32 for half types, else the dtype itself), then rounded to the dtype."""
    compute = torch.promote_types(valid.dtype, torch.float32)
    if agg == "seq-mean-token-mean":
        return valid / (lengths.clamp_min(1).to(compute) * s).to(lengths.dtype).unsqueeze(1)
    if agg == "seq-mean-token-sum":
        return (valid.to(compute) / s).to(valid.dtype)
    if agg == "seq-mean-token-sum-norm":
        c = float(valid.shape[1]) if loss_scale_factor is None else float(loss_scale_factor)
        return (valid.to(compute) / (s.to(torch.float64) * c)).to(valid.dtype)
    raise ValueError(f"unknown aggregation mode {agg!r}; valid: {', '.join(AGG_MODES)}")
