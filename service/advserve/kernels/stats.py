"""The statistics of an advantage response as two Triton kernels (`Engine.run_advantages` with kernels
"triton", for requests of at most `engine.FUSED_STATS_TOKENS` padded tokens): what a trainer logs, in two
launches instead of some thirty torch operations, the launch overhead a small request on a GPU would
otherwise pay (issue 14). The second kernel is one program looping over the blocks, scores and groups:
for a small request a few iterations, for a large one longer than torch's parallel reductions.

`advserve.engine.advantage_stats` is the reference (the torch path). For advantages A [B, T] (0 where the
mask is 0), the mask [B, T], the scores R [B] and, for group estimators, the groups (`Groups`: sizes
and `layout`, the members of each group in row order), the kernels write one float64 vector:

    [0] Σ A, [1] Σ A², [2] min A, [3] max A (over the valid positions; ±inf where there are none),
    [4] N, the valid positions,
    [5] mean R, [6] the population std of R (two passes: Σ R / B, then Σ (R − mean)² / B),
    and with groups: [7] min and [8] max of the group sizes, [9] the share of groups whose scores
    are all equal, [10 ...] each group's mean score (Σ_g R / M_g), G values.

Every sum is taken in float64 (the torch path sums A in its dtype: the figures agree to that rounding),
in an order that depends only on the shape: one program per block of ROWS rows, then one program
merging the blocks in order. A request's statistics are so the same bits alone and in a coalesced batch
(its own rows, its own launch). Inputs on a CUDA device, or on the CPU under Triton's interpreter
(TRITON_INTERPRET=1, read when this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..functional.groups import Groups
from .groups import GROUP_BLOCK

ROWS = 8  # rows per program of the first kernel
BLOCK_T = 512  # positions of a row read at once
FINISH_BLOCK = 256  # blocks, scores or groups read at once by the second kernel
HEAD = 10  # the vector's fixed entries before the group means


@triton.jit
def _no_moments():
    """(Σ, Σ², min, max, count) over no values, in float64."""
    zero = tl.zeros((), tl.float64)
    return zero, zero, tl.full((), float("inf"), tl.float64), tl.full((), float("-inf"), tl.float64), zero


@triton.jit
def _partials_kernel(adv, mask, adv_stride, mask_stride, B, T, scores, order, starts, sizes, G,
                     partials, group_partials, HAS_GROUPS: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_T: tl.constexpr, GROUP_BLOCK: tl.constexpr):
    """Program p: Σ A, Σ A², min, max and N over rows [p·ROWS, (p + 1)·ROWS), and with groups, for
    group p (if p < G): Σ R, min R and max R over its members."""
    pid = tl.program_id(0)
    if pid * ROWS < B:
        cols = tl.arange(0, BLOCK_T)
        total, squares, low, high, count = _no_moments()
        for r in range(ROWS):
            row = pid.to(tl.int64) * ROWS + r
            for start in range(0, T, BLOCK_T):
                inside = (start + cols < T) & (row < B)
                x = tl.load(adv + row * adv_stride + start + cols, mask=inside, other=0.0).to(tl.float64)
                valid = (tl.load(mask + row * mask_stride + start + cols, mask=inside, other=0) != 0) & inside
                total += tl.sum(x, axis=0)
                squares += tl.sum(x * x, axis=0)
                low = tl.minimum(low, tl.min(tl.where(valid, x, float("inf")), axis=0))
                high = tl.maximum(high, tl.max(tl.where(valid, x, float("-inf")), axis=0))
                count += tl.sum(valid.to(tl.float64), axis=0)  # exact below 2**53
        tl.store(partials + pid * 5, total)
        tl.store(partials + pid * 5 + 1, squares)
        tl.store(partials + pid * 5 + 2, low)
        tl.store(partials + pid * 5 + 3, high)
        tl.store(partials + pid * 5 + 4, count)
    if HAS_GROUPS:
        if pid < G:
            first = tl.load(starts + pid)
            n = tl.load(sizes + pid)
            members = tl.arange(0, GROUP_BLOCK)
            group_total = tl.zeros((), tl.float64)
            group_low = tl.full((), float("inf"), tl.float64)
            group_high = tl.full((), float("-inf"), tl.float64)
            for k in range(0, n, GROUP_BLOCK):
                inside = k + members < n
                member = tl.load(order + first + k + members, mask=inside, other=0)
                x = tl.load(scores + member, mask=inside, other=0.0).to(tl.float64)
                group_total += tl.sum(x, axis=0)
                group_low = tl.minimum(group_low, tl.min(tl.where(inside, x, float("inf")), axis=0))
                group_high = tl.maximum(group_high, tl.max(tl.where(inside, x, float("-inf")), axis=0))
            tl.store(group_partials + pid * 3, group_total)
            tl.store(group_partials + pid * 3 + 1, group_low)
            tl.store(group_partials + pid * 3 + 2, group_high)


@triton.jit
def _finish_kernel(partials, n_blocks, scores, B, sizes, group_partials, G, out, HAS_GROUPS: tl.constexpr,
                   BLOCK: tl.constexpr):
    """One program: the blocks merged in order, the scores' moments, the groups' summary and means."""
    idx = tl.arange(0, BLOCK)
    total, squares, low, high, count = _no_moments()
    for start in range(0, n_blocks, BLOCK):
        inside = start + idx < n_blocks
        at = (start + idx) * 5
        total += tl.sum(tl.load(partials + at, mask=inside, other=0.0), axis=0)
        squares += tl.sum(tl.load(partials + at + 1, mask=inside, other=0.0), axis=0)
        low = tl.minimum(low, tl.min(tl.load(partials + at + 2, mask=inside, other=float("inf")), axis=0))
        high = tl.maximum(high, tl.max(tl.load(partials + at + 3, mask=inside, other=float("-inf")), axis=0))
        count += tl.sum(tl.load(partials + at + 4, mask=inside, other=0.0), axis=0)
    tl.store(out, total)
    tl.store(out + 1, squares)
    tl.store(out + 2, low)
    tl.store(out + 3, high)
    tl.store(out + 4, count)
    score_total = tl.zeros((), tl.float64)
    for start in range(0, B, BLOCK):
        inside = start + idx < B
        score_total += tl.sum(tl.load(scores + start + idx, mask=inside, other=0.0).to(tl.float64), axis=0)
    mean = score_total / B
    score_squares = tl.zeros((), tl.float64)
    for start in range(0, B, BLOCK):
        inside = start + idx < B
        centered = tl.where(inside, tl.load(scores + start + idx, mask=inside, other=0.0).to(tl.float64) - mean, 0.0)
        score_squares += tl.sum(centered * centered, axis=0)
    tl.store(out + 5, mean)
    tl.store(out + 6, tl.sqrt(score_squares / B))  # float64: rounded to nearest
    if HAS_GROUPS:
        smallest = tl.full((), float("inf"), tl.float64)
        largest = tl.zeros((), tl.float64)
        constant = tl.zeros((), tl.float64)
        for start in range(0, G, BLOCK):
            inside = start + idx < G
            size = tl.load(sizes + start + idx, mask=inside, other=1).to(tl.float64)
            group_total = tl.load(group_partials + (start + idx) * 3, mask=inside, other=0.0)
            group_low = tl.load(group_partials + (start + idx) * 3 + 1, mask=inside, other=0.0)
            group_high = tl.load(group_partials + (start + idx) * 3 + 2, mask=inside, other=1.0)
            smallest = tl.minimum(smallest, tl.min(tl.where(inside, size, float("inf")), axis=0))
            largest = tl.maximum(largest, tl.max(tl.where(inside, size, 0.0), axis=0))
            constant += tl.sum((inside & (group_low == group_high)).to(tl.float64), axis=0)
            tl.store(out + 10 + start + idx, group_total / size, mask=inside)
        tl.store(out + 7, smallest)
        tl.store(out + 8, largest)
        tl.store(out + 9, constant / G)


def advantage_statistics(advantages: Tensor, mask: Tensor, scores: Tensor, groups: Groups | None) -> Tensor:
    """The float64 vector of the module's docstring ([HEAD + G], HEAD without groups' entries filled:
    [7:10] are then left unwritten) for advantages [B, T] (a row-strided view is fine), the bool mask
    [B, T], scores [B] and the batch's groups, in two kernel launches."""
    batch, width = advantages.shape
    if advantages.stride(1) != 1:
        advantages = advantages.contiguous()
    if mask.stride(1) != 1:
        mask = mask.contiguous()
    mask_bytes = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    scores = scores.contiguous()
    count = groups.count if groups is not None else 0
    out = torch.empty(HEAD + count, dtype=torch.float64, device=advantages.device)
    n_blocks = max(triton.cdiv(batch, ROWS), 1)
    partials = torch.empty(n_blocks * 5, dtype=torch.float64, device=advantages.device)
    group_partials = torch.empty(max(count, 1) * 3, dtype=torch.float64, device=advantages.device)
    if groups is not None:
        order, starts = groups.layout
        sizes = groups.sizes
    else:
        order = starts = sizes = scores  # not read without groups
    _partials_kernel[(max(n_blocks, count),)](
        advantages, mask_bytes, advantages.stride(0), mask_bytes.stride(0), batch, width, scores, order, starts,
        sizes, count, partials, group_partials, HAS_GROUPS=groups is not None, ROWS=ROWS, BLOCK_T=BLOCK_T,
        GROUP_BLOCK=GROUP_BLOCK)
    _finish_kernel[(1,)](partials, n_blocks, scores, batch, sizes, group_partials, count, out,
                         HAS_GROUPS=groups is not None, BLOCK=FINISH_BLOCK)
    return out
