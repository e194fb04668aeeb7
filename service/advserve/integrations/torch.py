"""The in-process twin of `advserve_client.integrations.torch`: `advserve.compute_losses` as a loss tensor
whose `.backward()` applies the engine's exact gradients.

    from advserve.integrations.torch import compute_loss

    loss, result = compute_loss(preset="verl", logprobs=logp, old_logprobs=old, advantages=adv, response_mask=mask)
    loss.backward()

Same arguments as `advserve.compute_losses` (device, kernels included); logprobs and, when given,
values, entropy and token_losses [B, T] carry the gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from advserve_client.integrations.torch import DIFFERENTIABLE, ServiceLoss, loss_with_gradients

from ..api import compute_losses


def compute_loss(**request: Any) -> tuple[torch.Tensor, Any]:
    """(loss, result): `advserve.compute_losses(**request)` with its loss as a 0-dim tensor (the first
    differentiable input's dtype and device) whose backward applies result.grad_<name> to logprobs
    (values, entropy, token_losses when given); result: the LossResult (.metrics, .components, ...)."""
    return loss_with_gradients(compute_losses, **request)


__all__ = ["DIFFERENTIABLE", "ServiceLoss", "compute_loss"]
