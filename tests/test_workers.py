"""--workers 2: a supervisor and two worker processes on the same ports (docs/workers.md). Real servers
on loopback; every worker is told apart by the process id in its log lines ("advserve.access[PID]")."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import grpc
import httpx
import numpy as np
import pytest

from advserve.testing import advserve_command, free_port
from advserve_client import framing, protocol
from advserve_client._pb import advserve_pb2_grpc as pb_grpc
from conftest import RunningServer

R = framing.RawTensor.from_numpy
SMALL = {"estimator": "grpo", "tensors": {"rewards": [1, 0], "response_mask": [[1, 1], [1, 0]], "group_ids": [0, 0]}}
FRESH = 16  # requests on fresh connections: the kernel spreads them, all on one worker has odds 2^-15


def workers_serving(server: RunningServer, count: int = 2, timeout_s: float = 60.0) -> list[int]:
    """The pids of the workers whose uvicorn has started, once there are `count` (log level info)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = sorted({int(p) for p in re.findall(r"uvicorn\.error\[(\d+)\]: Application startup complete",
                                                  server.output())})
        if len(pids) >= count:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"{count} workers not serving within {timeout_s} s:\n{server.log_tail()}")


def access_pids(server: RunningServer, status: str = "200") -> list[int]:
    """The worker pid of each access-log line with this status."""
    return [int(pid) for pid, line in re.findall(r"advserve\.access\[(\d+)\]: (\{.*\})", server.output())
            if f'"status": "{status}"' in line]


def metric(text: str, name: str) -> float:
    """The sum of every sample of `name` in a Prometheus text page."""
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def losses_body(b: int, t: int):
    rng = np.random.default_rng(0)
    lp = -rng.random((b, t), dtype=np.float32)
    arrays = {"logprobs": lp, "old_logprobs": lp, "advantages": rng.normal(size=(b, t)).astype(np.float32),
              "response_mask": np.ones((b, t), bool)}
    n, chunks = framing.encode({"preset": "verl"}, {k: R(v) for k, v in arrays.items()})
    return b"".join(chunks), {"content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(n)}


def grpo_call(address: str):
    request = protocol.advantages_request_to_pb({"estimator": "grpo"}, {
        "rewards": R(np.array([1, 0], np.float32)), "response_mask": R(np.ones((2, 2), bool)), "group_ids": ["a", "a"]})
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.AdvserveStub(channel).ComputeAdvantages(request, timeout=30)


@pytest.fixture(scope="module")
def two():
    server = RunningServer("--workers", "2", "--log-level", "info")
    workers_serving(server)
    yield server
    server.stop()


def test_requests_spread_over_both_workers_and_metrics_add_up(two):
    before = metric(httpx.get(f"{two.url}/metrics").text, "advserve_requests_total")
    for _ in range(FRESH):  # a new connection each
        assert httpx.post(f"{two.url}/v1/advantages", json=SMALL).status_code == 200
    for _ in range(4):  # gRPC on the same shared port
        assert grpo_call(two.grpc_address).ByteSize() > 0
    assert len(set(access_pids(two))) == 2, access_pids(two)
    # every worker's /metrics is the server's: the same sums whichever answers
    for _ in range(6):
        text = httpx.get(f"{two.url}/metrics").text
        assert metric(text, "advserve_requests_total") - before == FRESH + 4
        assert metric(text, "advserve_bytes_in_flight") == 0 and metric(text, "advserve_requests_in_progress") == 0
    assert "advserve_queue_depth 0.0" in text


def test_one_admission_budget_for_every_worker():
    server = RunningServer("--workers", "2", "--log-level", "info", "--admission-bytes", "1000000",
                           "--body-idle-timeout-s", "60")
    try:
        workers_serving(server)
        held = 800_000
        upload = socket.create_connection(("127.0.0.1", server.port))
        try:  # a slow upload: 800 kB of a declared 900 kB, admitted by whichever worker took it, held open
            upload.sendall(b"POST /v1/losses HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                           b"Content-Length: 900000\r\n\r\n" + bytes(held))
            deadline = time.monotonic() + 30
            while metric(httpx.get(f"{server.url}/metrics").text, "advserve_bytes_in_flight") < held:
                assert time.monotonic() < deadline, "the upload was never admitted"
                time.sleep(0.05)
            body = bytes(300_000)  # fits alone, not beside the upload: refused by both workers
            for _ in range(FRESH):
                res = httpx.post(f"{server.url}/v1/losses", content=body,
                                 headers={"content-type": "application/octet-stream"})
                assert res.status_code == 503 and res.json()["error"]["code"] == "overloaded", res.text
            for _ in range(6):
                assert metric(httpx.get(f"{server.url}/metrics").text, "advserve_bytes_in_flight") >= held
        finally:
            upload.close()
        deadline = time.monotonic() + 30  # the upload's bytes come back when its connection closes
        while metric(httpx.get(f"{server.url}/metrics").text, "advserve_bytes_in_flight") > 0:
            assert time.monotonic() < deadline, "the closed upload's bytes were never released"
            time.sleep(0.05)
        body, headers = losses_body(16, 256)
        assert httpx.post(f"{server.url}/v1/losses", content=body, headers=headers).status_code == 200
    finally:
        server.stop()


def test_a_killed_worker_is_restarted_and_the_server_keeps_answering():
    metrics_port = free_port()  # every worker serves --metrics-port (SO_REUSEPORT), each with the server's sums
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    server = RunningServer("--workers", "2", "--log-level", "info", "--metrics-port", str(metrics_port))
    try:
        first, second = workers_serving(server)
        count = metric(httpx.get(metrics_url).text, "advserve_requests_total")
        assert httpx.post(f"{server.url}/v1/advantages", json=SMALL).status_code == 200
        os.kill(first, signal.SIGKILL)
        for _ in range(FRESH):  # the dead worker's socket is gone: new connections reach the live one
            assert httpx.post(f"{server.url}/v1/advantages", json=SMALL).status_code == 200
        pids = workers_serving(server, 3)
        assert second in pids and first in pids and len(pids) == 3
        assert re.search(rf"worker \d \(pid {first}\) killed by SIGKILL .*restarting", server.output())
        for _ in range(4):  # the dead worker's counts stay in the sums
            assert metric(httpx.get(metrics_url).text, "advserve_requests_total") == count + 1 + FRESH
        assert grpo_call(server.grpc_address).ByteSize() > 0
    finally:
        server.stop()
    assert server.process.returncode == 0


def test_sigterm_to_one_worker_drains_it_and_the_supervisor_replaces_it():
    server = RunningServer("--workers", "2", "--log-level", "info")
    try:
        first, second = workers_serving(server)
        os.kill(first, signal.SIGTERM)
        pids = workers_serving(server, 3)
        assert second in pids and len(pids) == 3
        assert re.search(rf"worker \d \(pid {first}\) exited with status 0 .*restarting", server.output())
        for _ in range(FRESH):
            assert httpx.post(f"{server.url}/v1/advantages", json=SMALL).status_code == 200
    finally:
        server.stop()
    assert server.process.returncode == 0


def test_sigterm_drains_every_worker_and_the_supervisor_exits_0():
    server = RunningServer("--workers", "2", "--log-level", "info", "--shutdown-grace-s", "60")
    workers_serving(server)
    body, headers = losses_body(256, 2048)
    outcomes: list[str] = []
    lock = threading.Lock()

    def client():
        for _ in range(30):
            try:  # a new connection each time: both workers get work
                status = str(httpx.post(f"{server.url}/v1/losses", content=body, headers=headers, timeout=120)
                             .status_code)
            except httpx.HTTPError as exc:  # refused once the listeners closed: never accepted
                status = "refused " + type(exc).__name__
            with lock:
                outcomes.append(status)
            if status != "200":
                return

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(set(access_pids(server))) < 2:  # both workers are serving losses
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.02)
    server.process.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=120)
    assert server.process.wait(timeout=60) == 0
    answered = [s for s in outcomes if s == "200"]
    assert answered and all(s in ("200", "503") or s.startswith("refused") for s in outcomes), outcomes
    assert server.output().count("drained: every accepted request answered") == 2, server.log_tail()


def test_the_supervisor_loads_no_torch_numpy_or_grpc():
    """The supervisor forks the workers: it must not have started torch's, numpy's or grpc's threads, so
    none of them may be imported by the CLI or the supervisor's module (the package __init__ is lazy)."""
    heavy = subprocess.run(
        [sys.executable, "-c", "import sys, advserve, advserve.cli, advserve.workers; "
         "print(sorted(m for m in ('torch', 'numpy', 'grpc') if m in sys.modules))"],
        capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert heavy == "[]"
    loaded = subprocess.run([sys.executable, "-c", "import sys, advserve; advserve.compute_advantages; "
                             "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == "True"  # the in-process API still imports on first use


def test_a_taken_port_is_a_clear_error_before_any_worker_starts():
    with socket.socket() as taken:  # a plain listener of someone else on the gRPC port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        http_port = free_port()
        done = subprocess.run([*advserve_command(), "serve", "--workers", "2", "--host", "127.0.0.1",
                               "--http-port", str(http_port), "--grpc-port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"cannot start gRPC on 127.0.0.1:{port} (--grpc-port): Address already in use" in done.stderr, done.stderr
    assert "worker" not in done.stderr


def test_a_foreign_reuseport_group_cannot_be_joined_and_our_ports_cannot_be_taken(two):
    with socket.socket() as other:  # another process's SO_REUSEPORT socket: the supervisor refuses to join it
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        port = other.getsockname()[1]
        done = subprocess.run([*advserve_command(), "serve", "--workers", "2", "--host", "127.0.0.1",
                               "--http-port", str(port), "--grpc-port", str(free_port())],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and f"cannot bind REST on 127.0.0.1:{port} (--http-port)" in done.stderr, done.stderr
    for port in (two.port, two.grpc_port):  # a plain bind on a running server's ports fails
        with socket.socket() as intruder, pytest.raises(OSError):
            intruder.bind(("127.0.0.1", port))


def test_a_worker_gives_back_memory_beyond_its_admitted_bytes_and_slack():
    import asyncio
    from types import SimpleNamespace

    from advserve.runtime import Runtime

    # (RSS read, bytes this worker holds in admission from then on): at start, at each check, after each trim
    readings = iter([(100, 0), (150, 0), (400, 0), (90, 0), (350, 100), (700, 100), (650, 100), (700, 100)])
    held = {"bytes": 0}
    trims = []

    def rss() -> int:
        value = next(readings, None)
        if value is None:
            raise asyncio.CancelledError
        held["bytes"] = value[1]
        return value[0]

    fake = SimpleNamespace(admission=SimpleNamespace(held_here=lambda: held["bytes"]))

    async def run():
        with pytest.raises(asyncio.CancelledError):
            await Runtime.trim_memory_over_budget(fake, slack=200, every_s=0, trim=lambda: trims.append(1), rss=rss)

    asyncio.run(run())
    # resting 100, slack 200: 150 stays; 400 > 300 is trimmed (90 after: resting stays 100); 350 <= 100 + 100
    # held + 200 stays; 700 is trimmed, 650 remains (resting raised to 550), so the last 700 <= 850 stays
    assert len(trims) == 2


def test_tls_and_auth_on_every_worker(tmp_path):
    from test_operations import _tls_files

    ca, _, paths = _tls_files(tmp_path)
    trusted = ssl.create_default_context(cafile=paths["ca.pem"])
    server = RunningServer("--workers", "2", "--log-level", "info", "--tls-cert", paths["server_chain.pem"],
                           "--tls-key", paths["server_key.pem"], "--auth-token", "s3cret", scheme="https",
                           verify=trusted)
    try:
        workers_serving(server)
        for _ in range(FRESH):
            assert httpx.post(f"{server.url}/v1/advantages", json=SMALL, verify=trusted).status_code == 401
            assert httpx.post(f"{server.url}/v1/advantages", json=SMALL, verify=trusted,
                              headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert len(set(access_pids(server))) == 2
        request = protocol.advantages_request_to_pb({"estimator": "grpo"}, {
            "rewards": R(np.array([1, 0], np.float32)), "response_mask": R(np.ones((2, 2), bool)),
            "group_ids": ["a", "a"]})
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
        for _ in range(4):
            with grpc.secure_channel(server.grpc_address, credentials) as channel:
                stub = pb_grpc.AdvserveStub(channel)
                assert stub.ComputeAdvantages(request, timeout=30, metadata=(("authorization", "Bearer s3cret"),))
                with pytest.raises(grpc.RpcError) as err:
                    stub.ComputeAdvantages(request, timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop()
