"""PPO's clipped surrogate (dual clip) plus a KL penalty, loss and gradient, as one Triton kernel.

A standalone function, not yet called by the engine: `ppo_clip_kl` computes, in one pass over memory,
what `Engine.compute_losses` computes for the terms policy_loss {mode "ppo_clip"} and kl_loss from the
torch functions of `advserve.functional` (the reference):

    ρ_t = exp(clamp(lp_t − old_t, ±ratio_clamp)),  ∂ρ/∂lp = ρ where the clamp passes, else 0;
    ℓ^π_t = max(−A ρ, −A clip(ρ, 1 − clip_low, 1 + clip_high)), and for A < 0 with dual clip c:
            min(ℓ^π_t, −cA); ∂ℓ^π/∂lp = −A ∂ρ where the unclipped, uncapped branch is taken, else 0
            (`functional.losses.clipped_surrogate`);
    kl_t, ∂kl/∂lp of x = lp − ref by the estimator k1 (x), k2 (x²/2), k3 (e^−x + x − 1, −x clamped to
            ±20 first when a clamp is set), the value clamped to ±kl_clamp with gradient 0 where it
            binds (`functional.kl.kl_and_grad`);
    policy = Σ w^π_t ℓ^π_t,  kl = Σ w^kl_t kl_t,  loss = policy + β·kl,
    grad_t = w^π_t ∂ℓ^π_t/∂lp + β w^kl_t ∂kl_t/∂lp,

with the aggregation weights w [B, T] of `functional.masks.aggregation_weights` (0 at masked positions:
they carry the mask and the agg mode). Every position is read once (lp, old, ref, A, the two weights)
and its gradient written once; the two sums are per-block partials added in block order (the same
bits on every run). float32 or float64 on a CUDA device, or on the CPU under Triton's interpreter
(TRITON_INTERPRET=1, read when this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..functional.kl import K3_LOG_RATIO_BOUND

BLOCK = 1024
KERNEL_KL_ESTIMATORS = ("k1", "k2", "k3")
_KL = {name: i for i, name in enumerate(KERNEL_KL_ESTIMATORS)}
K3_BOUND: tl.constexpr = tl.constexpr(K3_LOG_RATIO_BOUND)  # k3's −x clamped to ±20 when a clamp is set


@triton.jit
def _ppo_clip_kl_kernel(logp, old, ref, adv, w_pol, w_kl, grad, partials, N,
                        clip_low: tl.float64, clip_high: tl.float64, dual_clip: tl.float64,
                        ratio_clamp: tl.float64, kl_coef: tl.float64, kl_clamp: tl.float64,
                        HAS_DUAL: tl.constexpr, HAS_RATIO_CLAMP: tl.constexpr, KL: tl.constexpr,
                        HAS_KL_CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    lp = tl.load(logp + offs, mask=inside, other=0.0)
    o = tl.load(old + offs, mask=inside, other=0.0)
    r = tl.load(ref + offs, mask=inside, other=0.0)
    a = tl.load(adv + offs, mask=inside, other=0.0)
    wp = tl.load(w_pol + offs, mask=inside, other=0.0)
    wk = tl.load(w_kl + offs, mask=inside, other=0.0)
    dtype = lp.dtype

    # policy: the clipped surrogate with the dual clip
    log_ratio = lp - o
    passes = tl.full(log_ratio.shape, 1.0, dtype)
    if HAS_RATIO_CLAMP:
        bound = tl.full((), ratio_clamp, dtype)
        passes = tl.where((log_ratio >= -bound) & (log_ratio <= bound), 1.0, 0.0).to(dtype)
        log_ratio = tl.minimum(tl.maximum(log_ratio, -bound), bound)
    ratio = tl.exp(log_ratio)
    neg_adv = -a
    unclipped = neg_adv * ratio
    low = 1 - tl.full((), clip_low, dtype)
    high = 1 + tl.full((), clip_high, dtype)
    clipped = neg_adv * tl.minimum(tl.maximum(ratio, low), high)
    loss_pol = tl.maximum(unclipped, clipped)
    grad_pol = tl.where(clipped <= unclipped, neg_adv * (ratio * passes), 0.0)
    if HAS_DUAL:
        cap = neg_adv * tl.full((), dual_clip, dtype)
        dual = (a < 0) & (cap < loss_pol)
        loss_pol = tl.where(dual, cap, loss_pol)
        grad_pol = tl.where(dual, 0.0, grad_pol)

    # KL of lp against ref
    x = lp - r
    if KL == 0:
        kl = x
        grad_kl = tl.full(x.shape, 1.0, dtype)
    elif KL == 1:
        kl = 0.5 * (x * x)
        grad_kl = x
    else:
        neg = -x
        scale = tl.full(x.shape, 1.0, dtype)
        if HAS_KL_CLAMP:
            scale = tl.where((neg >= -K3_BOUND) & (neg <= K3_BOUND), 1.0, 0.0).to(dtype)
            neg = tl.minimum(tl.maximum(neg, -K3_BOUND), K3_BOUND)
        e = tl.exp(neg)
        kl = e - neg - 1
        grad_kl = (1 - e) * scale
    if HAS_KL_CLAMP:
        c = tl.full((), kl_clamp, dtype)
        grad_kl = tl.where((kl >= -c) & (kl <= c), grad_kl, 0.0)
        kl = tl.minimum(tl.maximum(kl, -c), c)

    beta = tl.full((), kl_coef, dtype)
    tl.store(grad + offs, wp * grad_pol + (beta * wk) * grad_kl, mask=inside)
    tl.store(partials + pid * 2, tl.sum(tl.where(inside, wp * loss_pol, 0.0), axis=0))
    tl.store(partials + pid * 2 + 1, tl.sum(tl.where(inside, wk * kl, 0.0), axis=0))


def ppo_clip_kl(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, advantages: Tensor,
                policy_weights: Tensor, kl_weights: Tensor, *, clip_low: float, clip_high: float,
                dual_clip: float | None, ratio_clamp: float | None, kl_coef: float, kl_estimator: str,
                kl_clamp: float | None, block: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, policy, kl, grad_logprobs): the formulas of the module's docstring in one kernel launch.

    Every tensor [B, T] (or any shape, all alike) in one float dtype; the weights 0 at masked positions
    (`aggregation_weights` of each term's agg mode). loss, policy and kl are 0-d tensors on the
    device (nothing is read on the host); grad_logprobs has the inputs' shape. kl_estimator: k1, k2
    or k3. `block`: positions per program (a power of 2, default BLOCK).
    """
    if kl_estimator not in _KL:
        raise ValueError(f"kl_estimator must be one of {', '.join(KERNEL_KL_ESTIMATORS)}, got {kl_estimator!r}")
    shape = logprobs.shape
    flat = [t.contiguous().reshape(-1) for t in (logprobs, old_logprobs, ref_logprobs, advantages,
                                                   policy_weights, kl_weights)]
    count = flat[0].numel()
    block = BLOCK if block is None else block
    n_blocks = max(triton.cdiv(count, block), 1)
    grad = torch.empty_like(flat[0])
    partials = torch.zeros(n_blocks, 2, dtype=flat[0].dtype, device=flat[0].device)
    if count:
        _ppo_clip_kl_kernel[(n_blocks,)](
            *flat, grad, partials, count, float(clip_low), float(clip_high),
            float(dual_clip if dual_clip is not None else 0.0), float(ratio_clamp if ratio_clamp is not None else 0.0),
            float(kl_coef), float(kl_clamp if kl_clamp is not None else 0.0),
            HAS_DUAL=dual_clip is not None, HAS_RATIO_CLAMP=ratio_clamp is not None, KL=_KL[kl_estimator],
            HAS_KL_CLAMP=kl_clamp is not None, BLOCK=block)
    policy, kl = partials.sum(dim=0).unbind()
    return policy + kl_coef * kl, policy, kl, grad.view(shape)
