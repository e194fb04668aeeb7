"""Shared-memory tensors (Triton's system and CUDA shared memory extensions) against a real `advserve
serve` process, through the stock tritonclient (HTTP and gRPC) and tritonclient.utils.shared_memory
unchanged: register, infer with inputs and outputs in regions (equal to the same request without
them), status, unregister, re-register; every misuse a 400/404 naming the field, the server staying
up; a region whose object is unlinked, truncated or owned by another uid; auth; CUDA on a CPU server.
The registry itself (`advserve.shm.Regions`) across two instances over one directory, as two workers
see it."""

from __future__ import annotations

import base64
import os
import uuid

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, serialize_byte_tensor

from advserve.errors import InvalidArgument, NotFound
from advserve.shm import MAX_REGIONS, Regions, Released, check_registrant
from conftest import RunningServer

TRANSPORTS = ["http", "grpc"]
RNG = np.random.default_rng(7)
MASK = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
SHAPE = MASK.shape


def loss_arrays() -> dict[str, np.ndarray]:
    old = RNG.normal(-1.0, 0.3, SHAPE).astype(np.float32)
    return {"logprobs": old + RNG.normal(0, 0.2, SHAPE).astype(np.float32), "old_logprobs": old,
            "advantages": RNG.normal(0, 1, SHAPE).astype(np.float32), "response_mask": MASK}


@pytest.fixture(scope="module")
def server():
    running = RunningServer()
    yield running
    running.stop()
    assert running.problems() == [], running.output()[-4000:]


@pytest.fixture(scope="module")
def clients(server):
    http = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    grpc_ = grpcclient.InferenceServerClient(server.grpc_address)
    yield {"http": http, "grpc": grpc_}
    http.close()
    grpc_.close()


@pytest.fixture
def region():
    """A fresh system shared memory object (tritonclient's utility), destroyed afterwards."""
    made = []

    def make(byte_size: int = 1 << 16):
        name = f"t{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(name, f"/{name}", byte_size)
        made.append(handle)
        return name, f"/{name}", handle

    yield make
    for handle in made:
        try:
            shm.destroy_shared_memory_region(handle)
        except Exception:  # noqa: BLE001 - a test unlinked or truncated it already
            pass


def module_of(transport: str):
    return grpcclient if transport == "grpc" else httpclient


def plain_infer(client, module, model: str, arrays: dict, outputs: list[str], parameters: dict | None = None):
    """The same request without shared memory: the expectation."""
    inputs = []
    for name, array in arrays.items():
        item = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        inputs.append(item)
    result = client.infer(model, inputs, outputs=[module.InferRequestedOutput(n) for n in outputs],
                          parameters=parameters)
    return {name: result.as_numpy(name) for name in outputs}


def status_names(client, transport: str) -> dict:
    status = client.get_system_shared_memory_status()
    if transport == "grpc":
        return {name: (r.key, r.offset, r.byte_size) for name, r in status.regions.items()}
    return {r["name"]: (r["key"], r["offset"], r["byte_size"]) for r in status}


# --- the stock client, end to end ------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_inputs_and_outputs_in_shared_memory_equal_the_plain_request(clients, region, transport):
    """tritonclient places three loss inputs in one region (the mask travels as usual), asks for
    grad_logprobs in another region and loss in the response: the bytes in the region and the
    response equal those of the same request without shared memory."""
    client, module = clients[transport], module_of(transport)
    arrays = loss_arrays()
    expected = plain_infer(client, module, "losses", arrays, ["grad_logprobs", "loss"])
    in_name, in_key, in_handle = region()
    out_name, out_key, out_handle = region()
    in_shm = ["logprobs", "old_logprobs", "advantages"]
    shm.set_shared_memory_region(in_handle, [arrays[name] for name in in_shm])
    client.register_system_shared_memory(in_name, in_key, 1 << 16)
    client.register_system_shared_memory(out_name, out_key, 4096, offset=64)
    assert status_names(client, transport)[out_name] == (out_key, 64, 4096)

    inputs, offset = [], 0
    for name, array in arrays.items():
        item = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        if name in in_shm:
            item.set_shared_memory(in_name, array.nbytes, offset=offset)
            offset += array.nbytes
        else:
            item.set_data_from_numpy(array)
        inputs.append(item)
    grad = module.InferRequestedOutput("grad_logprobs")
    grad.set_shared_memory(out_name, 4096 - 128, offset=128)
    result = client.infer("losses", inputs, outputs=[grad, module.InferRequestedOutput("loss")])

    written = shm.get_contents_as_numpy(out_handle, np.float32, SHAPE, offset=64 + 128)
    np.testing.assert_array_equal(written, expected["grad_logprobs"])
    np.testing.assert_array_equal(result.as_numpy("loss"), expected["loss"])  # the output after the region's
    output = result.get_output("grad_logprobs")
    parameters = output["parameters"] if transport == "http" else \
        {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in output.parameters.items()}
    assert parameters == {"shared_memory_region": out_name, "shared_memory_byte_size": written.nbytes,
                          "shared_memory_offset": 128}
    if transport == "http":
        assert "data" not in output
    else:
        assert result.get_response().raw_output_contents[0] == b""

    # unregister one, then all; re-register under the same name
    client.unregister_system_shared_memory(out_name)
    assert out_name not in status_names(client, transport)
    with pytest.raises(InferenceServerException) as err:
        client.infer("losses", inputs, outputs=[grad])
    assert f"no shared memory region named {out_name!r}" in err.value.message()
    client.unregister_system_shared_memory()
    assert status_names(client, transport) == {}
    client.register_system_shared_memory(in_name, in_key, 1 << 16)
    client.register_system_shared_memory(out_name, out_key, 4096, offset=64)
    shm.set_shared_memory_region(out_handle, [np.zeros(1024, np.float32)])
    client.infer("losses", inputs, outputs=[grad])
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.float32, SHAPE, offset=64 + 128),
                                  expected["grad_logprobs"])
    client.unregister_system_shared_memory()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_object_of_another_uid_is_read_and_written_by_copy(clients, region, transport):
    """An object owned by another uid is not mapped (its owner could truncate it under the mapping):
    read with pread and written with pwrite, the same numbers."""
    client, module = clients[transport], module_of(transport)
    arrays = {"rewards": np.array([1, 0, 1, 1], np.float32), "response_mask": MASK,
              "group_ids": np.array([b"q1", b"q2", b"q1", b"q2"], dtype=object)}
    expected = plain_infer(client, module, "grpo", arrays, ["advantages"])
    name, key, handle = region()
    ids = serialize_byte_tensor(arrays["group_ids"]).item()  # Triton's BYTES serialization
    shm.set_shared_memory_region(handle, [arrays["rewards"], arrays["response_mask"]])
    handle._mpsm_handle.buf[256:256 + len(ids)] = ids
    os.chown(f"/dev/shm/{key[1:]}", 4321, 4321)
    client.register_system_shared_memory(name, key, 1 << 16)
    inputs = []
    for tensor, offset, size in (("rewards", 0, 16), ("response_mask", 16, MASK.nbytes), ("group_ids", 256, len(ids))):
        item = module.InferInput(tensor, list(arrays[tensor].shape), np_to_triton_dtype(arrays[tensor].dtype))
        item.set_shared_memory(name, size, offset=offset)
        inputs.append(item)
    out = module.InferRequestedOutput("advantages")
    out.set_shared_memory(name, MASK.size * 4, offset=1024)
    client.infer("grpo", inputs, outputs=[out])
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, SHAPE, offset=1024),
                                  expected["advantages"])
    client.unregister_system_shared_memory(name)


def test_server_metadata_lists_the_extensions(clients):
    assert {"system_shared_memory", "cuda_shared_memory"} <= set(clients["http"].get_server_metadata()["extensions"])
    assert {"system_shared_memory", "cuda_shared_memory"} <= set(clients["grpc"].get_server_metadata().extensions)


# --- misuse: a 400/404 naming the field, and the server stays up -------------------------------------------


def _infer_body(region_name: str, byte_size: int = 20, offset: int = 0, **extra) -> dict:
    params = {"shared_memory_region": region_name, "shared_memory_byte_size": byte_size}
    if offset:
        params["shared_memory_offset"] = offset
    return {"inputs": [{"name": "rewards", "datatype": "FP32", "shape": [5], "parameters": params, **extra},
                       {"name": "response_mask", "datatype": "BOOL", "shape": [5, 1], "data": [True] * 5},
                       {"name": "group_ids", "datatype": "INT64", "shape": [5], "data": [1, 1, 2, 2, 2]}]}


def test_misuse_is_a_clear_error(server, clients, region):
    name, key, handle = region(4096)
    http = httpx.Client(base_url=server.url, timeout=30)
    post = http.post
    assert post(f"/v2/systemsharedmemory/region/{name}/register",
                json={"key": key, "offset": 0, "byte_size": 4096}).status_code == 200
    cases = [
        (post("/v2/models/grpo/infer", json=_infer_body("nope")), 400,
         "inputs.rewards.parameters.shared_memory_region: no shared memory region named 'nope' is registered"),
        (post("/v2/models/grpo/infer", json=_infer_body(name, 20, 4090)), 400,
         "inputs.rewards.parameters.shared_memory_region: offset 4090 + byte_size 20 run past the end"),
        (post("/v2/models/grpo/infer", json=_infer_body(name, 16)), 400,
         "inputs.rewards.parameters.shared_memory_byte_size: input 'rewards': shared_memory_byte_size is 16 but"),
        (post("/v2/models/grpo/infer", json=_infer_body(name, data=[1, 2, 3, 4, 5])), 400,
         "inputs.rewards.parameters.shared_memory_region: input 'rewards' is in shared memory region"),
        (post("/v2/models/grpo/infer", json={**_infer_body(name), "outputs": [{"name": "advantages", "parameters": {
            "shared_memory_region": name, "shared_memory_byte_size": 4096, "shared_memory_offset": 8}}]}), 400,
         "outputs.advantages.parameters.shared_memory_region: offset 8 + byte_size 4096 run past the end"),
        (post("/v2/models/grpo/infer", json={**_infer_body(name), "outputs": [{"name": "advantages", "parameters": {
            "shared_memory_region": name, "shared_memory_byte_size": 4}}]}), 400,
         "outputs.advantages.parameters.shared_memory_byte_size: output 'advantages': shared_memory_byte_size is 4"),
        (post("/v2/models/grpo/infer", json=_infer_body(name, "20")), 400,
         "inputs.rewards.parameters.shared_memory_byte_size must be a non-negative integer"),
        (post(f"/v2/systemsharedmemory/region/{name}/register", json={"key": key, "byte_size": 8}), 400,
         f"name: a system shared memory region named {name!r} is already registered"),
        (post("/v2/systemsharedmemory/region/other/register", json={"key": key, "offset": 4000, "byte_size": 200}),
         400, "byte_size: offset 4000 + byte_size 200 run past the end of the shared memory object"),
        (post("/v2/systemsharedmemory/region/other/register", json={"key": "/no-such-object", "byte_size": 8}), 400,
         "key: no POSIX shared memory object '/no-such-object' exists"),
        (post("/v2/systemsharedmemory/region/other/register", json={"key": "/../etc/passwd", "byte_size": 8}), 400,
         "key must be '/name'"),
        (post("/v2/systemsharedmemory/region/other/register", json={"key": key, "byte_size": -1}), 400,
         "byte_size must be an integer >= 1"),
        (post("/v2/systemsharedmemory/region/other/register", json={"key": key, "byte_size": 8, "x": 1}), 400,
         "x: unknown field 'x'"),
        (http.get("/v2/systemsharedmemory/region/nope/status"), 404,
         "name: no system shared memory region named 'nope' is registered"),
        (http.get(f"/v2/cudasharedmemory/region/{name}/status"), 404,
         f"name: no CUDA shared memory region named {name!r} is registered"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"].startswith(message), response.json()["error"]
    # gRPC says the same
    grpc_ = clients["grpc"]
    with pytest.raises(InferenceServerException) as err:
        grpc_.register_system_shared_memory(name, key, 8)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "already registered" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        grpc_.get_system_shared_memory_status("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    item = grpcclient.InferInput("rewards", [5], "FP32")
    item.set_shared_memory("nope", 20)
    with pytest.raises(InferenceServerException) as err:
        grpc_.infer("grpo", [item])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert err.value.message().startswith("inputs.rewards.parameters.shared_memory_region: no shared memory region")
    # unregistering a name that is not registered is no error (as in Triton)
    assert post("/v2/systemsharedmemory/region/never/unregister").status_code == 200
    assert post(f"/v2/cudasharedmemory/region/{name}/unregister").status_code == 200  # another kind: kept
    assert http.get(f"/v2/systemsharedmemory/region/{name}/status").json()[0]["name"] == name
    post("/v2/systemsharedmemory/unregister")
    http.close()
    assert clients["http"].is_server_live()


def test_cuda_shared_memory_on_a_cpu_server_is_a_clear_error():
    """On a server whose engine is on the CPU (pinned: on a CUDA machine auto would pick the GPU)."""
    server = RunningServer("--device", "cpu")
    try:
        http = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
        grpc_ = grpcclient.InferenceServerClient(server.grpc_address)
        for client in (http, grpc_):
            with pytest.raises(InferenceServerException) as err:
                client.register_cuda_shared_memory("gpu", base64.b64encode(bytes(64)), 0, 1024)
            assert err.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")
            assert "CUDA shared memory needs the engine on a CUDA device; this server's engine is on cpu" \
                in err.value.message()
        assert http.get_cuda_shared_memory_status() == [] and list(grpc_.get_cuda_shared_memory_status().regions) == []
        http.unregister_cuda_shared_memory()
        http.close()
        grpc_.close()
    finally:
        server.stop()


def test_unlinked_and_truncated_objects_are_released_and_the_server_stays_up(server, clients, region):
    """Its owner unlinks one object and truncates another (one mapped: our uid; one of another uid:
    read by copy): each region is released at its next use with a 400, the server answers on."""
    http = httpx.Client(base_url=server.url, timeout=30)
    rewards = np.array([1, 0, 1, 1, 0], np.float32)
    regions = {}
    for case in ("unlinked", "truncated", "foreign-truncated"):
        name, key, handle = region(4096)
        shm.set_shared_memory_region(handle, [rewards])
        if case == "foreign-truncated":
            os.chown(f"/dev/shm/{key[1:]}", 4321, 4321)
        assert http.post(f"/v2/systemsharedmemory/region/{name}/register",
                         json={"key": key, "byte_size": 4096}).status_code == 200
        assert http.post("/v2/models/grpo/infer", json=_infer_body(name)).status_code == 200  # mapped now
        regions[case] = (name, key, handle)
    os.unlink(f"/dev/shm/{regions['unlinked'][1][1:]}")
    for case in ("truncated", "foreign-truncated"):
        os.truncate(f"/dev/shm/{regions[case][1][1:]}", 8)
    reasons = {"unlinked": "was unlinked by its owner", "truncated": "shrank to 8 bytes",
               "foreign-truncated": "shrank to 8 bytes"}
    for case, (name, _, _) in regions.items():
        response = http.post("/v2/models/grpo/infer", json=_infer_body(name))
        assert response.status_code == 400, response.text
        message = response.json()["error"]
        assert message.startswith("inputs.rewards.parameters.shared_memory_region: system shared memory region")
        assert "was released" in message and reasons[case] in message, message
        assert http.get(f"/v2/systemsharedmemory/region/{name}/status").status_code == 404  # released
    assert http.get("/v2/health/live").status_code == 200
    http.close()
    assert server.problems() == [], server.output()[-4000:]


def test_the_registry_is_bounded(tmp_path):
    registry = Regions(tmp_path, max_regions=3)
    key = f"/t{uuid.uuid4().hex[:12]}"
    handle = shm.create_shared_memory_region(key[1:], key, 64)
    try:
        for index in range(3):
            registry.register_system(f"r{index}", key, 0, 64)
        with pytest.raises(InvalidArgument, match="3 shared memory regions are registered, the most"):
            registry.register_system("r3", key, 0, 64)
        with pytest.raises(InvalidArgument, match="at most 128 bytes"):
            registry.register_system("x" * 129, key, 0, 64)
        registry.unregister("system", "r0")
        registry.register_system("r3", key, 0, 64)
    finally:
        shm.destroy_shared_memory_region(handle)
    assert MAX_REGIONS >= 64


def test_a_region_registered_by_one_worker_is_used_by_another(tmp_path):
    """Two registries over one shared directory (two workers of one server): a region registered by
    one is read and written by the other; unregistered by one, gone for the other; re-registered
    under the same name with another object, the other worker maps the new one."""
    first, second = Regions(tmp_path), Regions(tmp_path)
    keys = [f"/t{uuid.uuid4().hex[:12]}" for _ in range(2)]
    handles = [shm.create_shared_memory_region(key[1:], key, 256) for key in keys]
    try:
        shm.set_shared_memory_region(handles[0], [np.arange(8, dtype=np.float32)])
        shm.set_shared_memory_region(handles[1], [-np.arange(8, dtype=np.float32)])
        first.register_system("a", keys[0], 0, 256)
        got = second.read("a", 0, 32, dtype=torch.float32, shape=(2, 4), field="f")
        assert got.tolist() == np.arange(8, dtype=np.float32).reshape(2, 4).tolist()
        second.write("a", 64, 16, [torch.ones(4)], field="f")
        assert shm.get_contents_as_numpy(handles[0], np.float32, [4], offset=64).tolist() == [1, 1, 1, 1]
        assert second.status("system") == [{"name": "a", "key": keys[0], "offset": 0, "byte_size": 256}]
        first.unregister("system", "a")
        with pytest.raises(InvalidArgument, match="no shared memory region named 'a'"):
            second.read("a", 0, 32, dtype=torch.float32, shape=(8,), field="f")
        first.register_system("a", keys[1], 0, 256)
        assert second.read("a", 0, 8, dtype=torch.float32, shape=(2,), field="f").tolist() == [0, -1]
        with pytest.raises(NotFound):
            second.status("cuda", "a")
    finally:
        for handle in handles:
            shm.destroy_shared_memory_region(handle)


def test_shared_memory_endpoints_need_the_token(region):
    token = "shm-token-value"
    server = RunningServer(env={"ADVSERVE_AUTH_TOKEN": token})
    name, key, _ = region(256)
    try:
        http = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        grpc_ = grpcclient.InferenceServerClient(server.grpc_address)
        auth = {"authorization": f"Bearer {token}"}
        for client in (http, grpc_):
            for call in (lambda c, h: c.register_system_shared_memory(name, key, 256, headers=h),
                         lambda c, h: c.get_system_shared_memory_status(headers=h),
                         lambda c, h: c.unregister_system_shared_memory(headers=h),
                         lambda c, h: c.get_cuda_shared_memory_status(headers=h)):
                with pytest.raises(InferenceServerException) as err:
                    call(client, None)
                assert err.value.status() in ("401", "StatusCode.UNAUTHENTICATED")
                call(client, dict(auth))
        http.close()
        grpc_.close()
    finally:
        server.stop()
    assert server.problems() == [], server.output()[-4000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA shared memory needs a CUDA device")
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cuda_shared_memory_round_trip(transport):
    """With CUDA: loss inputs in a CUDA IPC region of this process's memory (the handle from torch's
    own IPC export: cudaIpcGetMemHandle of the allocation), the output written there from the
    server's device, equal to the plain request. (tritonclient.utils.cuda_shared_memory makes the
    same handle through cuda-python, which the test environment lacks.)"""
    server = RunningServer("--device", "cuda")
    try:
        module = module_of(transport)
        client = module.InferenceServerClient(server.grpc_address if transport == "grpc"
                                              else server.url.removeprefix("http://"))
        arrays = loss_arrays()
        expected = plain_infer(client, module, "losses", arrays, ["grad_logprobs"])
        memory = torch.zeros(1 << 16, dtype=torch.uint8, device="cuda")
        _, handle, size, base, *_ = memory.untyped_storage()._share_cuda_()
        client.register_cuda_shared_memory("gpu", base64.b64encode(handle), 0, base + size)
        inputs, position = [], 0
        for name, array in arrays.items():
            memory[position:position + array.nbytes].copy_(torch.from_numpy(array.reshape(-1).view(np.uint8)))
            item = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            item.set_shared_memory("gpu", array.nbytes, offset=base + position)
            inputs.append(item)
            position += -(-array.nbytes // 256) * 256
        torch.cuda.synchronize()
        out = module.InferRequestedOutput("grad_logprobs")
        out.set_shared_memory("gpu", 4096, offset=base + position)
        client.infer("losses", inputs, outputs=[out])
        written = memory[position:position + MASK.size * 4].cpu().numpy().view(np.float32).reshape(SHAPE)
        np.testing.assert_array_equal(written, expected["grad_logprobs"])
        status = client.get_cuda_shared_memory_status()
        assert len(status.regions if transport == "grpc" else status) == 1
        client.unregister_cuda_shared_memory()
        client.close()
    finally:
        server.stop()
    assert server.problems() == [], server.output()[-4000:]


def test_regions_are_shared_by_the_workers_of_a_server(region):
    """With --workers 2, a region registered over one connection serves requests on fresh connections
    (which the kernel spreads over both workers), and unregistering it over another is seen by all."""
    server = RunningServer("--workers", "2")
    try:
        address = server.url.removeprefix("http://")
        name, key, handle = region(4096)
        rewards = np.array([1, 0, 1, 1, 0], np.float32)
        shm.set_shared_memory_region(handle, [rewards])
        first = httpclient.InferenceServerClient(address)
        first.register_system_shared_memory(name, key, 4096)
        first.close()
        body = _infer_body(name)
        expected = httpx.post(f"{server.url}/v2/models/grpo/infer", timeout=30, json={
            "inputs": [{**body["inputs"][0], "parameters": {}, "data": rewards.tolist()}, *body["inputs"][1:]]})
        answers = []
        for _ in range(8):  # a new connection each: both workers take some
            with httpx.Client(base_url=server.url, timeout=30) as fresh:
                answers.append(fresh.post("/v2/models/grpo/infer", json=body))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert all(a.json()["outputs"] == expected.json()["outputs"] for a in answers)
        with httpx.Client(base_url=server.url, timeout=30) as other:
            assert other.post(f"/v2/systemsharedmemory/region/{name}/unregister").status_code == 200
        for _ in range(4):
            with httpx.Client(base_url=server.url, timeout=30) as fresh:
                response = fresh.post("/v2/models/grpo/infer", json=body)
            assert response.status_code == 400 and "no shared memory region named" in response.text
    finally:
        server.stop()
    assert server.problems() == [], server.output()[-4000:]


@pytest.mark.parametrize("peer, local", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True), ("ipv4:127.0.0.1:5123", True),
    ("ipv6:[::1]:5123", True), ("unix:/tmp/s", True), ("10.1.2.3", False), ("ipv4:192.168.0.7:5123", False),
    ("ipv6:[2001:db8::1]:443", False), ("::ffff:10.0.0.1", False), (None, False), ("testclient", False)])
def test_who_may_register(peer, local):
    """--shared-memory local: loopback peers (and Unix sockets) only; any: everyone; off: no one."""
    check_registrant("any", peer)
    if local:
        check_registrant("local", peer)
    else:
        with pytest.raises(InvalidArgument, match="registered by callers on this host connected over loopback"):
            check_registrant("local", peer)
    with pytest.raises(InvalidArgument, match="shared memory is off on this server"):
        check_registrant("off", peer)


def test_shared_memory_off(region):
    server = RunningServer("--shared-memory", "off")
    name, key, _ = region(256)
    try:
        response = httpx.post(f"{server.url}/v2/systemsharedmemory/region/{name}/register", timeout=30,
                              json={"key": key, "byte_size": 256})
        assert response.status_code == 400
        assert response.json()["error"] == "peer: shared memory is off on this server (--shared-memory off)"
        client = grpcclient.InferenceServerClient(server.grpc_address)
        with pytest.raises(InferenceServerException) as err:
            client.register_system_shared_memory(name, key, 256)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "off" in err.value.message()
        assert client.get_system_shared_memory_status().regions == {}
        client.close()
    finally:
        server.stop()
    assert server.problems() == [], server.output()[-4000:]


def test_fuzz_the_shared_memory_endpoints(server, region):
    """Schemathesis' cases of every shared-memory operation of /openapi.json, schema-valid and
    -invalid (random names, keys, sizes, handles), plus valid keys of a real object drawn into the
    register bodies: never a 5xx, the error body as documented; the server stays healthy."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    _, key, _ = region(4096)
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", timeout=10)
    operations = [(path, method) for path, methods in schema.raw_schema["paths"].items() if "sharedmemory" in path
                  for method in methods]
    assert len(operations) == 10
    seen: dict[int, int] = {}
    for path, method in operations:
        operation = schema[path][method.upper()]
        for mode in ("positive", "negative") if path.endswith("/register") else ("positive",):  # a body to break
            strategy = operation.as_strategy(GenerationMode(mode))
            if path.endswith("/register") and mode == "positive" and "system" in path:
                strategy = st.tuples(strategy, st.integers(0, 5000), st.integers(-1, 5000)).map(
                    lambda drawn: _with_body(drawn[0], {"key": key, "offset": drawn[1], "byte_size": drawn[2]}))

            @given(case=strategy)
            @settings(max_examples=15, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                status = case.call_and_validate(excluded_checks=[positive_data_acceptance], timeout=10).status_code
                seen[status] = seen.get(status, 0) + 1
                assert status < 500, (path, method, mode, status)

            run()
    assert {200, 400} <= set(seen), seen
    with httpx.Client(base_url=server.url, timeout=30) as client:
        client.post("/v2/systemsharedmemory/unregister")
        assert client.get("/v2/health/ready").status_code == 200


def _with_body(case, body: dict):
    case.body = body
    return case


def test_a_region_unregistered_while_a_request_reads_it(tmp_path):
    """The registry's mapping is closed by an unregister between a request's look-up and its read:
    the request gets a 400 saying so (no closed file descriptor read, no crash)."""
    registry = Regions(tmp_path)
    key = f"/t{uuid.uuid4().hex[:12]}"
    handle = shm.create_shared_memory_region(key[1:], key, 64)
    try:
        registry.register_system("r", key, 0, 64)
        entry, mapping = registry._mapping("r", "f")
        mapping.close()  # what a concurrent unregister does to this process's mapping
        with pytest.raises(Released, match="unregistered while this request used it"):
            mapping.read(0, 8, None)
    finally:
        shm.destroy_shared_memory_region(handle)


def test_a_worker_that_never_mapped_an_unlinked_object_releases_it(tmp_path):
    first, second = Regions(tmp_path), Regions(tmp_path)
    key = f"/t{uuid.uuid4().hex[:12]}"
    handle = shm.create_shared_memory_region(key[1:], key, 64)
    first.register_system("r", key, 0, 64)
    shm.destroy_shared_memory_region(handle)  # unlinked by its owner
    with pytest.raises(InvalidArgument, match=f"system shared memory region 'r' was released: no POSIX shared memory "
                                              f"object '{key}' exists"):
        second.read("r", 0, 8, dtype=torch.float32, shape=(2,), field="f")
    assert first.status("system") == []


def test_too_many_regions_over_the_server(server, region):
    """The server holds at most MAX_REGIONS regions: the next registration is a 400 naming name,
    and one unregistered makes room."""
    _, key, _ = region(64)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        client.post("/v2/systemsharedmemory/unregister")
        client.post("/v2/cudasharedmemory/unregister")
        try:
            for index in range(MAX_REGIONS):
                response = client.post(f"/v2/systemsharedmemory/region/many{index}/register",
                                       json={"key": key, "byte_size": 64})
                assert response.status_code == 200, response.text
            response = client.post("/v2/systemsharedmemory/region/onemore/register", json={"key": key, "byte_size": 64})
            assert response.status_code == 400
            assert response.json()["error"] == (f"name: {MAX_REGIONS} shared memory regions are registered, the most "
                                                "this server holds; unregister one first")
            assert client.post("/v2/systemsharedmemory/region/many0/unregister").status_code == 200
            assert client.post("/v2/systemsharedmemory/region/onemore/register",
                               json={"key": key, "byte_size": 64}).status_code == 200
            assert len(client.get("/v2/systemsharedmemory/status").json()) == MAX_REGIONS
        finally:
            client.post("/v2/systemsharedmemory/unregister")
