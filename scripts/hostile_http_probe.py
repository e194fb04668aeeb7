"""Measure the HTTP door against hostile and careless clients (issue 12, items 1, 3, 4, 7, 9): status,
the server's peak RSS (VmHWM), time, and what a well-behaved client sees meanwhile.

    .venv/bin/python scripts/hostile_http_probe.py                       # this checkout
    PROBE_PYTHONPATH=/tmp/h1-before/service:/tmp/h1-before/client \\
        .venv/bin/python scripts/hostile_http_probe.py --label before     # another tree (git worktree add)

Each probe starts its own `advserve serve` (flags both old and new servers know), prints one line per
probe and writes every number to --out (JSON). Every wait is bounded; the whole run takes a few minutes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))
from advserve.testing import ServerProcess, free_port  # noqa: E402
from advserve_client import framing  # noqa: E402

SMALL = {"estimator": "grpo", "tensors": {"rewards": [1, 0], "response_mask": [[1, 1], [1, 0]], "group_ids": [0, 0]}}
MIB = 1 << 20


def start(*args: str) -> ServerProcess:
    env = {"PYTHONPATH": os.environ["PROBE_PYTHONPATH"]} if os.environ.get("PROBE_PYTHONPATH") else {}
    return ServerProcess(*args, env=env, name="probe").start()


def mib(server: ServerProcess, field: str) -> float:
    value = server.status_kb(field)
    return round(value / 1024, 1) if value is not None else float("nan")


def wait_answer(sock: socket.socket, limit_s: float) -> tuple[str, float]:
    """(what the server did with a stalled socket within limit_s: its status line, 'closed' or
    'nothing', seconds)."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    try:
        data = sock.recv(4096)
    except (TimeoutError, socket.timeout):
        return "nothing", round(time.monotonic() - started, 2)
    except OSError as exc:
        return type(exc).__name__, round(time.monotonic() - started, 2)
    first = data.split(b"\r\n", 1)[0].decode(errors="replace") if data else "closed"
    return first, round(time.monotonic() - started, 2)


class WellBehaved:
    """A client posting SMALL in a loop, counting statuses and the slowest answer."""

    def __init__(self, url: str):
        self.url, self.statuses, self.slowest = url, {}, 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    status = str(client.post("/v1/advantages", json=SMALL).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.slowest = max(self.slowest, time.perf_counter() - started)
                self.statuses[status] = self.statuses.get(status, 0) + 1
                time.sleep(0.05)

    def result(self) -> dict:
        self.stop.set()
        self.thread.join(60)
        return {"statuses": self.statuses, "slowest_s": round(self.slowest, 3)}


def stalled_uploads() -> dict:
    """Item 1: 4 sockets declare 64 MiB (admission 256 MiB) and send nothing; one never sends a byte."""
    server = start("--admission-bytes", str(256 * MIB))
    try:
        stalled = []
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"POST /v1/advantages HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                         b"Inference-Header-Content-Length: 10\r\nContent-Length: %d\r\n\r\n" % (64 * MIB))
            stalled.append(sock)
        silent = socket.create_connection(("127.0.0.1", server.port))
        time.sleep(0.5)
        client = WellBehaved(server.url)
        time.sleep(3.0)
        ready = httpx.get(f"{server.url}/health/ready").status_code
        meanwhile = client.result()
        with concurrent.futures.ThreadPoolExecutor(5) as pool:  # each waited for at most 15 s, together
            *answers, silent_answer = pool.map(lambda sock: wait_answer(sock, 15.0), [*stalled, silent])
        for sock in [*stalled, silent]:
            sock.close()
        return {"well_behaved_while_stalled": meanwhile, "ready": ready, "stalled_answers": answers,
                "silent_connection": silent_answer, "vmhwm_mib": mib(server, "VmHWM")}
    finally:
        server.stop()


def bomb_body(inflated: int) -> bytes:
    path = Path(f"/tmp/advserve-probe-bomb-{inflated}.gz")
    if not path.exists():
        compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        block = bytes(64 * MIB)
        path.write_bytes(b"".join(compressor.compress(block) for _ in range(inflated // len(block)))
                         + compressor.flush())
    return path.read_bytes()


def compression_bombs() -> dict:
    """Item 3: 4 GiB of zeros in ~4 MB of gzip on /v2 (binary: the 1 GiB limit), alone then four at once,
    with --admission-bytes 256 MiB, while a well-behaved client posts."""
    bomb = bomb_body(4 << 30)
    server = start("--admission-bytes", str(256 * MIB))
    headers = {"content-type": "application/octet-stream", "content-encoding": "gzip",
               "inference-header-content-length": "10"}

    def post(_):
        started = time.perf_counter()
        res = httpx.post(f"{server.url}/v2/models/grpo/infer", content=bomb, headers=headers, timeout=120)
        return res.status_code, round(time.perf_counter() - started, 2), res.text[:160]

    try:
        resting = mib(server, "VmRSS")
        alone = post(0)
        peak_alone = mib(server, "VmHWM")
        client = WellBehaved(server.url)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            four = list(pool.map(post, range(4)))
        return {"compressed_bytes": len(bomb), "resting_rss_mib": resting, "alone": alone,
                "vmhwm_after_alone_mib": peak_alone, "four_at_once": four, "vmhwm_mib": mib(server, "VmHWM"),
                "well_behaved_meanwhile": client.result()}
    finally:
        server.stop()


def malformed() -> dict:
    """Items 4 and 9: deep nesting, a non-contiguous JSON result, an echoed 16.9 MB shape, wrong
    method and path."""
    server = start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            deep = b"[" * 100_000 + b"]" * 100_000
            nested = client.post("/v1/advantages", content=deep, headers={
                "content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(len(deep))})
            mask = np.ones((2, 17), bool)
            mask[1, 9:] = False
            contiguous = client.post("/v1/advantages", json={"estimator": "reinforce_rtg", "tensors": {
                "rewards": [0.5, -1.0], "response_mask": mask.tolist()}})
            header = json.dumps({"estimator": "grpo", "tensors": {"rewards": {
                "dtype": "float32", "shape": [-1] * 2_800_000, "binary_data_size": 4}}}).encode()
            echo = client.post("/v1/advantages", content=header + bytes(4), headers={
                "content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(len(header))})
            wrong_method = client.get("/v1/advantages")
            wrong_path = client.post("/v1/nothing", json={})
        return {"deep_nesting": [nested.status_code, nested.text[:160]],
                "non_contiguous_json": [contiguous.status_code, contiguous.text[:100]],
                "echo": {"request_bytes": len(header), "status": echo.status_code, "response_bytes": len(echo.content)},
                "wrong_method": [wrong_method.status_code, wrong_method.text[:160]],
                "wrong_path": [wrong_path.status_code, wrong_path.text[:160]], "vmhwm_mib": mib(server, "VmHWM")}
    finally:
        server.stop()


def gae_body(nbytes: int) -> tuple[bytes, dict]:
    t = 4096
    b = nbytes // (t * 9)  # values float32 + token_rewards float32 + mask bool
    values = np.zeros((b, t), np.float32)
    arrays = {"token_rewards": values, "values": values, "response_mask": np.ones((b, t), bool)}
    n, chunks = framing.encode({"estimator": "gae"}, {k: framing.RawTensor.from_numpy(v) for k, v in arrays.items()})
    return b"".join(chunks), {"content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(n)}


def deadline() -> dict:
    """Item 7: a 336 MiB GAE request with --request-timeout-s 1, then a small request."""
    body, headers = gae_body(336 * MIB)
    server = start("--request-timeout-s", "1")
    try:
        started = time.perf_counter()
        res = httpx.post(f"{server.url}/v1/advantages", content=body, headers=headers, timeout=120)
        big = [res.status_code, round(time.perf_counter() - started, 2), res.text[:120]]
        started = time.perf_counter()
        small = httpx.post(f"{server.url}/v1/advantages", json=SMALL, timeout=60)
        return {"body_bytes": len(body), "big": big,
                "next_small": [small.status_code, round(time.perf_counter() - started, 2)],
                "vmhwm_mib": mib(server, "VmHWM")}
    finally:
        server.stop()


def rss_after_burst() -> dict:
    """Item 9: RSS before a burst (12 binary losses requests of 512 x 4096, 3 at a time), at its peak,
    and 5 s after."""
    rng = np.random.default_rng(0)
    lp = -rng.random((512, 4096), dtype=np.float32)
    arrays = {"logprobs": lp, "old_logprobs": lp, "advantages": rng.normal(size=lp.shape).astype(np.float32),
              "response_mask": np.ones(lp.shape, bool)}
    n, chunks = framing.encode({"preset": "verl"}, {k: framing.RawTensor.from_numpy(v) for k, v in arrays.items()})
    body, headers = b"".join(chunks), {"content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(n)}
    server = start()
    try:
        before = mib(server, "VmRSS")
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            statuses = list(pool.map(lambda _: httpx.post(f"{server.url}/v1/losses", content=body, headers=headers,
                                                          timeout=120).status_code, range(12)))
        after_burst = mib(server, "VmRSS")
        time.sleep(5)
        return {"statuses": sorted(set(statuses)), "rss_before_mib": before, "rss_at_end_of_burst_mib": after_burst,
                "vmhwm_mib": mib(server, "VmHWM"), "rss_5s_after_mib": mib(server, "VmRSS")}
    finally:
        server.stop()


def settings() -> dict:
    """Item 9: `serve --shutdown-grace-s nan` (and a negative timeout): refused, or started?"""
    outcome = {}
    for flag, value in (("--shutdown-grace-s", "nan"), ("--request-timeout-s", "-1")):
        argv = [sys.executable, "-m", "advserve.cli", "serve", "--http-port", str(free_port()), "--grpc-port",
                str(free_port()), flag, value]
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("ADVSERVE_")},
               **({"PYTHONPATH": os.environ["PROBE_PYTHONPATH"]} if os.environ.get("PROBE_PYTHONPATH") else {})}
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            _, err = process.communicate(timeout=20)
            outcome[f"{flag} {value}"] = [process.returncode, err.strip().splitlines()[-1][:160]]
        except subprocess.TimeoutExpired:
            process.terminate()
            process.communicate(timeout=20)
            outcome[f"{flag} {value}"] = ["accepted: still serving after 20 s", ""]
    return outcome


PROBES = {"stalled_uploads": stalled_uploads, "compression_bombs": compression_bombs, "malformed": malformed,
          "deadline": deadline, "rss_after_burst": rss_after_burst, "settings": settings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: /tmp/hostile_http_<label>.json)")
    parser.add_argument("probes", nargs="*", default=list(PROBES), help=f"a subset of {', '.join(PROBES)}")
    args = parser.parse_args()
    results = {}
    for name in args.probes:
        started = time.perf_counter()
        results[name] = PROBES[name]()
        results[name]["probe_s"] = round(time.perf_counter() - started, 1)
        print(f"[{args.label}] {name}: {json.dumps(results[name])}", flush=True)
    out = args.out or Path(f"/tmp/hostile_http_{args.label}.json")
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
