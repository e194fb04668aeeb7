"""Reward-to-go and GAE as chunked linear scans: exact in float32, no loop over tokens.

The core is `reverse_discounted_cumsum`, y_t = x_t + c·y_{t+1}, computed in chunks of C tokens:
inside a chunk with one [C, C] matmul against the decay matrix D[j, i] = c^(j−i) (j ≥ i), across
chunks by the same scan applied recursively to the chunk totals with discount c^C. Sequential depth
is log_C(T); no power of c is ever divided by, so nothing overflows for any T (the cumsum trick
x·c^−t does in float32 past T≈1.5k). GAE's step δ_t = r_t − V_t + γ·V_{t+1} is never materialized:
the chunk sums are r @ D + V @ E, a second GEMM, and the next chunk's first V joins the carry.

Multi-turn rows have zeros inside the mask (observation tokens). By default (`gaps="skip"`) the
recursions skip them and carry the running value across, which is the same as running over the
row's valid tokens packed to the left; `Compactor` does that packing (a permutation of each row, one
gather each way) when, and only when, a mask has interior gaps. `gaps="step"` (OpenRLHF) instead
treats every position as a step: a masked position adds a zero reward (and value 0) and still
discounts by γ (γλ for GAE); no packing is needed.

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
    (these functions) or "triton" (`advserve.kernels.scan`, for CUDA tensors or Triton's interpreter);
    `masks.whiten` too, and under "numba" on the CPU (`advserve.kernels.cpu.whiten`)."""
    token = _KERNELS.set(kernels)
    try:
        yield
    finally:
        _KERNELS.reset(token)


def active_kernels() -> str:
    """"torch", "triton" or "numba": the `use_kernels` block this code runs in ("torch" outside any)."""
    return _KERNELS.get()


def chunked_width(length: int, chunk: int = CHUNK) -> int:
    """The width [B, T] rows are padded to for the chunked scan: T itself up to one chunk, else the
    next multiple of `chunk`."""
    return length if length <= chunk else -(-length // chunk) * chunk


@functools.lru_cache(maxsize=256)
def _decay_matrices(c: float, gamma: float | None, n: int, dtype: torch.dtype,
                    device: torch.device) -> tuple[Tensor, Tensor | None, Tensor]:
    """(D, E, tail) for chunks of n tokens, computed in float64 and rounded to `dtype` once:

    * D [n, n], D[j, i] = c^(j−i) for j ≥ i else 0, so (x @ D)_i = Σ_{j≥i} c^(j−i) x_j;
    * E [n, n] (None without `gamma`), the coefficient of V_j in the chunk's sum when the step is
      δ_j = r_j − V_j + γ·V_{j+1}: E[j, i] = γ·D[j−1, i] − D[j, i] (D[−1, ·] = 0), so
      r @ D + V @ E = δ @ D except for the γ·V of the next chunk's first token (added with the carry);
    * tail [n], tail_i = c^(n−1−i): the weight at position i of a value entering at the chunk's end.

    Powers are running products (c^k = c^(k−1)·c), so with γ = c (λ = 1) E is 0 off its diagonal
    exactly. Cached (a handful of small matrices per discount): callers must not modify them.
    """
    powers = [1.0]
    for _ in range(n - 1):
        powers.append(powers[-1] * c)
    p = torch.tensor(powers, dtype=torch.float64)
    idx = torch.arange(n)
    k = idx.unsqueeze(1) - idx.unsqueeze(0)  # j − i
    d = torch.where(k >= 0, p[k.clamp_min(0)], 0.0)
    e = None
    if gamma is not None:
        shifted = torch.zeros_like(d)
        shifted[1:] = d[:-1]
        e = (gamma * shifted - d).to(dtype=dtype, device=device)
    return d.to(dtype=dtype, device=device), e, p.flip(0).to(dtype=dtype, device=device)


def reverse_discounted_cumsum(x: Tensor, c: float, chunk: int = CHUNK, *, values: Tensor | None = None,
                              gamma: float = 0.0) -> Tensor:
    """y [B, T] with y_t = Σ_{t' ≥ t} c^(t'−t) δ_t' for x [B, T], where δ = x, or with `values` V
    [B, T] the GAE step δ_t = x_t − V_t + γ·V_{t+1} (V past the row is 0). Right-padding must be 0
    in x and V; the result may be a view of a wider buffer (T not a multiple of `chunk`).

    Inside each chunk of C tokens: y_local = x @ D (+ V @ E), two GEMMs over every chunk of every row
    (δ is never materialized); across chunks: the same scan, recursively, over the chunks' first
    values with discount c^C, added back as carry_k·c^(C−1−i) in one in-place pass.
    """
    batch, length = x.shape
    gamma_ = None if values is None else float(gamma)
    if length <= chunk:
        d, e, _ = _decay_matrices(float(c), gamma_, length, x.dtype, x.device)
        y = x @ d
        return y if values is None else y.addmm_(values, e)
    width = chunked_width(length, chunk)
    n_chunks = width // chunk
    x = _padded(x, width)
    d, e, tail = _decay_matrices(float(c), gamma_, chunk, x.dtype, x.device)
    # one 2-D GEMM for every chunk of every row (a batched 3-D matmul is ~5x slower on CPU)
    local = torch.mm(x.view(-1, chunk), d)
    if values is not None:
        values = _padded(values, width)
        local.addmm_(values.view(-1, chunk), e)
    local = local.view(batch, n_chunks, chunk)
    # y at each chunk's first token, from the chunks' local first values: y_k = z_k + c^C·y_{k+1},
    # z_k = local_k,0 + c^(C−1)·u_k with u_k = γ·V at the next chunk's first token
    z = local[:, :, 0].contiguous()
    u = None
    if values is not None:
        u = values.view(batch, n_chunks, chunk)[:, 1:, 0] * gamma
        z[:, :-1].addcmul_(u, tail[:1])  # tail_0 = c^(C−1)
    first = reverse_discounted_cumsum(z, float(c) ** chunk, chunk)
    carry = torch.zeros_like(z)  # what enters chunk k at its end: c·y_{k+1} (+ u_k)
    torch.mul(first[:, 1:], c, out=carry[:, :-1])
    if u is not None:
        carry[:, :-1].add_(u)
    local.addcmul_(carry.unsqueeze(-1), tail)
    out = local.view(batch, width)
    return out if width == length else out[:, :length]


def _padded(x: Tensor, width: int) -> Tensor:
    """x [B, T] as a contiguous [B, width] (zeros after column T): x itself when it already is."""
    if x.shape[1] == width:
        return x.contiguous()
    out = x.new_zeros(x.shape[0], width)
    out[:, :x.shape[1]] = x
    return out


class Compactor:
    """Moves each row's valid tokens to the left (and back), so recursions skip interior gaps.

    mask [B, T] bool; inputs are 0 at masked positions (the engine's invariant). For right-padded
    masks both directions are the identity: no copy. `gaps="step"` keeps every position where it is
    (the zeros at masked positions are the zero-valued steps); unpacking then zeroes masked positions.

    Packing is one scatter into rows of zeros already padded to the scan's chunked width: valid token t
    goes to its rank among the row's valid tokens, and every masked token (a 0) to the row's first
    position past them, which stays 0. Unpacking is one gather by the same index: a masked position
    reads that position back, where every scan of the zeros after a row's last valid token is exactly 0.
    """

    def __init__(self, mask: Tensor, gaps: str = "skip"):
        if gaps not in MASK_GAPS:
            raise ValueError(f"unknown mask_gaps {gaps!r}; valid: {', '.join(MASK_GAPS)}")
        self.mask = mask
        right_padded = is_right_padded(mask)
        self.identity = right_padded or gaps == "step"
        self.zero_masked = not right_padded and gaps == "step"
        if not self.identity:
            rank = mask.view(torch.uint8).cumsum(dim=1, dtype=torch.int64).sub_(1)  # valid tokens before t
            self.target = torch.where(mask, rank, rank[:, -1:] + 1)  # masked: the row's count of valid tokens

    def pack(self, x: Tensor) -> Tensor:
        """[B, T] -> [B, W] (W = `chunked_width(T)` when packing, else T) with row i's valid tokens
        first, zeros after."""
        if self.identity:
            return x
        length = x.shape[1]
        out = x.new_zeros(x.shape[0], chunked_width(length))
        out[:, :length].scatter_(1, self.target, x)
        return out

    def unpack(self, packed: Tensor) -> Tensor:
        """Inverse of `pack` ([B, W] or [B, T] -> [B, T]); masked positions become 0 (a packed row is 0
        after its valid tokens)."""
        if self.zero_masked:
            return packed.mul_(self.mask)
        if self.identity:
            return packed
        return packed.gather(1, self.target)


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
    # δ = r − V + γ·V_next is never materialized: the scan takes r and V (V past the row's last valid token is 0)
    advantages = compactor.unpack(reverse_discounted_cumsum(compactor.pack(token_rewards), gamma * lam,
                                                            values=compactor.pack(values), gamma=gamma))
    # unpack(pack(values)) is `values` itself (0 at masked positions): no second unpack
    return advantages, advantages + values
