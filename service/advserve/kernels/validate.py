"""A token tensor zeroed under the mask and checked finite on it, in one Triton launch (`build_batch` with
`triton`: the engine's kernels setting "triton").

`batch._zero_masked` is the reference (the torch path). For x [B, T] in a float dtype, the mask [B, T]
and the compute dtype:

    out_t = x_t · m_t               where m_t = 1 or x_t is finite (x_t converted to the compute dtype),
          = 0                       where m_t = 0 and x_t is NaN or ±inf;
    ok    = False                   where some x_t with m_t = 1 is NaN or ±inf (else left as it is).

The torch path multiplies (x·m, the engine's invariant: 0 where the mask is 0), sums for a verdict and,
read on a device after the compute, takes `where(m | every term finite, x·m, 0)`: about seven passes
and launches per tensor. Here it is one pass, reading x and the mask's bytes and writing `out`, and
the verdict is exact at once (no closer look). Where every term is finite, the bits are the torch path's;
where NaN or Inf sits under the mask, a masked position that is finite keeps x·0 (−0.0 for a negative
x) where the torch path writes +0.0. The conversion to the compute dtype is the one `.to()` makes
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
