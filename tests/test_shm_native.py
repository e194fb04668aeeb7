"""Shared-memory tensors on the native API (/v1 and native gRPC) and `Client(shared_memory=True)`: a
caller on the server's host places tensors in a registered system shared-memory region and sends
their descriptors (region, offset, byte size) instead of the bytes; the outputs come back in a region.

Properties: the client with shared memory gives exactly the results of the same client without it
(random ragged batches with scattered groups, advantages and losses, REST binary, REST JSON, gRPC);
the wire format read and written by hand gives the in-process engine's results; descriptor errors
name the field; the client's regions are unregistered and unlinked on close, on exit, and when they
grow; a registration the server refuses (a server on another host cannot open the key) is the
client's error, saying so."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from conftest import RunningServer

import advserve
from advserve_client import AsyncClient, Client, InvalidArgument, framing, protocol
from advserve_client._pb import advserve_pb2 as pb
from advserve_client._pb import advserve_pb2_grpc as pb_grpc

KINDS = ("rest", "rest-json", "grpc")


@pytest.fixture(scope="module")
def server():
    running = RunningServer()
    yield running
    running.stop()


def make_client(server: RunningServer, kind: str, **kwargs: Any) -> Client:
    if kind == "grpc":
        return Client(server.grpc_address, transport="grpc", **kwargs)
    return Client(f"127.0.0.1:{server.port}", binary=kind == "rest", **kwargs)


def registered(server: RunningServer) -> set[str]:
    """The names of the system regions the server holds (GET /v2/systemsharedmemory/status)."""
    response = httpx.get(f"{server.url}/v2/systemsharedmemory/status")
    assert response.status_code == 200, response.text
    return {region["name"] for region in response.json()}


def in_dev_shm(name: str) -> bool:
    return Path("/dev/shm", name).exists()


# --- random batches: ragged rows, scattered groups of unequal sizes ----------------------------------


def advantage_batch(rng: np.random.Generator, b: int, t: int) -> dict[str, Any]:
    lengths = rng.integers(1, t + 1, size=b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    mask[rng.random((b, t)) < 0.1] = False  # interior observation tokens
    mask[:, 0] = True
    groups = rng.integers(0, max(1, b // 2), size=b)  # scattered groups of unequal sizes (singletons too)
    return {"rewards": rng.integers(0, 2, size=b) + rng.normal(scale=0.1, size=b).astype(np.float32),
            "response_mask": mask, "group_ids": groups if rng.random() < 0.5 else [f"q{g}" for g in groups],
            "values": rng.normal(size=(b, t)).astype(np.float32)}


def loss_batch(rng: np.random.Generator, b: int, t: int) -> dict[str, np.ndarray]:
    mask = np.arange(t)[None, :] < rng.integers(1, t + 1, size=b)[:, None]
    lp = np.log(rng.uniform(0.05, 0.95, size=(b, t)))
    return {"logprobs": lp, "old_logprobs": lp + rng.normal(scale=0.3, size=(b, t)),
            "advantages": rng.normal(size=(b, t)), "response_mask": mask, "values": rng.normal(size=(b, t)),
            "old_values": rng.normal(size=(b, t)), "returns": rng.normal(size=(b, t)),
            "entropy": rng.uniform(0, 2, size=(b, t)).astype(np.float32)}


LOSS_SPEC = {"preset": "verl", "policy_loss": {"clip_high": 0.28}, "value_loss": {"coef": 0.5, "clip": 0.2},
             "entropy_bonus": {"coef": 0.01}}


def assert_same(a: Any, b: Any, names: tuple[str, ...]) -> None:
    for name in names:
        x, y = getattr(a, name), getattr(b, name)
        assert isinstance(y, np.ndarray) and y.flags.writeable, name
        np.testing.assert_array_equal(y, x, err_msg=name)
        assert y.dtype == x.dtype and y.shape == x.shape, name


@pytest.mark.parametrize("kind", KINDS)
def test_shared_memory_gives_the_results_of_the_bytes(server, kind):
    rng = np.random.default_rng(len(kind))
    with make_client(server, kind) as plain, make_client(server, kind, shared_memory=True) as shm:
        for step in range(4):
            b, t = int(rng.integers(2, 12)), int(rng.integers(1, 40))
            tensors = advantage_batch(rng, b, t)
            for estimator in ("grpo", "rloo", "gae"):
                dtype = "float64" if step == 3 else None
                given = {k: v for k, v in tensors.items() if (k == "values") == (estimator == "gae") or
                         k in ("rewards", "response_mask")}
                params = {"singleton_groups": "zero"} if estimator == "rloo" else None
                expected = plain.compute_advantages(estimator, dtype=dtype, params=params, **given)
                got = shm.compute_advantages(estimator, dtype=dtype, params=params, **given)
                assert_same(expected, got, ("advantages", "returns"))
                assert got.stats == expected.stats and got.params == expected.params
            batch = loss_batch(rng, b, t)
            expected = plain.compute_losses(**LOSS_SPEC, **batch)
            got = shm.compute_losses(**LOSS_SPEC, **batch)
            assert expected.grad_values is not None and expected.grad_entropy is not None
            assert_same(expected, got, ("grad_logprobs", "grad_values", "grad_entropy"))
            assert (got.loss, got.components, got.metrics) == (expected.loss, expected.components, expected.metrics)
        # packed layout: flat token tensors and cu_seqlens from the region
        lengths = rng.integers(1, 9, size=6)
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        packed = {"rewards": rng.normal(size=6), "group_ids": [0, 1, 0, 2, 1, 2], "cu_seqlens": cu}
        expected = plain.compute_advantages("grpo", layout="packed", **packed)
        got = shm.compute_advantages("grpo", layout="packed", **packed)
        assert_same(expected, got, ("advantages", "returns"))
        analysis = dict(rewards=rng.integers(0, 2, size=8).astype(float), group_ids=np.arange(8) % 3,
                        response_mask=np.ones((8, 5), bool))
        assert shm.analyze(["grpo", "rloo"], **analysis) == plain.analyze(["grpo", "rloo"], **analysis)
        assert len(shm._regions.names) == 1 and shm._regions.names[0] in registered(server)


@pytest.mark.parametrize("kind", ["rest", "grpc"])
def test_async_client_with_shared_memory(server, kind):
    rng = np.random.default_rng(5)
    batches = [loss_batch(rng, 4, 9), loss_batch(rng, 3, 700)]  # the second grows the region

    async def run() -> tuple[list[Any], list[str]]:
        address = server.grpc_address if kind == "grpc" else f"127.0.0.1:{server.port}"
        async with AsyncClient(address, transport="http" if kind == "rest" else "grpc", shared_memory=True) as shm:
            results = await asyncio.gather(*(shm.compute_losses(**LOSS_SPEC, **batch) for batch in batches))
            names = shm._regions.names
            assert set(names) <= registered(server) and len(names) in (1, 2)
        return results, names

    results, names = asyncio.run(run())
    with make_client(server, kind) as plain:
        for batch, got in zip(batches, results):
            assert_same(plain.compute_losses(**LOSS_SPEC, **batch), got, ("grad_logprobs", "grad_values"))
    assert not set(names) & registered(server) and not any(map(in_dev_shm, names))


@pytest.mark.parametrize("kind", ["rest", "grpc"])
def test_regions_grow_and_are_unregistered_and_unlinked(server, kind):
    rng = np.random.default_rng(7)
    with make_client(server, kind) as plain:
        shm = make_client(server, kind, shared_memory=True)
        small, large = loss_batch(rng, 2, 3), loss_batch(rng, 64, 1024)  # 1 MiB regions first, then ~5 MiB
        first = shm.compute_losses(**LOSS_SPEC, **small)
        (name,) = shm._regions.names
        assert name in registered(server) and in_dev_shm(name)
        got = shm.compute_losses(**LOSS_SPEC, **large)
        (grown,) = shm._regions.names
        assert grown != name and grown in registered(server) and in_dev_shm(grown)
        assert name not in registered(server) and not in_dev_shm(name)
        assert_same(plain.compute_losses(**LOSS_SPEC, **large), got, ("grad_logprobs", "grad_values", "grad_entropy"))
        assert_same(plain.compute_losses(**LOSS_SPEC, **small), first, ("grad_logprobs",))
        shm.close()
        assert grown not in registered(server) and not in_dev_shm(grown)


def test_a_client_that_exits_without_close_leaves_no_region(server):
    script = (f"import numpy as np\nfrom advserve_client import Client\n"
              f"c = Client('127.0.0.1:{server.port}', shared_memory=True)\n"
              "c.compute_advantages('grpo', rewards=[1.0, 0.0], response_mask=np.ones((2, 3), bool), group_ids=[1, 1])\n"
              "print(c._regions.names[0])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    name = done.stdout.strip()
    assert name.startswith("advserve-client-")
    assert name not in registered(server) and not in_dev_shm(name)


def test_a_refused_registration_is_the_clients_error(server, monkeypatch):
    """A server on another host cannot open the client's /dev/shm key: its 400 is raised by the call."""
    for kind in ("rest", "grpc"):
        client = make_client(server, kind, shared_memory=True)
        register = client._transport.register_region  # as the pool calls it, with a key the server cannot open
        monkeypatch.setattr(client._regions, "_register",
                            lambda name, key, size: register(name, f"/advserve-elsewhere-{secrets.token_hex(4)}", size))
        before = set(os.listdir("/dev/shm"))
        with pytest.raises(InvalidArgument) as caught:
            client.compute_advantages("grpo", rewards=[1.0, 0.0], response_mask=np.ones((2, 2), bool), group_ids=[0, 0])
        message = caught.value.message  # the server's reason (the Open Inference Protocol's errors name no field)
        assert "needs the server on this host" in message and "advserve-elsewhere-" in message, kind
        assert caught.value.status == (400 if kind == "rest" else None), kind
        assert {n for n in set(os.listdir("/dev/shm")) - before if n.startswith("advserve-client-")} == set()
        client.close()


# --- the wire, by hand ------------------------------------------------------------------------------


class Region:
    """A system shared-memory region of this test, registered with the server."""

    def __init__(self, server: RunningServer, size: int):
        self.server = server
        self.name = f"test-native-{os.getpid()}-{secrets.token_hex(4)}"
        self.memory = shared_memory.SharedMemory(name=self.name, create=True, size=size)
        response = httpx.post(f"{server.url}/v2/systemsharedmemory/region/{self.name}/register",
                              json={"key": "/" + self.memory.name, "offset": 0, "byte_size": size})
        assert response.status_code == 200, response.text

    def put(self, offset: int, array: np.ndarray, name: str) -> dict[str, Any]:
        raw = framing.RawTensor.from_numpy(array)
        self.memory.buf[offset:offset + raw.nbytes] = raw.data
        return framing.RegionRef(raw.dtype, raw.shape, self.name, offset, raw.nbytes).descriptor()

    def get(self, descriptor: dict[str, Any]) -> np.ndarray:
        ref = framing.region_ref("output", descriptor)
        assert ref.region == self.name
        data = bytes(self.memory.buf[ref.offset:ref.offset + ref.byte_size])
        return framing.RawTensor(ref.dtype, ref.shape, memoryview(data)).to_numpy()

    def close(self) -> None:
        httpx.post(f"{self.server.url}/v2/systemsharedmemory/region/{self.name}/unregister")
        self.memory.close()
        self.memory.unlink()


@pytest.fixture
def region(server):
    made = Region(server, 1 << 16)
    yield made
    made.close()


def post(server: RunningServer, path: str, header: dict[str, Any], accept: str = framing.CONTENT_TYPE,
         ) -> httpx.Response:
    body = framing.dumps(header)  # every tensor in a region: the body is the header alone
    return httpx.post(server.url + path, content=body, headers={
        "content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(len(body)), "accept": accept})


def test_descriptors_by_hand_give_the_engines_results(server, region):
    rng = np.random.default_rng(11)
    rewards, mask = rng.normal(size=5).astype(np.float32), rng.random((5, 7)) < 0.8
    ids = np.array([3, 1, 3, 1, 1], np.int64)
    expected = advserve.compute_advantages("grpo", rewards=rewards, response_mask=mask, group_ids=ids)
    tensors = {"rewards": region.put(0, rewards, "rewards"), "response_mask": region.put(64, mask, "response_mask"),
               "group_ids": region.put(128, ids, "group_ids")}
    outputs = {"region": region.name, "offset": 1024, "byte_size": 4096}
    for accept in (framing.CONTENT_TYPE, "application/json"):
        region.memory.buf[1024:1024 + 4096] = bytes(4096)
        response = post(server, "/v1/advantages", {"estimator": "grpo", "tensors": tensors,
                                                   framing.OUTPUTS_KEY: outputs}, accept)
        assert response.status_code == 200, response.text
        if accept == "application/json":
            described = response.json()["tensors"]
        else:
            document, raw = framing.decode(response.content, response.headers[framing.HEADER_LENGTH])
            assert len(response.content) == int(response.headers[framing.HEADER_LENGTH])  # no buffers
            described = {name: ref.descriptor() for name, ref in raw.items()}
        assert [d["shared_memory_offset"] for d in described.values()] == [1024, 1024 + 4 * 35]
        np.testing.assert_array_equal(region.get(described["advantages"]), expected.advantages)
        np.testing.assert_array_equal(region.get(described["returns"]), expected.returns)
    # a JSON request may name regions too
    response = httpx.post(server.url + "/v1/advantages", json={"estimator": "grpo", "tensors": tensors})
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(np.asarray(response.json()["tensors"]["advantages"], np.float32), expected.advantages)


def test_descriptor_errors_name_the_field(server, region):
    rewards = region.put(0, np.ones(4, np.float32), "rewards")
    mask = region.put(64, np.ones((4, 3), bool), "response_mask")
    ids = region.put(128, np.zeros(4, np.int64), "group_ids")
    cases = [  # (change of the rewards descriptor or of the header, field)
        ({"shared_memory_region": "no-such-region"}, "tensors.rewards"),
        ({"shared_memory_offset": (1 << 16) - 8}, "tensors.rewards"),  # runs past the region's end
        ({"shared_memory_byte_size": 12}, "tensors.rewards"),  # shape [4] of float32 is 16 bytes
        ({"binary_data_size": 16}, "tensors.rewards"),  # both body bytes and a region
        ({"shared_memory_offset": -1}, "tensors.rewards"),
        ({"dtype": "int16"}, "tensors.rewards"),
        ({framing.OUTPUTS_KEY: {"region": region.name, "offset": 1024, "byte_size": 40}},
         f"{framing.OUTPUTS_KEY}.byte_size"),  # the outputs need 2 x 48 bytes
        ({framing.OUTPUTS_KEY: {"region": "no-such-region", "byte_size": 4096}}, framing.OUTPUTS_KEY),
        ({framing.OUTPUTS_KEY: {"region": region.name, "offset": 1 << 16, "byte_size": 4096}}, framing.OUTPUTS_KEY),
        ({framing.OUTPUTS_KEY: {"region": region.name, "size": 4096}}, f"{framing.OUTPUTS_KEY}.size"),
    ]
    for change, field in cases:
        header: dict[str, Any] = {"estimator": "grpo"}
        tensors = {"rewards": dict(rewards), "response_mask": mask, "group_ids": ids}
        if framing.OUTPUTS_KEY in change:
            header.update(change)
        else:
            tensors["rewards"].update(change)
        response = post(server, "/v1/advantages", {**header, "tensors": tensors})
        assert response.status_code == 400, (change, response.text)
        assert response.json()["error"]["field"] == field, (change, response.json())
    good = post(server, "/v1/advantages", {"estimator": "grpo", "tensors": {"rewards": rewards, "response_mask": mask,
                                                                            "group_ids": ids}})
    assert good.status_code == 200, good.text
    # losses: which gradients come back is known after the compute; too little room writes nothing
    logprobs = region.put(256, np.full((4, 3), -1.0, np.float32), "logprobs")
    region.memory.buf[2048:2048 + 64] = b"\xab" * 64
    response = post(server, "/v1/losses", {"tensors": {"logprobs": logprobs, "old_logprobs": logprobs,
                                                       "advantages": logprobs, "response_mask": mask},
                                           framing.OUTPUTS_KEY: {"region": region.name, "offset": 2048, "byte_size": 40}})
    assert response.status_code == 400 and response.json()["error"]["field"] == f"{framing.OUTPUTS_KEY}.byte_size"
    assert bytes(region.memory.buf[2048:2048 + 64]) == b"\xab" * 64


def test_grpc_descriptor_errors_name_the_field(server, region):
    rewards = region.put(0, np.ones(4, np.float32), "rewards")
    ref = framing.region_ref("rewards", rewards)
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.AdvserveStub(channel)
        mask = protocol.tensor_to_pb(framing.RawTensor.from_numpy(np.ones((4, 3), bool)))
        cases = [
            (pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[4], shared_memory=pb.SharedMemoryRef(
                region="no-such-region", byte_size=16)), None, "tensors.rewards"),
            (pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[4], data=bytes(16), shared_memory=pb.SharedMemoryRef(
                region=region.name, byte_size=16)), None, "tensors.rewards"),
            (pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[4], shared_memory=pb.SharedMemoryRef(
                region=region.name, byte_size=20)), None, "tensors.rewards"),
            (protocol.tensor_to_pb(ref), pb.SharedMemoryRef(region=region.name, offset=1024, byte_size=8),
             f"{framing.OUTPUTS_KEY}.byte_size"),
        ]
        for rewards_pb, outputs, field in cases:
            request = pb.ComputeAdvantagesRequest(estimator=pb.ESTIMATOR_REINFORCE, rewards=rewards_pb,
                                                  response_mask=mask, output_shared_memory=outputs)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ComputeAdvantages(request, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            assert dict(caught.value.trailing_metadata())["advserve-error-field"] == field, caught.value.details()
        request = pb.ComputeAdvantagesRequest(estimator=pb.ESTIMATOR_REINFORCE, rewards=protocol.tensor_to_pb(ref),
                                              response_mask=mask,
                                              output_shared_memory=pb.SharedMemoryRef(region=region.name, offset=1024,
                                                                                      byte_size=96))
        answer = stub.ComputeAdvantages(request, timeout=30)
        assert not answer.advantages.data and answer.advantages.shared_memory.offset == 1024
        expected = advserve.compute_advantages("reinforce", rewards=np.ones(4, np.float32),
                                               response_mask=np.ones((4, 3), bool))
        got = protocol.tensor_from_pb("advantages", answer.advantages)
        np.testing.assert_array_equal(region.get(got.descriptor()), expected.advantages)
