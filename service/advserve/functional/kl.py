"""KL estimators between a policy and the reference, with their gradients (Schulman, "Approximating
KL divergence", 2020). With x = logp − ref:

    k1 = x            ∂/∂logp = 1
    k2 = ½ x²         ∂/∂logp = x
    k3 = e^−x + x − 1 ∂/∂logp = 1 − e^−x        (low variance, always ≥ 0)
    abs = |x|         ∂/∂logp = sign(x)

`clamp` c bounds the value to [−c, c] (and k3's input −x to [−20, 20] first, as verl and NeMo-RL
do); the gradient is 0 where a bound binds.
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
K3_LOG_RATIO_BOUND = 20.0


def kl_and_grad(logp: Tensor, ref: Tensor, estimator: str, clamp: float | None = None) -> tuple[Tensor, Tensor]:
    """(kl, ∂kl/∂logp), both [B, T], for logp and ref [B, T]."""
    x = logp - ref
    if estimator == "k1":
        value, grad = x, torch.ones_like(x)
    elif estimator == "k2":
        value, grad = 0.5 * x.square(), x
    elif estimator == "abs":
        value, grad = x.abs(), x.sign()
    elif estimator == "k3":
        neg = -x
        grad_scale = torch.ones_like(x)
        if clamp is not None:
            inside = (neg >= -K3_LOG_RATIO_BOUND) & (neg <= K3_LOG_RATIO_BOUND)
            neg = neg.clamp(-K3_LOG_RATIO_BOUND, K3_LOG_RATIO_BOUND)
            grad_scale = inside.to(x.dtype)
        ratio = neg.exp()
        value, grad = ratio - neg - 1, (1 - ratio) * grad_scale
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    if clamp is not None:
        grad = torch.where((value >= -clamp) & (value <= clamp), grad, 0)
        value = value.clamp(-clamp, clamp)
    return value, grad

