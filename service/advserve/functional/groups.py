"""Group (per-prompt) statistics as segment reductions, and the group-baseline advantages.

`group_index` [B] long holds each response's group in [0, G); groups may be scattered through the
batch and of any size. Every statistic is one `index_add_`/`scatter_reduce_` over [B]: no loop over
groups.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .scan import active_kernels

SINGLETON_POLICIES = ("zero", "raw", "error")
STD_SCOPES = ("group", "batch")


@dataclass(frozen=True)
class Groups:
    """Group membership of a batch: `index` [B] long in [0, count), `sizes` [count] long; `ordered`:
    its `layout` when computed already (on the host, with the index)."""

    index: Tensor
    count: int
    sizes: Tensor
    ordered: tuple[Tensor, Tensor] | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def from_index(index: Tensor) -> "Groups":
        count = int(index.max()) + 1 if index.numel() else 0
        sizes = torch.bincount(index, minlength=count)
        return Groups(index=index, count=count, sizes=sizes)

    def sum(self, x: Tensor) -> Tensor:
        """Per-group sum of x [B] -> [G]."""
        return x.new_zeros(self.count).index_add_(0, self.index, x)

    def mean(self, x: Tensor) -> Tensor:
        """Per-group mean of x [B] -> [G]."""
        return self.sum(x) / self.sizes.to(x.dtype)

    @functools.cached_property
    def layout(self) -> tuple[Tensor, Tensor]:
        """(order [B], starts [G]): the rows sorted by group (a stable sort: each group's members in row
        order), and each group's first entry in `order`; computed once per `Groups` (the Triton kernels
        of an estimator and of its statistics share it)."""
        if self.ordered is not None:
            return self.ordered
        order = torch.argsort(self.index, stable=True)
        return order, torch.cumsum(self.sizes, 0) - self.sizes

    def is_constant(self, x: Tensor) -> Tensor:
        """[G] bool: every member of the group has exactly the same value of x [B]."""
        hi = x.new_full((self.count,), -torch.inf).scatter_reduce_(0, self.index, x, "amax")
        lo = x.new_full((self.count,), torch.inf).scatter_reduce_(0, self.index, x, "amin")
        return hi == lo


def centered_scores(scores: Tensor, groups: Groups) -> tuple[Tensor, Tensor]:
    """(R − mean_g R) [B] and the group means [G]; exactly 0 for groups whose scores are all equal.

    The exact zero matters: a mean with one ulp of rounding divided by a tiny std would otherwise
    turn "no learning signal" into an O(1) advantage.
    """
    mean = groups.mean(scores)
    centered = scores - mean[groups.index]
    return torch.where(groups.is_constant(scores)[groups.index], 0, centered), mean


def group_std(centered: Tensor, groups: Groups, ddof: int) -> Tensor:
    """Per-group std [G] of scores given their centered values [B]; `ddof` 0 population, 1 unbiased.

    Groups with size <= ddof get std 0.
    """
    n = groups.sizes.to(centered.dtype)
    var = groups.sum(centered.square()) / (n - ddof).clamp_min(1)
    return torch.where(n > ddof, var.sqrt(), 0)


def batch_score_std(scores: Tensor, ddof: int) -> Tensor:
    """The std of all B scores [B] -> 0-d, with `ddof` (TRL's scale_rewards="batch"); a single score
    has std 0."""
    deviation = scores - scores.mean()
    return (torch.dot(deviation, deviation) / max(scores.shape[0] - ddof, 1)).sqrt()


def group_std_divisor(scores: Tensor, centered: Tensor, groups: Groups, *, std_ddof: int, std_eps: float,
                      std_scope: str = "group", batch_std: Tensor | None = None) -> Tensor:
    """GRPO's divisor per group [G]: std_g(R; std_ddof) + std_eps, or with `std_scope` "batch" (TRL's
    scale_rewards="batch") the std of all B scores + std_eps for every group (`batch_std`: that std
    given, when these scores are a shard of a larger batch). scores, centered [B]."""
    if std_scope == "batch":
        std = batch_score_std(scores, std_ddof) if batch_std is None else batch_std
        return std.expand(groups.count) + std_eps
    if std_scope == "group":
        return group_std(centered, groups, std_ddof) + std_eps
    raise ValueError(f"unknown std_scope {std_scope!r}; valid: {', '.join(STD_SCOPES)}")


def group_normalized_advantages(
    scores: Tensor,
    groups: Groups,
    *,
    scale_by_std: bool,
    std_ddof: int,
    std_eps: float,
    singleton_groups: str,
    std_scope: str = "group",
    batch_std: Tensor | None = None,
) -> Tensor:
    """GRPO: (R_i − mean_g R) / (std_g R + eps); Dr.GRPO (`scale_by_std`=False): R_i − mean_g R.

    scores [B] -> [B]. A group whose scores are all equal gives 0 (std 0, the seed's undefined case).
    `std_scope` "batch" (TRL's scale_rewards="batch"): the std is that of all B scores (with
    `std_ddof`; `batch_std`: given, when the scores are a shard of a larger batch), the mean stays the
    group's. Size-1 groups follow `singleton_groups`: "zero" -> 0;
    "raw" -> mean 0 and std 1 (verl), i.e. R/(1 + eps) (R for Dr.GRPO); "error" is checked by the caller.
    Inside `scan.use_kernels("triton")`: `advserve.kernels.groups`' kernel, the same values to rounding.
    """
    if active_kernels() == "triton":
        from ..kernels import groups as fused
        return fused.group_normalized_advantages(scores, groups, scale_by_std=scale_by_std, std_ddof=std_ddof,
                                                 std_eps=std_eps, singleton_groups=singleton_groups,
                                                 std_scope=std_scope, batch_std=batch_std)
    centered, _ = centered_scores(scores, groups)
    if scale_by_std:
        denom = group_std_divisor(scores, centered, groups, std_ddof=std_ddof, std_eps=std_eps,
                                  std_scope=std_scope, batch_std=batch_std)[groups.index]
        advantages = torch.where(denom > 0, centered / torch.where(denom > 0, denom, 1), 0)
    else:
        advantages = centered
    raw_divisor = verl_raw_divisor(std_eps) if scale_by_std else 1.0
    return _apply_singleton_policy(advantages, scores, groups, singleton_groups, raw_divisor)


def verl_raw_divisor(std_eps: float) -> float:
    """A singleton group's divisor under singleton_groups "raw": verl's std = torch.tensor(1.0) plus eps,
    1 + eps rounded to float32 (float32(1) + float32(eps), as torch adds a Python number to a float32
    tensor), computed on the host without a tensor."""
    return float(np.float32(1.0) + np.float32(std_eps))


def leave_one_out_advantages(scores: Tensor, groups: Groups, *, singleton_groups: str) -> Tensor:
    """RLOO: R_i − mean_{l≠i, l∈g} R_l = M/(M−1) · (R_i − mean_g R), scores [B] -> [B].

    Size-1 groups follow `singleton_groups` ("raw": R, as verl; "zero": 0). Inside
    `scan.use_kernels("triton")`: `advserve.kernels.groups`' kernel, the same values to rounding.
    """
    if active_kernels() == "triton":
        from ..kernels import groups as fused
        return fused.leave_one_out_advantages(scores, groups, singleton_groups=singleton_groups)
    n = groups.sizes.to(scores.dtype)[groups.index]
    others_mean = (groups.sum(scores)[groups.index] - scores) / (n - 1).clamp_min(1)
    advantages = torch.where(groups.is_constant(scores)[groups.index], 0, scores - others_mean)
    return _apply_singleton_policy(advantages, scores, groups, singleton_groups, 1.0)


def _apply_singleton_policy(advantages: Tensor, scores: Tensor, groups: Groups, policy: str, raw_divisor: float) -> Tensor:
    if policy not in SINGLETON_POLICIES:
        raise ValueError(f"unknown singleton_groups policy {policy!r}")
    singleton = groups.sizes[groups.index] == 1
    replacement = scores / raw_divisor if policy == "raw" else torch.zeros_like(scores)
    return torch.where(singleton, replacement, advantages)
