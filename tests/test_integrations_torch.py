"""The differentiable wrappers: `advserve_client.integrations.torch` over a remote server (REST and gRPC),
`advserve.integrations.torch` in process, and `advserve_client.integrations.jax` (jax.custom_vjp).

Properties: loss.backward() leaves in each differentiable input the service's gradient times the upstream
gradient; through a model, the parameters' gradient is the chain rule of it (compared with torch
autograd of a hand-written PPO clipped loss, verl's formula, written here from its definition); jax.grad
(also under jax.jit) of the JAX function is the service's gradient; the client imports without torch.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import advserve
from advserve.integrations.torch import compute_loss as in_process_loss
from advserve_client import Client
from advserve_client.integrations.torch import compute_loss

B, T = 5, 7


def batch(seed: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = torch.log(torch.rand(B, T, generator=g, dtype=dtype) * 0.9 + 0.05)
    return {"response_mask": mask, "old_logprobs": old,
            "logprobs": old + 0.4 * torch.randn(B, T, generator=g, dtype=dtype),
            "advantages": torch.randn(B, T, generator=g, dtype=dtype),
            "values": torch.randn(B, T, generator=g, dtype=dtype),
            "old_values": torch.randn(B, T, generator=g, dtype=dtype),
            "returns": torch.randn(B, T, generator=g, dtype=dtype),
            "entropy": torch.rand(B, T, generator=g, dtype=dtype) * 2}


def verl_ppo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0):
    """verl 0.9.1's vanilla policy loss (compute_policy_loss_vanilla), token-mean, written from its definition:
    ratio = exp(clamp(logp − old, ±20)); max(−A·ratio, −A·clip(ratio, 1 − ε_low, 1 + ε_high)), for A < 0
    at most −A·c; the mean over valid tokens."""
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    clipped = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    losses = torch.where(adv < 0, torch.minimum(clipped, -adv * dual_clip), clipped)
    return (losses * mask).sum() / mask.sum()


REQUEST = {"preset": "verl", "policy_loss": {"clip_low": 0.2, "clip_high": 0.28}, "dtype": "float64"}


@pytest.fixture(scope="module")
def clients(server):
    with Client(server.url) as http, Client(server.grpc_address, transport="grpc") as grpc:
        yield {"in process": None, "http": http, "grpc": grpc}


@pytest.mark.parametrize("where", ["in process", "http", "grpc"])
def test_backward_through_a_model_is_autograd_of_verls_ppo_loss(clients, where):
    """A linear 'model' makes the log-probs; loss.backward() through the wrapper gives the parameters the
    gradient torch autograd gives them through verl's formula."""
    t = batch(1)
    hidden = torch.randn(B, T, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weight = torch.randn(3, dtype=torch.float64, requires_grad=True)
    logp = t["old_logprobs"] + 0.3 * torch.tanh(hidden @ weight)
    fields = {"old_logprobs": t["old_logprobs"], "advantages": t["advantages"], "response_mask": t["response_mask"]}
    if where == "in process":
        loss, result = in_process_loss(logprobs=logp, **fields, **REQUEST)
    else:
        loss, result = compute_loss(clients[where], logprobs=logp, **fields, **REQUEST)
    assert loss.shape == () and loss.dtype == torch.float64 and loss.requires_grad
    loss.backward()
    ours = weight.grad.clone()

    weight.grad = None
    logp = t["old_logprobs"] + 0.3 * torch.tanh(hidden @ weight)
    reference = verl_ppo_loss(logp, t["old_logprobs"], t["advantages"], t["response_mask"])
    reference.backward()
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(ours, weight.grad, rtol=1e-10, atol=1e-12)
    assert set(result.metrics) >= {"clip_fraction_high", "clip_fraction_low", "approx_kl"}


@pytest.mark.parametrize("where", ["in process", "http", "grpc"])
def test_each_input_gets_its_gradient_times_the_upstream_one(clients, where):
    """logprobs, values and entropy all carry gradient; a scaled upstream gradient (3·loss) scales each."""
    t = batch(3)
    leaves = {name: t[name].clone().requires_grad_(True) for name in ("logprobs", "values", "entropy")}
    request = dict(REQUEST, value_loss={"coef": 0.5, "clip": 0.2}, entropy_bonus={"coef": 0.01})
    fields = {name: t[name] for name in ("old_logprobs", "advantages", "response_mask", "old_values", "returns")}
    if where == "in process":
        loss, result = in_process_loss(**leaves, **fields, **request)
    else:
        loss, result = compute_loss(clients[where], **leaves, **fields, **request)
    (3 * loss).backward()
    direct = advserve.compute_losses(**{n: v.detach() for n, v in leaves.items()}, **fields, **request)
    assert float(loss.detach()) == direct.loss
    for name in leaves:
        torch.testing.assert_close(leaves[name].grad, 3 * getattr(direct, f"grad_{name}"), rtol=0, atol=1e-15)
        torch.testing.assert_close(getattr(result, f"grad_{name}"), getattr(direct, f"grad_{name}"), rtol=0,
                                   atol=1e-15)


def test_token_losses_get_their_gradient():
    """Any per-token loss matrix (the token_loss term, verl's agg_loss): its gradient is the aggregation's,
    here token-mean over the valid tokens, times coef."""
    t = batch(8)
    token_losses = torch.rand(B, T, dtype=torch.float64, requires_grad=True)
    loss, result = in_process_loss(preset="verl", policy_loss=False, token_loss={"coef": 2.0, "agg": "token-mean"},
                                   token_losses=token_losses, response_mask=t["response_mask"], dtype="float64")
    loss.backward()
    mask = t["response_mask"].double()
    assert float(loss.detach()) == pytest.approx(2.0 * float((token_losses.detach() * mask).sum() / mask.sum()))
    torch.testing.assert_close(token_losses.grad, 2.0 * mask / mask.sum(), rtol=1e-12, atol=0)


def test_float32_and_no_grad_inputs():
    """The loss takes the first differentiable input's dtype; an input without requires_grad is fine."""
    t = batch(4, torch.float32)
    loss, result = in_process_loss(preset="verl", logprobs=t["logprobs"], old_logprobs=t["old_logprobs"],
                                   advantages=t["advantages"], response_mask=t["response_mask"])
    assert loss.dtype == torch.float32 and not loss.requires_grad and float(loss) == pytest.approx(result.loss)


def test_an_input_no_term_reads_is_an_error():
    t = batch(5)
    with pytest.raises(advserve.InvalidArgument, match="'values' is not used"):  # the engine refuses it
        in_process_loss(preset="verl", logprobs=t["logprobs"].requires_grad_(True), values=t["values"],
                        old_logprobs=t["old_logprobs"], advantages=t["advantages"], response_mask=t["response_mask"])
    with pytest.raises(ValueError, match="no differentiable input"):
        in_process_loss(preset="verl", old_logprobs=t["old_logprobs"])


def test_the_client_package_imports_without_torch_or_jax():
    """advserve_client.integrations is importable where torch and jax are not (their modules load only
    when imported)."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['jax'] = None\n"
            "import advserve_client, advserve_client.integrations\n"
            "from advserve_client import Client\n"
            "try:\n    import advserve_client.integrations.torch\nexcept ImportError:\n    print('no torch')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no torch"


# --- JAX -------------------------------------------------------------------------------------------------

# jax is in the test extra (advserve[jax]): imported, not skipped without it
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from advserve_client.integrations.jax import compute_loss as jax_loss  # noqa: E402


def numpy_batch(seed: int) -> dict[str, np.ndarray]:
    return {name: value.numpy().astype(np.float32) if value.dtype.is_floating_point else value.numpy()
            for name, value in batch(seed).items()}


@pytest.mark.parametrize("where", ["in process", "http"])
def test_jax_grad_is_the_service_gradient(clients, where):
    t = numpy_batch(6)
    compute = advserve.compute_losses if where == "in process" else clients[where]
    fields = {"old_logprobs": t["old_logprobs"], "advantages": t["advantages"], "response_mask": t["response_mask"]}
    results: list = []

    def objective(logp):
        return jax_loss(compute, logp, preset="verl", results=results, **fields)

    direct = advserve.compute_losses(preset="verl", logprobs=t["logprobs"], **fields)
    value, grad = jax.value_and_grad(objective)(jnp.asarray(t["logprobs"]))
    assert float(value) == pytest.approx(direct.loss, rel=1e-6) and value.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(grad), direct.grad_logprobs)
    jitted = jax.jit(jax.value_and_grad(objective))(jnp.asarray(t["logprobs"]))
    np.testing.assert_array_equal(np.asarray(jitted[1]), direct.grad_logprobs)
    assert len(results) == 2 and results[0].metrics == direct.metrics


def test_jax_chain_rule_through_a_model_and_several_inputs():
    """jax.grad with respect to a model's parameters (logprobs and values both made by it) equals the VJP
    of the model applied to the service's grad_logprobs and grad_values; a cotangent of 2 doubles it."""
    t = numpy_batch(7)
    params = jnp.asarray(np.random.default_rng(0).normal(size=(T, T)).astype(np.float32))
    hidden = jnp.asarray(t["advantages"])
    fields = {n: t[n] for n in ("old_logprobs", "advantages", "response_mask", "old_values", "returns")}

    def model(p):
        return t["old_logprobs"] + 0.1 * jnp.tanh(hidden @ p), hidden @ p.T

    def objective(p):
        logp, values = model(p)
        return 2.0 * jax_loss(advserve.compute_losses, logp, values=values, preset="verl",
                              value_loss={"coef": 0.5}, **fields)

    grads = jax.grad(objective)(params)
    (logp, values), vjp = jax.vjp(model, params)
    direct = advserve.compute_losses(preset="verl", logprobs=np.array(logp), values=np.array(values),
                                     value_loss={"coef": 0.5}, **fields)
    (expected,) = vjp((2.0 * jnp.asarray(direct.grad_logprobs), 2.0 * jnp.asarray(direct.grad_values)))
    np.testing.assert_allclose(np.asarray(grads), np.asarray(expected), rtol=1e-6, atol=1e-7)
