"""The loss of `compute_losses` as a JAX function with the service's exact gradients (`jax.custom_vjp`).

    import jax
    from advserve_client import Client
    from advserve_client.integrations.jax import compute_loss

    with Client("127.0.0.1:8000") as client:
        def objective(params):
            return compute_loss(client, log_probs(params, batch), preset="verl", old_logprobs=old,
                                advantages=adv, response_mask=mask)
        loss, grads = jax.value_and_grad(objective)(params)     # jax.jit(...) works too

The differentiable inputs are `logprobs` and, when given, `values`, `entropy` and `token_losses` [B, T];
their cotangents are the service's `grad_<name>` times the upstream cotangent. The service is called
through `jax.pure_callback`, so the function also runs under `jax.jit` (once per evaluation, never
vmapped). The other tensors (old_logprobs, advantages, response_mask, ...) and the loss terms are the
request of `Client.compute_losses` as is; they must be concrete arrays (numpy, or JAX arrays outside a
trace). `results`, a list, receives each call's LossResult (metrics, components). jax is imported with
this module only.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

# the inputs whose gradient the service returns, as `grad_<name>`
DIFFERENTIABLE = ("logprobs", "values", "entropy", "token_losses")


def _concrete(value: Any) -> Any:
    """A JAX array as numpy (the wire's arrays); anything else as is."""
    return np.asarray(value) if isinstance(value, jax.Array) else value


def loss_function(compute: Callable[..., Any], results: list | None = None, **request: Any) -> Callable[..., Any]:
    """f(inputs) -> loss: `inputs` a dict {name: [B, T] array} of differentiable inputs (`DIFFERENTIABLE`);
    compute(**request, **inputs) returns a LossResult (`Client.compute_losses`). The loss is a 0-dim
    array of the first input's dtype; f's VJP maps a cotangent g to {name: g · result.grad_<name>}."""
    request = {key: _concrete(value) for key, value in request.items() if value is not None}

    def host(inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        result = compute(**request, **{name: np.array(array) for name, array in inputs.items()})
        if results is not None:
            results.append(result)
        first = next(iter(inputs.values()))
        grads = {}
        for name, array in inputs.items():
            grad = getattr(result, f"grad_{name}", None)
            if grad is None:
                raise ValueError(f"the service returned no grad_{name}: is the loss term that reads {name} on?")
            grads[name] = np.asarray(grad, dtype=array.dtype)
        return np.asarray(result.loss, dtype=first.dtype), grads

    def call(inputs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        first = next(iter(inputs.values()))
        shapes = (jax.ShapeDtypeStruct((), first.dtype),
                  {name: jax.ShapeDtypeStruct(array.shape, array.dtype) for name, array in inputs.items()})
        return jax.pure_callback(host, shapes, inputs)

    @jax.custom_vjp
    def f(inputs: dict[str, Any]) -> Any:
        return call(inputs)[0]

    def forward(inputs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return call(inputs)

    def backward(grads: dict[str, Any], cotangent: Any) -> tuple[dict[str, Any]]:
        return ({name: cotangent * grad for name, grad in grads.items()},)

    f.defvjp(forward, backward)
    return f


def compute_loss(client: Any, logprobs: Any = None, *, values: Any = None, entropy: Any = None,
                 token_losses: Any = None, results: list | None = None, **request: Any) -> Any:
    """The loss of `client.compute_losses(logprobs=..., **request)` (a `Client`, or any callable taking
    compute_losses' arguments and returning a LossResult) as a differentiable JAX scalar: jax.grad of it
    with respect to logprobs (values, entropy, token_losses when given) is the service's gradient."""
    compute = getattr(client, "compute_losses", client)
    inputs = {name: array for name, array in zip(DIFFERENTIABLE, (logprobs, values, entropy, token_losses))
              if array is not None}
    if not inputs:
        raise ValueError(f"no differentiable input: give at least one of {', '.join(DIFFERENTIABLE)}")
    return loss_function(compute, results, **request)(inputs)


__all__ = ["DIFFERENTIABLE", "compute_loss", "loss_function"]
