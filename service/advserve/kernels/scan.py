"""Reward-to-go and GAE as Triton kernels: one program per row, scanning its tokens backwards; and the
outcome rewards placed on each row's last valid token, their input (`place_on_last_token`).

Each program walks its row from the last block of `BLOCK` tokens to the first. Inside a block the
first-order recurrence y_t = x_t + c_t·y_{t+1} is one `tl.associative_scan` over (c, x) pairs,
loaded in reverse order so the scan runs forward; across blocks the running value y at the block's
first token is carried into the next (earlier) block: y_t += (Π_{t ≤ k < end} c_k)·carry, the
product coming out of the same scan. Every token is read once and written once; nothing is divided
by, so nothing overflows for any T.

Both gap conventions of `advserve.functional.scan` are a choice of c_t and x_t (m_t: the mask):
  * reward-to-go, "skip": c_t = γ at valid tokens, 1 at masked ones (the running value passes
    through a gap unchanged); "step": c_t = γ everywhere. x_t = r_t; output m_t·y_t.
  * GAE, "step": δ_t = r_t + γ·V_{t+1} − V_t, A_t = δ_t + γλ·A_{t+1} (V past the row is 0).
  * GAE, "skip": V_next(t) = V at the next valid token after t (0 if none), itself a scan:
    s_t = m_{t+1}·V_{t+1} + (1 − m_{t+1})·s_{t+1}; δ_t = m_t·(r_t + γ·s_t − V_t) and
    A_t = δ_t + c_t·A_{t+1} with c_t = γλ at valid tokens, 1 at masked ones.
  Advantages are m_t·A_t, returns m_t·(A_t + V_t).

Inputs are [B, T] with unit stride along T and 0 at masked positions (the engine's invariant),
float32 or float64, on a CUDA device, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1,
read when this module is imported). γ and γλ are rounded to the input dtype, as the torch path does.
The torch functions in `advserve.functional.scan` are the reference; these agree with them to rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_BLOCK = 1024  # tokens per step of a program; a row of T <= MAX_BLOCK is one step


@triton.jit
def first_order(c_a, x_a, c_b, x_b):
    """Composition of two steps of y = x + c·y_prev (a before b in scan order): an associative
    operator, so the scan may group the steps in any order."""
    return c_a * c_b, x_b + c_b * x_a


@triton.jit
def _scan_block(c, x, carry, idx, BLOCK: tl.constexpr):
    """y [BLOCK] of y_i = x_i + c_i·y_{i−1} with y_{−1} = carry (scan order), and y at the block's end."""
    prod, y = tl.associative_scan((c, x), 0, first_order)
    y = y + prod * carry
    return y, tl.sum(tl.where(idx == BLOCK - 1, y, 0.0), axis=0)


@triton.jit
def _reward_to_go_kernel(rewards, mask, out, T, stride_r, stride_m, stride_o, gamma: tl.float64,
                         SKIP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    rewards += row * stride_r
    mask += row * stride_m
    out += row * stride_o
    dtype = out.dtype.element_ty
    g = tl.full((), gamma, dtype)
    idx = tl.arange(0, BLOCK)
    carry = tl.zeros((), dtype)
    n_blocks = tl.cdiv(T, BLOCK)
    for k in range(n_blocks):
        pos = (n_blocks - 1 - k) * BLOCK + (BLOCK - 1 - idx)  # this block's tokens, last first
        inside = pos < T
        r = tl.load(rewards + pos, mask=inside, other=0.0)
        m = tl.load(mask + pos, mask=inside, other=0) != 0
        if SKIP:
            c = tl.where(m, g, 1.0).to(dtype)
        else:
            c = tl.full((BLOCK,), 1.0, dtype) * g
        y, carry = _scan_block(c, r, carry, idx, BLOCK)
        tl.store(out + pos, tl.where(m, y, 0.0), mask=inside)


@triton.jit
def _gae_kernel(rewards, values, mask, adv_out, ret_out, T, stride_r, stride_v, stride_m, stride_a, stride_o,
                gamma: tl.float64, gamma_lam: tl.float64, SKIP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    rewards += row * stride_r
    values += row * stride_v
    mask += row * stride_m
    adv_out += row * stride_a
    ret_out += row * stride_o
    dtype = adv_out.dtype.element_ty
    g = tl.full((), gamma, dtype)
    gl = tl.full((), gamma_lam, dtype)
    idx = tl.arange(0, BLOCK)
    carry_a = tl.zeros((), dtype)
    carry_v = tl.zeros((), dtype)  # "skip": V at the first valid token after the block
    n_blocks = tl.cdiv(T, BLOCK)
    for k in range(n_blocks):
        pos = (n_blocks - 1 - k) * BLOCK + (BLOCK - 1 - idx)
        inside = pos < T
        after = pos + 1 < T
        r = tl.load(rewards + pos, mask=inside, other=0.0)
        v = tl.load(values + pos, mask=inside, other=0.0)
        m = tl.load(mask + pos, mask=inside, other=0) != 0
        v_after = tl.load(values + pos + 1, mask=after, other=0.0)
        if SKIP:
            m_after = tl.load(mask + pos + 1, mask=after, other=0) != 0
            v_next, carry_v = _scan_block(tl.where(m_after, 0.0, 1.0).to(dtype), tl.where(m_after, v_after, 0.0),
                                          carry_v, idx, BLOCK)
            delta = tl.where(m, r + g * v_next - v, 0.0)
            c = tl.where(m, gl, 1.0).to(dtype)
        else:
            delta = r + g * v_after - v
            c = tl.full((BLOCK,), 1.0, dtype) * gl
        a, carry_a = _scan_block(c, delta, carry_a, idx, BLOCK)
        a = tl.where(m, a, 0.0)
        tl.store(adv_out + pos, a, mask=inside)
        tl.store(ret_out + pos, tl.where(m, a + v, 0.0), mask=inside)


@triton.jit
def _place_kernel(rewards, mask, out, B, T, stride_m, stride_o, ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_rows = rows < B
    last = tl.full((ROWS,), -1, tl.int32)
    for start in range(0, T, BLOCK_T):  # each row's last valid token (-1: none)
        cols = start + tl.arange(0, BLOCK_T)
        inside = in_rows[:, None] & (cols < T)[None, :]
        valid = tl.load(mask + rows[:, None] * stride_m + cols[None, :], mask=inside, other=0) != 0
        last = tl.maximum(last, tl.max(tl.where(valid, cols[None, :], -1), axis=1))
    reward = tl.load(rewards + rows, mask=in_rows, other=0.0)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        inside = in_rows[:, None] & (cols < T)[None, :]
        placed = tl.where(cols[None, :] == last[:, None], reward[:, None], 0.0)
        tl.store(out + rows[:, None] * stride_o + cols[None, :], placed, mask=inside)


def place_on_last_token(rewards: Tensor, mask: Tensor, *, block: int | None = None) -> Tensor:
    """Token rewards [B, T]: `advserve.functional.masks.place_on_last_token` in one kernel launch.

    rewards [B] float32/float64, mask [B, T] bool -> [B, T] in the rewards' dtype: each row's reward on
    its last valid token, 0 elsewhere (a row without one: all 0). Each program takes a tile of rows
    (`kernels.validate.tile`; `block`: the tile's columns, rows of one at a time), reads their mask
    twice (bytes) and writes them once.
    """
    from .validate import tile

    mask8 = _mask_bytes(mask)
    batch, length = mask8.shape
    out = torch.empty((batch, length), dtype=rewards.dtype, device=rewards.device)
    if batch and length:
        rows, columns = (1, block) if block is not None else tile(length)
        _place_kernel[(triton.cdiv(batch, rows),)](rewards.contiguous(), mask8, out, batch, length, mask8.stride(0),
                                                   out.stride(0), ROWS=rows, BLOCK_T=columns)
    return out


def _block(length: int, block: int | None) -> int:
    if block is not None:
        return block
    return min(triton.next_power_of_2(max(length, 16)), MAX_BLOCK)


def _rows(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_bytes(mask: Tensor) -> Tensor:
    return _rows(mask).view(torch.uint8) if mask.dtype == torch.bool else _rows(mask)


def _check(gaps: str) -> bool:
    if gaps not in ("skip", "step"):
        raise ValueError(f"unknown mask_gaps {gaps!r}; valid: skip, step")
    return gaps == "skip"


def reward_to_go(token_rewards: Tensor, mask: Tensor, gamma: float, gaps: str = "skip", *,
                 block: int | None = None) -> Tensor:
    """G [B, T]: `advserve.functional.scan.reward_to_go` in one kernel launch.

    token_rewards [B, T] float32/float64 (0 at masked positions), mask [B, T] bool -> [B, T] in the
    rewards' dtype, 0 at masked positions. G_t = r_t + γ·G_next(t): next(t) the next valid token
    ("skip") or t + 1 ("step"). `block`: tokens per step (a power of 2; default min(T, 1024)).
    """
    skip = _check(gaps)
    rewards, mask8 = _rows(token_rewards), _mask_bytes(mask)
    out = torch.empty_like(rewards)
    batch, length = rewards.shape
    if batch and length:
        _reward_to_go_kernel[(batch,)](rewards, mask8, out, length, rewards.stride(0), mask8.stride(0),
                                       out.stride(0), float(gamma), SKIP=skip, BLOCK=_block(length, block))
    return out


def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float, gaps: str = "skip", *,
        block: int | None = None) -> tuple[Tensor, Tensor]:
    """(advantages, returns) [B, T]: `advserve.functional.scan.gae` in one kernel launch.

    token_rewards, values [B, T] float32/float64 of one dtype (0 at masked positions), mask [B, T]
    bool. δ_t = r_t + γ·V_next(t) − V_t, A_t = δ_t + γλ·A_next(t), returns A + V, 0 at masked
    positions; next(t) the next valid token ("skip") or t + 1 ("step", a gap being a step with
    r = V = 0). `block`: tokens per step (a power of 2; default min(T, 1024)).
    """
    skip = _check(gaps)
    rewards, vals, mask8 = _rows(token_rewards), _rows(values), _mask_bytes(mask)
    advantages, returns = torch.empty_like(vals), torch.empty_like(vals)
    batch, length = vals.shape
    if batch and length:
        _gae_kernel[(batch,)](rewards, vals, mask8, advantages, returns, length, rewards.stride(0), vals.stride(0),
                              mask8.stride(0), advantages.stride(0), returns.stride(0), float(gamma),
                              float(gamma * lam), SKIP=skip, BLOCK=_block(length, block))
    return advantages, returns
