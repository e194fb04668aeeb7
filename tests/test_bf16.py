"""bfloat16 inputs: what a trainer sends in bf16 (log-probs, old/ref/rollout log-probs, entropy, values,
rewards, the mask) is accepted by the in-process API and by every transport that carries dtypes (REST
binary framing, native gRPC, /v2 binary), widened to the compute dtype (float32 by default, float64 when
asked; bf16 is never a compute dtype) and computed there: a bf16 request gives exactly the numbers of
the same values sent as float32, and results and gradients come back in the compute dtype.

Over REST JSON (no dtypes) a bf16 tensor travels as its values, which JSON carries exactly. The bf16
values are drawn first and the float32 request carries them upcast (bf16 -> float32 is exact),
so "the same numbers" is bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import advserve
from advserve.errors import InvalidArgument
from advserve_client import Client
from advserve_client import InvalidArgument as ClientInvalidArgument

B, T = 6, 11
BF16_TOKEN_TENSORS = ("logprobs", "old_logprobs", "ref_logprobs", "rollout_logprobs", "entropy", "values",
                      "old_values", "returns", "advantages")


def _bf16_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16 tensors of a loss and an advantage request (log-probs < 0, ragged rows, an interior gap),
    a bool mask, outcome rewards and group ids."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(T).unsqueeze(0) < torch.tensor([11, 7, 3, 11, 1, 5]).unsqueeze(1)
    mask[0, 4] = False
    old = -torch.rand(B, T, generator=gen) * 3

    def bf16(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16)

    return {
        "logprobs": bf16(old + 0.2 * torch.randn(B, T, generator=gen)),
        "old_logprobs": bf16(old),
        "ref_logprobs": bf16(old + 0.2 * torch.randn(B, T, generator=gen)),
        "rollout_logprobs": bf16(old + 0.05 * torch.randn(B, T, generator=gen)),
        "entropy": bf16(torch.rand(B, T, generator=gen) * 2),
        "values": bf16(torch.randn(B, T, generator=gen)),
        "old_values": bf16(torch.randn(B, T, generator=gen)),
        "returns": bf16(torch.randn(B, T, generator=gen)),
        "advantages": bf16(torch.randn(B, T, generator=gen)),
        "rewards": bf16(torch.randint(0, 2, (B,), generator=gen).float() + 0.25),
        "response_mask": mask,
        "group_ids": torch.tensor([0, 0, 1, 1, 2, 2]),
    }


def _upcast(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in tensors.items()}


LOSS_TERMS = dict(policy_loss={"mode": "ppo_clip"}, kl_loss={"estimator": "k3"}, value_loss={},
                  entropy_bonus={"coef": 0.01}, rollout_correction={})
LOSS_INPUTS = ("logprobs", "old_logprobs", "advantages", "response_mask", "ref_logprobs", "values", "old_values",
               "returns", "entropy", "rollout_logprobs")
ADVANTAGE_CASES = [("gae", "verl", ("rewards", "values", "response_mask"), {"gamma": 0.99, "lam": 0.95}),
                   ("grpo", "verl", ("rewards", "response_mask", "group_ids"), {"kl_coef": 0.0}),
                   ("reinforce_pp", "verl", ("rewards", "response_mask", "old_logprobs", "ref_logprobs"),
                    {"kl_coef": 0.05})]


def _pick(tensors: dict, names) -> dict:
    return {k: tensors[k] for k in names}


def _same(a, b) -> None:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), (a - b).abs().max()


def _same_loss(got, want) -> None:
    assert got.loss == want.loss
    assert got.components == want.components and got.metrics == want.metrics
    for name in ("grad_logprobs", "grad_values", "grad_entropy"):
        _same(getattr(got, name), getattr(want, name))


# --- in process --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, "float64"])
def test_losses_in_process_compute_bf16_as_the_upcast_values(dtype):
    bf16 = _pick(_bf16_batch(1), LOSS_INPUTS)
    got = advserve.compute_losses(preset="verl", **LOSS_TERMS, dtype=dtype, **bf16)
    want = advserve.compute_losses(preset="verl", **LOSS_TERMS, dtype=dtype, **_upcast(bf16))
    _same_loss(got, want)
    compute = torch.float64 if dtype == "float64" else torch.float32
    assert got.grad_logprobs.dtype == got.grad_values.dtype == got.grad_entropy.dtype == compute
    assert got.loss != 0 and torch.count_nonzero(got.grad_logprobs) > 0


def test_losses_in_bf16_are_not_computed_in_bf16():
    """Ratios within 0.4% of 1 (bf16 resolves 0.8% there): computed in float32 the loss sees them; a bf16
    computation would round every ratio to 1 and give a loss of exactly -1."""
    mask = torch.ones(2, 3, dtype=torch.bool)
    old = torch.full((2, 3), -0.01, dtype=torch.bfloat16)
    logprobs = (old.float() + torch.tensor([[0.002, 0.003, 0.0], [0.001, 0.002, 0.003]])).to(torch.bfloat16)
    got = advserve.compute_losses(preset="verl", policy_loss={"mode": "ppo_clip"}, logprobs=logprobs,
                                  old_logprobs=old, advantages=torch.ones(2, 3), response_mask=mask)
    ratios = torch.exp(logprobs.float() - old.float())
    assert bool((ratios.to(torch.bfloat16) == 1).all())  # what a bf16 computation would see
    assert got.loss == pytest.approx(-float(ratios.mean()), rel=1e-6)
    assert got.loss < -1.001
    assert got.grad_logprobs.dtype == torch.float32


@pytest.mark.parametrize("estimator,preset,names,params", ADVANTAGE_CASES, ids=[c[0] for c in ADVANTAGE_CASES])
def test_advantages_in_process(estimator, preset, names, params):
    bf16 = _pick(_bf16_batch(2), names)
    got = advserve.compute_advantages(estimator, preset=preset, params=params, **bf16)
    want = advserve.compute_advantages(estimator, preset=preset, params=params, **_upcast(bf16))
    _same(got.advantages, want.advantages)
    _same(got.returns, want.returns)
    assert got.advantages.dtype == torch.float32
    assert got.stats == want.stats


def test_a_bf16_mask_is_a_mask():
    tensors = _pick(_bf16_batch(3), ("rewards", "values", "response_mask"))
    as_bf16 = {**tensors, "response_mask": tensors["response_mask"].to(torch.bfloat16)}
    _same(advserve.compute_advantages("gae", **as_bf16).advantages, advserve.compute_advantages("gae", **tensors).advantages)
    bad = tensors["response_mask"].to(torch.bfloat16)
    bad[0, 0] = 0.5
    with pytest.raises(InvalidArgument) as refused:
        advserve.compute_advantages("gae", **{**tensors, "response_mask": bad})
    assert refused.value.field == "tensors.response_mask"


def test_bf16_is_not_a_compute_dtype():
    with pytest.raises(InvalidArgument) as refused:
        advserve.compute_losses(preset="verl", dtype="bfloat16", **_pick(_bf16_batch(4), LOSS_INPUTS[:4]))
    assert refused.value.field == "dtype"


def test_a_bf16_inf_on_a_valid_token_names_the_tensor():
    tensors = _pick(_bf16_batch(5), LOSS_INPUTS[:4])
    tensors["logprobs"][1, 2] = float("inf")
    with pytest.raises(InvalidArgument) as refused:
        advserve.compute_losses(preset="verl", **tensors)
    assert refused.value.field == "tensors.logprobs"
    tensors["logprobs"][1, 2] = 0.0
    tensors["logprobs"][2, 9] = float("nan")  # masked (row 2 has 3 tokens): ignored
    assert np.isfinite(advserve.compute_losses(preset="verl", **tensors).loss)


# --- over the transports ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clients(server):
    made = {"rest-binary": Client(server.url, timeout=60, max_retries=0),
            "rest-json": Client(server.url, binary=False, timeout=60, max_retries=0),  # bf16 values as JSON numbers
            "grpc": Client(server.grpc_address, transport="grpc", timeout=60, max_retries=0),
            # tensors in shared-memory regions (docs/shared-memory.md), bf16 bytes as they are
            "rest-shm": Client(server.url, shared_memory=True, timeout=60, max_retries=0),
            "grpc-shm": Client(server.grpc_address, transport="grpc", shared_memory=True, timeout=60, max_retries=0)}
    yield made
    for client in made.values():
        client.close()


TRANSPORTS = ["rest-binary", "rest-json", "grpc", "rest-shm", "grpc-shm"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_losses_over_the_transports(clients, transport):
    client = clients[transport]
    bf16 = _pick(_bf16_batch(6), LOSS_INPUTS)
    got = client.compute_losses(preset="verl", **LOSS_TERMS, **bf16)
    want = client.compute_losses(preset="verl", **LOSS_TERMS, **_upcast(bf16))
    in_process = advserve.compute_losses(preset="verl", **LOSS_TERMS, **_upcast(bf16))
    _same_loss(got, want)
    _same_loss(got, in_process)
    assert got.grad_logprobs.dtype == torch.float32


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("estimator,preset,names,params", ADVANTAGE_CASES, ids=[c[0] for c in ADVANTAGE_CASES])
def test_advantages_over_the_transports(clients, transport, estimator, preset, names, params):
    client = clients[transport]
    bf16 = _pick(_bf16_batch(7), names)
    got = client.compute_advantages(estimator, preset=preset, params=params, **bf16)
    want = advserve.compute_advantages(estimator, preset=preset, params=params, **_upcast(bf16))
    _same(got.advantages, want.advantages)
    _same(got.returns, want.returns)


@pytest.mark.parametrize("transport", ["rest-binary", "grpc"])
def test_float64_compute_over_the_transports(clients, transport):
    bf16 = _pick(_bf16_batch(8), LOSS_INPUTS)
    got = clients[transport].compute_losses(preset="verl", **LOSS_TERMS, dtype="float64", **bf16)
    want = advserve.compute_losses(preset="verl", **LOSS_TERMS, dtype="float64", **_upcast(bf16))
    _same_loss(got, want)
    assert got.grad_logprobs.dtype == torch.float64


@pytest.mark.parametrize("transport", ["rest-binary", "grpc"])
def test_bf16_compute_dtype_is_refused_over_the_transports(clients, transport):
    with pytest.raises(ClientInvalidArgument) as refused:
        clients[transport].compute_losses(preset="verl", dtype="bfloat16", **_pick(_bf16_batch(9), LOSS_INPUTS[:4]))
    assert refused.value.field == "dtype"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_oip_bf16(server, protocol):
    """/v2 over HTTP (binary-data extension) and gRPC (raw contents): BF16 inputs computed as FP32."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = httpclient if protocol == "http" else grpcclient
    tensors = _pick(_bf16_batch(10), LOSS_INPUTS[:4])
    client = (httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
              if protocol == "http" else grpcclient.InferenceServerClient(server.grpc_address))
    try:
        inputs = []
        for name, value in tensors.items():
            bf16 = value.dtype == torch.bfloat16
            item = module.InferInput(name, list(value.shape), "BF16" if bf16 else "BOOL")
            array = _bf16_words(value) if bf16 else value.numpy()
            if protocol == "http":
                item.set_data_from_numpy(array, binary_data=True)
            else:
                item.set_data_from_numpy(array)
            inputs.append(item)
        answer = client.infer("losses", inputs, parameters={"preset": "verl"})
        got = answer.as_numpy("grad_logprobs")
    finally:
        client.close()
    want = advserve.compute_losses(preset="verl", **_upcast(tensors))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want.grad_logprobs.numpy())


def _bf16_words(value: torch.Tensor) -> np.ndarray:
    """bf16 as tritonclient's BF16 input takes it: an ml_dtypes.bfloat16 array of the same values (exact)."""
    import ml_dtypes

    return value.float().numpy().astype(ml_dtypes.bfloat16)


def test_bf16_where_integers_belong_is_refused_by_name():
    """Group ids and cu_seqlens are integers: bf16 ones (floats) are an error naming the tensor."""
    tensors = _pick(_bf16_batch(11), ("rewards", "response_mask", "group_ids"))
    with pytest.raises(InvalidArgument) as refused:
        advserve.compute_advantages("grpo", **{**tensors, "group_ids": tensors["group_ids"].to(torch.bfloat16)})
    assert refused.value.field == "tensors.group_ids"
    flat = torch.ones(5, dtype=torch.bfloat16)
    with pytest.raises(InvalidArgument) as refused:
        advserve.compute_advantages("reinforce", layout="packed", rewards=torch.ones(2, dtype=torch.bfloat16),
                                    token_rewards=None, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.bfloat16),
                                    response_mask=flat.bool())
    assert refused.value.field == "tensors.cu_seqlens"
