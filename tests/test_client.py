"""The thin client (`advserve_client.Client` / `AsyncClient`) against real `advserve serve` processes and
scripted stub servers: it installs alone (no torch, no fastapi), REST (binary and JSON) and gRPC give the
numbers of the in-process API, every error class over both transports, retries, torch and numpy."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
import trustme

import advserve
from advserve import errors as server_errors
from advserve_client import (AsyncClient, Client, DeadlineExceeded, InternalError, InvalidArgument, NotFound,
                             Overloaded, PayloadTooLarge, Unauthenticated, Unavailable, _retry, errors, protocol)
from advserve_client._pb import advserve_pb2_grpc as pb_grpc
from advserve_client.framing import RawTensor
from conftest import ROOT, RunningServer, free_port

TRANSPORTS = ("rest-binary", "rest-json", "grpc")


def make_client(server: RunningServer, kind: str, client_class: type = Client, **kwargs: Any) -> Any:
    if kind == "grpc":
        return client_class(server.grpc_address, transport="grpc", **kwargs)
    return client_class(server.url, binary=(kind == "rest-binary"), **kwargs)


@pytest.fixture(scope="module")
def clients(server):
    made = {kind: make_client(server, kind) for kind in TRANSPORTS}
    yield made
    for c in made.values():
        c.close()


@pytest.fixture
def sleeps(monkeypatch):
    """Record the retry sleeps instead of sleeping."""
    recorded: list[float] = []

    async def async_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(_retry, "sleep", recorded.append)
    monkeypatch.setattr(_retry, "async_sleep", async_sleep)
    return recorded


GRPO = {"rewards": [1, 0, 1, 0, 0], "response_mask": [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]],
        "group_ids": ["p1", "p2", "p1", "p1", "p2"]}


# --- (a) the client installs and works alone ---------------------------------------------------------

FRESH_SCRIPT = """
import importlib.util, sys
for name in ("torch", "fastapi", "advserve"):
    assert importlib.util.find_spec(name) is None, name + " is importable in the client's venv"
import numpy as np
from advserve_client import Client, InvalidArgument

http_url, grpc_address = sys.argv[1:3]
# GRPO by hand: group p1 has rewards (1, 1, 0): mean 2/3, population std sqrt(2/9), so its rows get
# (1 - 2/3)/sqrt(2/9) = 1/sqrt(2) and (0 - 2/3)/sqrt(2/9) = -sqrt(2); group p2 (0, 0) is all equal: 0.
a, b = 1 / np.sqrt(2), -np.sqrt(2)
expected = np.array([[a, a, a], [0, 0, 0], [a, 0, 0], [b, b, b], [0, 0, 0]])
for client in (Client(http_url), Client(http_url, binary=False), Client(grpc_address, transport="grpc")):
    with client:
        out = client.compute_advantages(
            "grpo", dtype="float64", rewards=[1, 0, 1, 0, 0],
            response_mask=[[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]],
            group_ids=["p1", "p2", "p1", "p1", "p2"])
        assert isinstance(out.advantages, np.ndarray) and out.advantages.dtype == np.float64
        np.testing.assert_allclose(out.advantages, expected, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(out.returns, out.advantages)
        assert out.stats["groups"]["ids"] == ["p1", "p2"] and out.stats["groups"]["zero_variance_fraction"] == 0.5
        try:
            client.compute_advantages("grpo", params={"lam": 0.9}, **{"rewards": [1, 0], "response_mask": [[1], [1]],
                                                                       "group_ids": [0, 0]})
        except InvalidArgument as exc:
            assert exc.field == "params.lam", exc
        else:
            raise AssertionError("no error")
assert "torch" not in sys.modules and "fastapi" not in sys.modules
print("fresh client ok")
"""


def test_client_installs_and_works_alone_in_a_fresh_venv(server, tmp_path):
    """`pip install ./client` into an empty venv pulls numpy, httpx, grpcio and protobuf only (no torch,
    no fastapi, not the server), and the client gets GRPO's numbers right over both transports."""
    source = tmp_path / "client"  # build from a copy: pip builds in-tree, and nothing may land outside tmp
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv_dir = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PIP_CACHE_DIR=str(tmp_path / "pip-cache"), PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True, timeout=120, env=env)
    python = str(venv_dir / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", str(source)], capture_output=True, text=True,
                             timeout=300, env=env, cwd=tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr
    script = tmp_path / "use_client.py"
    script.write_text(FRESH_SCRIPT)
    run = subprocess.run([python, str(script), server.url, server.grpc_address], capture_output=True, text=True,
                         timeout=120, env=env, cwd=tmp_path)
    assert run.returncode == 0 and "fresh client ok" in run.stdout, run.stdout + run.stderr


def test_importing_the_client_loads_neither_torch_nor_the_server():
    code = ("import sys, advserve_client; from advserve_client import Client, AsyncClient, errors; "
            "bad = [m for m in ('torch', 'fastapi', 'advserve') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT / "client")


# --- (b) every transport gives the in-process numbers -------------------------------------------------

CATALOG = advserve.catalog()
ESTIMATORS = {e["name"]: e for e in CATALOG["estimators"]}
CASES = [(name, preset["name"]) for preset in CATALOG["presets"] for name, e in ESTIMATORS.items()
         if "defaults" in e["presets"][preset["name"]]]


def advantage_batch(seed: int, estimator: str, preset: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, tensors) of a random batch with every tensor the estimator takes, KL included."""
    rng = np.random.default_rng(seed)
    b, t = 8, 6
    lengths = rng.integers(2, t + 1, size=b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    mask[0, 1] = False  # a multi-turn observation token inside row 0
    entry = ESTIMATORS[estimator]
    wanted = set(entry["tensors"]["required"]) | set(entry["tensors"]["optional"]) | {"response_mask", "rewards"}
    old = np.log(rng.uniform(0.05, 0.95, size=(b, t)))
    tensors = {
        "rewards": rng.integers(0, 2, size=b).astype(np.float64) + rng.normal(scale=0.1, size=b),
        "response_mask": mask,
        "group_ids": [f"q{i // 2}" for i in range(b)] if seed % 2 else np.arange(b) // 2,
        "values": rng.normal(size=(b, t)),
        "greedy_rewards": rng.uniform(size=b),
        "old_logprobs": old,
        "ref_logprobs": old + rng.normal(scale=0.2, size=(b, t)),
        "sum_pi_squared": np.exp(2 * old) + rng.uniform(0.0, 0.1, size=(b, t)),
        "rollout_is_weights": rng.uniform(0.5, 1.5, size=(b, t)),
    }
    params = {"kl_coef": 0.05} if "kl_coef" in entry["params"] else {}
    if not params:
        wanted -= {"old_logprobs", "ref_logprobs"}
    return params, {k: v for k, v in tensors.items() if k in wanted}


def normalized_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """Stats with group ids as strings (gRPC carries them as strings)."""
    stats = json.loads(json.dumps(stats, default=str))
    if "groups" in stats:
        stats["groups"]["ids"] = [str(i) for i in stats["groups"]["ids"]]
    return stats


def assert_same_advantages(results: dict[str, Any], local: Any) -> None:
    for kind, result in results.items():
        assert isinstance(result.advantages, np.ndarray), kind
        np.testing.assert_array_equal(result.advantages, local.advantages, err_msg=kind)
        np.testing.assert_array_equal(result.returns, local.returns, err_msg=kind)
        assert result.advantages.dtype == local.advantages.dtype, kind
        assert result.params == local.params, kind
        assert normalized_stats(result.stats) == normalized_stats(local.stats), kind
        assert result.estimator == local.estimator and result.preset == local.preset, kind


@pytest.mark.parametrize("estimator,preset", CASES, ids=[f"{e}-{p}" for e, p in CASES])
def test_every_estimator_is_the_same_over_every_transport(clients, estimator, preset):
    params, tensors = advantage_batch(len(estimator) + (preset == "verl"), estimator, preset)
    local = advserve.compute_advantages(estimator, preset=preset, params=params, **tensors)
    results = {kind: c.compute_advantages(estimator, preset=preset, params=params, **tensors)
               for kind, c in clients.items()}
    assert_same_advantages(results, local)
    assert results["rest-binary"].stats == results["rest-json"].stats


def test_packed_advantages_and_float64(clients):
    rng = np.random.default_rng(3)
    lengths = np.array([3, 1, 4, 2, 5, 2])
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    tensors = {"rewards": rng.integers(0, 2, size=6).astype(float), "group_ids": ["a", "a", "b", "b", "c", "c"],
               "cu_seqlens": cu}
    for estimator in ("grpo", "dapo"):
        local = advserve.compute_advantages(estimator, layout="packed", dtype="float64", **tensors)
        results = {kind: c.compute_advantages(estimator, layout="packed", dtype="float64", **tensors)
                   for kind, c in clients.items()}
        assert local.advantages.shape == (int(cu[-1]),) and local.advantages.dtype == np.float64
        assert_same_advantages(results, local)
    values = rng.normal(size=int(cu[-1]))
    local = advserve.compute_advantages("gae", preset="verl", layout="packed", rewards=tensors["rewards"],
                                        values=values, cu_seqlens=cu)
    for kind, c in clients.items():
        result = c.compute_advantages("gae", preset="verl", layout="packed", rewards=tensors["rewards"],
                                      values=values, cu_seqlens=cu)
        np.testing.assert_array_equal(result.advantages, local.advantages, err_msg=kind)
        np.testing.assert_array_equal(result.returns, local.returns, err_msg=kind)


def loss_batch(seed: int, b: int = 5, t: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.arange(t)[None, :] < rng.integers(1, t + 1, size=b)[:, None]
    mask[0, 0] = True
    lp = np.log(rng.uniform(0.05, 0.95, size=(b, t)))
    old = lp + rng.normal(scale=0.3, size=(b, t))
    return {"logprobs": lp, "old_logprobs": old, "advantages": rng.normal(size=(b, t)), "response_mask": mask,
            "ref_logprobs": lp + rng.normal(scale=0.1, size=(b, t)), "values": rng.normal(size=(b, t)),
            "old_values": rng.normal(size=(b, t)), "returns": rng.normal(size=(b, t)),
            "entropy": rng.uniform(0, 2, size=(b, t)), "rollout_logprobs": old + rng.normal(scale=0.2, size=(b, t))}


def assert_same_losses(results: dict[str, Any], local: Any) -> None:
    for kind, result in results.items():
        assert result.loss == local.loss, kind
        assert result.components == local.components, kind
        assert result.metrics == local.metrics, kind
        assert result.params == local.params, kind
        assert result.preset == local.preset, kind
        for name in ("grad_logprobs", "grad_values", "grad_entropy"):
            expected = getattr(local, name)
            if expected is None:
                assert getattr(result, name) is None, (kind, name)
            else:
                np.testing.assert_array_equal(getattr(result, name), expected, err_msg=f"{kind} {name}")


LOSS_CASES = [(mode, preset) for mode in ("ppo_clip", "gspo", "cispo", "reinforce") for preset in ("paper", "verl")]


@pytest.mark.parametrize("mode,preset", LOSS_CASES, ids=[f"{m}-{p}" for m, p in LOSS_CASES])
def test_every_policy_loss_is_the_same_over_every_transport(clients, mode, preset):
    tensors = loss_batch(len(mode))
    spec = {"preset": preset, "policy_loss": {"mode": mode, "clip_high": 0.28},
            "kl_loss": {"coef": 0.1, "estimator": "k3"}, "value_loss": {"coef": 0.5, "clip": 0.2},
            "entropy_bonus": {"coef": 0.01},
            "rollout_correction": {"level": "sequence" if mode == "gspo" else "token", "mode": "truncate",
                                   "high": 2.0}}
    local = advserve.compute_losses(**spec, **tensors)
    results = {kind: c.compute_losses(**spec, **tensors) for kind, c in clients.items()}
    assert local.grad_values is not None and local.grad_entropy is not None
    assert_same_losses(results, local)


def test_loss_variants_packed_shards_and_no_policy_term(clients):
    tensors = loss_batch(11)
    mask = tensors["response_mask"]
    cu = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int64)
    packed = {name: value[mask] for name, value in tensors.items() if name != "response_mask"}
    cases = [
        dict(layout="packed", cu_seqlens=cu, kl_loss={"coef": 0.05, "estimator": "abs"},
             policy_loss={"agg": "seq-mean-token-mean", "dual_clip": None}, preset="verl",
             **{k: packed[k] for k in ("logprobs", "old_logprobs", "advantages", "ref_logprobs")}),
        dict(num_tokens=100.0, dtype="float64", policy_loss={"mode": "ppo_clip", "agg": "token-mean"},
             **{k: tensors[k] for k in ("logprobs", "old_logprobs", "advantages", "response_mask")}),
        dict(policy_loss=False, value_loss={}, response_mask=mask,
             **{k: tensors[k] for k in ("values", "old_values", "returns")}),
        dict(policy_loss={"agg": "seq-mean-token-sum-norm", "loss_scale_factor": None}, num_sequences=9,
             rollout_correction={"mode": "mask", "low": 0.5, "high": 2.0},
             **{k: tensors[k] for k in ("logprobs", "old_logprobs", "advantages", "response_mask",
                                        "rollout_logprobs")}),
    ]
    for case in cases:
        local = advserve.compute_losses(**case)
        assert_same_losses({kind: c.compute_losses(**case) for kind, c in clients.items()}, local)


def test_list_estimators_is_the_rest_catalog_over_both_transports(clients):
    expected = json.dumps(CATALOG, sort_keys=True)
    for kind, c in clients.items():
        assert json.dumps(c.list_estimators(), sort_keys=True) == expected, kind  # ints stay ints over gRPC


# --- (c) errors: every class over both transports ----------------------------------------------------


@pytest.mark.parametrize("kind", ["rest-binary", "grpc"])
def test_invalid_argument_and_not_found_name_the_field(clients, kind):
    c = clients[kind]
    cases = [
        (dict(estimator="grpo", params={"lam": 0.9}, **GRPO), InvalidArgument, "params.lam"),
        (dict(estimator="grpo", params={"kl_estimator": "k9"}, **GRPO), InvalidArgument, "params.kl_estimator"),
        (dict(estimator="grpo", **{**GRPO, "response_mask": [[1, 1]] * 4}), InvalidArgument, "tensors.response_mask"),
        (dict(estimator="grpo", bogus=[1, 2], **GRPO), InvalidArgument, "tensors.bogus"),
        (dict(estimator="grpo", dtype="float16", **GRPO), InvalidArgument, "dtype"),
        (dict(estimator="nope", **GRPO), NotFound, "estimator"),
        (dict(estimator="grpo", preset="nope", **GRPO), NotFound, "preset"),
        (dict(estimator="dapo", preset="verl", **GRPO), NotFound, "estimator"),
    ]
    for kwargs, cls, field in cases:
        with pytest.raises(cls) as info:
            c.compute_advantages(**kwargs)
        assert info.value.field == field and info.value.code == cls.code, (kwargs, repr(info.value))
        assert info.value.message
    with pytest.raises(InvalidArgument) as info:
        c.compute_losses(policy_loss={"mode": "trpo"}, **{k: v for k, v in loss_batch(1).items()
                                                           if k in ("logprobs", "old_logprobs", "advantages",
                                                                    "response_mask")})
    assert info.value.field == "policy_loss.mode"


def test_server_side_errors_read_the_same_over_both_transports(clients):
    for kwargs in (dict(estimator="grpo", params={"lam": 0.9}, **GRPO), dict(estimator="dapo", preset="verl", **GRPO),
                   dict(estimator="grpo", **{**GRPO, "response_mask": [[1, 1]] * 4})):
        seen = []
        for kind in ("rest-binary", "grpc"):
            with pytest.raises(errors.AdvserveError) as info:
                clients[kind].compute_advantages(**kwargs)
            seen.append((type(info.value), info.value.code, info.value.field, info.value.message))
        assert seen[0] == seen[1]


@pytest.fixture(scope="module")
def limited():
    """A server with a small admission capacity (8 MiB: a request's body and its compute, 72 bytes a
    float32 token) and token limit (2**16)."""
    running = RunningServer("--admission-bytes", str(8 << 20), "--max-tokens", str(1 << 16))
    yield running
    running.stop()


def overload_batch() -> dict[str, np.ndarray]:
    """~590 KB of float32 losses inputs, 45,000 tokens (3.2 MB to compute): fits the limited server alone,
    not beside 5 MB."""
    rng = np.random.default_rng(5)
    lp = -rng.random((150, 300), dtype=np.float32)
    return {"logprobs": lp, "old_logprobs": lp, "advantages": rng.normal(size=(150, 300)).astype(np.float32),
            "response_mask": np.ones((150, 300), bool)}


@pytest.mark.parametrize("kind", ["rest-binary", "grpc"])
def test_payload_too_large(limited, kind):
    too_many_tokens = {"rewards": np.ones(300, np.float32), "response_mask": np.ones((300, 300), bool),
                       "group_ids": np.zeros(300, np.int64)}  # 90,000 tokens > 2**16, a 90 KB body
    with make_client(limited, kind, max_retries=0) as c:
        with pytest.raises(PayloadTooLarge) as info:
            c.compute_advantages("grpo", **too_many_tokens)
        assert info.value.code == "payload_too_large" and info.value.field == "tensors.response_mask"
        big = {name: np.tile(value, (15, 1)) for name, value in overload_batch().items()}  # 8.8 MB > 8 MiB
        with pytest.raises(PayloadTooLarge) as info:
            c.compute_losses(**big)
        # over gRPC a message over admission_bytes / 12 is refused by grpc core from its length prefix,
        # before the server reads it: RESOURCE_EXHAUSTED without advserve's metadata
        assert info.value.field == "body" or (kind == "grpc" and "larger than max" in info.value.message)
    if kind == "grpc":  # the client's own message limit
        with make_client(limited, kind, max_message_bytes=10_000, max_retries=0) as c:
            with pytest.raises(PayloadTooLarge) as info:
                c.compute_advantages("grpo", **too_many_tokens)
            assert info.value.grpc_code == "RESOURCE_EXHAUSTED"
        assert info.value.status is None
    else:
        assert info.value.status == 413 and info.value.grpc_code is None


class HeldUpload:
    """A binary HTTP upload that declares 5,000,000 bytes and stalls one byte short: the server admits
    (and holds) the bytes it received until the connection closes (or its body idle timeout, 10 s)."""

    def __init__(self, server: RunningServer, nbytes: int = 5_000_000):
        self.sock = socket.create_connection(("127.0.0.1", server.port))
        self.sock.sendall(f"POST /v1/losses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
                          f"Inference-Header-Content-Length: 1\r\nContent-Length: {nbytes}\r\n\r\n{{".encode()
                          + b" " * (nbytes - 2))

    def close(self) -> None:
        self.sock.close()


def wait_for(call, error_type: type[Exception] | None, deadline_s: float = 10.0) -> Any:
    """Call until it raises `error_type` (None: until it succeeds); returns the error or the result."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            result = call()
            if error_type is None:
                return result
        except Exception as exc:  # noqa: BLE001
            if error_type is not None and isinstance(exc, error_type):
                return exc
            if time.monotonic() > deadline or not isinstance(exc, errors.AdvserveError):
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"no {error_type} within {deadline_s} s")
        time.sleep(0.05)


@pytest.mark.parametrize("kind", ["rest-binary", "grpc"])
def test_overloaded_is_retried_after_retry_after_then_raised(limited, kind, sleeps):
    batch = overload_batch()  # alone: 0.6 MB (gRPC: 3 x 0.6) + 3.2 MB to compute; beside 5 MB, over 8 MiB
    with make_client(limited, kind, max_retries=2) as c:
        held = HeldUpload(limited)
        for _ in range(100):  # until its bytes are in (a request of ours in flight meanwhile would turn it away)
            metrics = httpx.get(f"{limited.url}/metrics").text
            if "advserve_bytes_in_flight 4.999999e+06" in metrics:
                break
            time.sleep(0.05)
        try:
            error = wait_for(lambda: c.compute_losses(**batch), Overloaded)
            assert error.code == "overloaded" and error.retry_after == 1.0 and error.field is None
            assert (error.status, error.grpc_code) == ((None, "UNAVAILABLE") if kind == "grpc" else (503, None))
            assert len(sleeps) >= 2 and all(s >= 1.0 for s in sleeps[-2:])  # two retries, each >= Retry-After
        finally:
            held.close()
        result = wait_for(lambda: c.compute_losses(**batch), None)  # the bytes are released
        assert result.grad_logprobs.shape == batch["logprobs"].shape


@pytest.mark.parametrize("kind", ["rest-binary", "grpc"])
def test_connection_refused_is_unavailable_and_retried(kind, sleeps):
    port = free_port()  # nothing listens there
    address = f"127.0.0.1:{port}"
    with (Client(address, transport="grpc") if kind == "grpc" else Client(address)) as c:
        with pytest.raises(Unavailable) as info:
            c.compute_advantages("grpo", **GRPO)
    assert info.value.code == "unavailable" and not isinstance(info.value, Overloaded)
    assert len(sleeps) == 2 and sleeps[0] <= 0.5 and sleeps[1] <= 1.0  # full jitter: [0, 0.5], [0, 1]


@pytest.mark.parametrize("kind", ["rest-binary", "grpc"])
def test_a_tiny_timeout_is_deadline_exceeded_and_not_retried(server, kind, sleeps):
    batch = {name: np.tile(value, (4, 2)) for name, value in overload_batch().items()}  # 4.7 MB
    with make_client(server, kind, timeout=1e-3) as c:
        with pytest.raises(DeadlineExceeded) as info:
            c.compute_losses(**batch)
    assert info.value.code == "deadline_exceeded" and isinstance(info.value, TimeoutError)
    assert sleeps == []


def test_bearer_token_and_mtls_over_both_transports(tmp_path, sleeps):
    """A server with --auth-token and mutual TLS: the client's headers carry the token (Unauthenticated
    without it, not retried) and its tls_* files the CA and the client certificate."""
    ca = trustme.CA()
    server_cert, client_cert = ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("trainer@example")
    files = {"ca": ca.cert_pem, "server_key": server_cert.private_key_pem,
             "client": client_cert.private_key_and_cert_chain_pem, "client_key": client_cert.private_key_pem}
    paths = {name: tmp_path / f"{name}.pem" for name in (*files, "server_chain", "client_chain")}
    for name, blob in files.items():
        blob.write_to_path(str(paths[name]))
    paths["server_chain"].write_bytes(b"".join(c.bytes() for c in server_cert.cert_chain_pems))
    paths["client_chain"].write_bytes(b"".join(c.bytes() for c in client_cert.cert_chain_pems))
    token = "client-test-token"
    verify = ssl.create_default_context(cafile=str(paths["ca"]))  # the fixture's readiness probe over https
    client_cert.configure_cert(verify)
    secured = RunningServer("--tls-cert", str(paths["server_chain"]), "--tls-key", str(paths["server_key"]),
                            "--tls-client-ca", str(paths["ca"]), env={"ADVSERVE_AUTH_TOKEN": token},
                            scheme="https", verify=verify)
    auth = {"authorization": f"Bearer {token}"}
    try:
        for transport, address in (("http", f"127.0.0.1:{secured.port}"), ("grpc", secured.grpc_address)):
            # the key inside the certificate file, or apart
            for cert, key in ((paths["client"], None), (paths["client_chain"], paths["client_key"])):
                with Client(address, transport=transport, tls_ca=str(paths["ca"]), tls_cert=str(cert),
                            tls_key=key and str(key), headers=auth) as c:
                    result = c.compute_advantages("grpo", **GRPO)
                    assert result.advantages.shape == (5, 3)
                    assert c.list_estimators()["default_preset"] == "paper"
            with Client(address, transport=transport, tls_ca=str(paths["ca"]), tls_cert=str(paths["client"]),
                        max_retries=2) as c:
                with pytest.raises(Unauthenticated) as info:
                    c.compute_advantages("grpo", **GRPO)
                assert info.value.code == "unauthenticated"
                assert (info.value.status, info.value.grpc_code) == \
                    ((401, None) if transport == "http" else (None, "UNAUTHENTICATED"))
            assert sleeps == []  # never retried
            with Client(address, transport=transport, tls_ca=str(paths["ca"]), headers=auth, max_retries=0,
                        timeout=10) as c:
                with pytest.raises(Unavailable):  # no client certificate: the handshake fails
                    c.compute_advantages("grpo", **GRPO)

        async def main():
            async with AsyncClient(secured.grpc_address, transport="grpc", tls_ca=str(paths["ca"]),
                                   tls_cert=str(paths["client"]), headers=auth) as c:
                return await c.compute_advantages("grpo", **GRPO)

        assert asyncio.run(main()).advantages.shape == (5, 3)
    finally:
        secured.stop()


# Stub servers that answer a script: every error code of the server's table over both transports,
# retries counted exactly.

STATUS = dict(server_errors.STATUS)
CLASSES = {"invalid_argument": InvalidArgument, "not_found": NotFound, "payload_too_large": PayloadTooLarge,
           "overloaded": Overloaded, "unavailable": Unavailable, "deadline_exceeded": DeadlineExceeded,
           "internal": InternalError, "unauthenticated": Unauthenticated,
           # codes the client has no class of its own for (yet): the base class, with the server's code
           "request_timeout": errors.AdvserveError, "method_not_allowed": errors.AdvserveError}
OK_DOCUMENT = {"params": {"std_ddof": 0}, "stats": {"sequences": 1, "tokens": 1},
               "advantages": np.array([[1.0, -0.0]], np.float32)}


class ScriptedHttp:
    """An HTTP server answering each POST with the next scripted step: "ok" or (code, retry_after)."""

    def __init__(self, script: list[Any]):
        self.script, self.requests = list(script), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.requests.append({k.lower(): v for k, v in self.headers.items()})
                step = outer.script.pop(0)
                headers = {"content-type": "application/json"}
                if step == "ok":
                    status = 200
                    adv = OK_DOCUMENT["advantages"].tolist()
                    body = {"estimator": "grpo", "preset": "paper", "params": OK_DOCUMENT["params"],
                            "stats": OK_DOCUMENT["stats"], "tensors": {"advantages": adv, "returns": adv}}
                else:
                    code, retry_after = step
                    status = STATUS[code][0]
                    body = {"error": {"code": code, "message": f"scripted {code}", "field": "tensors.x"}}
                    if retry_after is not None:
                        headers["retry-after"] = str(retry_after)
                data = json.dumps(body).encode()
                self.send_response(status)
                for key, value in {**headers, "content-length": str(len(data))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class ScriptedGrpc(pb_grpc.AdvserveServicer):
    """A gRPC server with the same script: aborts with the status and trailing metadata of the table."""

    def __init__(self, script: list[Any]):
        self.script, self.requests = list(script), []
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
        pb_grpc.add_AdvserveServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def ComputeAdvantages(self, request, context):
        self.requests.append(dict(context.invocation_metadata()))
        step = self.script.pop(0)
        if step == "ok":
            raw = RawTensor.from_numpy(OK_DOCUMENT["advantages"])
            return protocol.advantages_response_to_pb(OK_DOCUMENT, {"advantages": raw, "returns": raw})
        code, retry_after = step
        metadata = [("advserve-error-code", code), ("advserve-error-field", "tensors.x")]
        if retry_after is not None:
            metadata.append(("retry-after", str(retry_after)))
        context.set_trailing_metadata(tuple(metadata))
        context.abort(getattr(grpc.StatusCode, STATUS[code][1]), f"tensors.x: scripted {code}")

    def close(self) -> None:
        self.server.stop(None)


@pytest.fixture(params=["http", "grpc"])
def scripted(request):
    made = []

    def start(script: list[Any]) -> Any:
        stub = ScriptedHttp(script) if request.param == "http" else ScriptedGrpc(script)
        made.append(stub)
        return stub

    start.transport = request.param
    yield start
    for stub in made:
        stub.close()


@pytest.mark.parametrize("code", sorted(STATUS))
def test_every_error_code_maps_to_its_class(scripted, code, sleeps):
    stub = scripted([(code, 3 if code == "overloaded" else None)])
    with Client(stub.address, transport=scripted.transport, max_retries=0,
                headers={"authorization": "Bearer t0ken"}) as c:
        with pytest.raises(CLASSES[code]) as info:
            c.compute_advantages("grpo", **GRPO)
    error = info.value
    assert type(error) is CLASSES[code] and error.code == code and error.field == "tensors.x"
    assert error.message == f"scripted {code}"
    http_status, grpc_code = STATUS[code]
    if scripted.transport == "http":
        assert (error.status, error.grpc_code) == (http_status, None)
    else:
        assert (error.status, error.grpc_code) == (None, grpc_code)
    assert error.retry_after == (3.0 if code == "overloaded" else None)
    assert stub.requests[0]["authorization"] == "Bearer t0ken"
    assert sleeps == []


def test_retries_honour_retry_after_and_stop_at_other_errors(scripted, sleeps):
    stub = scripted([("overloaded", 2), ("unavailable", None), "ok"])
    with Client(stub.address, transport=scripted.transport, max_retries=2) as c:
        result = c.compute_advantages("grpo", **GRPO)
    np.testing.assert_array_equal(result.advantages, [[1.0, 0.0]])
    assert len(stub.requests) == 3 and sleeps[0] >= 2.0 and 0 <= sleeps[1] <= 1.0

    sleeps.clear()
    stub = scripted([("overloaded", 120), ("overloaded", 1), ("overloaded", 1), "ok"])
    with Client(stub.address, transport=scripted.transport, max_retries=2) as c:
        with pytest.raises(Overloaded):
            c.compute_advantages("grpo", **GRPO)
    assert len(stub.requests) == 3 and sleeps[0] == 30.0 and sleeps[1] >= 1.0  # Retry-After capped at 30 s

    sleeps.clear()
    for code in ("invalid_argument", "not_found", "deadline_exceeded", "internal", "unauthenticated"):
        stub = scripted([(code, 1), "ok"])
        with Client(stub.address, transport=scripted.transport, max_retries=5) as c:
            with pytest.raises(CLASSES[code]):
                c.compute_advantages("grpo", **GRPO)
        assert len(stub.requests) == 1, code
    assert sleeps == []


def test_async_retry_really_waits_for_retry_after(scripted):
    stub = scripted([("overloaded", 1), "ok"])

    async def main() -> float:
        async with AsyncClient(stub.address, transport=scripted.transport, max_retries=1) as c:
            started = time.monotonic()
            await c.compute_advantages("grpo", **GRPO)
            return time.monotonic() - started

    assert asyncio.run(main()) >= 1.0
    assert len(stub.requests) == 2


# --- (d) array kinds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_numpy_in_numpy_out_and_torch_in_torch_out(clients, kind):
    c = clients[kind]
    as_numpy = c.compute_advantages("grpo", **{k: np.asarray(v) for k, v in GRPO.items()})
    assert isinstance(as_numpy.advantages, np.ndarray) and as_numpy.advantages.flags.writeable
    assert as_numpy.advantages.dtype == np.float32
    as_lists = c.compute_advantages("grpo", **GRPO)
    np.testing.assert_array_equal(as_lists.advantages, as_numpy.advantages)

    rewards = torch.tensor(GRPO["rewards"], dtype=torch.bfloat16)  # bfloat16 travels as bfloat16
    as_torch = c.compute_advantages("grpo", rewards=rewards, response_mask=torch.tensor(GRPO["response_mask"]),
                                    group_ids=torch.tensor([0, 1, 0, 0, 1]))
    assert isinstance(as_torch.advantages, torch.Tensor) and as_torch.advantages.dtype == torch.float32
    np.testing.assert_array_equal(as_torch.advantages.numpy(), as_numpy.advantages)
    mixed = c.compute_advantages("grpo", rewards=np.asarray(GRPO["rewards"]),
                                 response_mask=torch.tensor(GRPO["response_mask"], dtype=torch.bool),
                                 group_ids=GRPO["group_ids"])
    assert isinstance(mixed.returns, torch.Tensor)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_a_torch_training_step(clients, kind):
    """The client README's step: advantages, then the loss, then logp.backward(out.grad_logprobs)."""
    c = clients[kind]
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (4, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    adv = c.compute_advantages("grpo", rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]), response_mask=mask,
                               group_ids=["q", "q", "q", "q"])
    out = c.compute_losses(preset="verl", logprobs=logp, old_logprobs=logp.detach(), advantages=adv.advantages,
                           response_mask=mask)
    assert isinstance(out.grad_logprobs, torch.Tensor)
    logp.backward(out.grad_logprobs)
    # the same step with autograd: verl's ppo_clip token-mean at ratio 1 is -mean(A * ratio)
    logits2 = logits.detach().clone().requires_grad_(True)
    logp2 = torch.log_softmax(logits2, -1).gather(-1, tokens[..., None])[..., 0]
    ratio = torch.exp(logp2 - logp2.detach())
    (-(adv.advantages * ratio)[mask].sum() / mask.sum()).backward()
    torch.testing.assert_close(logits.grad, logits2.grad)
    assert out.loss == pytest.approx(-float((adv.advantages[mask]).mean()), abs=1e-6)


def test_bad_arrays_are_invalid_arguments_before_sending(clients):
    for c in clients.values():
        with pytest.raises(InvalidArgument) as info:
            c.compute_advantages("grpo", rewards=["a", "b"], response_mask=[[1], [1]], group_ids=[0, 0])
        assert info.value.field == "tensors.rewards"
        with pytest.raises(InvalidArgument) as info:
            c.compute_advantages("grpo", rewards=[1.0, 0.0], response_mask=[[1, 1], [1]], group_ids=[0, 0])
        assert info.value.field == "tensors.response_mask"


# --- (e) AsyncClient ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_async_client_matches_the_sync_client(server, clients, kind):
    params, tensors = advantage_batch(4, "reinforce_pp_baseline", "paper")
    losses = loss_batch(2)
    sync_adv = clients[kind].compute_advantages("reinforce_pp_baseline", params=params, **tensors)
    sync_loss = clients[kind].compute_losses(kl_loss={"coef": 0.1}, **{
        k: losses[k] for k in ("logprobs", "old_logprobs", "advantages", "response_mask", "ref_logprobs")})

    async def main():
        async with make_client(server, kind, AsyncClient) as c:
            many = await asyncio.gather(*[c.compute_advantages("reinforce_pp_baseline", params=params, **tensors)
                                          for _ in range(6)])
            loss = await c.compute_losses(kl_loss={"coef": 0.1}, **{
                k: losses[k] for k in ("logprobs", "old_logprobs", "advantages", "response_mask", "ref_logprobs")})
            catalog = await c.list_estimators()
            with pytest.raises(NotFound) as info:
                await c.compute_advantages("dapo", preset="verl", **GRPO)
            as_torch = await c.compute_advantages("grpo", rewards=torch.tensor(GRPO["rewards"]),
                                                  response_mask=torch.tensor(GRPO["response_mask"]),
                                                  group_ids=GRPO["group_ids"])
            return many, loss, catalog, info.value, as_torch

    many, loss, catalog, error, as_torch = asyncio.run(main())
    for result in many:
        np.testing.assert_array_equal(result.advantages, sync_adv.advantages)
        assert result.stats == sync_adv.stats and result.params == sync_adv.params
    assert loss.loss == sync_loss.loss and loss.metrics == sync_loss.metrics
    np.testing.assert_array_equal(loss.grad_logprobs, sync_loss.grad_logprobs)
    assert json.dumps(catalog, sort_keys=True) == json.dumps(CATALOG, sort_keys=True)
    assert error.field == "estimator"
    assert isinstance(as_torch.advantages, torch.Tensor)


@pytest.mark.parametrize("kind", ["rest-binary", "grpc"])
def test_async_errors_and_retries(kind, sleeps):
    address = f"127.0.0.1:{free_port()}"

    async def main():
        async with AsyncClient(address, transport="grpc" if kind == "grpc" else "http", max_retries=1) as c:
            with pytest.raises(Unavailable):
                await c.compute_advantages("grpo", **GRPO)
            with pytest.raises(InvalidArgument):  # checked before anything is sent
                await c.compute_advantages("grpo", rewards=["a"], response_mask=[[1]], group_ids=[0])

    asyncio.run(main())
    assert len(sleeps) == 1
