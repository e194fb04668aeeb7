"""Group-baseline advantages as one Triton kernel: one program per group, over its members.

The members of each group are found through `order`, the batch's rows sorted by group (a stable
argsort of the group index, so groups may be scattered through the batch and of any size), and
`starts`, each group's first entry in `order`. A program reads its group's scores in blocks of
`GROUP_BLOCK`: once for the sum, the minimum and the maximum, once more for Σ (R − mean)² when the
std is needed, and once to write each member's advantage. Every reduction runs in a fixed order that
depends only on the group's own members (in row order), so the result does not change from run to
run (an atomic scatter-add's does) nor with the other rows of the batch.

Formulas (those of `advserve.functional.groups`, which stays the reference and the CPU path), for a
group g of M members with scores R:
  * GRPO (`group_normalized_advantages`): (R_i − mean_g R) / d_g with d_g = std_g(R; ddof) + eps
    (std_scope "group": std 0 when M <= ddof) or the std of all B scores + eps ("batch"); 0 where
    d_g = 0; without `scale_by_std` (Dr. GRPO) R_i − mean_g R.
  * RLOO (`leave_one_out_advantages`): R_i − (Σ_g R − R_i) / max(M − 1, 1).
  * A group whose scores are all equal gives exactly 0. A group of one follows `singleton_groups`:
    "raw" → R / raw_divisor (GRPO) or R (RLOO), "zero" (and "error", checked by the caller) → 0.
Inputs and outputs are [B] float32/float64 on a CUDA device, or on the CPU under Triton's
interpreter (TRITON_INTERPRET=1, read when this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..functional.groups import SINGLETON_POLICIES, STD_SCOPES, Groups, group_std_divisor, verl_raw_divisor

# members read at once by one program: a constant, so a group's sums are associated the same way
# whatever else is in the batch (coalesced requests get the bits they get alone)
GROUP_BLOCK = 64


@triton.jit
def _div(x, y, F32: tl.constexpr):
    """x / y rounded to nearest, as torch divides (Triton's plain float32 `/` may be approximate)."""
    if F32:
        return tl.div_rn(x, y)
    else:
        return x / y


@triton.jit
def _sqrt(x, F32: tl.constexpr):
    """√x rounded to nearest (Triton's float32 `tl.sqrt` may be approximate)."""
    if F32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _group_kernel(scores, order, starts, sizes, out, batch_divisor, eps: tl.float64, raw_divisor: tl.float64, ddof,
                  LOO: tl.constexpr, SCALE: tl.constexpr, BATCH_STD: tl.constexpr, RAW: tl.constexpr,
                  F32: tl.constexpr, BLOCK: tl.constexpr):
    group = tl.program_id(0)
    start = tl.load(starts + group)
    n = tl.load(sizes + group)
    dtype = out.dtype.element_ty
    idx = tl.arange(0, BLOCK)
    total = tl.zeros((), dtype)
    high = tl.full((), float("-inf"), dtype)
    low = tl.full((), float("inf"), dtype)
    for k in range(0, n, BLOCK):
        inside = k + idx < n
        x = tl.load(scores + tl.load(order + start + k + idx, mask=inside, other=0), mask=inside, other=0.0)
        total += tl.sum(x, axis=0)
        high = tl.maximum(high, tl.max(tl.where(inside, x, float("-inf")), axis=0))
        low = tl.minimum(low, tl.min(tl.where(inside, x, float("inf")), axis=0))
    count = n.to(dtype)
    constant = high == low
    mean = _div(total, count, F32)
    denom = tl.full((), 1.0, dtype)
    if SCALE and not LOO:
        if BATCH_STD:
            denom = tl.load(batch_divisor)
        else:
            squares = tl.zeros((), dtype)
            for k in range(0, n, BLOCK):
                inside = k + idx < n
                x = tl.load(scores + tl.load(order + start + k + idx, mask=inside, other=0), mask=inside, other=0.0)
                centered = tl.where(inside, x - mean, 0.0)  # a constant group's d_g is never used
                squares += tl.sum(centered * centered, axis=0)
            var = _div(squares, tl.maximum(count - ddof, 1.0), F32)
            denom = tl.where(count > ddof, _sqrt(var, F32), 0.0) + tl.full((), eps, dtype)
    for k in range(0, n, BLOCK):
        inside = k + idx < n
        member = tl.load(order + start + k + idx, mask=inside, other=0)
        x = tl.load(scores + member, mask=inside, other=0.0)
        if LOO:
            adv = x - _div(total - x, tl.maximum(count - 1.0, 1.0), F32)
        else:
            adv = x - mean
            if SCALE:
                adv = tl.where(denom > 0, _div(adv, tl.where(denom > 0, denom, 1.0), F32), 0.0)
        adv = tl.where(constant, 0.0, adv)
        if RAW:
            single = _div(x, tl.full((), raw_divisor, dtype), F32)
        else:
            single = tl.zeros((BLOCK,), dtype)
        tl.store(out + member, tl.where(n == 1, single, adv).to(dtype), mask=inside)


def _launch(scores: Tensor, groups: Groups, *, loo: bool, scale: bool, batch_divisor: Tensor | None, eps: float,
            raw_divisor: float, ddof: int, raw: bool) -> Tensor:
    scores = scores.contiguous()
    out = torch.empty_like(scores)
    if groups.count == 0 or scores.numel() == 0:
        return out
    order, starts = groups.layout
    divisor = batch_divisor if batch_divisor is not None else scores[:1]  # not read without BATCH_STD
    _group_kernel[(groups.count,)](scores, order, starts, groups.sizes, out, divisor, float(eps),
                                   float(raw_divisor), int(ddof), LOO=loo, SCALE=scale,
                                   BATCH_STD=batch_divisor is not None, RAW=raw,
                                   F32=scores.dtype == torch.float32, BLOCK=GROUP_BLOCK)
    return out


def _check(policy: str, scope: str) -> None:
    if policy not in SINGLETON_POLICIES:
        raise ValueError(f"unknown singleton_groups policy {policy!r}")
    if scope not in STD_SCOPES:
        raise ValueError(f"unknown std_scope {scope!r}; valid: {', '.join(STD_SCOPES)}")


def group_normalized_advantages(scores: Tensor, groups: Groups, *, scale_by_std: bool, std_ddof: int,
                                std_eps: float, singleton_groups: str, std_scope: str = "group",
                                batch_std: Tensor | None = None) -> Tensor:
    """[B]: `advserve.functional.groups.group_normalized_advantages` in one kernel launch (plus the
    stable sort of the group index, and for std_scope "batch" the batch's std in torch).

    scores [B] float32/float64, groups: `Groups` of the batch. (R_i − mean_g R) / (std_g R + eps),
    or R_i − mean_g R without `scale_by_std`; `batch_std` as in the torch function; see the module's
    docstring for the edge cases.
    """
    _check(singleton_groups, std_scope)
    batch_divisor = None
    if scale_by_std and std_scope == "batch":
        batch_divisor = group_std_divisor(scores, scores, groups, std_ddof=std_ddof, std_eps=std_eps,
                                          std_scope="batch", batch_std=batch_std)[:1].contiguous()
    raw_divisor = verl_raw_divisor(std_eps) if scale_by_std else 1.0
    return _launch(scores, groups, loo=False, scale=scale_by_std, batch_divisor=batch_divisor, eps=std_eps,
                   raw_divisor=raw_divisor, ddof=std_ddof, raw=singleton_groups == "raw")


def leave_one_out_advantages(scores: Tensor, groups: Groups, *, singleton_groups: str) -> Tensor:
    """[B]: `advserve.functional.groups.leave_one_out_advantages` in one kernel launch (plus the sort):
    R_i − (Σ_g R − R_i) / (M − 1); groups of one: R ("raw") or 0."""
    _check(singleton_groups, "group")
    return _launch(scores, groups, loo=True, scale=False, batch_divisor=None, eps=0.0, raw_divisor=1.0, ddof=0,
                   raw=singleton_groups == "raw")
