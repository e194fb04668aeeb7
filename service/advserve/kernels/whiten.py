"""Batch whitening as Triton kernels: the masked mean and variance in one pass, the output in a second.

`advserve.functional.masks.whiten` is the reference (and the CPU path); this computes the same values to
rounding. For x [B, T] (or [B]) with 0/1 weights `valid` in x's dtype, x 0 where valid is 0, over the N
valid positions:

    μ = Σ x / max(N, 1),  σ² = Σ valid·(x − μ)² / max(N − ddof, 1),
    d = sqrt(σ² + eps) ("inside", verl) | sqrt(max(σ², eps)) ("floor", OpenRLHF) | σ + eps ("outside", TRL),
    out = valid·(x − μ) / d, and 0 everywhere when d = 0; without `use_std`, out = valid·(x − μ).

Three launches, nothing read on the host:
  1. `_moments_kernel`, one program per block of BLOCK positions: the block's count n_b, mean m_b (in
     two passes, as the torch path: an all-equal block's mean is its value exactly) and
     M2_b = Σ valid·(x − m_b)² (centred on its own mean: no cancellation).
  2. `_combine_kernel`, one program: the blocks' (n, m, M2) merged in block order by Chan et al.'s
     pairwise update (n = n_a + n_b, δ = m_b − m_a, m = m_a + δ·n_b/n, M2 = M2_a + M2_b + δ²·n_a·n_b/n),
     a fixed order, so the result does not change from run to run; then μ and d.
  3. `_apply_kernel`, one program per block: the output, divided rounded to nearest as torch divides.

Inputs are float32 or float64 on a CUDA device, or on the CPU under Triton's interpreter
(TRITON_INTERPRET=1, read when this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..functional.masks import WHITEN_EPS_MODES
from .groups import _div, _sqrt  # rounded-to-nearest float32 division and root

BLOCK = 1024  # positions per program of the moments and apply kernels
COMBINE_BLOCK = 256  # block summaries merged at once by the combine kernel
_EPS_MODE = {name: i for i, name in enumerate(WHITEN_EPS_MODES)}  # inside 0, floor 1, outside 2


@triton.jit
def _chan(n_a, m_a, q_a, n_b, m_b, q_b):
    """Merge two (count, mean, M2) summaries (Chan, Golub and LeVeque 1979); an empty side leaves the other."""
    n = n_a + n_b
    w = n_b / tl.where(n > 0, n, 1.0)
    delta = m_b - m_a
    return n, m_a + delta * w, q_a + q_b + delta * delta * (n_a * w)


@triton.jit
def _chan_rn(n_a, m_a, q_a, n_b, m_b, q_b):
    """`_chan` with its division rounded to nearest (float32 on a GPU: plain `/` may be approximate)."""
    n = n_a + n_b
    w = tl.div_rn(n_b, tl.where(n > 0, n, 1.0))
    delta = m_b - m_a
    return n, m_a + delta * w, q_a + q_b + delta * delta * (n_a * w)


@triton.jit
def _moments_kernel(x, valid, summary, N, F32: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    xs = tl.load(x + offs, mask=inside, other=0.0)
    w = tl.load(valid + offs, mask=inside, other=0.0)
    n = tl.sum(w, axis=0)
    m = _div(tl.sum(xs, axis=0), tl.where(n > 0, n, 1.0), F32)
    m = m + _div(tl.sum((xs - m) * w, axis=0), tl.where(n > 0, n, 1.0), F32)  # 2nd pass: all-equal -> exact
    centered = (xs - m) * w
    q = tl.sum(centered * centered, axis=0)
    tl.store(summary + pid * 3, n)
    tl.store(summary + pid * 3 + 1, m)
    tl.store(summary + pid * 3 + 2, q)


@triton.jit
def _combine_kernel(summary, stats, n_blocks, ddof, eps: tl.float64, EPS_MODE: tl.constexpr,
                    USE_STD: tl.constexpr, F32: tl.constexpr, BLOCK: tl.constexpr):
    dtype = stats.dtype.element_ty
    idx = tl.arange(0, BLOCK)
    n = tl.zeros((), dtype)
    m = tl.zeros((), dtype)
    q = tl.zeros((), dtype)
    for start in range(0, n_blocks, BLOCK):
        inside = start + idx < n_blocks
        nb = tl.load(summary + (start + idx) * 3, mask=inside, other=0.0)
        mb = tl.load(summary + (start + idx) * 3 + 1, mask=inside, other=0.0)
        qb = tl.load(summary + (start + idx) * 3 + 2, mask=inside, other=0.0)
        if F32:
            nc, mc, qc = tl.reduce((nb, mb, qb), 0, _chan_rn)
            n, m, q = _chan_rn(n, m, q, nc, mc, qc)
        else:
            nc, mc, qc = tl.reduce((nb, mb, qb), 0, _chan)
            n, m, q = _chan(n, m, q, nc, mc, qc)
    denom = tl.full((), 1.0, dtype)
    if USE_STD:
        var = _div(q, tl.maximum(n - ddof, 1.0), F32)
        e = tl.full((), eps, dtype)
        if EPS_MODE == 0:
            denom = _sqrt(var + e, F32)
        elif EPS_MODE == 1:
            denom = _sqrt(tl.maximum(var, e), F32)
        else:
            denom = _sqrt(var, F32) + e
    tl.store(stats, m)
    tl.store(stats + 1, denom)


@triton.jit
def _apply_kernel(x, valid, stats, out, N, USE_STD: tl.constexpr, F32: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    xs = tl.load(x + offs, mask=inside, other=0.0)
    w = tl.load(valid + offs, mask=inside, other=0.0)
    mean = tl.load(stats)
    centered = (xs - mean) * w
    if USE_STD:
        denom = tl.load(stats + 1)
        centered = tl.where(denom > 0, _div(centered, tl.where(denom > 0, denom, 1.0), F32), 0.0)
    tl.store(out + offs, centered, mask=inside)


def whiten(x: Tensor, valid: Tensor, *, ddof: int, eps: float, eps_mode: str = "inside",
           use_std: bool = True, block: int | None = None) -> Tensor:
    """`advserve.functional.masks.whiten` in three kernel launches: x [B, T] or [B] (0 where `valid` is 0),
    valid the 0/1 weights in x's dtype, same shape -> the whitened x, same shape and dtype (see the
    module's docstring for the formula and each eps_mode). `block`: positions per program (a power of
    2, default BLOCK; small ones test the merge of many blocks)."""
    if eps_mode not in _EPS_MODE:
        raise ValueError(f"unknown whitening eps_mode {eps_mode!r}; valid: {', '.join(WHITEN_EPS_MODES)}")
    flat, weights = x.contiguous().reshape(-1), valid.to(x.dtype).contiguous().reshape(-1)
    count = flat.numel()
    out = torch.empty_like(flat)
    block = BLOCK if block is None else block
    n_blocks = max(triton.cdiv(count, block), 1)
    summary = torch.empty(n_blocks * 3, dtype=x.dtype, device=x.device)
    stats = torch.empty(2, dtype=x.dtype, device=x.device)
    f32 = x.dtype == torch.float32
    _moments_kernel[(n_blocks,)](flat, weights, summary, count, F32=f32, BLOCK=block)
    _combine_kernel[(1,)](summary, stats, n_blocks, int(ddof), float(eps), EPS_MODE=_EPS_MODE[eps_mode],
                          USE_STD=use_std, F32=f32, BLOCK=COMBINE_BLOCK)
    _apply_kernel[(n_blocks,)](flat, weights, stats, out, count, USE_STD=use_std, F32=f32, BLOCK=block)
    return out.view(x.shape)
