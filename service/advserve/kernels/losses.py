"""The loss terms of `Engine.compute_losses` with their gradients, in one Triton kernel launch.

`loss_terms` computes, in one pass over memory, what the torch functions of `advserve.functional`
(the reference) compute for the terms the engine dispatches here (`covers`): every position is read
once (each term's inputs and aggregation weights) and each gradient written once. Per token t, with
the aggregation weights w [B, T] of `functional.masks.aggregation_weights` (0 at masked positions:
they carry the mask, the agg mode and the normalizers):

    ρ_t = exp(clamp(lp − old, ±ratio_clamp)),  ∂ρ = ρ where the clamp passes, else 0 (the token ratio);
        or the row's s_i = exp(min(mean_t(lp − old), ratio_clamp)) for gspo and cispo at sequence level
        (the row means computed by the torch path first), its gradient per token (token_trick) or
        through the row mean (through_mean: the kernel writes ∂ℓ/∂log s_i, `spread_over_row` after);
    policy ℓ^π_t, ∂ℓ^π_t/∂lp of the mode (`functional.losses.policy_term`): ppo_clip and gspo (clip,
        dual clip, ratio cap), reinforce, cispo, gpg, dro, sapo, dppo_tv, dppo_kl, bypass_mode (its
        importance weights, computed by the torch path, multiply ℓ and ∂ℓ); rollout correction's
        weights or the given rollout_is_weights multiply w^π;
    kl_t, ∂kl/∂lp of x = lp − ref by k1, k2, k3 or abs with their clamps (`functional.kl.kl_and_grad`),
        the straight-through gradient of another estimator, OpenRLHF's unbiased gradient, or × ρ_t
        (importance_weighted: ∂ = ρ ∂kl + kl ∂ρ) (`functional.losses.kl_loss`);
    value ℓ^v_t, ∂ℓ^v/∂v: ½ max((v − G)², (v_c − G)²), both clip forms and tie conventions
        (`functional.losses.value_loss`); entropy e_t; token_losses τ_t;

    policy = Σ w^π ℓ^π,  kl = Σ w^kl kl,  value = Σ w^v ℓ^v,  entropy = Σ w^e e,  token_loss = Σ w^τ τ,
    loss = policy + β kl + c_v value − c_e entropy + c_τ token_loss,
    ∂loss/∂lp = w^π ∂ℓ^π + β w^kl ∂kl,  ∂loss/∂v = c_v w^v ∂ℓ^v,  ∂loss/∂e = −c_e w^e,  ∂loss/∂τ = c_τ w^τ.

The sums are per-block partials added in block order (the same bits on every run), with the
unweighted sums the metrics read (Σ kl_t, Σ e_t), the count of clipped values, and with a policy term
the reductions of `engine.policy_metrics` on the kernel's ρ: Σ (old − lp), Σ ρ and ρ's extremes over
the valid tokens, and the tokens behind each clip fraction. float32 or float64
on a CUDA device, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1, read when this module
is imported). geo_mean, clip_cov and kl_cov stay on the torch path (`covers`, docs/kernels.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..functional.kl import K3_LOG_RATIO_BOUND
from ..functional.losses import KL_IS_WEIGHT_CAP, PolicyTerm, bypass_weights, sequence_log_ratio, spread_over_row
from .groups import _div  # float32 division rounded to nearest, as torch divides

BLOCK = 1024
KERNEL_KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
_KL = {name: i for i, name in enumerate(KERNEL_KL_ESTIMATORS)}
UNBIASED = len(KERNEL_KL_ESTIMATORS)  # the KL gradient code of OpenRLHF's unbiased gradient
# the kernel's policy codes; bypass_mode maps to ppo_clip or gpg (`_policy_code`)
POLICY_CODES = {"ppo_clip": 1, "reinforce": 2, "cispo": 3, "gpg": 4, "dro": 5, "sapo": 6, "dppo_tv": 7, "dppo_kl": 8}
FUSED_POLICY_MODES = (*POLICY_CODES, "gspo", "bypass_mode")  # gspo: ppo_clip on the sequence ratio
IS_ON_LOSS, IS_ON_WEIGHTS = 1, 2  # importance weights multiply ℓ and ∂ℓ (bypass_mode) or w^π (rollout correction)
VALUE_CODES = {None: 1, "bounds": 2, "delta": 3}  # unclipped, and the two clip forms
# columns of the partial sums (APPROX_KL, RATIO_SUM: the policy metrics' Σ (old − lp) and Σ ρ over valid tokens)
TOTAL, POLICY, KL, KL_SUM, VALUE, ENTROPY, ENTROPY_SUM, TOKEN, APPROX_KL, RATIO_SUM = range(10)
COLUMNS = 10
# columns of the counts: clipped values, and the tokens behind each clip fraction of `engine.policy_metrics`
COUNTED = ("value_clip_fraction", "clip_fraction_high", "clip_fraction_low", "dual_clip_fraction", "ratio_cap_fraction")
BEYOND, CLIP_HIGH, CLIP_LOW, DUAL, CAPPED = range(len(COUNTED))
K3_BOUND: tl.constexpr = tl.constexpr(K3_LOG_RATIO_BOUND)  # k3's −x clamped to ±20 when a clamp is set
IS_WEIGHT_CAP: tl.constexpr = tl.constexpr(KL_IS_WEIGHT_CAP)


@triton.jit
def _kl_estimate(x, KL: tl.constexpr, BOUND: tl.constexpr):
    """(kl, ∂kl/∂lp) of x = lp − ref by estimator KL (0 k1, 1 k2, 2 k3, 3 abs); BOUND: k3's −x to ±20."""
    one = tl.full(x.shape, 1.0, x.dtype)
    if KL == 0:
        kl = x
        grad = one
    elif KL == 1:
        kl = 0.5 * (x * x)
        grad = x
    elif KL == 2:
        neg = -x
        scale = one
        if BOUND:
            scale = tl.where((neg >= -K3_BOUND) & (neg <= K3_BOUND), 1.0, 0.0).to(x.dtype)
            neg = tl.minimum(tl.maximum(neg, -K3_BOUND), K3_BOUND)
        e = tl.exp(neg)
        kl = e - neg - 1
        grad = (1 - e) * scale
    else:
        kl = tl.abs(x)
        grad = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(x.dtype)
    return kl, grad


@triton.jit
def _tie_split(x, bound, BELOW: tl.constexpr):
    """∂/∂x of min(x, bound) (BELOW) or max(x, bound): 1 to a strict winner x, ½ at a tie, else 0."""
    wins = x < bound if BELOW else x > bound
    return tl.where(wins, 1.0, tl.where(x == bound, 0.5, 0.0)).to(x.dtype)


@triton.jit
def _loss_kernel(logp, old, ref, adv, w_pol, is_w, w_kl, values, old_values, returns, w_val, entropy, w_ent,
                 token_losses, w_tok, valid, grad_lp, grad_v, grad_e, grad_tok, kl_out, seq_log_ratio, spread_out,
                 partials, counts, extremes, N, T, n_blocks,
                 low: tl.float64, high: tl.float64, clip_low: tl.float64, clip_high: tl.float64,
                 dual_clip: tl.float64, ratio_clamp: tl.float64, cap: tl.float64, p1: tl.float64, p2: tl.float64,
                 kl_coef: tl.float64, kl_clamp: tl.float64, value_coef: tl.float64, value_clip: tl.float64,
                 entropy_coef: tl.float64, token_coef: tl.float64,
                 POLICY: tl.constexpr, HAS_RATIO_CLAMP: tl.constexpr, HAS_DUAL: tl.constexpr,
                 HAS_CAP: tl.constexpr, IS_W: tl.constexpr, SEQ_RATIO: tl.constexpr, SPREAD: tl.constexpr,
                 METRICS: tl.constexpr,
                 KL: tl.constexpr, KL_GRAD: tl.constexpr, HAS_KL_CLAMP: tl.constexpr, KL_IW: tl.constexpr,
                 WRITE_KL: tl.constexpr, VALUE: tl.constexpr, SPLIT_TIES: tl.constexpr, ENTROPY: tl.constexpr,
                 TOKEN: tl.constexpr, F32: tl.constexpr, BLOCK: tl.constexpr):
    # POLICY: 0 none, else POLICY_CODES; p1, p2: the mode's own parameters (cispo: none; dro: ½β, β;
    # sapo: τ+, τ−; dppo: none); IS_W: 0 none, IS_ON_LOSS or IS_ON_WEIGHTS; SEQ_RATIO: the ratio is the
    # row's exp(min(seq_log_ratio[row], ratio_clamp)) (T: the row length); SPREAD: its gradient goes
    # through the row mean: gspo's and an importance-weighted KL's part to spread_out; KL: −1 none, else _KL; KL_GRAD:
    # −1 the estimator's own, _KL (unclamped) or UNBIASED; VALUE: 0 none, else VALUE_CODES. METRICS (a policy
    # and its mask): the policy metrics' reductions: partials' APPROX_KL and RATIO_SUM, counts' clip columns (COUNTED) and
    # extremes [2, n_blocks] (min ρ, max ρ over the block's valid tokens; valid: the mask's bytes)
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    total = tl.zeros((BLOCK,), partials.dtype.element_ty)
    dtype = total.dtype
    if POLICY != 0 or KL >= 0:
        lp = tl.load(logp + offs, mask=inside, other=0.0)
        grad = tl.zeros((BLOCK,), dtype)
    if SPREAD:
        spread = tl.zeros((BLOCK,), dtype)
    if POLICY != 0 or KL_IW or KL_GRAD == 4:
        o = tl.load(old + offs, mask=inside, other=0.0)
        passes = tl.full((BLOCK,), 1.0, dtype)
        if SEQ_RATIO:  # the row's mean log-ratio, bounded above only (policy_ratio)
            log_ratio = tl.load(seq_log_ratio + offs // T, mask=inside, other=0.0)
            if HAS_RATIO_CLAMP:
                bound = tl.full((), ratio_clamp, dtype)
                passes = tl.where(log_ratio <= bound, 1.0, 0.0).to(dtype)
                log_ratio = tl.minimum(log_ratio, bound)
        else:
            log_ratio = lp - o
            if HAS_RATIO_CLAMP:
                bound = tl.full((), ratio_clamp, dtype)
                passes = tl.where((log_ratio >= -bound) & (log_ratio <= bound), 1.0, 0.0).to(dtype)
                log_ratio = tl.minimum(tl.maximum(log_ratio, -bound), bound)
        ratio = tl.exp(log_ratio)
        dratio = ratio * passes

    if POLICY != 0:
        a = tl.load(adv + offs, mask=inside, other=0.0)
        wp = tl.load(w_pol + offs, mask=inside, other=0.0)
        neg_adv = -a
        lo = tl.full((), low, dtype)
        hi = tl.full((), high, dtype)
        if POLICY == 1:  # ppo_clip: the clipped surrogate (clipped_surrogate)
            clipped = neg_adv * tl.minimum(tl.maximum(ratio, lo), hi)
            if HAS_CAP:
                delta = tl.full((), cap, dtype)
                unclipped = neg_adv * tl.minimum(ratio, delta)
                loss_pol = tl.maximum(unclipped, clipped)
                passed = tl.where(clipped <= unclipped, ratio <= delta, (ratio >= lo) & (ratio <= hi))
                grad_pol = tl.where(passed, neg_adv * dratio, 0.0)
            else:
                unclipped = neg_adv * ratio
                loss_pol = tl.maximum(unclipped, clipped)
                grad_pol = tl.where(clipped <= unclipped, neg_adv * dratio, 0.0)
            if HAS_DUAL:
                cap_loss = neg_adv * tl.full((), dual_clip, dtype)
                dual = (a < 0) & (cap_loss < loss_pol)
                loss_pol = tl.where(dual, cap_loss, loss_pol)
                grad_pol = tl.where(dual, 0.0, grad_pol)
        elif POLICY == 2:  # reinforce: −A ρ
            loss_pol = neg_adv * ratio
            grad_pol = neg_adv * dratio
        elif POLICY == 3:  # cispo: −sg(ŵ) A lp
            if HAS_CAP:
                neg_w = -tl.minimum(ratio, tl.full((), cap, dtype))
            else:
                neg_w = -tl.minimum(tl.maximum(ratio, lo), hi)
            grad_pol = neg_w * a
            loss_pol = grad_pol * lp
        elif POLICY == 4:  # gpg: −A lp
            loss_pol = -lp * a
            grad_pol = neg_adv
        elif POLICY == 5:  # dro: −(A lp − ½β (lp − old)²)
            d = lp - o
            loss_pol = -(lp * a - tl.full((), p1, dtype) * (d * d))
            grad_pol = tl.full((), p2, dtype) * d - a
        elif POLICY == 6:  # sapo: −(4/τ) σ(τ(ρ − 1)) A
            tau = tl.where(a > 0, tl.full((), p1, dtype), tl.full((), p2, dtype))
            sig = _div(tl.full((BLOCK,), 1.0, dtype), 1.0 + tl.exp(-(tau * (ratio - 1.0))), F32)
            loss_pol = -(sig * _div(tl.full((BLOCK,), 4.0, dtype), tau, F32)) * a
            grad_pol = neg_adv * ((4.0 * sig) * (1 - sig)) * dratio
        else:  # dppo_tv (7), dppo_kl (8): −A sg(min(ρ, cap)) lp inside the trust region
            weight = tl.minimum(ratio, tl.full((), cap, dtype)) if HAS_CAP else ratio
            prob = tl.exp(lp)
            old_prob = tl.exp(o)
            c_low = tl.full((), clip_low, dtype)
            c_high = tl.full((), clip_high, dtype)
            if POLICY == 7:
                positive = (prob - old_prob) <= c_high
                negative = (prob - old_prob) >= -c_low
            else:
                eps = tl.full((), 1e-8, dtype)
                divergence = old_prob * (o - lp) + (1 - old_prob) * tl.log(_div(1.0 - old_prob + eps, 1.0 - prob + eps, F32))
                positive = (divergence <= c_high) | (prob <= old_prob)
                negative = (divergence <= c_low) | (prob >= old_prob)
            trusted = tl.where(a > 0, positive, negative)
            scaled = neg_adv * weight
            loss_pol = tl.where(trusted, scaled * lp, 0.0)
            grad_pol = tl.where(trusted, scaled, 0.0)
        if IS_W != 0:
            weight_is = tl.load(is_w + offs, mask=inside, other=0.0)
            if IS_W == 1:  # bypass_mode's: −A·lp·sg(w)
                loss_pol = loss_pol * weight_is
                grad_pol = grad_pol * weight_is
            else:  # rollout correction's: w^π·w
                wp = wp * weight_is
        policy_part = wp * loss_pol
        total += policy_part
        if SPREAD and POLICY == 1:  # gspo through the row mean: ∂ℓ/∂log s_i, spread afterwards
            spread = wp * grad_pol
        else:
            grad = wp * grad_pol
        tl.store(partials + pid * 10 + 1, tl.sum(tl.where(inside, policy_part, 0.0), axis=0))  # POLICY
    if POLICY != 0 and METRICS:  # the policy metrics (`engine.policy_metrics`), by the same conditions on this ratio
        m = tl.load(valid + offs, mask=inside, other=0) != 0
        tl.store(partials + pid * 10 + 8, tl.sum(tl.where(inside, o - lp, 0.0), axis=0))  # APPROX_KL
        tl.store(partials + pid * 10 + 9, tl.sum(tl.where(m, ratio, 0.0), axis=0))  # RATIO_SUM
        tl.store(extremes + pid, tl.min(tl.where(m, ratio, float("inf")), axis=0))
        tl.store(extremes + n_blocks + pid, tl.max(tl.where(m, ratio, -float("inf")), axis=0))
        no = tl.zeros((BLOCK,), tl.int1)
        counted_high, counted_low, counted_dual, counted_cap = no, no, no, no
        if POLICY == 1:  # ppo_clip, gspo, bypass_mode's ppo_clip
            counted_high = (ratio > hi) & (a > 0)
            counted_low = (ratio < lo) & (a < 0)
            if HAS_DUAL:
                counted_dual = (ratio > tl.full((), dual_clip, dtype)) & (a < 0)
            if HAS_CAP:
                counted_cap = (ratio > tl.full((), cap, dtype)) & m
        elif POLICY == 3:  # cispo: over the cap, or outside the clip range
            if HAS_CAP:
                counted_high = (ratio > tl.full((), cap, dtype)) & m
            else:
                counted_high = (ratio > hi) & m
                counted_low = (ratio < lo) & m
        elif POLICY >= 7:  # dppo: outside the trust region, by A's sign; the cap inside it
            dropped = (trusted == 0) & m
            counted_high = dropped & (a > 0)
            counted_low = dropped & (a <= 0)
            if HAS_CAP:
                counted_cap = (ratio > tl.full((), cap, dtype)) & (trusted != 0) & m
        tl.store(counts + pid * 5 + 1, tl.sum(counted_high.to(tl.int64), axis=0))  # CLIP_HIGH
        tl.store(counts + pid * 5 + 2, tl.sum(counted_low.to(tl.int64), axis=0))  # CLIP_LOW
        tl.store(counts + pid * 5 + 3, tl.sum(counted_dual.to(tl.int64), axis=0))  # DUAL
        tl.store(counts + pid * 5 + 4, tl.sum(counted_cap.to(tl.int64), axis=0))  # CAPPED

    if KL >= 0:
        r = tl.load(ref + offs, mask=inside, other=0.0)
        wk = tl.load(w_kl + offs, mask=inside, other=0.0)
        x = lp - r
        kl, grad_kl = _kl_estimate(x, KL, HAS_KL_CLAMP)
        if HAS_KL_CLAMP:
            c = tl.full((), kl_clamp, dtype)
            grad_kl = tl.where((kl >= -c) & (kl <= c), grad_kl, 0.0)
            kl = tl.minimum(tl.maximum(kl, -c), c)
        if WRITE_KL:
            tl.store(kl_out + offs, kl, mask=inside)
        if KL_GRAD == 4:  # OpenRLHF's unbiased gradient: sg(min(e^(lp − old), 10)) (lp − ref)
            grad_kl = tl.minimum(tl.exp(lp - o), IS_WEIGHT_CAP) * x
        elif KL_GRAD >= 0:  # straight-through: another estimator's gradient, unclamped
            _, grad_kl = _kl_estimate(x, KL_GRAD, False)
        beta = tl.full((), kl_coef, dtype)
        if KL_IW:  # × ρ, differentiable: ∂ = ρ ∂kl + kl ∂ρ (the second through the row mean with SPREAD)
            through = kl * dratio
            grad_kl = grad_kl * ratio
            if SPREAD:
                spread += (beta * wk) * through
            else:
                grad_kl = grad_kl + through
            kl = kl * ratio
        total += beta * (wk * kl)
        grad += (beta * wk) * grad_kl
        tl.store(partials + pid * 10 + 2, tl.sum(tl.where(inside, wk * kl, 0.0), axis=0))  # KL
        tl.store(partials + pid * 10 + 3, tl.sum(tl.where(inside, kl, 0.0), axis=0))  # KL_SUM
    if POLICY != 0 or KL >= 0:
        tl.store(grad_lp + offs, grad, mask=inside)
    if SPREAD:
        tl.store(spread_out + offs, spread, mask=inside)

    if VALUE != 0:
        v = tl.load(values + offs, mask=inside, other=0.0)
        g = tl.load(returns + offs, mask=inside, other=0.0)
        wv = tl.load(w_val + offs, mask=inside, other=0.0)
        d_unclipped = v - g
        unclipped_v = d_unclipped * d_unclipped
        if VALUE == 1:
            loss_v = 0.5 * unclipped_v
            grad_value = d_unclipped
        else:
            ov = tl.load(old_values + offs, mask=inside, other=0.0)
            c = tl.full((), value_clip, dtype)
            if VALUE == 3:  # delta: v_old + clip(v − v_old, ±c)
                xv = v - ov
                bound_low = tl.zeros((BLOCK,), dtype) - c
                bound_high = tl.zeros((BLOCK,), dtype) + c
            else:  # bounds: clip(v, v_old ± c)
                xv = v
                bound_low = ov - c
                bound_high = ov + c
            capped = tl.minimum(xv, bound_high)
            clipped_x = tl.maximum(capped, bound_low)
            if SPLIT_TIES:
                passes_v = _tie_split(xv, bound_high, True) * _tie_split(capped, bound_low, False)
            else:
                passes_v = tl.where((xv >= bound_low) & (xv <= bound_high), 1.0, 0.0).to(dtype)
            clipped_v = ov + clipped_x if VALUE == 3 else clipped_x
            d_clipped = clipped_v - g
            clipped_sq = d_clipped * d_clipped
            d_clipped = d_clipped * passes_v
            loss_v = 0.5 * tl.maximum(unclipped_v, clipped_sq)
            grad_value = tl.where(unclipped_v > clipped_sq, d_unclipped,
                                  tl.where(clipped_sq > unclipped_v, d_clipped, 0.5 * (d_unclipped + d_clipped)))
            beyond = (clipped_sq > unclipped_v) & inside
            tl.store(counts + pid * 5 + 0, tl.sum(beyond.to(tl.int64), axis=0))  # BEYOND
        coef_v = tl.full((), value_coef, dtype)
        total += coef_v * (wv * loss_v)
        tl.store(grad_v + offs, (coef_v * wv) * grad_value, mask=inside)
        tl.store(partials + pid * 10 + 4, tl.sum(tl.where(inside, wv * loss_v, 0.0), axis=0))  # VALUE

    if ENTROPY:
        e = tl.load(entropy + offs, mask=inside, other=0.0)
        we = tl.load(w_ent + offs, mask=inside, other=0.0)
        coef_e = tl.full((), entropy_coef, dtype)
        total -= coef_e * (we * e)
        tl.store(grad_e + offs, (-coef_e) * we, mask=inside)
        tl.store(partials + pid * 10 + 5, tl.sum(tl.where(inside, we * e, 0.0), axis=0))  # ENTROPY
        tl.store(partials + pid * 10 + 6, tl.sum(tl.where(inside, e, 0.0), axis=0))  # ENTROPY_SUM

    if TOKEN:
        tau_t = tl.load(token_losses + offs, mask=inside, other=0.0)
        wt = tl.load(w_tok + offs, mask=inside, other=0.0)
        coef_t = tl.full((), token_coef, dtype)
        total += coef_t * (wt * tau_t)
        tl.store(grad_tok + offs, coef_t * wt, mask=inside)
        tl.store(partials + pid * 10 + 7, tl.sum(tl.where(inside, wt * tau_t, 0.0), axis=0))  # TOKEN

    tl.store(partials + pid * 10 + 0, tl.sum(tl.where(inside, total, 0.0), axis=0))  # TOTAL


@dataclass(frozen=True)
class FusedLosses:
    """What `loss_terms` computes, every number a 0-d tensor on the device (nothing read on the host).

    total: the loss; components: policy, kl, value, entropy, token_loss (None for a term that is off);
    sums: the metrics' numerators, each over every position (kl_mean: Σ kl_t, value_clip_fraction: the
    count of clipped values, entropy_mean: Σ e_t), for the terms present; the gradients and kl_values
    [B, T] (None where the torch path gives None); policy_term: what `policy_metrics` reads of the mode
    (bypass_mode's importance weights; loss and grad None), or None; policy_reductions: with a policy
    term, what `policy_metrics` reduces, computed in the same pass (its `reduced`), else None."""

    total: Tensor
    components: dict[str, Tensor | None]
    sums: dict[str, Tensor]
    grad_logprobs: Tensor | None
    grad_values: Tensor | None
    grad_entropy: Tensor | None
    grad_token_losses: Tensor | None
    kl_values: Tensor | None
    policy_term: PolicyTerm | None
    policy_reductions: dict[str, Tensor] | None = None


def token_ratio(policy: Mapping[str, Any]) -> bool:
    """True when the policy parameters' ratio (`functional.losses.policy_ratio`) is the token ratio, not a
    sequence ratio (gspo, cispo at sequence level)."""
    return policy["mode"] != "gspo" and not (policy["mode"] == "cispo" and policy["cispo_level"] == "sequence")


def covers(terms: Mapping[str, Mapping[str, Any]], policy: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> bool:
    """True when `loss_terms` computes every term of `terms` (the engine's resolved parameters; `policy`
    the policy term's, or the preset's when it is off; `tensors` the request's). Not covered: geo_mean,
    clip_cov, kl_cov, and bypass_mode with rollout_is_weights (an error, which the torch path raises)."""
    if "policy_loss" not in terms:
        return True
    mode = policy["mode"]
    return mode in FUSED_POLICY_MODES and not (mode == "bypass_mode" and "rollout_is_weights" in tensors)


def _policy_code(p: Mapping[str, Any], logp: Tensor, old: Tensor, mask: Tensor,
                 lengths: Tensor) -> tuple[int, dict[str, Any], Tensor | None, PolicyTerm | None]:
    """The kernel's policy code, its scalar arguments, bypass_mode's importance weights (multiplying ℓ
    and ∂ℓ; None: none) and the PolicyTerm the metrics read (None: nothing mode-specific)."""
    mode, args = p["mode"], {}
    if mode == "gspo":
        mode = "ppo_clip"  # on the sequence ratio
    if mode == "bypass_mode":  # the weights are the metrics' (and reinforce's factor): the torch path's
        weights, outside = bypass_weights(logp, old, mask, level=p["bypass_is"], high=p["bypass_is_high"],
                                          low=p["bypass_is_low"], lengths=lengths)
        term = PolicyTerm(None, None, is_weights=weights, is_outside=outside)  # type: ignore[arg-type]
        if p["bypass_loss"] == "ppo_clip":
            return POLICY_CODES["ppo_clip"], {"low": 1 - p["clip_low"], "high": 1 + p["clip_high"],
                                              "dual_clip": p["dual_clip"]}, None, term
        return POLICY_CODES["gpg"], {}, weights, term
    if mode == "ppo_clip":
        args = {"low": 1 - p["clip_low"], "high": 1 + p["clip_high"], "dual_clip": p["dual_clip"], "cap": p["ratio_cap"]}
    elif mode == "cispo":
        args = {"low": 1 - p["clip_low"], "high": 1 + p["clip_high"], "cap": p["cispo_cap"]}
    elif mode == "dro":
        args = {"p1": 0.5 * p["dro_beta"], "p2": p["dro_beta"]}
    elif mode == "sapo":
        args = {"p1": p["tau_pos"], "p2": p["tau_neg"]}
    elif mode in ("dppo_tv", "dppo_kl"):
        args = {"clip_low": p["clip_low"], "clip_high": p["clip_high"], "cap": p["ratio_cap"]}
    return POLICY_CODES[mode], args, None, None


def loss_terms(terms: Mapping[str, Mapping[str, Any]], policy: Mapping[str, Any], tensors: Mapping[str, Tensor],
               weights: Mapping[str, Tensor], mask: Tensor | None = None, lengths: Tensor | None = None, *,
               importance_weights: Tensor | None = None, return_kl_values: bool = False,
               block: int | None = None) -> FusedLosses:
    """The terms of `terms` (`covers` must hold) in one kernel launch: the formulas of the module's docstring.

    terms: each requested term's resolved parameters (the engine's); policy: the policy term's (the
    preset's when it is off: its ratio_clamp bounds an importance-weighted KL's ratio); tensors: the
    batch's [B, T] tensors in one float dtype, 0 at masked positions; weights: each aggregated term's
    w [B, T]; mask [B, T] bool and lengths [B] valid tokens per row (read by bypass_mode, dppo and
    sequence ratios only: None is fine without them). importance_weights [B, T]: rollout correction's or the given
    rollout_is_weights, multiplying w^π (the engine computes them and their metrics). return_kl_values:
    also the KL estimate per token (before an importance weight). `block`: positions per program (a
    power of 2, default BLOCK).
    """
    any_weights = next(iter(weights.values()))
    dtype, device, shape = any_weights.dtype, any_weights.device, any_weights.shape
    count = any_weights.numel()
    dummy = torch.empty(1, dtype=dtype, device=device)  # in place of an absent tensor: never read

    def flat(name: str | None) -> Tensor:
        return dummy if name is None else tensors[name].contiguous().view(-1)

    def flat_weights(term: str) -> Tensor:
        return weights[term].contiguous().view(-1) if term in terms else dummy

    def output(present: bool) -> Tensor:
        return torch.empty(count, dtype=dtype, device=device) if present else dummy

    pol, kl, value = terms.get("policy_loss"), terms.get("kl_loss"), terms.get("value_loss")
    entropy, token = terms.get("entropy_bonus"), terms.get("token_loss")
    code, args, is_weights, term = 0, {}, None, None
    if pol is not None:
        code, args, is_weights, term = _policy_code(pol, tensors["logprobs"], tensors["old_logprobs"], mask, lengths)
    is_kind = 0 if is_weights is None else IS_ON_LOSS
    if importance_weights is not None:  # (bypass_mode has none of these: check_loss_terms, covers)
        is_weights, is_kind = importance_weights, IS_ON_WEIGHTS
    sequence = None
    if (pol is not None or (kl is not None and kl["importance_weighted"])) and not token_ratio(policy):
        sequence = sequence_log_ratio(tensors["logprobs"], tensors["old_logprobs"], mask, lengths)  # [B]
    spread = sequence is not None and policy["sequence_ratio_gradient"] == "through_mean" and (
        (pol is not None and pol["mode"] == "gspo") or (kl is not None and kl["importance_weighted"]))
    spread_out = output(spread)
    kl_grad = -1
    if kl is not None and kl["unbiased_gradient"]:
        kl_grad = UNBIASED
    elif kl is not None and kl["gradient_estimator"] is not None:
        kl_grad = _KL[kl["gradient_estimator"]]
    needs_old = pol is not None or (kl is not None and (kl["unbiased_gradient"] or kl["importance_weighted"]))
    uses_logprobs = pol is not None or kl is not None
    grad_lp, grad_v, grad_e, grad_tok = (output(present) for present in
                                         (uses_logprobs, value is not None, entropy is not None, token is not None))
    write_kl = kl is not None and return_kl_values
    kl_out = output(write_kl)
    block = BLOCK if block is None else block
    n_blocks = max(triton.cdiv(count, block), 1)
    # every block writes the columns of its terms, and only those are read; nothing runs on an empty batch
    allocate = torch.empty if count else torch.zeros
    partials = allocate(n_blocks, COLUMNS, dtype=dtype, device=device)
    counts = allocate(n_blocks, len(COUNTED), dtype=torch.int64, device=device)
    metrics = pol is not None and mask is not None
    extremes = torch.empty(2, n_blocks, dtype=dtype, device=device) if metrics else dummy
    valid = mask.contiguous().view(-1).view(torch.uint8) if metrics else dummy
    value_clip = None if value is None else value["clip"]

    def number(x: float | None) -> float:
        return 0.0 if x is None else float(x)

    if count:
        _loss_kernel[(n_blocks,)](
            flat("logprobs" if uses_logprobs else None), flat("old_logprobs" if needs_old else None),
            flat("ref_logprobs" if kl is not None else None), flat("advantages" if pol is not None else None),
            flat_weights("policy_loss"), dummy if is_weights is None else is_weights.contiguous().view(-1),
            flat_weights("kl_loss"), flat("values" if value is not None else None),
            flat("old_values" if value_clip is not None else None), flat("returns" if value is not None else None),
            flat_weights("value_loss"), flat("entropy" if entropy is not None else None), flat_weights("entropy_bonus"),
            flat("token_losses" if token is not None else None), flat_weights("token_loss"), valid,
            grad_lp, grad_v, grad_e, grad_tok, kl_out, dummy if sequence is None else sequence.contiguous(),
            spread_out, partials, counts, extremes, count, shape[-1], n_blocks,
            *(number(args.get(name)) for name in ("low", "high", "clip_low", "clip_high", "dual_clip")),
            number(policy["ratio_clamp"]), *(number(args.get(name)) for name in ("cap", "p1", "p2")),
            number(kl["coef"] if kl else None), number(kl["clamp"] if kl else None),
            number(value["coef"] if value else None), number(value_clip),
            number(entropy["coef"] if entropy else None), number(token["coef"] if token else None),
            POLICY=code, HAS_RATIO_CLAMP=policy["ratio_clamp"] is not None,
            HAS_DUAL=args.get("dual_clip") is not None, HAS_CAP=args.get("cap") is not None,
            IS_W=is_kind, SEQ_RATIO=sequence is not None, SPREAD=spread, METRICS=metrics,
            KL=-1 if kl is None else _KL[kl["estimator"]], KL_GRAD=kl_grad,
            HAS_KL_CLAMP=kl is not None and kl["clamp"] is not None, KL_IW=kl is not None and kl["importance_weighted"],
            WRITE_KL=write_kl, VALUE=0 if value is None else VALUE_CODES[value["clip_form"] if value_clip is not None else None],
            SPLIT_TIES=value is not None and value["clip_ties"] == "split", ENTROPY=entropy is not None,
            TOKEN=token is not None, F32=dtype == torch.float32, BLOCK=block)
    sums, counted = partials.sum(dim=0), counts.sum(dim=0)
    if spread:  # the row-mean part of the gradient: every valid token gets its row's sum / L_i
        grad_lp += spread_over_row(spread_out.view(shape), mask, lengths).view(-1)

    def present(x: Tensor, on: bool) -> Tensor | None:
        return x.view(shape) if on else None

    metric_sums = {}
    if kl is not None:
        metric_sums["kl_mean"] = sums[KL_SUM]
    if value_clip is not None:
        metric_sums["value_clip_fraction"] = counted[BEYOND]
    if entropy is not None:
        metric_sums["entropy_mean"] = sums[ENTROPY_SUM]
    reductions = None
    if metrics:  # an empty batch has no block: no valid token, the extremes' reads give 0
        low, high = (extremes[0].amin(), extremes[1].amax()) if count else (sums[TOTAL], sums[TOTAL])
        reductions = {"approx_kl": sums[APPROX_KL], "ratio_sum": sums[RATIO_SUM], "ratio_min": low, "ratio_max": high,
                      **{name: counted[i] for i, name in enumerate(COUNTED) if i != BEYOND}}
    components = {"policy": sums[POLICY] if pol is not None else None, "kl": sums[KL] if kl is not None else None,
                  "value": sums[VALUE] if value is not None else None,
                  "entropy": sums[ENTROPY] if entropy is not None else None,
                  "token_loss": sums[TOKEN] if token is not None else None}
    return FusedLosses(sums[TOTAL], components, metric_sums, present(grad_lp, uses_logprobs),
                       present(grad_v, value is not None), present(grad_e, entropy is not None),
                       present(grad_tok, token is not None), present(kl_out, write_kl), term, reductions)


def ppo_clip_kl(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, advantages: Tensor,
                policy_weights: Tensor, kl_weights: Tensor, *, clip_low: float, clip_high: float,
                dual_clip: float | None, ratio_clamp: float | None, kl_coef: float, kl_estimator: str,
                kl_clamp: float | None, block: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, policy, kl, grad_logprobs) of policy_loss ppo_clip + kl_loss by `loss_terms` (one launch).

    Every tensor [B, T] (or any shape, all alike) in one float dtype; the weights 0 at masked positions
    (`aggregation_weights` of each term's agg mode). loss, policy and kl are 0-d tensors on the
    device; grad_logprobs has the inputs' shape. kl_estimator: k1, k2, k3 or abs.
    """
    if kl_estimator not in _KL:
        raise ValueError(f"kl_estimator must be one of {', '.join(KERNEL_KL_ESTIMATORS)}, got {kl_estimator!r}")
    policy = {"mode": "ppo_clip", "clip_low": clip_low, "clip_high": clip_high, "dual_clip": dual_clip,
              "ratio_clamp": ratio_clamp, "ratio_cap": None}
    kl = {"coef": kl_coef, "estimator": kl_estimator, "clamp": kl_clamp, "unbiased_gradient": False,
          "importance_weighted": False, "gradient_estimator": None}
    tensors = {"logprobs": logprobs, "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs,
               "advantages": advantages}
    out = loss_terms({"policy_loss": policy, "kl_loss": kl}, policy, tensors,
                     {"policy_loss": policy_weights, "kl_loss": kl_weights}, block=block)
    return out.total, out.components["policy"], out.components["kl"], out.grad_logprobs
