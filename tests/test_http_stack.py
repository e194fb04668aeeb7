"""The HTTP stack (bench/bench_http.py chose it): uvicorn's httptools protocol under advserve's
connection guard, request bodies kept as they arrive, binary responses streamed from the result
tensors' own memory (transports.http_door.FramedResponse). Real servers on loopback; every wait is
bounded in count and time."""

from __future__ import annotations

import http.client
import socket
import time

import numpy as np
import orjson
import pytest
import torch

from advserve.config import Settings
from advserve.engine import Engine
from advserve.model import AdvantageRequest, LossRequest
from advserve.transports.http_door import guarded_protocol
from advserve_client import framing
from advserve_client.framing import RawTensor
from conftest import RunningServer

HEADER_S = 1.0


@pytest.fixture(scope="module")
def stack():
    running = RunningServer("--header-timeout-s", str(HEADER_S), "--max-connections", "8", "--workers", "1")  # the cap is per process
    yield running
    running.stop()
    assert not [line for line in running.problems() if "Traceback" in line], running.log_tail()


def frame(document: dict, tensors: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    n, chunks = framing.encode(document, {k: RawTensor.from_numpy(v) for k, v in tensors.items()})
    return b"".join(chunks), {"content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(n)}


def reference_body(document: dict, tensors: dict[str, torch.Tensor | None]) -> tuple[bytes, int]:
    """What the reference encoder (`framing.encode`, with the server's JSON writer) makes of a result
    computed in this process: (the body, the header length)."""
    raw = {name: RawTensor.from_numpy(t.numpy()) for name, t in tensors.items() if t is not None}
    n, chunks = framing.encode(document, raw, dumps=lambda d: orjson.dumps(d, option=orjson.OPT_SERIALIZE_NUMPY))
    return b"".join(chunks), n


def post(server: RunningServer, path: str, body: bytes, headers: dict[str, str]) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", path, body=body, headers=headers)
    return conn.getresponse()


def batch(rng: np.random.Generator, rows: int, cols: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(1, cols + 1, rows)
    mask = np.arange(cols)[None, :] < lengths[:, None]
    return mask, rng.standard_normal((rows, cols)).astype(dtype)


# rows x cols spans one inline encode (tiny) and multi-MiB bodies whose writes cannot go out at once
SHAPES = [(2, 3, "float32"), (8, 101, "float64"), (96, 2048, "float32"), (64, 4096, "float64")]


@pytest.mark.parametrize("rows,cols,dtype", SHAPES)
def test_streamed_advantages_are_the_reference_encoding(stack, rows, cols, dtype):
    rng = np.random.default_rng(rows * cols)
    mask, values = batch(rng, rows, cols, dtype)
    estimator = "gae" if cols % 2 == 0 else "grpo"
    tensors = {"response_mask": mask}
    if estimator == "gae":
        tensors.update(token_rewards=(0.1 * rng.standard_normal((rows, cols))).astype(dtype), values=values)
    else:
        tensors.update(rewards=rng.integers(0, 2, rows).astype(dtype), group_ids=np.arange(rows) // 2)
    document = {"estimator": estimator, "dtype": dtype}
    body, headers = frame(document, tensors)
    response = post(stack, "/v1/advantages", body, headers)
    got = response.read()
    assert response.status == 200, got[:300]

    result = Engine("cpu").compute_advantages(AdvantageRequest(
        estimator=estimator, tensors={k: torch.from_numpy(v) for k, v in tensors.items()}, dtype=dtype))
    expected, n = reference_body({"estimator": result.estimator, "preset": result.preset, "params": result.params,
                                  "stats": result.stats},
                                 {"advantages": result.advantages, "returns": result.returns})
    assert int(response.getheader("content-length")) == len(got) == len(expected)
    assert int(response.getheader(framing.HEADER_LENGTH)) == n
    assert got == expected


LOSS_TERMS = [{"kl_loss": {"coef": 0.01, "estimator": "k3"}},
              {"value_loss": {"coef": 0.5}, "entropy_bonus": {"coef": 0.01}}]


@pytest.mark.parametrize("terms", LOSS_TERMS, ids=["kl", "value+entropy"])
@pytest.mark.parametrize("rows,cols,dtype", SHAPES[1:])
def test_streamed_losses_are_the_reference_encoding(stack, terms, rows, cols, dtype):
    rng = np.random.default_rng(rows + cols)
    mask, logprobs = batch(rng, rows, cols, dtype)
    logprobs = -np.abs(logprobs)

    def near(scale: float) -> np.ndarray:
        return (logprobs + scale * rng.standard_normal((rows, cols))).astype(dtype)

    tensors = {"response_mask": mask, "logprobs": logprobs, "old_logprobs": near(0.05), "ref_logprobs": near(0.1),
               "advantages": rng.standard_normal((rows, cols)).astype(dtype), "values": near(1),
               "old_values": near(1), "returns": near(1), "entropy": np.abs(near(1))}
    needed = {"response_mask", "logprobs", "old_logprobs", "advantages"}
    needed |= {"ref_logprobs"} if "kl_loss" in terms else {"values", "old_values", "returns", "entropy"}
    tensors = {k: v for k, v in tensors.items() if k in needed}
    document = {"preset": "verl", "dtype": dtype, **terms}
    body, headers = frame(document, tensors)
    response = post(stack, "/v1/losses", body, headers)
    got = response.read()
    assert response.status == 200, got[:300]

    result = Engine("cpu").compute_losses(LossRequest(
        tensors={k: torch.from_numpy(v) for k, v in tensors.items()}, preset="verl", dtype=dtype, **terms))
    expected, n = reference_body(
        {"preset": result.preset, "loss": result.loss, "components": result.components, "metrics": result.metrics,
         "params": result.params},
        {"grad_logprobs": result.grad_logprobs, "grad_values": result.grad_values,
         "grad_entropy": result.grad_entropy})
    assert int(response.getheader("content-length")) == len(got) == len(expected)
    assert int(response.getheader(framing.HEADER_LENGTH)) == n
    assert got == expected
    assert ("grad_values" in orjson.loads(got[:n])["tensors"]) == ("value_loss" in terms)


def gae_body(rows: int, cols: int) -> tuple[bytes, dict[str, str]]:
    rng = np.random.default_rng(7)
    mask, values = batch(rng, rows, cols, np.float32)
    return frame({"estimator": "gae"}, {"response_mask": mask, "values": values,
                                        "token_rewards": (0.1 * values).astype(np.float32)})


def test_a_client_that_leaves_mid_response_does_not_break_the_server(stack):
    body, headers = gae_body(256, 4096)  # 8 MiB of results: far more than the socket buffers hold
    request = (b"POST /v1/advantages HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n" % len(body)
               + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() + b"\r\n" + body)
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", stack.port), timeout=30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(request)
        first = sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        sock.close()  # with megabytes still to come
    response = post(stack, "/v1/advantages", body, headers)
    got = response.read()
    assert response.status == 200 and len(got) == int(response.getheader("content-length"))
    document, raw = framing.decode(got, response.getheader(framing.HEADER_LENGTH))
    assert raw["advantages"].shape == (256, 4096)


def bytes_out(server: RunningServer) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("advserve_request_bytes_total{") and 'direction="out"' in line
               and 'transport="http"' in line)


def test_metrics_count_the_streamed_bytes(stack):
    body, headers = gae_body(64, 1024)
    before = bytes_out(stack)
    response = post(stack, "/v1/advantages", body, headers)
    got = response.read()
    assert response.status == 200
    assert bytes_out(stack) - before == len(got) > 2 * 64 * 1024 * 4


def test_head_and_keep_alive_across_streamed_responses(stack):
    body, headers = gae_body(32, 512)
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    try:
        conn.request("HEAD", "/health/live")  # a GET route: 405 in the error shape, its body left out
        head = conn.getresponse()
        assert head.status == 405 and int(head.getheader("content-length")) > 0 and head.read() == b""
        sock = conn.sock
        sizes = set()
        for _ in range(3):
            conn.request("POST", "/v1/advantages", body=body, headers=headers)
            response = conn.getresponse()
            got = response.read()
            assert response.status == 200 and len(got) == int(response.getheader("content-length"))
            sizes.add(len(got))
            assert conn.sock is sock  # the same connection: the streamed body ended where it said
        conn.request("GET", "/health/live")
        live = conn.getresponse()
        assert live.status == 200 and orjson.loads(live.read()) == {"status": "live"}
        assert conn.sock is sock and len(sizes) == 1
    finally:
        conn.close()


def test_bodies_in_many_pieces_and_chunked_arrive_whole(stack):
    body, headers = gae_body(16, 1024)
    expected = post(stack, "/v1/advantages", body, headers).read()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
    pieces = [body[i:i + 7919] for i in range(0, len(body), 7919)]
    for chunked in (False, True):
        sock = socket.create_connection(("127.0.0.1", stack.port), timeout=30)
        framing_header = b"transfer-encoding: chunked\r\n" if chunked else b"content-length: %d\r\n" % len(body)
        sock.sendall(b"POST /v1/advantages HTTP/1.1\r\nhost: x\r\n" + framing_header + head + b"\r\n")
        for i, piece in enumerate(pieces):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if i % 8 == 0:
                time.sleep(0.002)  # some pieces arrive while the door is busy with the previous ones
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 200
        assert response.read() == expected
        sock.close()


def test_the_guard_is_on_the_httptools_protocol(stack):
    assert guarded_protocol(Settings()).__name__ == "GuardedHttpToolsProtocol"
    assert guarded_protocol(Settings(), "h11").__name__ == "GuardedH11Protocol"
    with pytest.raises(ValueError, match="httptools, h11"):
        guarded_protocol(Settings(), "hyper")
    # a connection that never completes its headers is closed after --header-timeout-s
    silent = socket.create_connection(("127.0.0.1", stack.port), timeout=HEADER_S * 10)
    silent.sendall(b"POST /v1/advantages HTTP/1.1\r\nhost: x\r\n")
    started = time.monotonic()
    assert silent.recv(1024) == b""
    assert time.monotonic() - started < HEADER_S * 10
    silent.close()
    # past --max-connections (8), a new connection gets 503 and is closed
    held = [socket.create_connection(("127.0.0.1", stack.port), timeout=30) for _ in range(8)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", stack.port), timeout=30)
        answer = b""
        while chunk := extra.recv(4096):
            answer += chunk
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "overloaded"
    finally:
        for sock in held:
            sock.close()


def test_copy_to_host_gives_each_tensors_own_bytes_without_copying_contiguous_ones():
    from advserve.device import copy_to_host

    contiguous = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    transposed = torch.arange(12, dtype=torch.float64).reshape(3, 4).t()
    brain = torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16)
    copies = copy_to_host([contiguous, transposed, brain, torch.zeros((0, 5))])
    assert all(copy.done() for copy in copies)
    assert copies[0].tensor.data_ptr() == contiguous.data_ptr()  # its own memory, not a copy
    assert copies[0].bytes_view().tobytes() == contiguous.numpy().tobytes()
    assert copies[1].bytes_view().tobytes() == np.ascontiguousarray(transposed.numpy()).tobytes()
    assert copies[2].bytes_view().tobytes() == brain.view(torch.uint16).numpy().tobytes()
    assert copies[3].bytes_view().nbytes == 0


def test_host_scalars_are_the_tensors_values():
    from advserve.device import host_scalars

    values = {"mean": torch.tensor(0.25, dtype=torch.float32), "count": torch.tensor(7), "flag": torch.tensor(True),
              "given": 1.5, "none": None, "big": torch.tensor(2**40 + 1, dtype=torch.int64)}
    out = host_scalars(values)
    assert out == {"mean": 0.25, "count": 7, "flag": 1, "given": 1.5, "none": None, "big": 2**40 + 1}
    assert list(out) == list(values) and isinstance(out["count"], int) and isinstance(out["mean"], float)
