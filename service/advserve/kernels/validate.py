"""A request's value checks as Triton kernels (`build_batch` with `triton`: the engine's kernels setting
"triton"): the mask checked and converted, and each token tensor zeroed under the mask and checked
finite on it, one launch each.

`batch._mask` is the reference of `mask_of`: each program reads a tile of rows of the given mask once
(a short row's program takes many rows) and writes the bool mask, the values in the compute dtype
(unless given in it) and each row's count of valid tokens;
a value that is neither 0 nor 1 (NaN included; −0.0 is a 0) fails the request's check. The torch path
takes about eleven launches for a float mask (the range from the bits, the sum against the count of
non-zeros, the conversions).

`batch._zero_masked` is the reference of `zero_masked`. For x [B, T] in a float dtype, the mask [B, T]
and the compute dtype:

    out_t = x_t · m_t               where m_t = 1 or x_t is finite (x_t converted to the compute dtype),
          = 0                       where m_t = 0 and x_t is NaN or ±inf;
    ok    = False                   where some x_t with m_t = 1 is NaN or ±inf (else left as it is).

The torch path multiplies (x·m, the engine's invariant: 0 where the mask is 0), sums for a verdict and,
read on a device after the compute, takes `where(m | every term finite, x·m, 0)`: about seven passes
and launches per tensor. Here it is one pass, reading x and the mask's bytes and writing `out`, and
the verdict is exact at once (no closer look). Where every term is finite, the bits are the torch path's,
but for the sign of a masked zero in two cases: where NaN or Inf sits under the mask, a masked position
that is finite keeps x·0 (−0.0 for a negative x) where the torch path writes +0.0; and the kernel
multiplies by the mask's truth (0 or 1), where the torch path multiplies by its given values (a −0.0
there flips the sign of x·0). The conversion to the compute dtype is the one `.to()` makes
(round to nearest).

`ok` is a bool tensor set to True before the launch: one flag per tensor of a request, each written only
by the programs that find a bad value (all with False), so no atomics. Inputs on a CUDA device, or on
the CPU under Triton's interpreter (TRITON_INTERPRET=1, read when this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024
FLOAT_INPUTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what the kernel reads


@triton.jit
def _zero_masked_kernel(x, mask, out, ok, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    value = tl.load(x + offs, mask=inside, other=0.0).to(out.dtype.element_ty)
    valid = tl.load(mask + offs, mask=inside, other=0) != 0
    finite = tl.abs(value) < float("inf")  # False for ±inf and NaN
    product = value * valid.to(value.dtype)
    tl.store(out + offs, tl.where(valid | finite, product, 0.0), mask=inside)
    bad = tl.sum((valid & (finite == 0)).to(tl.int32), axis=0)
    if bad > 0:
        tl.store(ok, 0)


def zero_masked(x: Tensor, mask: Tensor, dtype: torch.dtype, ok: Tensor) -> Tensor:
    """x [B, T] (any float dtype, on the mask's device) in `dtype` with 0 where the bool `mask` [B, T] is
    False (x·m, as the module's docstring says); `ok` (a 0-d bool tensor on the device, True before) set
    to False when x is NaN or Inf on a True position of the mask."""
    if x.dtype not in FLOAT_INPUTS:
        raise ValueError(f"zero_masked reads floats, got {x.dtype}")
    x, flat_mask = x.contiguous(), mask.contiguous().view(torch.uint8)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    count = x.numel()
    if count:
        _zero_masked_kernel[(triton.cdiv(count, BLOCK),)](x, flat_mask, out, ok, count, BLOCK=BLOCK)
    return out


@triton.jit
def _mask_kernel(given, mask_out, valid_out, lengths, ok, B, T, WRITE_VALID: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_T: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_rows = rows < B
    count = tl.zeros((ROWS, BLOCK_T), tl.int32)
    bad = tl.zeros((ROWS, BLOCK_T), tl.int32)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        inside = in_rows[:, None] & (cols < T)[None, :]
        offs = rows[:, None] * T + cols[None, :]
        value = tl.load(given + offs, mask=inside, other=0)
        on = value != 0
        bad += (inside & on & (value != 1)).to(tl.int32)  # NaN included: neither 0 nor 1
        count += on.to(tl.int32)
        tl.store(mask_out + offs, on.to(tl.uint8), mask=inside)
        if WRITE_VALID:
            tl.store(valid_out + offs, value.to(valid_out.dtype.element_ty), mask=inside)
    tl.store(lengths + rows, tl.sum(count, axis=1), mask=in_rows)
    if tl.sum(tl.sum(bad, axis=1), axis=0) > 0:
        tl.store(ok, 0)


def tile(width: int) -> tuple[int, int]:
    """(rows, columns) of the [B, T] tile a row-wise program reads at a time: up to BLOCK columns, and
    as many rows as make BLOCK positions (short rows: many rows per program, not a program per row)."""
    columns = min(triton.next_power_of_2(max(width, 16)), BLOCK)
    return BLOCK // columns, columns


def mask_of(given: Tensor, dtype: torch.dtype, ok: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """response_mask [B, T] (booleans, integers or floats, on the device) as `batch._mask` returns it:
    (bool [B, T], the given values in `dtype` [B, T] (the given tensor itself when it is in `dtype`),
    valid tokens per row [B] int32), in one launch, each program a tile of rows (`tile`); `ok` (a 0-d
    bool tensor, True before) set to False when a value is neither 0 nor 1."""
    given = given.contiguous()
    rows, width = given.shape
    mask = torch.empty(rows, width, dtype=torch.bool, device=given.device)
    valid = given if given.dtype == dtype else torch.empty(rows, width, dtype=dtype, device=given.device)
    lengths = torch.empty(rows, dtype=torch.int32, device=given.device)
    if rows:
        read = given.view(torch.uint8) if given.dtype == torch.bool else given
        per_program, columns = tile(width)
        _mask_kernel[(triton.cdiv(rows, per_program),)](read, mask.view(torch.uint8), valid, lengths, ok, rows, width,
                                                        WRITE_VALID=valid is not given, ROWS=per_program,
                                                        BLOCK_T=columns)
    return mask, valid, lengths
