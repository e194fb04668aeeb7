"""Hostile and careless gRPC clients against a real `advserve serve` (issue 12, the gRPC door): the
token is checked before a message is read, admission before it is parsed, malformed bytes are
INVALID_ARGUMENT naming the body, reflection needs the token, a busy port is a startup error, and
the one deadline covers reading, decoding and computing. Both services, advserve.v1.Advserve and
the Open Inference Protocol's inference.GRPCInferenceService, pass the same door.

Memory is read from the server process (/proc/PID/status VmHWM, the peak RSS); nothing here asserts
elapsed time. Every load loop is bounded in count, every call has a timeout."""

from __future__ import annotations

import subprocess
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from advserve._oip_pb import grpc_service_pb2 as oip_pb
from advserve.testing import advserve_command, free_port
from advserve_client import framing, protocol
from conftest import RunningServer

R = framing.RawTensor.from_numpy
TOKEN = "hostile-grpc-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
ADMISSION = 128 << 20
MIB = 1 << 20
LOSSES = "/advserve.v1.Advserve/ComputeLosses"
ADVANTAGES = "/advserve.v1.Advserve/ComputeAdvantages"
INFER = "/inference.GRPCInferenceService/ModelInfer"
BIG_OPTIONS = [("grpc.max_send_message_length", (1 << 31) - 1), ("grpc.max_receive_message_length", 1 << 30)]


@pytest.fixture(scope="module")
def server():
    running = RunningServer("--auth-token", TOKEN, "--admission-bytes", str(ADMISSION), "--request-timeout-s", "3",
                            "--grpc-read-timeout-s", "2")
    yield running
    running.stop()


def losses_bytes(mib: float) -> bytes:
    """A serialized ComputeLossesRequest of about `mib` MiB (three float32 tensors and a mask, T = 2048)."""
    rows = max(1, int(mib * MIB / (13 * 2048)))
    rng = np.random.default_rng(0)
    lp = -rng.random((rows, 2048), dtype=np.float32)
    return protocol.losses_request_to_pb({}, {
        "logprobs": R(lp), "old_logprobs": R(lp), "advantages": R(rng.normal(size=(rows, 2048)).astype(np.float32)),
        "response_mask": R(np.ones((rows, 2048), bool))}).SerializeToString()


def infer_bytes(mib: float) -> bytes:
    """A serialized OIP ModelInferRequest of the "losses" model, about `mib` MiB of raw inputs."""
    rows = max(1, int(mib * MIB / (13 * 2048)))
    lp = -np.random.default_rng(0).random((rows, 2048), dtype=np.float32)
    message = oip_pb.ModelInferRequest(model_name="losses")
    for name, array, datatype in (("logprobs", lp, "FP32"), ("old_logprobs", lp, "FP32"), ("advantages", lp, "FP32"),
                                  ("response_mask", np.ones((rows, 2048), bool), "BOOL")):
        message.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        message.raw_input_contents.append(array.tobytes())
    return message.SerializeToString()


def mask_advantages(mib: float) -> bytes:
    """A serialized GRPO ComputeAdvantagesRequest of about `mib` MiB: a bool mask (1 byte a token), so
    its compute (COMPUTE_COST x B·T x 4 bytes) is ~72 times its size."""
    rows = max(2, int(mib * MIB / 2048)) // 2 * 2
    return protocol.advantages_request_to_pb({"estimator": "grpo"}, {
        "rewards": R(np.tile(np.array([1, 0], np.float32), rows // 2)), "response_mask": R(np.ones((rows, 2048), bool)),
        "group_ids": R(np.repeat(np.arange(rows // 2), 2))}).SerializeToString()


def small_advantages() -> bytes:
    return protocol.advantages_request_to_pb({"estimator": "grpo"}, {
        "rewards": R(np.array([1, 0, 1, 0], np.float32)), "response_mask": R(np.ones((4, 5), bool)),
        "group_ids": ["a", "a", "b", "b"]}).SerializeToString()


def call_raw(address: str, method: str, payload: bytes, metadata=(), timeout: float = 60.0):
    """(status code name, trailing metadata dict) of one unary call with raw request bytes."""
    with grpc.insecure_channel(address, options=BIG_OPTIONS) as channel:
        stub = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            stub(payload, metadata=metadata, timeout=timeout)
            return "OK", {}
        except grpc.RpcError as exc:
            return exc.code().name, dict(exc.trailing_metadata() or ())


def burst(address: str, method: str, payload: bytes, calls: int, metadata=()) -> list:
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(call_raw(address, method, payload, metadata)))
               for _ in range(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == calls
    return results


def peak_growth_mib(server: RunningServer, baseline_kb: int) -> float:
    return (server.status_kb("VmHWM") - baseline_kb) / 1024


@pytest.mark.parametrize("method,payload", [(LOSSES, lambda: losses_bytes(40)), (INFER, lambda: infer_bytes(40))],
                         ids=["native", "oip"])
def test_unauthenticated_large_calls_are_never_read(server, method, payload):
    """Six 40 MiB calls without the token: UNAUTHENTICATED, and the server's peak RSS does not grow by
    even one message (read and parsed, as before, they cost ~3 x 6 x 40 MiB)."""
    data = payload()
    baseline = server.status_kb("VmHWM")
    results = burst(server.grpc_address, method, data, 6)
    assert {code for code, _ in results} == {"UNAUTHENTICATED"}
    assert {meta.get("advserve-error-code") for _, meta in results} == {"unauthenticated"}
    assert peak_growth_mib(server, baseline) < 40


def test_authenticated_bursts_stay_within_admission(server):
    """Concurrent authenticated bursts of admissible and oversize messages, on both services: the peak
    RSS grows by at most admission + 128 MiB; each call is answered OK, or refused with the error code
    in the metadata (UNAVAILABLE overloaded with Retry-After; RESOURCE_EXHAUSTED), at least one is OK;
    a message over the receive limit (admission / 12) is refused before it is read."""
    baseline = server.status_kb("VmHWM")
    results = burst(server.grpc_address, LOSSES, losses_bytes(10), 6, AUTH)
    results += burst(server.grpc_address, INFER, infer_bytes(10), 4, AUTH)
    results += burst(server.grpc_address, ADVANTAGES, mask_advantages(8), 4, AUTH)  # decodable, too big to compute
    assert "OK" in [code for code, _ in results]
    for code, meta in results:
        assert code in ("OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED"), (code, meta)
        if code == "UNAVAILABLE":
            assert meta["advserve-error-code"] == "overloaded" and meta["retry-after"] == "1"
        if code == "RESOURCE_EXHAUSTED":
            assert meta["advserve-error-code"] == "payload_too_large" and meta["advserve-error-field"] == "body"
    over_limit = burst(server.grpc_address, LOSSES, losses_bytes(16), 3, AUTH)  # > admission / 12
    assert {code for code, _ in over_limit} == {"RESOURCE_EXHAUSTED"}
    assert peak_growth_mib(server, baseline) <= (ADMISSION >> 20) + 128
    assert call_raw(server.grpc_address, ADVANTAGES, small_advantages(), AUTH)[0] == "OK"  # all released


GARBAGE = [b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", b"\x08", np.random.default_rng(1).bytes(512)]


@pytest.mark.parametrize("method", [LOSSES, ADVANTAGES, INFER, "/inference.GRPCInferenceService/ModelMetadata"])
def test_malformed_protobuf_is_invalid_argument_on_the_body(server, method):
    for payload in GARBAGE + [losses_bytes(0.01)[:1000]]:
        code, meta = call_raw(server.grpc_address, method, payload, AUTH, timeout=30)
        assert (code, meta.get("advserve-error-code"), meta.get("advserve-error-field")) == \
            ("INVALID_ARGUMENT", "invalid_argument", "body"), payload[:16]
    assert not [line for line in server.problems() if "Traceback" in line or "ERROR" in line]


def test_a_field_with_control_characters_comes_back_escaped(server):
    """An OIP input named with a control character: INVALID_ARGUMENT naming it, escaped (a raw one is
    no legal metadata value, and the call failed INTERNAL)."""
    message = oip_pb.ModelInferRequest(model_name="grpo")
    message.inputs.add(name="respon\x11e_mask", datatype="BOOL", shape=[2, 2])
    message.raw_input_contents.append(b"\x01" * 4)
    code, meta = call_raw(server.grpc_address, INFER, message.SerializeToString(), AUTH, timeout=30)
    assert (code, meta.get("advserve-error-field")) == ("INVALID_ARGUMENT", "inputs.respon\\x11e_mask")


def test_a_call_without_a_message_is_invalid_argument(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = channel.stream_unary(LOSSES, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            stub(iter(()), metadata=AUTH, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.value.trailing_metadata())["advserve-error-field"] == "body"


def test_reflection_needs_the_token_and_health_does_not(server):
    def services(metadata):
        with grpc.insecure_channel(server.grpc_address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            answers = list(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=30))
            return {s.name for s in answers[0].list_services_response.service}

    with pytest.raises(grpc.RpcError) as err:
        services(())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert {"advserve.v1.Advserve", "grpc.health.v1.Health"} <= services(AUTH)
    with grpc.insecure_channel(server.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service="advserve.v1.Advserve"), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive", request_serializer=None,
                                   response_deserializer=oip_pb.ServerLiveResponse.FromString)
        assert live(b"", timeout=10).live


def test_deadline_covers_compute_and_a_stalled_upload(server):
    """A call whose deadline passes while it computes is DEADLINE_EXCEEDED; a message that never
    arrives ends with DEADLINE_EXCEEDED (request_timeout, within --request-timeout-s) and gives its
    admission back; the next call is served."""
    rows = 512  # ~1M tokens: within admission, and not received, decoded and computed in 10 ms
    rng = np.random.default_rng(2)
    slow = protocol.advantages_request_to_pb({"estimator": "gae"}, {
        "token_rewards": R(rng.random((rows, 2048), dtype=np.float32)),
        "values": R(rng.random((rows, 2048), dtype=np.float32)),
        "response_mask": R(np.ones((rows, 2048), bool))}).SerializeToString()
    code, _ = call_raw(server.grpc_address, ADVANTAGES, slow, AUTH, timeout=0.01)
    assert code == "DEADLINE_EXCEEDED"

    release = threading.Event()

    def never():  # a request stream that sends no message until released
        release.wait(20)
        return
        yield

    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = channel.stream_unary(LOSSES, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            stub(never(), metadata=AUTH, timeout=15)
        release.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert dict(err.value.trailing_metadata())["advserve-error-code"] == "request_timeout"
    assert call_raw(server.grpc_address, ADVANTAGES, small_advantages(), AUTH)[0] == "OK"


def test_a_stalled_upload_holds_admission_only_until_the_read_timeout(server):
    """Calls whose message does not come hold the reservation for the largest message (a quarter of
    admission each; two fill what messages being received may hold, half of it): a call meanwhile
    waits its --grpc-admission-wait-s in line and gets UNAVAILABLE (overloaded, Retry-After); past
    --grpc-read-timeout-s the stalled calls end (request_timeout) and the next call is served."""
    release = threading.Event()

    def stalled():
        release.wait(20)
        return
        yield

    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = channel.stream_unary(LOSSES, request_serializer=None, response_deserializer=None)
        futures = [stub.future(stalled(), metadata=AUTH, timeout=15) for _ in range(2)]
        for _ in range(100):  # until the server has taken the reservations (bounded)
            code, meta = call_raw(server.grpc_address, ADVANTAGES, small_advantages(), AUTH, timeout=10)
            if code != "OK":
                break
        assert (code, meta.get("advserve-error-code"), meta.get("retry-after")) == ("UNAVAILABLE", "overloaded", "1")
        errors = []
        for future in futures:
            with pytest.raises(grpc.RpcError) as err:
                future.result(timeout=15)
            errors.append(err.value)
        release.set()
    assert {error.code() for error in errors} == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert {dict(error.trailing_metadata())["advserve-error-code"] for error in errors} == {"request_timeout"}
    assert call_raw(server.grpc_address, ADVANTAGES, small_advantages(), AUTH)[0] == "OK"


def test_stalled_grpc_uploads_never_lock_rest_out():
    """Three gRPC calls whose message never comes (read timeout 30 s): the messages being received
    hold at most half of admission, so a REST client keeps getting 200, a 4 MiB losses batch
    included, while a gRPC call waits its turn (UNAVAILABLE, overloaded, Retry-After). A REST batch
    whose body and compute fit admission but not the half left is 503 (overloaded, Retry-After) at
    once; once the stalled callers go, gRPC and that batch are served. (One stalled call used to
    reserve all of admission.)"""
    running = RunningServer("--auth-token", TOKEN, "--admission-bytes", str(ADMISSION))
    headers = {"authorization": f"Bearer {TOKEN}"}
    gates = [threading.Event() for _ in range(3)]

    def stalled(gate):
        gate.wait(30)
        return
        yield

    def in_flight(client) -> float:
        line = next(line for line in client.get("/metrics").text.splitlines()
                    if line.startswith("advserve_bytes_in_flight "))
        return float(line.split()[1])

    try:
        with grpc.insecure_channel(running.grpc_address) as channel, \
                httpx.Client(base_url=running.url, headers=headers, timeout=60) as client:
            stub = channel.stream_unary(LOSSES, request_serializer=None, response_deserializer=None)
            futures = [stub.future(stalled(gate), metadata=AUTH, timeout=30) for gate in gates]
            for _ in range(200):  # until two reservations (a quarter of admission each) are held (bounded)
                if in_flight(client) >= ADMISSION // 2 - 64:
                    break
                time.sleep(0.05)
            assert ADMISSION // 2 - 64 <= in_flight(client) <= ADMISSION // 2
            small = {"estimator": "grpo", "tensors": {"rewards": [1, 0], "response_mask": [[1, 1], [1, 0]],
                                                      "group_ids": [0, 0]}}
            statuses = [client.post("/v1/advantages", json=small).status_code for _ in range(5)]
            def losses(mib: int) -> httpx.Response:  # a binary losses batch of `mib` MiB (72 bytes a token to compute)
                lp = -np.random.default_rng(4).random((mib * MIB // (13 * 2048), 2048), dtype=np.float32)
                n, chunks = framing.encode({}, {"logprobs": R(lp), "old_logprobs": R(lp), "advantages": R(lp),
                                                "response_mask": R(np.ones(lp.shape, bool))})
                return client.post("/v1/losses", content=b"".join(chunks), headers={
                    "content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(n)})

            statuses.append(losses(4).status_code)  # 4 MiB + 22 MiB to compute: fits beside the stalled calls
            assert statuses == [200] * 6
            busy = losses(12)  # 12 MiB + 66 MiB to compute: fits admission, not the half left now
            assert (busy.status_code, busy.json()["error"]["code"], busy.headers["retry-after"]) == \
                (503, "overloaded", "1")
            code, meta = call_raw(running.grpc_address, ADVANTAGES, small_advantages(), AUTH, timeout=10)
            assert (code, meta.get("advserve-error-code"), meta.get("retry-after")) == \
                ("UNAVAILABLE", "overloaded", "1")
            assert in_flight(client) >= ADMISSION // 2 - 64  # the stalled calls were held all along
            for future in futures:
                future.cancel()
            for gate in gates:
                gate.set()
            for _ in range(100):  # the cancelled calls give their reservations back (bounded)
                code, _ = call_raw(running.grpc_address, ADVANTAGES, small_advantages(), AUTH, timeout=10)
                if code == "OK":
                    break
                time.sleep(0.05)
            assert code == "OK"
            assert losses(12).status_code == 200  # with the room back, the same request is served
    finally:
        running.stop()


def test_a_busy_grpc_port_is_a_startup_error(server):
    """A second server on the first one's gRPC port exits non-zero with a clear message (no
    SO_REUSEPORT: it cannot silently share the port)."""
    command = [*advserve_command(), "serve", "--host", "127.0.0.1", "--http-port", str(free_port()),
               "--grpc-port", str(server.grpc_port), "--log-level", "warning"]
    second = subprocess.run(command, capture_output=True, text=True, timeout=60,
                            env=server.environment())
    assert second.returncode != 0
    assert f"cannot start gRPC on 127.0.0.1:{server.grpc_port}" in second.stderr
    assert call_raw(server.grpc_address, ADVANTAGES, small_advantages(), AUTH)[0] == "OK"  # the first serves on


def test_a_cancelled_call_gives_its_admission_back(server):
    """Callers that go away while their message is awaited hold nothing afterwards: a burst of
    cancelled stalled uploads, then a normal call is served."""
    gates = [threading.Event() for _ in range(4)]

    def stalled(gate):
        gate.wait(20)
        return
        yield

    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = channel.stream_unary(LOSSES, request_serializer=None, response_deserializer=None)
        futures = [stub.future(stalled(gate), metadata=AUTH, timeout=20) for gate in gates]
        time.sleep(0.3)  # let them reach the server (not a timing assertion)
        for future in futures:
            future.cancel()
        for gate in gates:
            gate.set()
    assert call_raw(server.grpc_address, ADVANTAGES, small_advantages(), AUTH)[0] == "OK"
