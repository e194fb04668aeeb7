"""GAE and reward-to-go on the CPU in one compiled pass (numba): validation, the scan and the outputs.

The torch path validates a request in several passes over memory (the mask's 0/1 check, each token
tensor zeroed and summed for finiteness) and scans in several more (two GEMMs, the carries,
returns = A + V). Here each row is read once as the client sent it, and everything the engine's
`Batch` and the estimator need is written in the same pass: the bool mask, the row lengths, the
zeroed copies of the rewards and values, the advantages and the returns. The same pass checks what
validation checks, and `scan` returns None when a check fails (the caller then validates the torch
way, which words the error):

  * every mask value is 0 or 1 (a float mask: ±0 or 1);
  * the rewards and values are finite at valid positions (an outcome reward [B] at every row).
    Non-finite inputs make the row's first advantage non-finite (A_t feeds every earlier A), so one
    test per row suffices; a finite batch whose advantages overflow also lands there, and the torch
    path then computes it (returns A + V that overflow are inf on both paths).

The recurrence is the sequential one of verl's and OpenRLHF's loops, operation for operation in the
compute dtype (no fused multiply-add), so it reproduces those loops bit for bit:

  δ_t = r_t + γ·V_next − V_t,   A_t = δ_t + γλ·A_next,   returns_t = A_t + V_t,

with next = the next valid token ("skip" gaps, verl) or t + 1 with r = V = 0 at masked positions
("step" gaps, OpenRLHF). Without values it is the reward-to-go G_t = r_t + γ·G_next. An outcome
reward R [B] sits on each row's last valid token. Outputs are 0 at masked positions.

Speed: the chain A_t → A_{t−1} is a multiply and an add of latency, so one row at a time runs at
that latency. Right-padded rows (every valid token before every masked one) are therefore walked
four at a time, each from its own last token, sorted by length so the four end together; rows with
interior gaps go one at a time. Rows are independent: a large batch is split by rows over
`torch.get_num_threads()` threads (the kernels release the GIL). Each dtype and variant compiles on
first use (cached on disk by numba where the package directory is writable).

The torch path (`advserve.functional.scan`) stays the reference; this one agrees with it to
rounding (tests/test_cpu_kernels.py).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import uint64
from torch import Tensor

TOKENS_PER_THREAD = 1 << 16  # below this many tokens per thread, one thread (a split costs ~20 µs)
MASK_DTYPES = (torch.bool, torch.float32, torch.float64)  # read as they are
WIDENED_MASK_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16)


def _jit(fn):
    """numba.njit without the GIL, cached on disk where the package directory is writable."""
    try:
        return numba.njit(nogil=True, cache=True, boundscheck=False)(fn)
    except RuntimeError:  # no writable cache location: compile in each process
        return numba.njit(nogil=True, boundscheck=False)(fn)


NOT_ZERO_ONE, NOT_FINITE, REWARDS_MASKED, VALUES_MASKED = 1, 2, 4, 8  # the verdict's bits


@functools.lru_cache(maxsize=None)
def _kernels(with_values: bool):
    """The pass over rows [start, stop), compiled with or without values (GAE or reward-to-go)."""

    @_jit
    def rows(rewards, outcome, values, mask, coef, use_outcome, step_gaps, advantages, returns, mask_out,
             lengths, start, stop):  # pragma: no cover (compiled)
        """rewards [B, T] or outcome [B] (`use_outcome`), values [B, T] (`with_values`), mask [B, T]
        bool or float; coef [3] in the compute dtype: γ, the discount c (γλ, or γ without values), 0.
        Writes advantages, returns, mask_out (mask ≠ 0) [B, T] and lengths [B]; returns the verdict:
        NOT_ZERO_ONE, NOT_FINITE (a row's first advantage), REWARDS_MASKED and VALUES_MASKED (not 0
        somewhere masked: the caller zeroes a copy)."""
        g, c, zero = coef[0], coef[1], coef[2]
        width = mask.shape[1]
        m_in, r_in, v_in = mask.ravel(), rewards.ravel(), values.ravel()
        m_out, adv, ret = mask_out.ravel(), advantages.ravel(), returns.ravel()
        bad, finite, dirty_rewards, dirty_values = False, True, False, False
        chained = np.empty(stop - start, np.int64)
        count = 0
        for b in range(start, stop):
            # the mask: each step a loop over the row (in L1 after the first), vectorized
            row = uint64(b * width)
            end = row + uint64(width)
            for p in range(row, end):
                m_out[p] = m_in[p] != 0
            for p in range(row, end):
                bad |= (m_in[p] != 0) & (m_in[p] != 1)
            n = 0
            for p in range(row, end):
                n += m_out[p]
            lengths[b] = n
            head = row + uint64(n)
            prefix = 0
            for p in range(row, head):
                prefix += m_out[p]
            if prefix == n:  # right-padded: zeros after the valid tokens here, the scan below
                for p in range(head, end):
                    adv[p] = zero
                if with_values:
                    for p in range(head, end):
                        ret[p] = zero
                    for p in range(head, end):
                        dirty_values |= v_in[p] != 0
                if not use_outcome:
                    for p in range(head, end):
                        dirty_rewards |= r_in[p] != 0
                chained[count] = b
                count += 1
                continue
            # a row with gaps: one token at a time
            a, nv = zero, zero
            pending = outcome[b] if use_outcome else zero  # an outcome reward, until its token is met
            for i in range(1, width + 1):
                p = end - uint64(i)
                if m_out[p]:
                    rv = zero
                    if use_outcome:
                        rv, pending = pending, zero
                    else:
                        rv = r_in[p]
                    if with_values:
                        vv = v_in[p]
                        a = (rv + g * nv - vv) + c * a
                        ret[p] = a + vv
                        nv = vv
                    else:
                        a = rv + c * a
                    adv[p] = a
                else:
                    if step_gaps:  # a step with r = V = 0
                        if with_values:
                            a = (zero + g * nv - zero) + c * a
                            nv = zero
                        else:
                            a = zero + c * a
                    adv[p] = zero
                    if with_values:
                        ret[p] = zero
                        dirty_values |= v_in[p] != 0
                    if not use_outcome:
                        dirty_rewards |= r_in[p] != 0
            finite &= a - a == 0
        # right-padded rows by length, four walked together from their own last tokens (the shortest
        # first: its length is the walk's), then what is left of the other three, one at a time
        order = chained[:count][np.argsort(lengths[chained[:count]], kind="mergesort")]
        for k in range(0, count, 4):
            quad = order[k:k + 4]
            ends = np.zeros(4, np.uint64)
            pend = np.zeros(4, coef.dtype)
            for j in range(quad.size):
                ends[j] = uint64(quad[j] * width + lengths[quad[j]])
                if use_outcome:
                    pend[j] = outcome[quad[j]]
            e0, e1, e2, e3 = ends[0], ends[1], ends[2], ends[3]
            q0, q1, q2, q3 = pend[0], pend[1], pend[2], pend[3]
            a0 = a1 = a2 = a3 = n0 = n1 = n2 = n3 = zero
            walk = lengths[quad[0]] if quad.size == 4 else 0
            for i in range(1, walk + 1):
                p0, p1, p2, p3 = e0 - uint64(i), e1 - uint64(i), e2 - uint64(i), e3 - uint64(i)
                if use_outcome:
                    r0, r1, r2, r3 = q0, q1, q2, q3
                    q0 = q1 = q2 = q3 = zero
                else:
                    r0, r1, r2, r3 = r_in[p0], r_in[p1], r_in[p2], r_in[p3]
                if with_values:
                    x0, x1, x2, x3 = v_in[p0], v_in[p1], v_in[p2], v_in[p3]
                    a0 = (r0 + g * n0 - x0) + c * a0
                    a1 = (r1 + g * n1 - x1) + c * a1
                    a2 = (r2 + g * n2 - x2) + c * a2
                    a3 = (r3 + g * n3 - x3) + c * a3
                    ret[p0], ret[p1], ret[p2], ret[p3] = a0 + x0, a1 + x1, a2 + x2, a3 + x3
                    n0, n1, n2, n3 = x0, x1, x2, x3
                else:
                    a0, a1, a2, a3 = r0 + c * a0, r1 + c * a1, r2 + c * a2, r3 + c * a3
                adv[p0], adv[p1], adv[p2], adv[p3] = a0, a1, a2, a3
            state = ((a0, n0, q0), (a1, n1, q1), (a2, n2, q2), (a3, n3, q3))
            for j in range(quad.size):
                a, nv, pending = state[j]
                for i in range(walk + 1, lengths[quad[j]] + 1):
                    p = ends[j] - uint64(i)
                    rv = zero
                    if use_outcome:
                        rv, pending = pending, zero
                    else:
                        rv = r_in[p]
                    if with_values:
                        vv = v_in[p]
                        a = (rv + g * nv - vv) + c * a
                        ret[p] = a + vv
                        nv = vv
                    else:
                        a = rv + c * a
                    adv[p] = a
                finite &= a - a == 0
        return ((NOT_ZERO_ONE if bad else 0) | (0 if finite else NOT_FINITE)
                | (REWARDS_MASKED if dirty_rewards else 0) | (VALUES_MASKED if dirty_values else 0))

    return rows


@_jit
def _zeroed_rows(x, mask, zero, out, start, stop):  # pragma: no cover (compiled)
    """Rows [start, stop) of out = x where mask else 0 ([B, T]; mask bool, zero the dtype's 0)."""
    width = mask.shape[1]
    x_in, m_in, x_out = x.ravel(), mask.ravel(), out.ravel()
    for p in range(uint64(start * width), uint64(stop * width)):
        x_out[p] = x_in[p] if m_in[p] else zero
    return 0


@dataclass
class Scan:
    """The fused pass's results: advantages and returns [B, T] in the compute dtype (returns is
    `advantages` itself without values), mask [B, T] bool, lengths [B] int32, and the zeroed copies
    of the token rewards (None for outcome rewards) and of the values (None without)."""

    advantages: Tensor
    returns: Tensor
    mask: Tensor
    lengths: Tensor
    rewards: Tensor | None
    values: Tensor | None


def scan(rewards: Tensor | None, values: Tensor | None, mask: Tensor, gamma: float, lam: float,
         gaps: str = "skip", outcome: Tensor | None = None) -> Scan | None:
    """GAE (with `values`) or reward-to-go (without: `lam` unused) over raw CPU inputs, checked in the
    same pass; None when a check fails (see the module's docstring), or when the mask's dtype is none of
    MASK_DTYPES and WIDENED_MASK_DTYPES.

    rewards [B, T] or outcome [B] (exactly one), values [B, T] or None, in the compute dtype (float32
    or float64), contiguous; mask [B, T], contiguous, of any real dtype (bool and the float dtypes are
    read as they are, others widened to the compute dtype first, which keeps every value that is not
    0 or 1 away from 0 and 1). Masked positions of the inputs may hold anything (NaN included).
    Outputs are new tensors; nothing given is modified.
    """
    dtype = (rewards if rewards is not None else outcome).dtype
    if mask.dtype not in MASK_DTYPES:
        if mask.dtype not in WIDENED_MASK_DTYPES:
            return None
        mask = mask.to(dtype)
    batch, width = mask.shape
    mask_out = torch.empty((batch, width), dtype=torch.bool)
    lengths = torch.empty(batch, dtype=torch.int32)
    coef = np.array([gamma, gamma * lam if values is not None else gamma, 0.0],
                    dtype=torch.empty(0, dtype=dtype).numpy().dtype)
    placeholder = np.zeros((1, 1), dtype=coef.dtype)
    advantages = torch.empty((batch, width), dtype=dtype)
    returns = torch.empty((batch, width), dtype=dtype) if values is not None else advantages
    args = (placeholder if rewards is None else rewards.numpy(), coef[2:] if outcome is None else outcome.numpy(),
            placeholder if values is None else values.numpy(), mask.numpy(), coef, outcome is not None,
            gaps == "step", advantages.numpy(), returns.numpy(), mask_out.numpy(), lengths.numpy())
    rows = _kernels(values is not None)
    # the zeroed copies, written by each part whose rows hold something at a masked position (kept when any does)
    copies = {name: (given, torch.empty_like(given)) for name, given in (("rewards", rewards), ("values", values))
              if given is not None}

    def part(start: int, stop: int) -> int:
        verdict = rows(*args, start, stop)
        for name, bit in (("rewards", REWARDS_MASKED), ("values", VALUES_MASKED)):
            if verdict & bit and not verdict & (NOT_ZERO_ONE | NOT_FINITE):
                given, copy = copies[name]
                _zeroed_rows(given.numpy(), mask_out.numpy(), coef[2], copy.numpy(), start, stop)
        return verdict

    parts = max(1, min(torch.get_num_threads(), batch, mask.numel() // TOKENS_PER_THREAD))
    bounds = [batch * k // parts for k in range(parts + 1)]
    futures = [_pool().submit(part, start, stop) for start, stop in zip(bounds[1:-1], bounds[2:])]
    verdicts = [part(bounds[0], bounds[1])] + [future.result() for future in futures]
    if any(verdict & (NOT_ZERO_ONE | NOT_FINITE) for verdict in verdicts):
        return None
    if outcome is not None and not bool(torch.isfinite(outcome).all()):  # every row's, empty ones too
        return None
    out = {"rewards": rewards, "values": values}
    for name, bit in (("rewards", REWARDS_MASKED), ("values", VALUES_MASKED)):
        if any(verdict & bit for verdict in verdicts):
            given, copy = copies[name]
            for verdict, start, stop in zip(verdicts, bounds, bounds[1:]):
                if not verdict & bit:  # a part with nothing at masked positions: its rows as they are
                    copy[start:stop] = given[start:stop]
            out[name] = copy
    return Scan(advantages, returns, mask_out, lengths, out["rewards"], out["values"])


@functools.lru_cache(maxsize=1)
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for the parts of a batch beyond the caller's own (which it runs itself)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1),
                                                 thread_name_prefix="advserve-scan")
