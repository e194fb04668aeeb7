"""GAE and reward-to-go on the CPU in one compiled pass (numba): validation, the scan and the outputs.

The torch path validates a request in several passes over memory (the mask's 0/1 check, each token
tensor zeroed and summed for finiteness) and scans in several more (two GEMMs, the carries,
returns = A + V). Here each row is read once as the client sent it, and everything the engine's
`Batch` and the estimator need is written in the same pass: the bool mask, the row lengths, the
advantages, the returns, and the token rewards' zeroed copy where they are not 0 at masked
positions already (the values and log-probs are consumed by the scan: nothing else reads them, so
no copy is kept). The same pass checks what validation checks, and `scan` returns None when a check
fails (the caller then validates the torch way, which words the error):

  * every mask value is 0 or 1 (a float mask: ±0 or 1);
  * the rewards, values and log-probs are finite at valid positions (an outcome reward [B] at every
    row). Without reward shaping, non-finite inputs make the row's first advantage non-finite (A_t
    feeds every earlier A), so one test per row suffices; a finite batch whose advantages overflow
    also lands there, and the torch path then computes it (returns A + V that overflow are inf on
    both paths). A clip or a KL penalty could hide a non-finite input: with them each is checked.

The rewards are shaped as the estimators shape them (`_shaped`): the reward clip on each token
reward or on the outcome, then minus β·kl(old_logprobs, ref_logprobs) at every valid token
(functional.kl's k1, k2 and abs, clamped or not; k3 takes the torch path).

The recurrence is the sequential one of verl's and OpenRLHF's loops, operation for operation in the
compute dtype (no fused multiply-add), so it reproduces those loops bit for bit:

  δ_t = r_t + γ·V_next − V_t,   A_t = δ_t + γλ·A_next,   returns_t = A_t + V_t,

with next = the next valid token ("skip" gaps, verl) or t + 1 with r = V = 0 at masked positions
("step" gaps, OpenRLHF). Without values it is the reward-to-go G_t = r_t + γ·G_next. An outcome
reward R [B] sits on each row's last valid token. Outputs are 0 at masked positions.

Whitening (`scan(..., whiten=form)`, and `whiten` for advantages given): each row's mean and M2 in
float64 over its span (recorded by the scan's pass), merged in row order, then μ and d in the compute
dtype and `functional.masks.whiten`'s operations in one vectorized pass. The moments are taken in a
pass of their own, one compiled loop for both callers: compiled into the scan's pass as well, the
same loop summed in another order, and a sharded batch whitened afterwards would differ in the last bit.

Speed: the chain A_t → A_{t−1} is a multiply and an add of latency, so one row at a time runs at
that latency. Rows are therefore walked four at a time, each from its own last valid token, sorted by
that length so the four end together: right-padded rows (every valid token before every masked one)
without reading the mask, rows with gaps with a select per position. Rows are independent: a large
batch is split by rows over `torch.get_num_threads()` threads (the kernels release the GIL). The
outputs come from `outputs.OUTPUTS`, which reuses their memory once the caller drops them. Each dtype
combination compiles on first use, cached on disk by numba where the package directory is writable
(`warm`, which scripts/install.sh runs).

The torch path (`advserve.functional.scan`) stays the reference; this one agrees with it to
rounding (tests/test_cpu_kernels.py).
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import time
from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import uint64
from torch import Tensor

from ..functional.masks import Whitening, whitening_scale
from .outputs import OUTPUTS

TOKENS_PER_THREAD = 1 << 18  # below this many tokens per thread, one (waking a pool thread costs ~0.15 ms)
WHITENED_PER_THREAD = 1 << 21  # the same for the whitening's two passes, bound by memory: 2 threads pay from 4M
MASK_DTYPES = (torch.bool, torch.float32, torch.float64)  # read as they are
WIDENED_MASK_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16)


def _jit(fn=None, **options):
    """numba.njit without the GIL, with numpy's division (x / 0 is ±inf or NaN, as in torch: Python's
    ZeroDivisionError check keeps a loop from vectorizing) and `options`, cached on disk where the
    package directory is writable."""
    if fn is None:
        return functools.partial(_jit, **options)
    options = {"nogil": True, "boundscheck": False, "error_model": "numpy", **options}
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # no writable cache location: compile in each process
        return numba.njit(**options)(fn)


NOT_ZERO_ONE, NOT_FINITE, REWARDS_MASKED = 1, 2, 4  # the verdict's bits


@_jit
def _mask_row(m_in, m_out, row, end):  # pragma: no cover (compiled)
    """One row [row, end) of the flat mask: m_out = m_in ≠ 0; (valid count, a value is not 0 or 1,
    right-padded: every valid token before every masked one). Each a loop over the row, vectorized
    (in L1 after the first)."""
    bad = False
    for p in range(row, end):
        m_out[p] = m_in[p] != 0
    for p in range(row, end):
        bad |= (m_in[p] != 0) & (m_in[p] != 1)
    n = 0
    for p in range(row, end):
        n += m_out[p]
    prefix = 0
    for p in range(row, row + uint64(n)):
        prefix += m_out[p]
    return n, bad, prefix == n


@_jit
def _zeroed_row(x_in, m_out, x_out, row, end, zero):  # pragma: no cover (compiled)
    """x_out = x_in where the mask, else 0, over [row, end) (a row with gaps' zeroed copy)."""
    for p in range(row, end):
        x_out[p] = x_in[p] if m_out[p] else zero


@_jit
def _copy_head(x_in, x_out, row, head, end, zero):  # pragma: no cover (compiled)
    """x_out = x_in over [row, head), 0 over [head, end): a right-padded row's zeroed copy."""
    for p in range(row, head):
        x_out[p] = x_in[p]
    for p in range(head, end):
        x_out[p] = zero


@_jit
def _dirty_row(x_in, m_out, row, end):  # pragma: no cover (compiled)
    """True when x_in is not 0 somewhere masked in [row, end)."""
    dirty = False
    for p in range(row, end):
        dirty |= (not m_out[p]) & (x_in[p] != 0)
    return dirty


@numba.njit(inline="always")
def _step(rv, vv, a, nv, g, c, with_values):  # pragma: no cover (compiled)
    """One token of the recurrence: (A_t, V_next for the token before) from r_t, V_t, A_next, V_next."""
    if with_values:
        return (rv + g * nv - vv) + c * a, vv
    return rv + c * a, nv


KL_KINDS = {"k1": 1, "k2": 2, "abs": 4}  # functional.kl's estimators computed here (k3: the torch path, see _kl)
CLIP, KL = 1, 2  # the shaping's bits: a reward clip (its bounds in coef), a KL penalty
# coef [9], in the compute dtype: γ, the discount c, 0, β, the KL clamp, the reward clip's low and high
# bounds (−inf and inf: none), ½ and inf (typed like the data: no float64 creeps in)
G, C, ZERO, BETA, KL_CLAMP, LOW, HIGH, HALF, INF = range(9)


@numba.njit(inline="always")
def _kl(old, ref, coef, kind, clamped):  # pragma: no cover (compiled)
    """functional.kl.kl_and_grad's value, operation for operation: x = old − ref; k1 x, k2 ½x², abs |x|;
    then to ±clamp when clamped. (k3's e^−x is left to the torch path: compiled next to the others, the
    exponential is computed for every token whatever the estimator, 5x the pass.)"""
    x = old - ref
    if kind == 1:
        value = x
    elif kind == 2:
        value = coef[HALF] * (x * x)
    else:
        value = abs(x)
    if clamped:
        value = -coef[KL_CLAMP] if value < -coef[KL_CLAMP] else value
        value = coef[KL_CLAMP] if value > coef[KL_CLAMP] else value
    return value


@numba.njit(inline="always")
def _shaped(rv, low, high, old, ref, coef, with_kl, kl_kind, kl_clamped):  # pragma: no cover (compiled)
    """(r̃, the inputs are finite) for one valid token: rv clipped to [low, high] (±inf: no bound; as
    torch.clamp, NaN stays NaN), minus β·kl(old, ref) when `with_kl`. A clip or the KL could hide a
    non-finite reward, so each input is checked here. Selects, not branches: the loops vectorize."""
    finite = rv - rv == 0
    rv = low if rv < low else rv
    rv = high if rv > high else rv
    if with_kl:
        finite &= (old - old == 0) & (ref - ref == 0)
        rv = rv - coef[BETA] * _kl(old, ref, coef, kl_kind, kl_clamped)
    return rv, finite


@_jit
def _shape_tokens(r_in, o_in, f_in, m_out, row, count, out, coef, shaping, kl_kind,
                  kl_clamped):  # pragma: no cover (compiled)
    """out[t] = r̃ of the token reward at flat position row + t, t < count (`_shaped`); True when the inputs read
    at valid positions (m_out) are finite (masked ones may hold anything). A row's shaped rewards are
    written first, in a loop of their own, so that the walks stay short (and in one function per kind of
    reward: one loop choosing between kinds is 5x slower)."""
    low, high = coef[LOW], coef[HIGH]
    with_kl = shaping & KL != 0
    finite = True
    if with_kl:
        for t in range(count):
            p = row + uint64(t)
            rv, ok = _shaped(r_in[p], low, high, o_in[p], f_in[p], coef, True, kl_kind, kl_clamped)
            out[t] = rv
            finite &= ok | (not m_out[p])
    else:
        for t in range(count):
            p = row + uint64(t)
            rv, ok = _shaped(r_in[p], low, high, coef[ZERO], coef[ZERO], coef, False, kl_kind, kl_clamped)
            out[t] = rv
            finite &= ok | (not m_out[p])
    return finite


@_jit
def _shape_outcome(o_in, f_in, m_out, row, count, out, coef, shaping, kl_kind, kl_clamped, outcome,
                   last):  # pragma: no cover (compiled)
    """`_shape_tokens` for an outcome reward (clipped already) on the token t = `last`, 0 elsewhere."""
    zero = coef[ZERO]
    with_kl = shaping & KL != 0
    finite = True
    for t in range(count):
        p = row + uint64(t)
        rv, ok = _shaped(outcome if t == last else zero, -coef[INF], coef[INF], o_in[p] if with_kl else zero,
                         f_in[p] if with_kl else zero, coef, with_kl, kl_kind, kl_clamped)
        out[t] = rv
        finite &= ok | (not m_out[p])
    return finite


@_jit(fastmath={"reassoc", "nsz"})
def _row_moments(adv, m_out, start, end, count, gaps):  # pragma: no cover (compiled)
    """(mean, M2 = Σ valid·(a − mean)²) in float64 of the `count` valid advantages in the flat
    [start, end) (0 at masked positions; `gaps`: some of them are masked, else [start, end) is all
    valid). Loops over one row; the sums are reassociated so that they vectorize (the same data gives
    the same bits from this compiled loop: the order depends on the length only). The mean in two
    passes, as the torch path takes it: an all-equal row's mean is its value exactly, and its M2 0."""
    if count == 0:
        return 0.0, 0.0
    total = 0.0
    for p in range(start, end):
        total += np.float64(adv[p])
    mean = total / count
    rest = 0.0
    if gaps:
        for p in range(start, end):
            rest += np.float64(adv[p]) - mean if m_out[p] else 0.0
    else:
        for p in range(start, end):
            rest += np.float64(adv[p]) - mean
    mean += rest / count
    m2 = 0.0
    if gaps:
        for p in range(start, end):
            d = np.float64(adv[p]) - mean
            m2 += d * d if m_out[p] else 0.0
    else:
        for p in range(start, end):
            d = np.float64(adv[p]) - mean
            m2 += d * d
    return mean, m2


@numba.njit(inline="always")
def _gapped_step(rv, vv, valid, a, nv, g, c, with_values, step_gaps):  # pragma: no cover (compiled)
    """One position of a row with gaps: (A, V_next) after it, and (its advantage, its return) as written
    (0 at a masked position). "skip": a masked position leaves A and V_next as they are; "step": it is a
    step with r = V = 0. Selects, not branches (the four-row walk runs them side by side)."""
    zero = c - c
    if step_gaps:
        rv = rv if valid else zero
        vv = vv if valid else zero
        a, nv = _step(rv, vv, a, nv, g, c, with_values)
    else:
        stepped, carried = _step(rv, vv, a, nv, g, c, with_values)
        a = stepped if valid else a
        nv = carried if valid else nv
    return a, nv, a if valid else zero, a + vv if valid else zero


@numba.njit(inline="always")
def _signed_span(m, row, width, n, right_padded):  # pragma: no cover (compiled)
    """A row's span as `row_spans` holds it: its length n when right-padded (every valid token before
    every masked one), else −(its last valid token + 1), a row with gaps (n ≥ 1)."""
    if right_padded:
        return np.int64(n)
    last = np.int64(width)
    while not m[row + uint64(last - 1)]:
        last -= 1
    return -last


@_jit
def _rows(rewards, outcome, values, mask, old_logprobs, ref_logprobs, coef, with_values, use_outcome, step_gaps,
          shaping, kl_kind, kl_clamped, advantages, returns, mask_out, lengths, rewards_out, copied, row_spans,
          start, stop):  # pragma: no cover (compiled)
    """rewards [B, T] or outcome [B] (`use_outcome`; clipped already), values [B, T] (`with_values`),
    mask [B, T] bool or float, old_logprobs and ref_logprobs [B, T] (read when `shaping` has KL);
    coef: see above; shaping: the CLIP and KL bits, the KL estimator `kl_kind` (KL_KINDS)
    clamped or not. Writes advantages, returns, mask_out (mask ≠ 0) [B, T] and lengths [B], and for
    each row whose token rewards hold something not 0 at a masked position its zeroed copy in
    rewards_out, copied[b] set, and each row's span in row_spans [B] (`_signed_span`). Returns the
    verdict: NOT_ZERO_ONE, NOT_FINITE (a row's first advantage, or a shaped input), REWARDS_MASKED (some
    row was copied). With shaping, each row's shaped rewards are written to a scratch row first (`_shape_tokens`,
    `_shape_outcome`) and the walks read them.

    Rows are walked four at a time, each from its last valid token (its `span` = that index + 1), the
    four sorted by span so that they end together: right-padded rows (every valid token before every
    masked one) without reading the mask, rows with gaps with a select per position
    (`_gapped_step`); what is left of the three longer rows of a four afterwards, one row at a time."""
    g, c, zero = coef[G], coef[C], coef[ZERO]
    width = mask.shape[1]
    m_in, r_in, v_in = mask.ravel(), rewards.ravel(), values.ravel()
    o_in, f_in = old_logprobs.ravel(), ref_logprobs.ravel()
    m_out, adv, ret = mask_out.ravel(), advantages.ravel(), returns.ravel()
    r_out = rewards_out.ravel()
    bad, finite = False, True
    shaped = np.empty((4, width if shaping else 1), coef.dtype)  # a shaped row of rewards per walk
    s_in = shaped.ravel()
    padded = np.empty(stop - start, np.int64)
    gapped = np.empty(stop - start, np.int64)
    n_padded = n_gapped = 0
    for b in range(start, stop):
        row = uint64(b * width)
        end = row + uint64(width)
        n, row_bad, right_padded = _mask_row(m_in, m_out, row, end)
        lengths[b] = n
        bad |= row_bad
        row_spans[b] = _signed_span(m_out, row, width, n, right_padded)
        if right_padded:
            padded[n_padded] = b
            n_padded += 1
        else:
            gapped[n_gapped] = b
            n_gapped += 1
    spans = np.abs(row_spans[start:stop])  # (rows of this part: index b − start)
    ends = np.zeros(4, np.uint64)
    shaped_ends = np.zeros(4, np.uint64)
    pend = np.zeros(4, coef.dtype)
    for kind in range(2):
        with_gaps = kind == 1
        group = gapped[:n_gapped] if with_gaps else padded[:n_padded]
        order = group[np.argsort(spans[group - start], kind="mergesort")]
        for k in range(0, order.size, 4):
            quad = order[k:k + 4]
            # each row's zeros past its span, rewards copy and shaped rewards (the rows come into the cache)
            for j in range(quad.size):
                b = quad[j]
                row = uint64(b * width)
                end = row + uint64(width)
                span = spans[b - start]
                head = row + uint64(span)
                ends[j] = head
                pend[j] = outcome[b] if use_outcome else zero
                if shaping:
                    if use_outcome:
                        finite &= _shape_outcome(o_in, f_in, m_out, row, span, s_in[j * width:], coef, shaping,
                                                 kl_kind, kl_clamped, pend[j], span - 1)
                    else:
                        finite &= _shape_tokens(r_in, o_in, f_in, m_out, row, span, s_in[j * width:], coef,
                                                shaping, kl_kind, kl_clamped)
                    shaped_ends[j] = uint64(j * width + span)
                for p in range(head, end):
                    adv[p] = zero
                if with_values:
                    for p in range(head, end):
                        ret[p] = zero
                if not use_outcome:
                    if with_gaps:
                        if _dirty_row(r_in, m_out, row, end):
                            _zeroed_row(r_in, m_out, r_out, row, end, zero)
                            copied[b] = True
                    else:
                        dirty = False
                        for p in range(head, end):
                            dirty |= r_in[p] != 0
                        if dirty:
                            _copy_head(r_in, r_out, row, head, end, zero)
                            copied[b] = True
            # the four walked together from their own last valid tokens, for the shortest span
            e0, e1, e2, e3 = ends[0], ends[1], ends[2], ends[3]
            z0, z1, z2, z3 = shaped_ends[0], shaped_ends[1], shaped_ends[2], shaped_ends[3]
            q0, q1, q2, q3 = pend[0], pend[1], pend[2], pend[3]
            a0 = a1 = a2 = a3 = n0 = n1 = n2 = n3 = zero
            walk = spans[quad[0] - start] if quad.size == 4 else 0
            for i in range(1, walk + 1):
                p0, p1, p2, p3 = e0 - uint64(i), e1 - uint64(i), e2 - uint64(i), e3 - uint64(i)
                if shaping:
                    r0, r1, r2, r3 = s_in[z0 - uint64(i)], s_in[z1 - uint64(i)], s_in[z2 - uint64(i)], s_in[z3 - uint64(i)]
                elif use_outcome:
                    r0, r1, r2, r3 = q0, q1, q2, q3
                    q0 = q1 = q2 = q3 = zero
                else:
                    r0, r1, r2, r3 = r_in[p0], r_in[p1], r_in[p2], r_in[p3]
                if with_values:
                    x0, x1, x2, x3 = v_in[p0], v_in[p1], v_in[p2], v_in[p3]
                else:
                    x0 = x1 = x2 = x3 = zero
                if with_gaps:
                    a0, n0, y0, w0 = _gapped_step(r0, x0, m_out[p0], a0, n0, g, c, with_values, step_gaps)
                    a1, n1, y1, w1 = _gapped_step(r1, x1, m_out[p1], a1, n1, g, c, with_values, step_gaps)
                    a2, n2, y2, w2 = _gapped_step(r2, x2, m_out[p2], a2, n2, g, c, with_values, step_gaps)
                    a3, n3, y3, w3 = _gapped_step(r3, x3, m_out[p3], a3, n3, g, c, with_values, step_gaps)
                    adv[p0], adv[p1], adv[p2], adv[p3] = y0, y1, y2, y3
                    if with_values:
                        ret[p0], ret[p1], ret[p2], ret[p3] = w0, w1, w2, w3
                else:
                    a0, n0 = _step(r0, x0, a0, n0, g, c, with_values)
                    a1, n1 = _step(r1, x1, a1, n1, g, c, with_values)
                    a2, n2 = _step(r2, x2, a2, n2, g, c, with_values)
                    a3, n3 = _step(r3, x3, a3, n3, g, c, with_values)
                    adv[p0], adv[p1], adv[p2], adv[p3] = a0, a1, a2, a3
                    if with_values:
                        ret[p0], ret[p1], ret[p2], ret[p3] = a0 + x0, a1 + x1, a2 + x2, a3 + x3
            # what is left of each row, one at a time (a right-padded row's mask is all valid there)
            state = ((a0, n0, q0), (a1, n1, q1), (a2, n2, q2), (a3, n3, q3))
            for j in range(quad.size):
                a, nv, pending = state[j]
                b = quad[j]
                for i in range(walk + 1, spans[b - start] + 1):
                    p = ends[j] - uint64(i)
                    valid = m_out[p]
                    rv = zero
                    if shaping:
                        rv = s_in[shaped_ends[j] - uint64(i)]
                    elif use_outcome:
                        rv = pending
                        pending = pending if not valid else zero
                    else:
                        rv = r_in[p]
                    vv = v_in[p] if with_values else zero
                    a, nv, y, w = _gapped_step(rv, vv, valid, a, nv, g, c, with_values, step_gaps)
                    adv[p] = y
                    if with_values:
                        ret[p] = w
                finite &= a - a == 0
    dirty_rewards = False
    for b in range(start, stop):
        dirty_rewards |= copied[b]
    return (NOT_ZERO_ONE if bad else 0) | (0 if finite else NOT_FINITE) | (REWARDS_MASKED if dirty_rewards else 0)


@_jit
def _spans_of_rows(mask_out, lengths, row_spans, start, stop):  # pragma: no cover (compiled)
    """row_spans[b] (`_signed_span`) for rows [start, stop) of mask_out [B, T], as `_rows` writes them."""
    width = mask_out.shape[1]
    m_in = mask_out.ravel()
    for b in range(start, stop):
        row = uint64(b * width)
        n = lengths[b]
        prefix = 0
        for p in range(row, row + uint64(n)):
            prefix += m_in[p]
        row_spans[b] = _signed_span(m_in, row, width, n, prefix == n)
    return 0


@_jit
def _moments_of_rows(adv, mask_out, lengths, row_spans, moments, start, stop):  # pragma: no cover (compiled)
    """moments[b] = `_row_moments` of row b of adv [B, T] (0 at masked positions) over its span
    (row_spans), for rows [start, stop). The scan's whitening and `whiten` both take their moments
    here, after the scan's pass: one compiled loop, so the same bits. (Compiled into the scan's pass as
    well, the loop summed in another order there.)"""
    width = mask_out.shape[1]
    a_in, m_in = adv.ravel(), mask_out.ravel()
    for b in range(start, stop):
        row = uint64(b * width)
        span = row_spans[b]
        moments[b, 0], moments[b, 1] = _row_moments(a_in, m_in, row, row + uint64(abs(span)), lengths[b], span < 0)
    return 0


@_jit
def _merged_moments(moments, lengths):  # pragma: no cover (compiled)
    """(N, mean, M2) of the whole batch from its rows' (mean, M2) [B, 2] and lengths [B], merged in row
    order by Chan et al.'s update (n = n_a + n_b, δ = m_b − m_a, m = m_a + δ·n_b/n, M2 = M2_a + M2_b +
    δ²·n_a·n_b/n): one order whatever the threads, so the same bits on every run."""
    n, mean, m2 = 0.0, 0.0, 0.0
    for b in range(lengths.size):
        count = np.float64(lengths[b])
        if count == 0:
            continue
        total = n + count
        delta = moments[b, 0] - mean
        mean += delta * (count / total)
        m2 += moments[b, 1] + delta * delta * (n * count / total)
        n = total
    return n, mean, m2


@_jit
def _whitened_rows(adv, mask_out, out, in_place, stats, row_spans, start, stop):  # pragma: no cover (compiled)
    """out = (adv − μ)·valid / d over rows [start, stop), or adv itself so (`in_place`; `out` unused);
    stats = (μ, d, 1, 0) in the compute dtype: the operations of `functional.masks.whiten`, so the same
    bits at valid positions given the same μ and d. row_spans[b] (`_rows`): a right-padded row's
    length, read without the mask (its valid tokens are its first ones, and ·1 is exact), or −(the
    last valid token + 1) for a row with gaps, read with it. Past a row's span: 0 (+0; in place, the
    scan's zeros are left). Each row a loop from index 0 (from another start, each index is checked
    for wraparound: 5x slower), and in place a loop of its own (from an array to itself, the vectorized
    loop's overlap check fails)."""
    mean, denom, one, zero = stats[0], stats[1], stats[2], stats[3]
    width = mask_out.shape[1]
    for b in range(start, stop):
        a_row, m_row, o_row = adv[b], mask_out[b], out[b]
        span = row_spans[b]
        if in_place and span >= 0:
            for t in range(span):
                a_row[t] = (a_row[t] - mean) / denom
        elif in_place:
            for t in range(-span):
                a_row[t] = ((a_row[t] - mean) * (one if m_row[t] else zero)) / denom
        else:
            if span >= 0:
                for t in range(span):
                    o_row[t] = (a_row[t] - mean) / denom
            else:
                for t in range(-span):
                    o_row[t] = ((a_row[t] - mean) * (one if m_row[t] else zero)) / denom
            for t in range(abs(span), width):
                o_row[t] = zero
    return 0


@dataclass
class Scan:
    """The fused pass's results: advantages and returns [B, T] in the compute dtype (returns is
    `advantages` itself without values), mask [B, T] bool, lengths [B] int32, and the token rewards 0
    at masked positions (the given tensor when it already is, else a zeroed copy; None for outcome
    rewards). The values are read by the scan and not kept: nothing else in the engine reads them."""

    advantages: Tensor
    returns: Tensor
    mask: Tensor
    lengths: Tensor
    rewards: Tensor | None


def scan(rewards: Tensor | None, values: Tensor | None, mask: Tensor, gamma: float, lam: float,
         gaps: str = "skip", outcome: Tensor | None = None, *, old_logprobs: Tensor | None = None,
         ref_logprobs: Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k1",
         kl_clamp: float | None = None, clip: tuple[float | None, float | None] = (None, None),
         whiten: Whitening | None = None) -> Scan | None:
    """GAE (with `values`) or reward-to-go (without: `lam` unused) over raw CPU inputs, checked in the
    same pass; None when a check fails (see the module's docstring), or when the mask's dtype is none of
    MASK_DTYPES and WIDENED_MASK_DTYPES.

    rewards [B, T] or outcome [B] (exactly one), values [B, T] or None, in the compute dtype (float32
    or float64), contiguous; mask [B, T], contiguous (MASK_DTYPES are read as they are,
    WIDENED_MASK_DTYPES widened to the compute dtype first, exactly: a value that is not 0 or 1 stays
    so). Masked positions of the inputs may hold anything (NaN included). Nothing given is modified.
    The rewards the scan runs on are shaped as the estimators shape them: `clip` (low, high; None: no
    bound) on each token reward or on the outcome, then minus kl_coef·kl(old_logprobs, ref_logprobs)
    (`functional.kl` estimator, one of KL_KINDS, and clamp) at every valid token when kl_coef > 0
    (both [B, T], then checked finite at valid positions). `whiten`: the advantages are then whitened
    over the batch's valid tokens in that form (`functional.masks.whiten`, to rounding: the moments are
    taken in float64 row by row and merged, then μ and d rounded to the compute dtype and applied in
    one more pass; the bits of `whiten` afterwards); the returns (the reward-to-go without values) are
    not.
    """
    dtype = (rewards if rewards is not None else outcome).dtype
    if mask.dtype not in MASK_DTYPES:
        if mask.dtype not in WIDENED_MASK_DTYPES:
            return None
        mask = mask.to(dtype)
    batch, width = mask.shape
    mask_out = OUTPUTS.empty((batch, width), torch.bool)
    lengths = torch.empty(batch, dtype=torch.int32)
    low, high = clip
    shaping = (CLIP if low is not None or high is not None else 0) | (KL if kl_coef else 0)
    coef = np.array([gamma, gamma * lam if values is not None else gamma, 0.0, kl_coef,
                     0.0 if kl_clamp is None else kl_clamp, -math.inf if low is None else low,
                     math.inf if high is None else high, 0.5, math.inf], dtype=torch.empty(0, dtype=dtype).numpy().dtype)
    given_outcome = outcome
    if outcome is not None and (low is not None or high is not None):
        outcome = outcome.clamp(low, high)  # on the outcome, before it is placed (the caller's is kept)
    advantages = OUTPUTS.empty((batch, width), dtype)
    returns = OUTPUTS.empty((batch, width), dtype) if values is not None else advantages
    with_kl = bool(shaping & KL)
    # an input the call does not have is stood in for by an array of its shape (`advantages`, or zeros
    # [B]), never a smaller one: the compiled code may read it ahead of the flag that says it is unused
    stand_in = advantages.numpy()
    args = (stand_in if rewards is None else rewards.numpy(),
            np.zeros(batch, coef.dtype) if outcome is None else outcome.numpy(),
            stand_in if values is None else values.numpy(), mask.numpy(),
            old_logprobs.numpy() if with_kl else stand_in, ref_logprobs.numpy() if with_kl else stand_in, coef,
            values is not None, outcome is not None, gaps == "step", shaping, KL_KINDS[kl_estimator] if with_kl else 0,
            kl_clamp is not None, advantages.numpy(), returns.numpy(), mask_out.numpy(), lengths.numpy())
    # the rewards' zeroed copy: rows holding something at a masked position are copied by the pass while
    # they are in the cache, the others afterwards when any was (the copy is then the batch's tensor)
    rewards_out = OUTPUTS.empty(rewards.shape, dtype) if rewards is not None else None
    copied = np.zeros(batch, np.bool_)
    row_spans = np.empty(batch, np.int64)
    args = (*args, np.zeros((1, 1), coef.dtype) if rewards is None else rewards_out.numpy(), copied,  # never written
            row_spans)
    threads = min(torch.get_num_threads(), mask.numel() // TOKENS_PER_THREAD)
    verdict = _in_parts(_rows, args, batch, threads)
    if verdict & (NOT_ZERO_ONE | NOT_FINITE):
        return None
    if outcome is not None and not bool(torch.isfinite(given_outcome).all()):  # every row's, empty ones too
        return None
    if verdict & REWARDS_MASKED:
        if not copied.all():
            rest = torch.from_numpy(~copied)
            rewards_out[rest] = rewards[rest]
        rewards = rewards_out
    if whiten is not None:
        out = advantages if values is not None else OUTPUTS.empty((batch, width), dtype)  # rtg: returns stay
        advantages = _whitened(advantages, mask_out, lengths, row_spans, whiten, out, threads)
    return Scan(advantages, returns, mask_out, lengths, rewards)


def whiten(x: Tensor, mask: Tensor, form: Whitening) -> Tensor:
    """`functional.masks.whiten(x, valid, **vars(form))` on the CPU, x [B, T] float32 or float64 (0 at
    masked positions), mask [B, T] bool: the moments of each row in float64 merged in row order, as
    `scan(..., whiten=form)` takes them, so whitening a scan's advantages afterwards gives the bits of
    the scan's own whitening (the two passes of a sharded batch: advserve.ray.sharding). A new tensor."""
    x, mask = x.contiguous(), mask.contiguous()
    batch = x.shape[0]
    lengths = mask.sum(dim=1, dtype=torch.int32)
    row_spans = np.empty(batch, np.int64)
    threads = min(torch.get_num_threads(), x.numel() // TOKENS_PER_THREAD)
    _in_parts(_spans_of_rows, (mask.numpy(), lengths.numpy(), row_spans), batch, threads)
    return _whitened(x, mask, lengths, row_spans, form, torch.empty_like(x), threads)


def _whitened(advantages: Tensor, mask_out: Tensor, lengths: Tensor, row_spans: np.ndarray, form: Whitening,
              out: Tensor, threads: int) -> Tensor:
    """`functional.masks.whiten(advantages, valid, **vars(form))` written to `out` (which may be
    `advantages`), given the rows' spans [B] (`_rows` or `_spans_of_rows`): the rows' moments
    (`_moments_of_rows`), merged, then applied, on up to `threads` threads (from WHITENED_PER_THREAD
    tokens each)."""
    batch = advantages.shape[0]
    threads = min(threads, advantages.numel() // WHITENED_PER_THREAD)  # two passes bound by memory
    moments = np.empty((batch, 2), np.float64)
    _in_parts(_moments_of_rows, (advantages.numpy(), mask_out.numpy(), lengths.numpy(), row_spans, moments), batch,
              threads)
    n, mean, m2 = _merged_moments(moments, lengths.numpy())
    dtype = advantages.dtype
    mu = torch.tensor(mean, dtype=dtype)
    denom = torch.tensor(1.0, dtype=dtype)
    if form.use_std:
        denom = whitening_scale(torch.tensor(m2 / max(n - form.ddof, 1.0), dtype=dtype), eps=form.eps,
                                eps_mode=form.eps_mode)
        if not bool(denom > 0):  # all equal, eps 0: whiten's zeros
            return out.zero_()
    stats = torch.stack([mu, denom, torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype)]).numpy()
    _in_parts(_whitened_rows, (advantages.numpy(), mask_out.numpy(), out.numpy(), out is advantages, stats,
                               row_spans), advantages.shape[0], threads)
    return out


def _in_parts(fn, args: tuple, batch: int, threads: int) -> int:
    """fn(*args, start, stop) over the rows of the batch, on up to `threads` threads: the union of the
    verdicts (ints) it returns. The rows are cut into twice as many parts as threads (rows differ in
    work); this thread runs the first, then every part no pool thread has started yet (a cancelled
    future), from the last: the pool is shared, and a request never waits behind another's part."""
    parts = max(1, min(batch, 2 * threads if threads > 1 else 1))
    bounds = [batch * k // parts for k in range(parts + 1)]
    futures = [(_pool().submit(fn, *args, start, stop), start, stop) for start, stop in zip(bounds[1:-1], bounds[2:])]
    verdict = fn(*args, bounds[0], bounds[1])
    for future, start, stop in reversed(futures):
        verdict |= fn(*args, start, stop) if future.cancel() else 0
    for future, _, _ in futures:
        if not future.cancelled():
            verdict |= future.result()
    return verdict


@functools.lru_cache(maxsize=1)
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for the parts of a batch beyond the caller's own (which it runs itself)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1),
                                                 thread_name_prefix="advserve-scan")


os.register_at_fork(after_in_child=_pool.cache_clear)  # a forked worker (--workers) starts its own threads


def warm(until_cached: bool = False) -> None:
    """Compile (or load from numba's disk cache) the variants requests use most: float32 and float64,
    a mask of bool or of the compute dtype, whitened or not (and `whiten`). scripts/install.sh (`make venv`, the Docker image) calls it
    so that the cache is there before the first request; the server calls it at start, in a thread,
    with `until_cached`: it stops at the first variant that loads from the cache in under a second (the
    others will too, on first use), and otherwise compiles them all before a request needs them."""
    for dtype in (torch.float32, torch.float64):
        for mask_dtype in (dtype, torch.bool):
            rewards = torch.zeros(1, 2, dtype=dtype)
            started = time.perf_counter()
            result = scan(rewards, rewards, torch.ones(1, 2, dtype=mask_dtype), 1.0, 1.0, whiten=Whitening(0, 1e-8))
            whiten(result.advantages, result.mask, Whitening(0, 1e-8))
            if until_cached and time.perf_counter() - started < 1.0:
                return
