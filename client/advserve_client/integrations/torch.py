"""The loss of `compute_losses` as a torch tensor whose `.backward()` applies the service's exact gradients.

    from advserve_client import Client
    from advserve_client.integrations.torch import compute_loss

    with Client("127.0.0.1:8000") as client:
        loss, result = compute_loss(client, preset="verl", logprobs=logp, old_logprobs=old,
                                    advantages=adv, response_mask=mask)
        loss.backward()                  # ∂loss/∂logp, as the service computed it, into logp's graph
        print(result.metrics)

`logprobs` and, when given, `values`, `entropy` and `token_losses` [B, T] are the differentiable inputs:
each is sent detached, and backward multiplies the upstream gradient (1 for `loss.backward()`) by the
service's `grad_<name>` ([B, T], the exact ∂loss/∂input, tested against torch autograd). Every other
argument is the request of `Client.compute_losses` as is. torch is imported with this module only.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

# the inputs whose gradient the service returns, as `grad_<name>`
DIFFERENTIABLE = ("logprobs", "values", "entropy", "token_losses")


class ServiceLoss(torch.autograd.Function):
    """forward(compute, request, box, names, *inputs) -> the loss, a 0-dim tensor of the first input's dtype
    and device. compute(**request, **{name: input.detach()}) returns a LossResult (`Client.compute_losses`,
    `advserve.compute_losses`); it is stored in box[0]. backward: grad_output · result.grad_<name> for each
    input, cast to the input's dtype and device."""

    @staticmethod
    def forward(ctx: Any, compute: Callable[..., Any], request: dict[str, Any], box: list, names: tuple[str, ...],
                *inputs: torch.Tensor) -> torch.Tensor:
        result = compute(**request, **{name: tensor.detach() for name, tensor in zip(names, inputs)})
        box.append(result)
        grads = []
        for name, tensor in zip(names, inputs):
            grad = getattr(result, f"grad_{name}", None)
            if grad is None:
                raise ValueError(f"the service returned no grad_{name}: is the loss term that reads {name} on?")
            grads.append(torch.as_tensor(grad).to(device=tensor.device, dtype=tensor.dtype))
        ctx.save_for_backward(*grads)
        first = inputs[0]
        return torch.tensor(float(result.loss), dtype=first.dtype, device=first.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        return (None, None, None, None, *(grad_output * grad for grad in ctx.saved_tensors))


def loss_with_gradients(compute: Callable[..., Any], **request: Any) -> tuple[torch.Tensor, Any]:
    """(loss, result): `compute(**request)` (a LossResult) with its loss as a tensor wired into the graph
    of the differentiable inputs present in `request` (`DIFFERENTIABLE`: logprobs, values, entropy,
    token_losses; None values are dropped). loss.backward() adds result.grad_<name> · upstream to each."""
    request = {key: value for key, value in request.items() if value is not None}
    names = tuple(name for name in DIFFERENTIABLE if name in request)
    if not names:
        raise ValueError(f"no differentiable input: give at least one of {', '.join(DIFFERENTIABLE)}")
    inputs = [torch.as_tensor(request.pop(name)) for name in names]
    box: list = []
    loss = ServiceLoss.apply(compute, request, box, names, *inputs)
    return loss, box[0]


def compute_loss(client: Any, **request: Any) -> tuple[torch.Tensor, Any]:
    """(loss, result) from `client.compute_losses(**request)` (a `Client`; an `AsyncClient` cannot be
    used: backward is synchronous). loss: a 0-dim tensor (the first differentiable input's dtype and
    device) whose backward applies the service's gradients; result: the LossResult (.metrics,
    .components, .params, the gradients)."""
    return loss_with_gradients(client.compute_losses, **request)


__all__ = ["DIFFERENTIABLE", "ServiceLoss", "compute_loss", "loss_with_gradients"]
