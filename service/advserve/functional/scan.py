"""Reward-to-go and GAE as chunked linear scans: exact in float32, no loop over tokens.

The core is `reverse_discounted_cumsum`, y_t = x_t + c·y_{t+1}, computed in chunks of C tokens:
inside a chunk with one [C, C] matmul against the decay matrix D[j, i] = c^(j−i) (j ≥ i), across
chunks by the same scan applied recursively to the chunk totals with discount c^C. Sequential depth
is log_C(T); no power of c is ever divided by, so nothing overflows for any T (the cumsum trick
x·c^−t does in float32 past T≈1.5k).

Multi-turn rows have zeros inside the mask (observation tokens). By default (`gaps="skip"`) the
recursions skip them and carry the running value across, which is the same as running over the
row's valid tokens packed to the left; `Compactor` does that packing when, and only when, a mask has
interior gaps. `gaps="step"` (OpenRLHF) instead treats every position as a step: a masked position
adds a zero reward (and value 0) and still discounts by γ (γλ for GAE); no packing is needed.

Inside `use_kernels("triton")` (the engine's `kernels` setting), `reward_to_go` and `gae` run the
fused kernels of `advserve.kernels.scan` instead (and the group baselines of `groups` those of
`advserve.kernels.groups`): the same values to rounding, one pass over memory.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator

import torch
from torch import Tensor

from .masks import is_right_padded

MASK_GAPS = ("skip", "step")
CHUNK = 16  # measured on 2 cores at [256, 4096]: 16 ≈ 0.75 ms, 32 ≈ 0.85 ms, 64 ≈ 1.2 ms
_KERNELS: contextvars.ContextVar[str] = contextvars.ContextVar("advserve_scan_kernels", default="torch")


@contextlib.contextmanager
def use_kernels(kernels: str) -> Iterator[None]:
    """Within the block (this thread or task), `reward_to_go` and `gae` run on `kernels`: "torch"
    (these functions) or "triton" (`advserve.kernels.scan`, for CUDA tensors or Triton's interpreter)."""
    token = _KERNELS.set(kernels)
    try:
        yield
    finally:
        _KERNELS.reset(token)


def active_kernels() -> str:
    """"torch" or "triton": the `use_kernels` block this code runs in ("torch" outside any)."""
    return _KERNELS.get()


@functools.lru_cache(maxsize=256)
def _decay_matrix(c: float, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """D [n, n] with D[j, i] = c^(j−i) for j ≥ i else 0, so (x @ D)_i = Σ_{j≥i} c^(j−i) x_j.

    Cached (a handful of small matrices per discount): callers must not modify it."""
    idx = torch.arange(n, device=device, dtype=dtype)
    exponent = idx.unsqueeze(1) - idx.unsqueeze(0)  # j - i
    power = torch.pow(torch.tensor(c, dtype=dtype, device=device), exponent.clamp_min(0))
    return torch.where(exponent >= 0, power, torch.zeros((), dtype=dtype, device=device))


@functools.lru_cache(maxsize=256)
def _decay_to_next_chunk(c: float, chunk: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[C] with entry i = c^(C − i): the weight of the next chunk's first value at position i."""
    offsets = torch.arange(chunk, 0, -1, device=device, dtype=dtype)
    return torch.pow(torch.tensor(c, dtype=dtype, device=device), offsets)


def reverse_discounted_cumsum(x: Tensor, c: float, chunk: int = CHUNK) -> Tensor:
    """y [B, T] with y_t = Σ_{t' ≥ t} c^(t'−t) x_t' for x [B, T] (right-padding must be 0 in x)."""
    batch, length = x.shape
    if length <= chunk:
        return x @ _decay_matrix(c, length, x.dtype, x.device)
    n_chunks = -(-length // chunk)
    if n_chunks * chunk != length:
        x = torch.nn.functional.pad(x, (0, n_chunks * chunk - length))
    # one 2-D GEMM for every chunk of every row (a batched 3-D matmul is ~5x slower on CPU)
    local = torch.mm(x.reshape(-1, chunk), _decay_matrix(c, chunk, x.dtype, x.device)).view(batch, n_chunks, chunk)
    chunk_start = reverse_discounted_cumsum(local[:, :, 0].contiguous(), c**chunk, chunk)
    carry_in = torch.zeros_like(chunk_start)
    carry_in[:, :-1] = chunk_start[:, 1:]  # value of y at the first token of the next chunk
    local.addcmul_(carry_in.unsqueeze(-1), _decay_to_next_chunk(c, chunk, x.dtype, x.device))
    return local.view(batch, -1)[:, :length]


class Compactor:
    """Moves each row's valid tokens to the left (and back), so recursions skip interior gaps.

    mask [B, T] bool; inputs are 0 at masked positions (the engine's invariant). For right-padded
    masks both directions are the identity: no copy. `gaps="step"` keeps every position where it is
    (the zeros at masked positions are the zero-valued steps); unpacking then zeroes masked positions.
    """

    def __init__(self, mask: Tensor, gaps: str = "skip"):
        if gaps not in MASK_GAPS:
            raise ValueError(f"unknown mask_gaps {gaps!r}; valid: {', '.join(MASK_GAPS)}")
        self.mask = mask
        right_padded = is_right_padded(mask)
        self.identity = right_padded or gaps == "step"
        self.zero_masked = not right_padded and gaps == "step"
        if not self.identity:
            position = mask.long().cumsum(dim=1) - 1
            # masked tokens go to a dump column T, dropped after the scatter
            self.target = torch.where(mask, position, mask.shape[1])
            self.source = position.clamp_min(0)

    def pack(self, x: Tensor) -> Tensor:
        """[B, T] -> [B, T] with row i's valid tokens first, zeros after."""
        if self.identity:
            return x
        out = x.new_zeros(x.shape[0], x.shape[1] + 1)
        out.scatter_(1, self.target, x)
        return out[:, :-1]

    def unpack(self, packed: Tensor) -> Tensor:
        """Inverse of `pack`; masked positions become 0 (a packed row is 0 after its valid tokens)."""
        if self.zero_masked:
            return packed.mul_(self.mask)
        if self.identity:
            return packed
        return packed.gather(1, self.source).mul_(self.mask)


def reward_to_go(token_rewards: Tensor, mask: Tensor, gamma: float, gaps: str = "skip") -> Tensor:
    """G_t = Σ_{t' ≥ t, valid} γ^(k(t')−k(t)) r_t' over valid tokens (k: index among valid tokens).

    token_rewards [B, T] (0 at masked positions), mask [B, T] bool -> [B, T], 0 at masked positions.
    `gaps="step"`: k(t) = t, so a masked position inside the row still discounts by γ (OpenRLHF's
    get_cumulative_returns); with γ = 1 both give the same values.
    """
    if _KERNELS.get() == "triton":
        from ..kernels import scan as fused
        return fused.reward_to_go(token_rewards, mask, gamma, gaps)
    compactor = Compactor(mask, gaps)
    return compactor.unpack(reverse_discounted_cumsum(compactor.pack(token_rewards), gamma))


def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float,
        gaps: str = "skip") -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over valid tokens (Schulman et al. 2015, arXiv:1506.02438).

    token_rewards, values [B, T] (0 at masked positions), mask [B, T] bool -> (advantages, returns) [B, T].
    δ_t = r_t + γ V_next(t) − V_t, A_t = δ_t + γλ A_next(t), returns = A + V, where next(t) is the
    next valid token of the row and V after the last valid token is 0. Masked positions give 0.
    `gaps="step"` (OpenRLHF): next(t) = t + 1 and a masked position is a step with r = V = 0, so the
    token before a gap bootstraps from V = 0 and each gap position decays the sum by γλ; with
    γ = λ = 1 the sum telescopes to the same values as "skip".
    """
    if _KERNELS.get() == "triton":
        from ..kernels import scan as fused
        return fused.gae(token_rewards, values, mask, gamma, lam, gaps)
    compactor = Compactor(mask, gaps)
    v = compactor.pack(values)
    # a new tensor (not sub_): without gaps pack is the identity, and the caller's rewards must stay as given
    delta = compactor.pack(token_rewards) - v
    delta[:, :-1].add_(v[:, 1:], alpha=gamma)  # + γ V_next; V past the last valid token is 0
    advantages = compactor.unpack(reverse_discounted_cumsum(delta, gamma * lam))
    # unpack(pack(values)) is `values` itself (0 at masked positions): no second unpack
    return advantages, advantages + values
