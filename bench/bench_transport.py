"""Transport benchmark: advserve's REST service over loopback, against a bare uvicorn echo.

    .venv/bin/python bench/bench_transport.py            # full sizes, about 1-2 min on an idle 2-core box
    .venv/bin/python bench/bench_transport.py --quick    # smoke run: small sizes, < 20 s, exit 0

Everything runs on 127.0.0.1. The script starts real servers as subprocesses on free ports
(`.venv/bin/advserve serve --host 127.0.0.1 --http-port P --log-level warning` plus flags, and a bare
uvicorn echo app defined here, `--echo-server PORT`), talks to them, and stops them at the end, also
on error. Every loop is bounded in count and in time.

Parts (full sizes; --quick shrinks them):
  1. End to end: POST /v1/losses (preset verl: ppo_clip, token-mean) with logprobs, old_logprobs,
     advantages float32 and a bool response_mask [256, 4096], binary (~13.6 MB in, ~4.2 MB out) over
     a keep-alive httpx.Client. Client-observed total, the server's compute (Server-Timing), and
     total - compute against a bare uvicorn echo that reads the same body and answers as many bytes
     as advserve's response, timed alternately in the same run (target: total - compute <= 1.5x the
     echo). The same call as JSON (nested lists), and JSON / binary.
  2. Packed vs padded at lengths uniform in [T/8, T] (B=256, T=4096): bytes on the wire and total
     time, for /v1/advantages gae (token_rewards, values, mask) and /v1/losses, binary.
  3. Many small requests: 64 concurrent clients (asyncio + httpx.AsyncClient) sending binary GRPO
     batches of 8 sequences (one group, T=256); throughput and p50/p95 latency with --coalesce,
     --no-coalesce and --coalesce --max-wait-ms 2. Every request uses group id 0, so coalesced
     requests must keep equal ids of different requests apart. A sample of the responses is
     compared with advserve.compute_advantages in this process.
  4. Peak server memory: 32 clients (threads) send [256, 4096] /v1/losses binary batches at once
     to a server started with --admission-bytes 256 MiB; the server's VmRSS is sampled every 10 ms.
     Peak - idle RSS (after warm-up) against the admission limit; 200 / 503 / other counts (503s are
     retried after Retry-After, capped at --retry-cap seconds). Each 200 must be complete and equal to
     the in-process result (sha256 of grad_logprobs, else max|diff| / max|ref| <= 1e-5).

Exit status 1 for a wrong result, a status other than 200 (parts 1-3) or 200/503 (part 4), or a
transport error; speed never affects it. Results go to bench/results/transport.json (git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import resource
import shlex
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable
from _common import (  # noqa: E402 (bench/ on sys.path)
    MIB, Failures, compare, fmt_timing, machine, median_timing, parse_server_timing, settler,
    stats_ms, finish)
from advserve.testing import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "transport.json"
ECHO_TARGET = 1.5
ECHO_TARGET_SIZE = (256, 4096)  # the target is stated for this size; a --quick run's smaller one says nothing of it


def echo_verdict(ratio: float, batch: int, length: int) -> str:
    """`target <= 1.5x: ok|MISS`, saying so when the run's size is not the one the target is for."""
    verdict = f"target <= {ECHO_TARGET}x: {'ok' if ratio <= ECHO_TARGET else 'MISS'}"
    if (batch, length) != ECHO_TARGET_SIZE:
        verdict += f"; the target is for {ECHO_TARGET_SIZE[0]}x{ECHO_TARGET_SIZE[1]}, this run is {batch}x{length}"
    return verdict
# the allocator setting advserve applies to itself at start (advserve.runtime.tune_allocator), given to the
# echo server too so that both servers pay the same page-fault costs for large bodies
TUNED_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str((1 << 31) - 1)}


# --- the bare echo server (runs in its own process: `bench_transport.py --echo-server PORT`) --------


async def echo_app(scope, receive, send):
    """Minimal ASGI app: reads the whole request body, answers `x-echo-bytes` bytes of it (padded with
    zeros when longer), or the body itself. Any GET answers an empty 200 (readiness)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    size = len(body)
    for key, value in scope["headers"]:
        if key == b"x-echo-bytes":
            size = int(value)
    out = body[:size] if size <= len(body) else body + bytes(size - len(body))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream"),
                            (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


def run_echo_server(port: int) -> None:
    import uvicorn

    uvicorn.run(echo_app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on")


# --- arguments, machine -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke run, < 20 s)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats, parts 1-2 (default 21; quick 3)")
    parser.add_argument("--json-repeats", type=int, default=None, help="timed JSON repeats (default 5; quick 1)")
    parser.add_argument("--requests", type=int, default=None,
                        help="part 3: requests per configuration (default 2000; quick 256)")
    parser.add_argument("--clients", type=int, default=64, help="part 3: concurrent clients (default 64)")
    parser.add_argument("--mem-clients", type=int, default=None,
                        help="part 4: concurrent clients (default 32; quick 8)")
    parser.add_argument("--mem-requests", type=int, default=None,
                        help="part 4: requests per client (default 3; quick 2)")
    parser.add_argument("--admission-mib", type=float, default=None,
                        help="part 4: the server's --admission-bytes in MiB (default 256; quick 16)")
    parser.add_argument("--retry-cap", type=float, default=0.25,
                        help="part 4: longest wait after a 503, seconds (Retry-After is honoured up to this)")
    parser.add_argument("--max-wait", type=float, default=None,
                        help="seconds to wait, before each part, for other processes to use < 15%% of the CPUs "
                        "(default 10; quick 0)")
    parser.add_argument("--parts", default="1,2,3,4", help="comma-separated subset of 1,2,3,4 (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument("--echo-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- servers ------------------------------------------------------------------------------------


class Server(ServerProcess):
    """A server process (advserve.testing) that can also reset its kernel peak-RSS counter."""

    def reset_peak_rss(self) -> bool:
        """Reset the kernel's VmHWM (peak RSS) of the server (echo 5 > /proc/PID/clear_refs)."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False


def advserve_server(name: str, *flags: str) -> Server:
    return Server(*flags, name=name)


def echo_server() -> Server:
    script = str(Path(__file__).resolve())
    return Server(name="echo", argv=lambda port, _grpc: [sys.executable, script, "--echo-server", str(port)],
                  env=TUNED_MALLOC_ENV)


# --- wire helpers -------------------------------------------------------------------------------


def frame(document: dict[str, Any], tensors: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """A binary body (framing.encode, joined) and its headers."""
    from advserve_client import framing
    from advserve_client.framing import RawTensor

    n, chunks = framing.encode(document, {k: RawTensor.from_numpy(v) if hasattr(v, "dtype") else v
                                          for k, v in tensors.items()})
    return b"".join(chunks), {"content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(n)}


def unframe(response) -> tuple[dict[str, Any], dict[str, Any]]:
    """(document, {name: numpy array}) of a binary response; framing.decode checks every size."""
    from advserve_client import framing

    document, raw = framing.decode(response.content, response.headers.get(framing.HEADER_LENGTH))
    return document, {k: v.to_numpy() if hasattr(v, "to_numpy") else v for k, v in raw.items()}


def expect_200(failures: Failures, where: str, response) -> bool:
    if response.status_code != 200:
        failures.add(f"{where}: HTTP {response.status_code}: {response.text[:300]}")
        return False
    return True


# --- inputs -------------------------------------------------------------------------------------


def lengths_mask(rng, batch: int, length: int, low: int):
    import numpy as np

    lengths = rng.integers(low, length + 1, batch)
    return lengths, np.arange(length)[None, :] < lengths[:, None]


def loss_inputs(rng, batch: int, length: int, low_frac: float = 0.125) -> dict[str, Any]:
    import numpy as np

    _, mask = lengths_mask(rng, batch, length, max(1, int(length * low_frac)))
    logprobs = (-1.5 + 0.5 * rng.standard_normal((batch, length))).astype(np.float32)
    old = (logprobs + 0.05 * rng.standard_normal((batch, length))).astype(np.float32)
    advantages = rng.standard_normal((batch, length)).astype(np.float32)
    return {"logprobs": logprobs, "old_logprobs": old, "advantages": advantages, "response_mask": mask}


def gae_inputs(rng, batch: int, length: int) -> dict[str, Any]:
    import numpy as np

    lengths, mask = lengths_mask(rng, batch, length, max(1, length // 8))
    token_rewards = (0.01 * rng.standard_normal((batch, length))).astype(np.float32)
    token_rewards[np.arange(batch), lengths - 1] += rng.integers(0, 2, batch)
    values = rng.standard_normal((batch, length)).astype(np.float32)
    return {"token_rewards": token_rewards, "values": values, "response_mask": mask}


def packed(tensors: dict[str, Any]) -> dict[str, Any]:
    """The padded request's tensors packed: token tensors flat [N] (no mask), cu_seqlens [B + 1]."""
    import numpy as np

    mask = tensors["response_mask"]
    cu = np.zeros(mask.shape[0] + 1, dtype=np.int64)
    np.cumsum(mask.sum(axis=1), out=cu[1:])
    return {**{k: np.ascontiguousarray(v[mask]) for k, v in tensors.items() if k != "response_mask"},
            "cu_seqlens": cu}


# --- part 1: end to end, binary vs echo vs JSON --------------------------------------------------


def part_e2e(server: Server, echo: Server, batch: int, length: int, reps: int, json_reps: int, rng,
             failures: Failures, time_budget_s: float) -> dict[str, Any]:
    import httpx
    import numpy as np
    import orjson

    import advserve

    print(f"\n[1] end to end: POST /v1/losses preset verl (ppo_clip, token-mean), [{batch}, {length}] float32 + bool "
          "mask, keep-alive httpx.Client over loopback", flush=True)
    inputs = loss_inputs(rng, batch, length)
    document = {"preset": "verl"}
    ref = advserve.compute_losses(**document, **inputs)
    body, headers = frame(document, inputs)
    url, echo_url = f"{server.url}/v1/losses", f"{echo.url}/echo"
    deadline = time.monotonic() + time_budget_s
    out: dict[str, Any] = {"size": [batch, length], "request_bytes": len(body)}
    with httpx.Client(timeout=60) as client:
        response = client.post(url, content=body, headers=headers)
        if not expect_200(failures, "[1] binary", response):
            return out
        response_bytes = len(response.content)
        doc, arrays = unframe(response)
        failures.check("[1] binary grad_logprobs", compare("grad_logprobs", arrays["grad_logprobs"], ref.grad_logprobs))
        failures.check("[1] binary loss", compare("loss", doc["loss"], ref.loss))
        echo_headers = {**headers, "x-echo-bytes": str(response_bytes)}
        for _ in range(2):  # warm-up, both servers
            client.post(url, content=body, headers=headers)
            client.post(echo_url, content=body, headers=echo_headers)

        total, echo_total, overhead, client_total, timings = [], [], [], [], []
        for i in range(reps):
            if time.monotonic() > deadline:
                print(f"  (time budget reached after {i} repeats)")
                break
            for which in (("advserve", "echo") if i % 2 == 0 else ("echo", "advserve")):
                if which == "echo":
                    t0 = time.perf_counter()
                    e = client.post(echo_url, content=body, headers=echo_headers)
                    echo_total.append((time.perf_counter() - t0) * 1e3)
                    if e.status_code != 200 or len(e.content) != response_bytes:
                        failures.add(f"[1] echo: HTTP {e.status_code}, {len(e.content)} bytes")
                    continue
                t0 = time.perf_counter()
                fresh, fresh_headers = frame(document, inputs)  # what a client pays to frame its arrays
                t1 = time.perf_counter()
                r = client.post(url, content=fresh, headers=fresh_headers)
                t2 = time.perf_counter()
                if not expect_200(failures, "[1] binary", r):
                    continue
                _, got = unframe(r)
                got["grad_logprobs"].sum()  # touch it
                t3 = time.perf_counter()
                timing = parse_server_timing(r.headers.get("server-timing"))
                timings.append(timing)
                total.append((t2 - t1) * 1e3)
                client_total.append((t3 - t0) * 1e3)
                overhead.append((t2 - t1) * 1e3 - timing.get("compute", 0.0))
        binary = {"response_bytes": response_bytes, "total_ms": stats_ms(total),
                  "server_timing_ms": median_timing(timings),
                  "total_minus_compute_ms": stats_ms(overhead), "echo_total_ms": stats_ms(echo_total),
                  "client_total_ms": stats_ms(client_total)}
        binary["overhead_over_echo"] = binary["total_minus_compute_ms"]["p50"] / binary["echo_total_ms"]["p50"]
        out["binary"] = binary

        # JSON: nested lists as orjson writes numpy arrays (float32 in their shortest repr)
        json_headers = {"content-type": "application/json", "accept": "application/json"}

        def json_body() -> bytes:
            return orjson.dumps({**document, "tensors": inputs}, option=orjson.OPT_SERIALIZE_NUMPY)

        jbody = json_body()
        out["json_request_bytes"] = len(jbody)
        r = client.post(url, content=jbody, headers=json_headers)
        jtotal, jclient, jtimings, jresponse_bytes = [], [], [], 0
        if expect_200(failures, "[1] JSON", r):
            jresponse_bytes = len(r.content)
            parsed = orjson.loads(r.content)
            failures.check("[1] JSON grad_logprobs", compare(
                "grad_logprobs", np.asarray(parsed["tensors"]["grad_logprobs"], dtype=np.float32), ref.grad_logprobs))
            for i in range(json_reps):
                if time.monotonic() > deadline:
                    print(f"  (time budget reached after {i} JSON repeats)")
                    break
                t0 = time.perf_counter()
                jb = json_body()
                t1 = time.perf_counter()
                r = client.post(url, content=jb, headers=json_headers)
                t2 = time.perf_counter()
                if not expect_200(failures, "[1] JSON", r):
                    continue
                np.asarray(orjson.loads(r.content)["tensors"]["grad_logprobs"], dtype=np.float32)
                t3 = time.perf_counter()
                jtotal.append((t2 - t1) * 1e3)
                jclient.append((t3 - t0) * 1e3)
                jtimings.append(parse_server_timing(r.headers.get("server-timing")))
        out["json"] = {"request_bytes": len(jbody), "response_bytes": jresponse_bytes, "total_ms": stats_ms(jtotal),
                       "client_total_ms": stats_ms(jclient), "server_timing_ms": median_timing(jtimings)}
        if jtotal and total:
            out["json_over_binary_total"] = out["json"]["total_ms"]["p50"] / binary["total_ms"]["p50"]
            out["json_over_binary_client_total"] = (out["json"]["client_total_ms"]["p50"]
                                                    / binary["client_total_ms"]["p50"])

    if not total:
        return out
    b = binary
    print(f"  binary: request {len(body) / 1e6:.2f} MB, response {response_bytes / 1e6:.2f} MB; "
          f"p50 of {b['total_ms']['n']} (alternating with the echo)")
    print(f"    total (client-observed POST)          {b['total_ms']['p50']:8.2f} ms  "
          f"[{b['total_ms']['min']:.2f} .. {b['total_ms']['max']:.2f}]")
    print(f"    server compute (Server-Timing)        {b['server_timing_ms'].get('compute', float('nan')):8.2f} ms")
    print(f"    total - compute                       {b['total_minus_compute_ms']['p50']:8.2f} ms")
    print(f"    bare uvicorn echo, same bytes in/out  {b['echo_total_ms']['p50']:8.2f} ms  "
          f"[{b['echo_total_ms']['min']:.2f} .. {b['echo_total_ms']['max']:.2f}]")
    print(f"    (total - compute) / echo              {b['overhead_over_echo']:8.2f}x  "
          f"({echo_verdict(b['overhead_over_echo'], batch, length)})")
    print(f"    Server-Timing p50: {fmt_timing(b['server_timing_ms'])}")
    print(f"    with client framing + unframing       {b['client_total_ms']['p50']:8.2f} ms")
    if jtotal:
        j = out["json"]
        print(f"  JSON (nested lists, orjson): request {j['request_bytes'] / 1e6:.1f} MB, response "
              f"{j['response_bytes'] / 1e6:.1f} MB; p50 of {j['total_ms']['n']}")
        print(f"    total (client-observed POST)          {j['total_ms']['p50']:8.1f} ms  "
              f"[{j['total_ms']['min']:.1f} .. {j['total_ms']['max']:.1f}]")
        print(f"    Server-Timing p50: {fmt_timing(j['server_timing_ms'])}")
        print(f"    with client orjson dumps + loads      {j['client_total_ms']['p50']:8.1f} ms")
        print(f"  JSON / binary total: {out['json_over_binary_total']:.1f}x (POST only), "
              f"{out['json_over_binary_client_total']:.1f}x (with the client's encoding and decoding)")
    return out


# --- part 2: packed vs padded ---------------------------------------------------------------------


def part_layout(server: Server, batch: int, length: int, reps: int, rng, failures: Failures,
                time_budget_s: float) -> dict[str, Any]:
    import httpx

    import advserve

    print(f"\n[2] packed vs padded, binary: B={batch}, T={length}, lengths uniform in [T/8, T]", flush=True)
    deadline = time.monotonic() + time_budget_s
    cases = []
    gae = gae_inputs(rng, batch, length)
    gae_ref = advserve.compute_advantages("gae", **gae)
    cases.append(("advantages gae", "/v1/advantages", {"estimator": "gae"}, gae,
                  {"advantages": gae_ref.advantages, "returns": gae_ref.returns}))
    loss = loss_inputs(rng, batch, length)
    loss_ref = advserve.compute_losses(preset="verl", **loss)
    cases.append(("losses", "/v1/losses", {"preset": "verl"}, loss, {"grad_logprobs": loss_ref.grad_logprobs}))
    mask_tokens = int(gae["response_mask"].sum())
    out: dict[str, Any] = {"size": [batch, length], "rows": []}
    with httpx.Client(timeout=60) as client:
        for name, path, document, tensors, refs in cases:
            mask = tensors["response_mask"]
            variants = {"padded": frame(document, tensors),
                        "packed": frame({**document, "layout": "packed"}, packed(tensors))}
            row: dict[str, Any] = {"case": name, "valid_fraction": float(mask.mean())}
            times: dict[str, list[float]] = {"padded": [], "packed": []}
            timings: dict[str, list[dict]] = {"padded": [], "packed": []}
            for layout, (body, headers) in variants.items():
                r = client.post(server.url + path, content=body, headers=headers)
                if not expect_200(failures, f"[2] {name} {layout}", r):
                    continue
                row[layout] = {"request_bytes": len(body), "response_bytes": len(r.content)}
                _, got = unframe(r)
                for key, ref in refs.items():
                    failures.check(f"[2] {name} {layout} {key}",
                                   compare(key, got[key], ref if layout == "padded" else ref[mask]))
                client.post(server.url + path, content=body, headers=headers)  # warm-up
            if "padded" not in row or "packed" not in row:
                continue
            for i in range(reps):
                if time.monotonic() > deadline:
                    print(f"  (time budget reached after {i} repeats)")
                    break
                for layout in (("padded", "packed") if i % 2 == 0 else ("packed", "padded")):
                    body, headers = variants[layout]
                    t0 = time.perf_counter()
                    r = client.post(server.url + path, content=body, headers=headers)
                    elapsed = (time.perf_counter() - t0) * 1e3
                    if expect_200(failures, f"[2] {name} {layout}", r):
                        times[layout].append(elapsed)
                        timings[layout].append(parse_server_timing(r.headers.get("server-timing")))
            for layout in ("padded", "packed"):
                row[layout]["total_ms"] = stats_ms(times[layout])
                row[layout]["server_timing_ms"] = median_timing(timings[layout])
            out["rows"].append(row)
    print(f"  valid tokens: {mask_tokens} of {batch * length} ({mask_tokens / (batch * length):.1%}); bodies only "
          "(HTTP headers not counted); p50 total, alternating padded/packed")
    print(f"  {'case':<16} {'layout':<7} {'bytes in':>11} {'bytes out':>11} {'wire MB':>8} {'total ms':>9} "
          f"{'compute ms':>10}  Server-Timing p50")
    for row in out["rows"]:
        for layout in ("padded", "packed"):
            v = row[layout]
            wire = (v["request_bytes"] + v["response_bytes"]) / 1e6
            print(f"  {row['case']:<16} {layout:<7} {v['request_bytes']:>11,} {v['response_bytes']:>11,} {wire:>8.2f} "
                  f"{v['total_ms'].get('p50', float('nan')):>9.2f} "
                  f"{v['server_timing_ms'].get('compute', float('nan')):>10.2f}  {fmt_timing(v['server_timing_ms'])}")
        pad, pk = row["padded"], row["packed"]
        row["bytes_ratio"] = ((pk["request_bytes"] + pk["response_bytes"])
                              / (pad["request_bytes"] + pad["response_bytes"]))
        if pad["total_ms"]["n"] and pk["total_ms"]["n"]:
            row["time_ratio"] = pk["total_ms"]["p50"] / pad["total_ms"]["p50"]
            print(f"  {row['case']:<16} packed/padded: bytes {row['bytes_ratio']:.2f}x, "
                  f"total time {row['time_ratio']:.2f}x")
    return out


# --- part 3: many small requests ----------------------------------------------------------------


def grpo_pool(rng, size: int, group: int, length: int):
    """`size` distinct GRPO requests (one group of `group` sequences, group id 0 in each) and their
    in-process results."""
    import numpy as np

    import advserve

    pool = []
    for _ in range(size):
        rewards = rng.integers(0, 2, group).astype(np.float32)
        _, mask = lengths_mask(rng, group, length, max(1, length // 8))
        group_ids = np.zeros(group, dtype=np.int64)
        tensors = {"rewards": rewards, "response_mask": mask, "group_ids": group_ids}
        ref = advserve.compute_advantages("grpo", preset="verl", **tensors)
        body, headers = frame({"estimator": "grpo", "preset": "verl"}, tensors)
        pool.append((body, headers, {"advantages": ref.advantages, "returns": ref.returns}))
    return pool


async def _load(server: Server, pool, total: int, concurrency: int, time_budget_s: float, sample_every: int):
    """`concurrency` workers, each with its own httpx.AsyncClient (one keep-alive connection: a shared
    pool of 64 connections costs httpcore more CPU per request than the server spends), taking request
    numbers from a shared counter until `total` or the time budget."""
    import httpx

    latencies: list[float] = []
    statuses: Counter = Counter()
    timings: list[dict[str, float]] = []
    samples: list[tuple[int, Any]] = []
    next_index = 0
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    url = f"{server.url}/v1/advantages"
    clients = [httpx.AsyncClient(limits=limits, timeout=30) for _ in range(concurrency)]
    try:
        server_cpu0, rusage0 = server.cpu_s(), resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        end = start + time_budget_s

        async def worker(client) -> None:
            nonlocal next_index
            while next_index < total and time.perf_counter() < end:
                i = next_index
                next_index += 1
                body, headers, _ = pool[i % len(pool)]
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, content=body, headers=headers)
                except httpx.HTTPError as exc:
                    statuses[f"transport error {type(exc).__name__}"] += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1e3)
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    timings.append(parse_server_timing(r.headers.get("server-timing")))
                    if i % sample_every == 0:
                        samples.append((i, r))
                elif len(samples) < 1000:
                    samples.append((i, r))

        await asyncio.gather(*(worker(client) for client in clients))
        elapsed = time.perf_counter() - start
        server_cpu1, rusage1 = server.cpu_s(), resource.getrusage(resource.RUSAGE_SELF)
    finally:
        await asyncio.gather(*(client.aclose() for client in clients), return_exceptions=True)
    return {"elapsed_s": elapsed, "latencies": latencies, "statuses": statuses, "timings": timings,
            "samples": samples, "deadline_hit": next_index < total, "server_cpu_s": server_cpu1 - server_cpu0,
            "client_cpu_s": (rusage1.ru_utime - rusage0.ru_utime) + (rusage1.ru_stime - rusage0.ru_stime)}


def part_small(configs: list[tuple[str, Server]], total: int, concurrency: int, rng, failures: Failures,
               time_budget_s: float, sample_every: int, settle: Callable[[str], None]) -> dict[str, Any]:
    group, length = 8, 256
    print(f"\n[3] many small requests: {concurrency} concurrent clients (asyncio + httpx.AsyncClient, one "
          f"keep-alive connection each), binary GRPO preset verl, {group} sequences (one group, id 0) x T={length}, "
          f"{total} requests per configuration", flush=True)
    pool = grpo_pool(rng, 64, group, length)
    out: dict[str, Any] = {"clients": concurrency, "requests": total, "group": group, "length": length, "rows": []}
    for label, server in configs:
        settle(f"small {label}")
        server.start()
        try:
            asyncio.run(_load(server, pool, min(total // 2, 4 * concurrency), concurrency, 15.0, 1 << 30))  # warm-up
            run = asyncio.run(_load(server, pool, total, concurrency, time_budget_s, sample_every))
        finally:
            server.stop()
        checked = 0
        for i, r in run["samples"]:
            if not expect_200(failures, f"[3] {label} request {i}", r):
                continue
            _, got = unframe(r)
            refs = pool[i % len(pool)][2]
            for key, ref in refs.items():
                failures.check(f"[3] {label} request {i} {key}", compare(key, got[key], ref))
            checked += 1
        for status in run["statuses"]:
            if status != 200:
                failures.add(f"[3] {label}: {run['statuses'][status]} responses with status {status}")
        ok = run["statuses"].get(200, 0)
        row = {"config": label, "command": server.command_line(), "completed_200": ok,
               "statuses": {str(k): v for k, v in run["statuses"].items()}, "elapsed_s": run["elapsed_s"],
               "throughput_rps": ok / run["elapsed_s"] if run["elapsed_s"] > 0 else 0.0,
               "latency_ms": stats_ms(run["latencies"]), "server_timing_ms": median_timing(run["timings"]),
               "checked": checked, "deadline_hit": run["deadline_hit"],
               "server_cpu_share": run["server_cpu_s"] / run["elapsed_s"],
               "client_cpu_share": run["client_cpu_s"] / run["elapsed_s"]}
        out["rows"].append(row)
        lat = row["latency_ms"]
        print(f"  {label:<26} {row['throughput_rps']:7.0f} req/s  p50 {lat.get('p50', float('nan')):6.1f} ms  "
              f"p95 {lat.get('p95', float('nan')):6.1f} ms  ({ok} x 200 in {run['elapsed_s']:.1f} s"
              f"{', TIME BUDGET HIT' if run['deadline_hit'] else ''}; CPU: server {row['server_cpu_share']:.2f}, "
              f"client {row['client_cpu_share']:.2f} cores; {checked} responses checked)", flush=True)
        print(f"  {'':<26} Server-Timing p50: {fmt_timing(row['server_timing_ms'])}")
    rows = {r["config"]: r for r in out["rows"]}
    if "coalesce" in rows and "no-coalesce" in rows and rows["no-coalesce"]["throughput_rps"] > 0:
        out["coalesce_over_no_coalesce"] = rows["coalesce"]["throughput_rps"] / rows["no-coalesce"]["throughput_rps"]
        print(f"  throughput coalesce / no-coalesce: {out['coalesce_over_no_coalesce']:.2f}x")
    return out


# --- part 4: peak memory under admission ---------------------------------------------------------


class RssSampler(threading.Thread):
    def __init__(self, server: Server, interval_s: float = 0.01):
        super().__init__(name="rss-sampler", daemon=True)
        self.server, self.interval_s = server, interval_s
        self.stop_event = threading.Event()
        self.peak_kb = 0
        self.samples = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            rss = self.server.status_kb("VmRSS")
            if rss is not None:
                self.peak_kb = max(self.peak_kb, rss)
                self.samples += 1
            self.stop_event.wait(self.interval_s)


def part_memory(server: Server, batch: int, length: int, clients: int, per_client: int, admission: int,
                retry_cap_s: float, rng, failures: Failures, time_budget_s: float) -> dict[str, Any]:
    import httpx
    import numpy as np

    import advserve

    print(f"\n[4] peak server memory: {clients} clients (threads, one httpx.Client each) x {per_client} requests, "
          f"POST /v1/losses binary [{batch}, {length}], --admission-bytes {admission} ({admission / MIB:.0f} MiB); "
          f"503s retried after min(Retry-After, {retry_cap_s} s)", flush=True)
    kinds = 4
    inputs = []
    for _ in range(kinds):
        tensors = loss_inputs(rng, batch, length)
        ref = advserve.compute_losses(preset="verl", **tensors)
        grad = np.ascontiguousarray(ref.grad_logprobs, dtype=np.float32)
        body, headers = frame({"preset": "verl"}, tensors)
        inputs.append({"body": body, "headers": headers, "grad": grad, "loss": ref.loss,
                       "sha256": hashlib.sha256(grad.tobytes()).hexdigest()})
    url = f"{server.url}/v1/losses"
    lock = threading.Lock()
    statuses: Counter = Counter()
    verdicts: Counter = Counter()
    retry_after_seen: Counter = Counter()
    gave_up = 0

    def verify(response, kind: int) -> str:
        item = inputs[kind]
        try:
            declared = int(response.headers.get("content-length", "-1"))
            if declared != len(response.content):
                return f"incomplete: {len(response.content)} bytes of {declared}"
            document, arrays = unframe(response)
        except Exception as exc:  # noqa: BLE001 - any malformed body is a failure to report
            return f"malformed body: {exc}"
        grad = arrays.get("grad_logprobs")
        if grad is None or grad.dtype != np.float32 or grad.shape != (batch, length):
            return f"grad_logprobs missing or wrong: {None if grad is None else (grad.dtype, grad.shape)}"
        loss_check = compare("loss", document.get("loss", float("nan")), item["loss"])
        if not loss_check["ok"]:
            return f"loss differs: rel {loss_check.get('rel')}"
        if hashlib.sha256(grad.tobytes()).hexdigest() == item["sha256"]:
            return "ok (sha256 identical)"
        check = compare("grad_logprobs", grad, item["grad"])
        return "ok (within tolerance)" if check["ok"] else f"grad_logprobs differs: rel {check.get('rel')}"

    with httpx.Client(timeout=60) as client:  # warm-up: serial, then the idle RSS
        for k in range(3):
            r = client.post(url, content=inputs[k % kinds]["body"], headers=inputs[k % kinds]["headers"])
            if expect_200(failures, "[4] warm-up", r):
                verdict = verify(r, k % kinds)
                if not verdict.startswith("ok"):
                    failures.add(f"[4] warm-up: {verdict}")
    time.sleep(0.5)
    idle_samples = []
    for _ in range(5):
        idle_samples.append(server.status_kb("VmRSS") or 0)
        time.sleep(0.02)
    idle_kb = int(statistics.median(idle_samples))
    hwm_reset = server.reset_peak_rss()
    deadline = time.monotonic() + time_budget_s
    barrier = threading.Barrier(clients)

    def client_thread(cid: int) -> None:
        nonlocal gave_up
        local_rng = random.Random(cid)
        with httpx.Client(timeout=60) as client:
            try:
                barrier.wait(timeout=30)
            except threading.BrokenBarrierError:
                pass
            for j in range(per_client):
                kind = (cid + j) % kinds
                item = inputs[kind]
                for _attempt in range(10_000):
                    if time.monotonic() > deadline:
                        with lock:
                            gave_up += per_client - j
                        return
                    try:
                        r = client.post(url, content=item["body"], headers=item["headers"])
                    except httpx.HTTPError as exc:
                        with lock:
                            statuses[f"transport error {type(exc).__name__}"] += 1
                        time.sleep(0.05)
                        continue
                    with lock:
                        statuses[r.status_code] += 1
                    if r.status_code == 503:
                        try:
                            retry_after = float(r.headers.get("retry-after", "1"))
                        except ValueError:
                            retry_after = 1.0
                        with lock:
                            retry_after_seen[r.headers.get("retry-after")] += 1
                        time.sleep(min(retry_after, retry_cap_s) * local_rng.uniform(0.5, 1.0))
                        continue
                    verdict = verify(r, kind) if r.status_code == 200 else f"status {r.status_code}: {r.text[:200]}"
                    with lock:
                        verdicts[verdict] += 1
                    break

    sampler = RssSampler(server)
    sampler.start()
    cpu0 = server.cpu_s()
    start = time.perf_counter()
    threads = [threading.Thread(target=client_thread, args=(c,), name=f"mem-client-{c}", daemon=True)
               for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic() + 130))
    elapsed = time.perf_counter() - start
    sampler.stop_event.set()
    sampler.join(timeout=5)
    cpu1 = server.cpu_s()
    hwm_kb = server.status_kb("VmHWM") if hwm_reset else None
    time.sleep(0.5)
    after_kb = server.status_kb("VmRSS") or 0
    stuck = sum(t.is_alive() for t in threads)
    peak_kb = max(sampler.peak_kb, hwm_kb or 0)
    growth = (peak_kb - idle_kb) * 1024
    out = {"clients": clients, "per_client": per_client, "admission_bytes": admission,
           "request_bytes": len(inputs[0]["body"]),
           "idle_rss_kb": idle_kb, "peak_rss_sampled_kb": sampler.peak_kb, "peak_rss_hwm_kb": hwm_kb,
           "rss_samples": sampler.samples, "rss_after_load_kb": after_kb, "peak_minus_idle_bytes": growth,
           "peak_minus_idle_over_admission": growth / admission,
           "statuses": {str(k): v for k, v in statuses.items()}, "verdicts": dict(verdicts),
           "retry_after_values": {str(k): v for k, v in retry_after_seen.items()}, "gave_up": gave_up,
           "stuck_threads": stuck, "elapsed_s": elapsed, "server_cpu_share": (cpu1 - cpu0) / elapsed,
           "command": server.command_line()}
    for status, count in statuses.items():
        if status not in (200, 503):
            failures.add(f"[4] {count} responses with status {status}")
    for verdict, count in verdicts.items():
        if not verdict.startswith("ok"):
            failures.add(f"[4] {count} x {verdict}")
    if stuck:
        failures.add(f"[4] {stuck} client threads still running after the time budget (hang?)")
    expected = clients * per_client
    done = sum(c for v, c in verdicts.items() if v.startswith("ok"))
    print(f"  request body {len(inputs[0]['body']) / 1e6:.2f} MB ({admission / len(inputs[0]['body']):.1f} fit in the "
          f"admission limit); {elapsed:.1f} s; server CPU {out['server_cpu_share']:.2f} cores")
    print(f"  statuses: {dict(sorted((str(k), v) for k, v in statuses.items()))}; Retry-After values: "
          f"{dict(retry_after_seen)}; complete and correct 200s: {done} of {expected} "
          f"({dict(verdicts)}){f'; gave up (time budget): {gave_up}' if gave_up else ''}")
    print(f"  server RSS: idle after warm-up {idle_kb / 1024:.0f} MiB, peak {peak_kb / 1024:.0f} MiB "
          f"(sampled every 10 ms: {sampler.peak_kb / 1024:.0f} MiB over {sampler.samples} samples; kernel VmHWM "
          f"{'n/a' if hwm_kb is None else f'{hwm_kb / 1024:.0f} MiB'}); 0.5 s after the load {after_kb / 1024:.0f} MiB")
    print(f"  peak - idle = {growth / MIB:.0f} MiB = {growth / admission:.2f}x the admission limit "
          f"({admission / MIB:.0f} MiB)")
    return out


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.echo_server is not None:
        run_echo_server(args.echo_server)
        return 0

    quick = args.quick
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"1", "2", "3", "4"}:
        print(f"--parts: expected a subset of 1,2,3,4, got {args.parts!r}", file=sys.stderr)
        return 2
    cfg = {
        "e2e_size": (64, 1024) if quick else (256, 4096),
        "layout_size": (64, 1024) if quick else (256, 4096),
        "repeats": args.repeats or (3 if quick else 21),
        "json_repeats": args.json_repeats or (1 if quick else 5),
        "requests": args.requests or (256 if quick else 2000),
        "clients": args.clients,
        "mem_size": (64, 1024) if quick else (256, 4096),
        "mem_clients": args.mem_clients or (8 if quick else 32),
        "mem_requests": args.mem_requests or (2 if quick else 3),
        # quick: room for ~3 [64, 1024] requests (each 0.85 MB body + 4.7 MB to compute, runtime.compute_bytes)
        "admission_bytes": int((args.admission_mib or (16 if quick else 256)) * MIB),
        "retry_cap_s": args.retry_cap,
        "max_wait_s": args.max_wait if args.max_wait is not None else (0.0 if quick else 10.0),
        "budgets_s": {"e2e": 15 if quick else 90, "layout": 10 if quick else 45, "small": 8 if quick else 40,
                      "memory": 15 if quick else 90},
    }
    import numpy as np

    info = machine("httpx", "uvicorn", "h11", "uvloop", "httptools", "fastapi")
    print(f"machine: {info['cpu_model']}, nproc {info['nproc']}, {info['mem_total_mib']} MiB RAM, "
          f"python {info['python']}, "
          f"torch {info['torch']} ({info['torch_num_threads']} threads)")
    print(f"software: advserve {info['advserve']}, fastapi {info['fastapi']}, uvicorn {info['uvicorn']} "
          f"(h11 {info['h11']}, "
          f"uvloop {info['uvloop']}, httptools {info['httptools']}), httpx {info['httpx']}")
    print(f"mode: {'quick' if quick else 'full'}; seed {args.seed}; all servers on 127.0.0.1, clients in this process "
          "(glibc defaults); advserve tunes its allocator at start, the echo server gets the same setting "
          "(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_)", flush=True)

    rng = np.random.default_rng(args.seed)
    failures = Failures()
    loads: dict[str, Any] = {}
    settle = settler(loads, cfg["max_wait_s"], once=quick)

    servers: list[Server] = []
    if parts & {"1", "2"}:
        main_server = advserve_server("advserve")
        servers.append(main_server)
        if "1" in parts:
            echo = echo_server()
            servers.append(echo)
    small_servers = []
    if "3" in parts:
        small_servers = [("coalesce", advserve_server("coalesce", "--coalesce")),
                         ("no-coalesce", advserve_server("no-coalesce", "--no-coalesce"))]
        if not quick:
            small_servers.append(("coalesce --max-wait-ms 2", advserve_server("coalesce-wait", "--coalesce",
                                                                              "--max-wait-ms", "2")))
        servers += [s for _, s in small_servers]
    if "4" in parts:
        mem_server = advserve_server("admission", "--admission-bytes", str(cfg["admission_bytes"]))
        servers.append(mem_server)
    results: dict[str, Any] = {"machine": info, "mode": "quick" if quick else "full", "parts": sorted(parts),
                               "config": cfg}
    started = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if parts & {"1", "2"}:
            main_server.start()
            if "1" in parts:
                echo.start()
                settle("e2e")
                results["e2e"] = part_e2e(main_server, echo, *cfg["e2e_size"], cfg["repeats"], cfg["json_repeats"],
                                          rng, failures, cfg["budgets_s"]["e2e"])
                echo.stop()
            if "2" in parts:
                settle("layout")
                results["layout"] = part_layout(main_server, *cfg["layout_size"], cfg["repeats"], rng, failures,
                                                cfg["budgets_s"]["layout"])
            if not main_server.alive():
                failures.add(f"the advserve server died:\n{main_server.log_tail()}")
            main_server.stop()
        if "3" in parts:
            results["small"] = part_small(small_servers, cfg["requests"], cfg["clients"], rng, failures,
                                          cfg["budgets_s"]["small"], max(1, cfg["requests"] // 128), settle)
        if "4" in parts:
            settle("memory")
            mem_server.start()
            results["memory"] = part_memory(mem_server, *cfg["mem_size"], cfg["mem_clients"], cfg["mem_requests"],
                                            cfg["admission_bytes"], cfg["retry_cap_s"], rng, failures,
                                            cfg["budgets_s"]["memory"])
            if not mem_server.alive():
                failures.add(f"the admission server died:\n{mem_server.log_tail()}")
    finally:
        for server in servers:
            server.stop()
        signal.signal(signal.SIGTERM, previous)
    print_summary(results, cfg)
    commands = {"bench": shlex.join([".venv/bin/python", "bench/bench_transport.py",
                                     *(sys.argv[1:] if argv is None else argv)]),
                **{s.name: s.command_line() for s in servers}}
    return finish(servers, failures, loads, commands, results, args.out, started,
                  "every checked response matched the in-process result; statuses as expected")


def print_summary(results: dict[str, Any], cfg: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str]] = []
    e2e = results.get("e2e", {})
    b = e2e.get("binary")
    size = "x".join(map(str, cfg["e2e_size"]))
    if b and b["total_ms"]["n"]:
        rows.append((f"[1] losses {size} binary, total p50", f"{b['total_ms']['p50']:.1f} ms",
                     f"compute {b['server_timing_ms'].get('compute', float('nan')):.1f} ms"))
        rows.append(("[1] total - compute / bare uvicorn echo",
                     f"{b['total_minus_compute_ms']['p50']:.1f} / {b['echo_total_ms']['p50']:.1f} ms = "
                     f"{b['overhead_over_echo']:.2f}x",
                     echo_verdict(b["overhead_over_echo"], *cfg["e2e_size"])))
    if "json_over_binary_total" in e2e:
        rows.append((f"[1] losses {size} JSON, total p50", f"{e2e['json']['total_ms']['p50']:.0f} ms",
                     f"JSON/binary {e2e['json_over_binary_total']:.1f}x (with client codec "
                     f"{e2e['json_over_binary_client_total']:.1f}x)"))
    for row in results.get("layout", {}).get("rows", []):
        if "time_ratio" in row:
            rows.append((f"[2] {row['case']} packed/padded",
                         f"bytes {row['bytes_ratio']:.2f}x, time {row['time_ratio']:.2f}x",
                         f"{row['padded']['total_ms']['p50']:.1f} -> {row['packed']['total_ms']['p50']:.1f} ms"))
    small = results.get("small", {})
    for row in small.get("rows", []):
        lat = row["latency_ms"]
        rows.append((f"[3] GRPO 8x256, {small['clients']} clients, {row['config']}",
                     f"{row['throughput_rps']:.0f} req/s",
                     f"p50 {lat.get('p50', float('nan')):.1f} ms, p95 {lat.get('p95', float('nan')):.1f} ms"))
    if "coalesce_over_no_coalesce" in small:
        rows.append(("[3] coalesce / no-coalesce throughput", f"{small['coalesce_over_no_coalesce']:.2f}x", ""))
    mem = results.get("memory")
    if mem:
        rows.append((f"[4] peak - idle RSS, {mem['clients']} clients", f"{mem['peak_minus_idle_bytes'] / MIB:.0f} MiB",
                     f"{mem['peak_minus_idle_over_admission']:.2f}x admission {mem['admission_bytes'] / MIB:.0f} MiB"))
        rows.append(("[4] statuses", ", ".join(f"{k}: {v}" for k, v in sorted(mem["statuses"].items())),
                     f"{sum(v for k, v in mem['verdicts'].items() if k.startswith('ok'))} correct of "
                     f"{mem['clients'] * mem['per_client']}"))
    width = max(len(r[0]) for r in rows) if rows else 10
    vwidth = max(len(r[1]) for r in rows) if rows else 10
    print("\nsummary")
    print("-" * (width + vwidth + 40))
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:<{vwidth}}  {note}")


if __name__ == "__main__":
    sys.exit(main())
