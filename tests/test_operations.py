"""Operations: bearer-token auth, TLS and mTLS, metrics, request ids and structured logs, request
deadlines, and the graceful shutdown, each against a real server process on loopback."""

from __future__ import annotations

import json
import signal
import ssl
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

import advserve
from advserve_client import framing, protocol
from advserve_client._pb import advserve_pb2_grpc as pb_grpc
from conftest import RunningServer

R = framing.RawTensor.from_numpy
SMALL = {"estimator": "grpo", "tensors": {"rewards": [1, 0], "response_mask": [[1, 1], [1, 0]], "group_ids": [0, 0]}}


def losses_body(b: int, t: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lp = -rng.random((b, t), dtype=np.float32)
    arrays = {"logprobs": lp, "old_logprobs": lp + rng.normal(scale=0.1, size=(b, t)).astype(np.float32),
              "advantages": rng.normal(size=(b, t)).astype(np.float32), "response_mask": np.ones((b, t), bool)}
    n, chunks = framing.encode({"preset": "verl"}, {k: R(v) for k, v in arrays.items()})
    return b"".join(chunks), {"content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(n)}, arrays


def test_bearer_token_on_both_transports():
    token = "s3cret-token-value"
    server = RunningServer("--log-format", "json", env={"ADVSERVE_AUTH_TOKEN": token})
    try:
        url = f"{server.url}/v1/advantages"
        missing = httpx.post(url, json=SMALL)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthenticated"
        assert httpx.post(url, json=SMALL, headers={"authorization": "Bearer nope"}).status_code == 401
        assert httpx.post(url, json=SMALL, headers={"authorization": f"Bearer {token}"}).status_code == 200
        assert httpx.get(f"{server.url}/v1/estimators").status_code == 401
        assert httpx.get(f"{server.url}/health/ready").status_code == 200  # health is exempt
        assert httpx.get(f"{server.url}/health/live").status_code == 200

        request = protocol.advantages_request_to_pb({"estimator": "grpo"}, {
            "rewards": R(np.array([1, 0], np.float32)), "response_mask": R(np.ones((2, 2), bool)),
            "group_ids": ["a", "a"]})
        with grpc.insecure_channel(server.grpc_address) as channel:
            stub = pb_grpc.AdvserveStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.ComputeAdvantages(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                stub.ComputeAdvantages(request, timeout=30, metadata=(("authorization", "Bearer nope"),))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = stub.ComputeAdvantages(request, timeout=30, metadata=(("authorization", f"Bearer {token}"),))
            assert list(ok.advantages.shape) == [2, 2]
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()
    assert token not in server.output()  # never logged


def _tls_files(tmp_path):
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("trainer@example")
    paths = {}
    for name, blob in (("ca.pem", ca.cert_pem), ("server.pem", server_cert.private_key_and_cert_chain_pem),
                       ("client.pem", client_cert.private_key_and_cert_chain_pem)):
        (tmp_path / name).write_bytes(blob.bytes())
        paths[name] = str(tmp_path / name)
    (tmp_path / "server_key.pem").write_bytes(server_cert.private_key_pem.bytes())
    (tmp_path / "server_chain.pem").write_bytes(b"".join(c.bytes() for c in server_cert.cert_chain_pems))
    paths["server_key.pem"], paths["server_chain.pem"] = str(tmp_path / "server_key.pem"), str(tmp_path / "server_chain.pem")
    return ca, client_cert, paths


def test_mtls_refuses_plain_and_certless_clients_and_serves_a_good_one(tmp_path):
    ca, client_cert, paths = _tls_files(tmp_path)
    good = ssl.create_default_context(cafile=paths["ca.pem"])
    client_cert.configure_cert(good)
    server = RunningServer("--tls-cert", paths["server_chain.pem"], "--tls-key", paths["server_key.pem"],
                           "--tls-client-ca", paths["ca.pem"], scheme="https", verify=good)
    try:
        assert httpx.post(f"{server.url}/v1/advantages", json=SMALL, verify=good).status_code == 200
        plain = server.url.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"{plain}/v1/advantages", json=SMALL, timeout=10)
        certless = ssl.create_default_context(cafile=paths["ca.pem"])
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"{server.url}/v1/advantages", json=SMALL, verify=certless, timeout=10)

        request = protocol.advantages_request_to_pb({"estimator": "dr_grpo"}, {
            "rewards": R(np.array([1, 0], np.float32)), "response_mask": R(np.ones((2, 2), bool)),
            "group_ids": ["a", "a"]})
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.cert_pem.bytes(), private_key=client_cert.private_key_pem.bytes(),
            certificate_chain=b"".join(c.bytes() for c in client_cert.cert_chain_pems))
        with grpc.secure_channel(server.grpc_address, credentials) as channel:
            assert list(pb_grpc.AdvserveStub(channel).ComputeAdvantages(request, timeout=30).advantages.shape) == [2, 2]
        without_cert = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        with grpc.secure_channel(server.grpc_address, without_cert) as channel:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.AdvserveStub(channel).ComputeAdvantages(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(server.grpc_address) as channel:
            with pytest.raises(grpc.RpcError):
                pb_grpc.AdvserveStub(channel).ComputeAdvantages(request, timeout=10)
    finally:
        server.stop()


def test_metrics_request_ids_and_json_logs():
    server = RunningServer("--log-format", "json", "--log-level", "info")
    try:
        res = httpx.post(f"{server.url}/v1/advantages", json=SMALL, headers={"x-request-id": "trace-123"})
        assert res.headers["x-request-id"] == "trace-123"
        generated = httpx.post(f"{server.url}/v1/advantages", json={"estimator": "nope", "tensors": {}})
        assert generated.status_code == 404 and len(generated.headers["x-request-id"]) == 32
        body, headers, _ = losses_body(8, 16)
        assert httpx.post(f"{server.url}/v1/losses", content=body, headers=headers).status_code == 200
        request = protocol.advantages_request_to_pb({"estimator": "grpo"}, {
            "rewards": R(np.array([1, 0], np.float32)), "response_mask": R(np.ones((2, 2), bool)),
            "group_ids": ["a", "a"]})
        with grpc.insecure_channel(server.grpc_address) as channel:
            call = pb_grpc.AdvserveStub(channel).ComputeAdvantages.with_call(
                request, timeout=30, metadata=(("x-request-id", "grpc-456"),))
            assert dict(call[1].initial_metadata())["x-request-id"] == "grpc-456"

        text = httpx.get(f"{server.url}/metrics").text
        assert 'advserve_requests_total{endpoint="advantages",estimator="grpo",status="200",transport="http"} 1.0' \
            in text
        assert 'advserve_requests_total{endpoint="advantages",estimator="grpo",status="OK",transport="grpc"} 1.0' \
            in text
        assert 'advserve_rejections_total{reason="not_found",transport="http"} 1.0' in text
        assert 'advserve_tokens_total{endpoint="losses"} 128.0' in text
        for phase in ("decode", "queue", "compute", "encode"):
            assert f'advserve_request_phase_seconds_count{{endpoint="losses",phase="{phase}",transport="http"}} 1.0' \
                in text
        assert "advserve_bytes_in_flight 0.0" in text and "advserve_queue_depth 0.0" in text
        assert 'advserve_request_bytes_total{direction="in",transport="http"}' in text
    finally:
        server.stop()
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("logger") == "advserve.access"]
    assert any(line["request_id"] == "trace-123" and line["status"] == "200" and line["transport"] == "http"
               for line in access)
    assert any(line["request_id"] == "grpc-456" and line["transport"] == "grpc" for line in access)
    assert any(line.get("error") == "not_found" for line in access)


def test_request_deadline_is_a_504_and_deadline_exceeded():
    server = RunningServer("--request-timeout-s", "0.001")
    try:
        body, headers, arrays = losses_body(512, 2048)
        res = httpx.post(f"{server.url}/v1/losses", content=body, headers=headers, timeout=60)
        # the deadline covers the body's upload too: past it while reading, 408; later, 504
        assert (res.status_code, res.json()["error"]["code"]) in ((408, "request_timeout"), (504, "deadline_exceeded"))
        request = protocol.losses_request_to_pb({}, {k: R(v) for k, v in arrays.items()})
        with grpc.insecure_channel(server.grpc_address, options=[("grpc.max_send_message_length", 1 << 30)]) as ch:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.AdvserveStub(ch).ComputeLosses(request, timeout=60)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert httpx.get(f"{server.url}/health/ready").status_code == 200
    finally:
        server.stop()


def test_sigterm_drains_every_accepted_request():
    server = RunningServer("--shutdown-grace-s", "60")
    body, headers, arrays = losses_body(512, 2048)
    expected = advserve.compute_losses(preset="verl", **arrays).grad_logprobs
    outcomes: list[tuple[str, object]] = []
    lock = threading.Lock()
    stop_sending = threading.Event()

    def client(seed: int):
        with httpx.Client(timeout=120) as c:
            for _ in range(40):
                if stop_sending.is_set():
                    return
                try:
                    r = c.post(f"{server.url}/v1/losses", content=body, headers=headers)
                except httpx.HTTPError as exc:  # refused once the listener closed: never accepted
                    with lock:
                        outcomes.append(("refused", type(exc).__name__))
                    return
                with lock:
                    outcomes.append((str(r.status_code), r))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # requests in flight
    server.process.send_signal(signal.SIGTERM)
    readiness = []
    for _ in range(20):  # readiness turns false while the accepted requests finish
        try:
            readiness.append(httpx.get(f"{server.url}/health/ready", timeout=2).status_code)
        except httpx.HTTPError:
            break
        if 503 in readiness:
            break
        time.sleep(0.02)
    stop_sending.set()
    for t in threads:
        t.join(timeout=120)
    code = server.process.wait(timeout=60)
    assert code == 0
    statuses = [status for status, _ in outcomes]
    assert "200" in statuses and set(statuses) <= {"200", "503", "refused"}, statuses
    for status, response in outcomes:
        if status == "200":  # every accepted request got a full, correct answer
            _, tensors = framing.decode(response.content, response.headers[framing.HEADER_LENGTH])
            np.testing.assert_allclose(tensors["grad_logprobs"].to_numpy(), expected, rtol=1e-6, atol=1e-9)
        elif status == "503":
            assert response.json()["error"]["code"] == "unavailable"
    assert 503 in readiness or not readiness, readiness
