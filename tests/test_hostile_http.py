"""Hostile and careless HTTP clients (REST /v1 and the Open Inference Protocol's /v2) against a real
server with short timeouts: stalled uploads and silent connections cannot lock anyone out or hold
memory, bodies are read under a deadline, compression bombs stop at admission or the ratio cap with
bounded memory, malformed input is a 4xx naming the field (never a 5xx), error messages do not echo
unbounded content, and every numeric setting is validated. Each wait is bounded in count and time."""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import os
import socket
import subprocess
import sys
import time
import zlib

import httpx
import numpy as np
import pytest

import advserve
from advserve.transports.http_door import _failure_response, _error_response
from advserve_client import framing
from conftest import RunningServer

ADMISSION = 32 << 20
IDLE_S, HEADER_S, DEADLINE_S, RATIO = 1.5, 1.5, 4.0, 200
SMALL = {"estimator": "grpo", "tensors": {"rewards": [1, 0], "response_mask": [[1, 1], [1, 0]], "group_ids": [0, 0]}}
OIP_SMALL = {"inputs": [
    {"name": "rewards", "datatype": "FP32", "shape": [2], "data": [1, 0]},
    {"name": "response_mask", "datatype": "BOOL", "shape": [2, 2], "data": [True, True, True, False]},
    {"name": "group_ids", "datatype": "INT64", "shape": [2], "data": [0, 0]}]}


@pytest.fixture(scope="module")
def hostile():
    running = RunningServer("--admission-bytes", str(ADMISSION), "--body-idle-timeout-s", str(IDLE_S),
                            "--header-timeout-s", str(HEADER_S), "--request-timeout-s", str(DEADLINE_S),
                            "--max-json-bytes", str(1 << 30), "--max-inflate-ratio", str(RATIO))
    yield running
    running.stop()
    assert not [line for line in running.problems() if "Traceback" in line], running.log_tail()


def stalled_upload(server: RunningServer, declared: int, sent: bytes = b"{") -> socket.socket:
    """A binary POST that declares `declared` bytes, sends `sent` and then nothing."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /v1/advantages HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                 b"Inference-Header-Content-Length: 10\r\nContent-Length: %d\r\n\r\n%s" % (declared, sent))
    return sock


def read_until_closed(sock: socket.socket, limit_s: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection (at most `limit_s`)."""
    sock.settimeout(limit_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return data


def status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def rss_mib(server: RunningServer, field: str) -> float:
    return server.status_kb(field) / 1024


# --- item 1: stalled uploads, silent connections, the body deadline --------------------------------


def test_stalled_uploads_hold_nothing_and_get_408_while_others_get_200(hostile):
    stalled = [stalled_upload(hostile, ADMISSION - 1024) for _ in range(4)]  # 4 x 32 MiB declared, 1 byte sent
    try:
        with httpx.Client(base_url=hostile.url, timeout=30) as client:
            statuses = [client.post("/v1/advantages", json=SMALL).status_code for _ in range(10)]
            assert statuses == [200] * 10
            assert client.get("/metrics").text.count("advserve_bytes_in_flight 0.0") == 0  # the 4 bytes held
        for sock in stalled:  # each is answered 408 after the idle timeout and closed
            status, document = status_and_json(read_until_closed(sock))
            assert status == 408 and document["error"]["code"] == "request_timeout"
            assert document["error"]["field"] == "body" and "--body-idle-timeout-s" in document["error"]["message"]
    finally:
        for sock in stalled:
            sock.close()
    assert "advserve_bytes_in_flight 0.0" in httpx.get(f"{hostile.url}/metrics").text  # released


def test_a_declared_length_over_the_capacity_is_413_at_once(hostile):
    status, document = status_and_json(read_until_closed(stalled_upload(hostile, ADMISSION + 1)))
    assert status == 413 and document["error"]["field"] == "body" and "admission capacity" in \
        document["error"]["message"]


def test_a_json_body_is_charged_what_parsing_it_costs(hostile):
    """JSON_DECODE_COST x the body: a JSON body of capacity / 8 is refused at the door (413, naming the
    binary framing); as many binary bytes are admitted (and answered 400: they are not a batch)."""
    size = ADMISSION // 8
    status, document = status_and_json(_post_raw(hostile, "application/json", size))
    assert status == 413 and "binary framing" in document["error"]["message"]
    status, document = status_and_json(_post_raw(hostile, "application/octet-stream", size))
    assert status == 400 and document["error"]["field"] == framing.HEADER_LENGTH  # read, decoded: not a batch


def _post_raw(server: RunningServer, content_type: str, size: int) -> bytes:
    """The answer to a POST of `size` spaces. The body is sent from a thread while the answer is read:
    a server that refuses at the door answers and closes before the body is all sent, and an answer
    left unread when the client's next bytes meet the closed socket is lost to the reset."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(f"POST /v1/advantages HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                 f"Connection: close\r\nContent-Length: {size}\r\n\r\n".encode())

    def send_body() -> None:
        try:
            sock.sendall(b" " * size)
        except OSError:  # refused at the door: the server closed before the body was sent
            pass

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(send_body)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:  # after the answer: the rest of the body met the closed socket
            pass
    sock.close()
    return answer


def test_silent_and_trickling_connections_are_closed(hostile):
    silent = socket.create_connection(("127.0.0.1", hostile.port))
    assert read_until_closed(silent) == b""  # never sent a byte: closed after --header-timeout-s
    trickle = socket.create_connection(("127.0.0.1", hostile.port))
    closed = False
    for byte in b"POST /v1/advantages HTTP/1.1\r\nHost: x\r\n" * 4:  # one byte per 0.1 s: never a full header
        try:
            trickle.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.1)
    assert closed or read_until_closed(trickle) == b""
    assert httpx.post(f"{hostile.url}/v1/advantages", json=SMALL).status_code == 200


def test_the_deadline_covers_the_upload(hostile):
    """Bytes keep coming (never idle for --body-idle-timeout-s), but the body is not complete within
    --request-timeout-s: 408, and the connection is closed."""
    sock = stalled_upload(hostile, 1 << 20)
    sock.settimeout(0.5)
    answer = b""
    for _ in range(40):  # a byte every 0.5 s; the deadline is 4 s
        try:  # the answer is looked for before each byte: a byte sent after the server closed resets the
            answer = sock.recv(65536)  # connection, and the answer not yet read would be lost with it
        except TimeoutError:
            sock.sendall(b" ")
            continue
        break
    answer += read_until_closed(sock)
    status, document = status_and_json(answer)
    assert status == 408 and "--request-timeout-s" in document["error"]["message"]


# --- item 3: compression bombs and gzip members on /v2 ------------------------------------------


def gzip_of(blocks) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return b"".join(compressor.compress(block) for block in blocks) + compressor.flush()


def post_gzip(server: RunningServer, body: bytes) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/grpo/infer", content=body, timeout=60,
                      headers={"content-type": "application/json", "content-encoding": "gzip"})


def test_compression_bombs_stop_at_the_ratio_or_admission_with_bounded_memory(hostile):
    before = rss_mib(hostile, "VmRSS")
    ratio_bomb = gzip_of([bytes(1 << 20)] * 16)  # 16 MiB of zeros in ~16 KB
    res = post_gzip(hostile, ratio_bomb)
    assert res.status_code == 413 and f"more than {RATIO} times" in res.json()["error"]
    rng = np.random.default_rng(0)  # ~100:1, under the ratio cap: inflates until admission refuses
    admission_bomb = gzip_of([rng.bytes(8 << 10) + bytes((1 << 20) - (8 << 10)) for _ in range(96)])
    alone = post_gzip(hostile, admission_bomb)
    assert alone.status_code == 413 and "admission capacity" in alone.json()["error"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: post_gzip(hostile, admission_bomb), range(4)))
    for res in responses:  # 413: this body alone passed the capacity; 503: with the others in flight
        assert (res.status_code, res.json()["error"].split(":")[0]) in ((413, "body"), (503, "server busy")), res.text
    peak = rss_mib(hostile, "VmHWM")
    assert peak <= max(before, 0) + ADMISSION / 2**20 + 128, (before, peak)
    assert post_gzip(hostile, gzip.compress(json.dumps(OIP_SMALL).encode())).status_code == 200


def test_every_gzip_member_is_decoded(hostile):
    body = json.dumps(OIP_SMALL).encode()
    identity = httpx.post(f"{hostile.url}/v2/models/grpo/infer", content=body, timeout=30)
    members = gzip.compress(body[:40]) + gzip.compress(body[40:])  # `cat a.gz b.gz`
    res = post_gzip(hostile, members)
    assert identity.status_code == res.status_code == 200 and res.json() == identity.json()
    garbage = post_gzip(hostile, gzip.compress(body) + b"not gzip")
    assert garbage.status_code == 400 and garbage.json()["error"].startswith("Content-Encoding: ")
    deflate = httpx.post(f"{hostile.url}/v2/models/grpo/infer", content=zlib.compress(body) + b"tail", timeout=30,
                         headers={"content-encoding": "deflate"})
    assert deflate.status_code == 400 and "after the end" in deflate.json()["error"]


# --- item 4: malformed input is a 4xx, never a 5xx --------------------------------------------------


def test_deep_nesting_is_a_400_on_the_body(hostile):
    deep = b"[" * 100_000 + b"]" * 100_000
    with httpx.Client(base_url=hostile.url, timeout=30) as client:
        binary = client.post("/v1/advantages", content=deep, headers={
            "content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(len(deep))})
        as_json = client.post("/v1/losses", content=deep, headers={"content-type": "application/json"})
        oip = client.post("/v2/models/grpo/infer", content=deep)
    for res in (binary, as_json):
        assert res.status_code == 400 and res.json()["error"]["field"] == "body", res.text
    assert oip.status_code == 400 and oip.json()["error"].startswith("body: ")


def test_wrong_method_and_path_answer_the_error_shape(hostile):
    with httpx.Client(base_url=hostile.url, timeout=30) as client:
        missing = client.get("/v1/nothing-here")
        wrong = client.get("/v1/advantages")
        v2_missing = client.get("/v2/models/grpo/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert missing.json()["error"]["field"] == "path"
    assert wrong.status_code == 405 and wrong.json()["error"] == {
        "code": "method_not_allowed", "field": "method",
        "message": "GET is not allowed on '/v1/advantages' (allowed: POST)"}
    assert wrong.headers["allow"] == "POST"
    assert v2_missing.status_code == 404 and isinstance(v2_missing.json()["error"], str)


def test_json_results_of_non_contiguous_tensors_encode(hostile):
    rng = np.random.default_rng(1)
    mask = np.ones((2, 17), bool)
    mask[1, 9:] = False
    rewards = rng.normal(size=2).round(3)
    body = {"estimator": "reinforce_rtg", "tensors": {"rewards": rewards.tolist(), "response_mask": mask.tolist()}}
    res = httpx.post(f"{hostile.url}/v1/advantages", json=body, timeout=30)
    assert res.status_code == 200, res.text
    local = advserve.compute_advantages("reinforce_rtg", rewards=rewards.astype(np.float32), response_mask=mask)
    np.testing.assert_allclose(res.json()["tensors"]["advantages"], local.advantages, rtol=1e-6)


def test_memory_and_recursion_errors_are_4xx_not_500():
    for exc, status, code in ((MemoryError(), 413, "payload_too_large"), (RecursionError(), 400, "invalid_argument")):
        response, label, error = _failure_response(exc, "advantages", "rid", _error_response)
        assert (response.status_code, label, error) == (status, str(status), code)
        assert json.loads(response.body)["error"]["field"] == "body"


# --- item 9: echoes are bounded -----------------------------------------------------------------------


def test_an_error_does_not_echo_an_unbounded_shape(hostile):
    header = json.dumps({"estimator": "grpo", "tensors": {"rewards": {
        "dtype": "float32", "shape": [-1] * 2_000_000, "binary_data_size": 4}}}).encode()
    res = httpx.post(f"{hostile.url}/v1/advantages", content=header + bytes(4), timeout=60, headers={
        "content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(len(header))})
    error = res.json()["error"]
    assert res.status_code == 400 and error["field"] == "tensors.rewards"
    assert len(res.content) < 2000 and "truncated" in error["message"]


# --- item 6: settings -------------------------------------------------------------------------------


SETTINGS = [("--shutdown-grace-s", "nan"), ("--request-timeout-s", "-1"), ("--body-idle-timeout-s", "inf"),
            ("--max-connections", "0"), ("--max-wait-ms", "nan"), ("--memory-trim-idle-s", "-0.5"),
            ("--admission-bytes", "-5"), ("--metrics-port", "70000")]


def test_numeric_settings_are_validated_by_name():
    result = subprocess.run([sys.executable, "-m", "advserve.cli", "serve", *(x for pair in SETTINGS for x in pair)],
                            capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if not k.startswith("ADVSERVE_")})
    assert result.returncode == 2
    for flag, value in SETTINGS:  # every problem is reported, each naming its flag
        assert f"{flag} must be" in result.stderr and f"got {value}" in result.stderr, (flag, result.stderr)


# --- connections and memory after a burst -------------------------------------------------------------


@pytest.fixture(scope="module")
def capped():
    """3 connections at most, 1 s for headers, a trim after 0.5 s idle, and a compute thread that waits
    2 s for companions of an advantages request (a request can be caught waiting in the queue)."""
    running = RunningServer("--max-connections", "3", "--header-timeout-s", "1", "--memory-trim-idle-s", "0.5",
                            "--max-wait-ms", "2000")
    yield running
    running.stop()


def test_a_caller_that_leaves_is_dropped_while_its_job_waits(capped):
    body = json.dumps(SMALL).encode()
    sock = socket.create_connection(("127.0.0.1", capped.port))
    sock.sendall(b"POST /v1/advantages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(0.3)  # queued: the compute thread waits 2 s for companions
    sock.close()
    for _ in range(50):  # answered 499 (nothing sent) when the disconnect is seen, not 200 after the wait
        metrics = httpx.get(f"{capped.url}/metrics").text
        if 'status="499"' in metrics:
            break
        time.sleep(0.1)
    assert 'advserve_requests_total{endpoint="advantages",estimator="grpo",status="499",transport="http"} 1.0' \
        in metrics
    assert 'status="200"' not in metrics


def test_connections_past_the_cap_are_refused_and_memory_returns_after_a_burst(capped):
    server = capped
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
    refused = socket.create_connection(("127.0.0.1", server.port))
    status, document = status_and_json(read_until_closed(refused))
    assert status == 503 and document["error"]["code"] == "overloaded"
    for sock in held:
        assert read_until_closed(sock) == b""  # silent: closed after --header-timeout-s
    resting = rss_mib(server, "VmRSS")
    rng = np.random.default_rng(2)
    lp = -rng.random((512, 4096), dtype=np.float32)
    arrays = {"logprobs": lp, "old_logprobs": lp, "advantages": rng.normal(size=lp.shape).astype(np.float32),
              "response_mask": np.ones(lp.shape, bool)}
    n, chunks = framing.encode({"preset": "verl"}, {k: framing.RawTensor.from_numpy(v) for k, v in arrays.items()})
    headers = {"content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(n)}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for _ in range(3):
            assert client.post("/v1/losses", content=b"".join(chunks), headers=headers).status_code == 200
    peak = rss_mib(server, "VmHWM")
    assert peak > resting + 64  # the burst did grow the heap
    for _ in range(100):  # malloc_trim once idle for 0.5 s
        if rss_mib(server, "VmRSS") < resting + (peak - resting) / 2:
            break
        time.sleep(0.1)
    assert rss_mib(server, "VmRSS") < resting + (peak - resting) / 2, (resting, peak, rss_mib(server, "VmRSS"))


# --- compute memory is charged on every HTTP door ----------------------------------------------------


def _losses_bodies(rows: int, cols: int = 2048) -> dict[str, tuple[bytes, dict[str, str]]]:
    """A float32 losses batch of rows x cols tokens as a /v1/losses binary body and a /v2 binary infer
    body (the same tensors): {path: (body, headers)}."""
    rng = np.random.default_rng(3)
    lp = -rng.random((rows, cols), dtype=np.float32)
    arrays = {"logprobs": lp, "old_logprobs": lp, "advantages": rng.normal(size=lp.shape).astype(np.float32),
              "response_mask": np.ones(lp.shape, bool)}
    n, chunks = framing.encode({}, {k: framing.RawTensor.from_numpy(v) for k, v in arrays.items()})
    v1 = (b"".join(chunks), {"content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(n)})
    inputs = [{"name": k, "datatype": "BOOL" if v.dtype == bool else "FP32", "shape": list(v.shape),
               "parameters": {"binary_data_size": v.nbytes}} for k, v in arrays.items()]
    header = json.dumps({"inputs": inputs}).encode()
    v2 = (b"".join([header, *(v.tobytes() for v in arrays.values())]),
          {"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))})
    return {"/v1/losses": v1, "/v2/models/losses/infer": v2}


def test_compute_memory_is_charged_before_the_job_is_queued(hostile, capped):
    """A losses batch of 6 MiB (~480k tokens) fits the 32 MiB admission as a body, but its compute
    (COMPUTE_COST x B·T x 4 bytes, ~33 MiB) does not: 413 naming the body on /v1 (binary) and /v2, before
    any compute (the compute counters do not move); the same bodies are answered 200 by a server with
    the default (large) admission."""
    bodies = _losses_bodies(6 * 2**20 // (13 * 2048))
    computed = _computed(hostile)
    for path, (body, headers) in bodies.items():
        assert len(body) < ADMISSION // 4
        response = httpx.post(f"{hostile.url}{path}", content=body, headers=headers, timeout=60)
        assert response.status_code == 413, (path, response.text)
        error = response.json()["error"]
        if path.startswith("/v1"):
            assert (error["code"], error["field"]) == ("payload_too_large", "body")
            assert "compute" in error["message"] and "admission capacity" in error["message"]
        else:
            assert error.startswith("body: ") and "compute" in error
    assert _computed(hostile) == computed  # refused before the queue: nothing was computed
    for path, (body, headers) in bodies.items():
        assert httpx.post(f"{capped.url}{path}", content=body, headers=headers, timeout=120).status_code == 200, path


def _computed(server: RunningServer) -> float:
    """How many requests the server has computed (its compute phase observations), every transport."""
    lines = httpx.get(f"{server.url}/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("advserve_request_phase_seconds_count") and 'phase="compute"' in line)
