"""HTTP stack benchmark: advserve's binary REST against a bare uvicorn echo, and uvicorn's protocol and
event-loop choices for large and small bodies.

    .venv/bin/python bench/bench_http.py                 # both parts, about 1-2 min on an idle 2-core box
    .venv/bin/python bench/bench_http.py --quick         # smoke run: few repeats, small sizes, exit 0
    .venv/bin/python bench/bench_http.py --parts stack --granian /path/to/python-with-granian

Everything runs on 127.0.0.1: the servers are subprocesses on free ports, the client is this process
(a plain blocking socket, keep-alive, TCP_NODELAY: the cheapest client there is, so that the servers'
differences show). Every loop is bounded in count and in time.

  (a) `echo`: POST /v1/losses [256, 4096] (logprobs, old_logprobs, advantages, ref_logprobs float32, a
      bool response_mask; ppo_clip + kl_loss k3), binary, against a bare uvicorn echo app run with the
      server's own uvicorn configuration (advserve.transports.http_door.guarded_protocol and the same
      loop) that reads the same request bytes into one buffer and answers as many bytes as advserve's
      response; advserve runs one process (--workers 1), as the echo does. Timed alternately; the
      figure is median(advserve total - Server-Timing compute) over median(echo total), target <= 1.2x.
  (b) `stack`: the echo app under each of uvicorn's HTTP/1.1 protocols (h11, httptools; the guarded
      classes advserve runs) and event loops (asyncio, uvloop): median round trip of large bodies
      (16 MiB in / 4 MiB out, 64 MiB in / 64 MiB out) and of small ones (~10 KB in / ~5 KB out, one
      connection), plus the small bodies' throughput with 16 connections. With --granian PYTHON, the
      same echo app under granian (ASGI, HTTP/1) run by that interpreter, for comparison only.
  (c) `gae` (not run by default): POST /v1/advantages GAE [1024, 8192] binary (72 MiB in, 64 MiB out),
      median total and Server-Timing, each answer compared with this process's CPU engine; on a GPU
      machine: --parts gae --server-flag=--device --server-flag=cuda (the issue's target: <= 60 ms).

Exit status 1 when a server answers wrongly (status, length); speed never affects it. The figures go to
bench/results/http.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "http.json"
ECHO_TARGET = 1.2
MIB = 1 << 20
# the allocator setting advserve applies to itself (advserve.runtime.tune_allocator), given to the echo
# servers too, so that both pay the same page-fault costs for large bodies
TUNED_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str((1 << 31) - 1)}


# --- the echo app (its own process; importable without advserve, for granian) -------------------


async def echo_app(scope, receive, send):
    """ASGI: reads the request body into one buffer of its Content-Length (as advserve's door does),
    answers `x-echo-bytes` bytes (zeros) in one message. A GET answers an empty 200 (readiness)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].rsplit(".", 1)[-1]
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    if scope["type"] != "http":
        return
    headers = dict(scope["headers"])
    declared = int(headers.get(b"content-length", b"0"))
    buffer, seen, more = bytearray(declared), 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        buffer[seen:seen + len(chunk)] = chunk
        seen += len(chunk)
        more = message.get("more_body", False)
    out = _zeros(int(headers.get(b"x-echo-bytes", b"0")))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream"),
                            (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


_ZEROS: dict[int, bytes] = {}


def _zeros(n: int) -> bytes:
    """n zero bytes, made once per size (advserve's result exists before it is sent, too)."""
    if n not in _ZEROS:
        _ZEROS[n] = bytes(n)
    return _ZEROS[n]


def run_echo_server(port: int, http: str, loop: str) -> None:
    """uvicorn serving `echo_app` with advserve's guarded protocol class `http` and event loop `loop`."""
    import uvicorn

    from advserve.config import Settings
    from advserve.transports.http_door import guarded_protocol

    protocol = guarded_protocol(Settings(), http)
    uvicorn.run(echo_app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on",
                http=protocol, loop=loop)


# --- a minimal blocking HTTP/1.1 client -----------------------------------------------------------


class Client:
    """One keep-alive connection; `post` returns (status, headers, body)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending = b""

    def close(self) -> None:
        self.sock.close()

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytearray]:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-length: {len(body)}\r\n{head}\r\n"
                          .encode())
        self.sock.sendall(body)
        data = self.pending
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("closed before the response head")
            data += chunk
        raw_head, _, rest = data.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        response_headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(response_headers.get("content-length", "0"))
        out = bytearray(length)
        have = min(len(rest), length)
        out[:have] = rest[:have]
        self.pending = bytes(rest[have:])
        view = memoryview(out)
        while have < length:
            n = self.sock.recv_into(view[have:], min(length - have, 1 << 22))
            if n == 0:
                raise ConnectionError(f"closed after {have} of {length} body bytes")
            have += n
        return status, response_headers, out


# --- servers --------------------------------------------------------------------------------------


def start(server):
    server.start()
    return server


def echo_server(http: str, loop: str):
    from advserve.testing import ServerProcess

    script = str(Path(__file__).resolve())
    return ServerProcess(name=f"echo-{http}-{loop}", env=TUNED_MALLOC_ENV, ready_path="/",
                         argv=lambda port, _grpc: [sys.executable, script, "--echo-server", str(port), http, loop])


def granian_server(python: str, loop: str):
    from advserve.testing import ServerProcess

    return ServerProcess(name=f"granian-{loop}", env=TUNED_MALLOC_ENV, ready_path="/",
                         argv=lambda port, _grpc: [python, "-m", "granian", "--interface", "asgi", "--http", "1",
                                                   "--loop", loop, "--host", "127.0.0.1", "--port", str(port),
                                                   "--log-level", "warning", "--working-dir", str(ROOT / "bench"),
                                                   "bench_http:echo_app"])


# --- measurements ---------------------------------------------------------------------------------


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by every thread of process `pid` and of its children (granian runs its
    worker as a child), from /proc/*/task/*/schedstat (nanoseconds; /proc/*/stat counts 10 ms ticks)."""
    pids = {pid}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    pids.add(int(entry))
        except (OSError, ValueError):
            continue
    total = 0
    for process in pids:
        try:
            tasks = os.listdir(f"/proc/{process}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{process}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError):
                continue
    return total / 1e9


def round_trips(server, body: bytes, out_bytes: int, reps: int, budget_s: float, failures: list[str],
                where: str) -> tuple[list[float], float]:
    """(round-trip times in ms, the server's CPU ms per request) of `reps` echo POSTs of `body` answered
    with `out_bytes`, one connection. CPU time is the steadier figure on a shared machine."""
    client = Client(server.port)
    headers = {"content-type": "application/octet-stream", "x-echo-bytes": str(out_bytes)}
    times, deadline = [], time.monotonic() + budget_s
    cpu_at = None
    try:
        for i in range(reps + 2):
            if i == 2:  # after two warm-up calls
                cpu_at = tree_cpu_s(server.pid)
            t0 = time.perf_counter()
            status, _, got = client.post("/echo", body, headers)
            if status != 200 or len(got) != out_bytes:
                failures.append(f"{where}: HTTP {status}, {len(got)} bytes (want {out_bytes})")
                break
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
            if time.monotonic() > deadline:
                break
    finally:
        client.close()
    cpu_ms = (tree_cpu_s(server.pid) - cpu_at) * 1e3 / len(times) if times and cpu_at is not None else float("nan")
    return times, cpu_ms


def throughput(port: int, body: bytes, out_bytes: int, connections: int, seconds: float,
               failures: list[str], where: str) -> float:
    """Requests/s of `connections` threads, each a keep-alive connection posting `body` for `seconds`."""
    counts = [0] * connections
    stop = time.monotonic() + seconds
    headers = {"content-type": "application/octet-stream", "x-echo-bytes": str(out_bytes)}

    def worker(i: int) -> None:
        client = Client(port)
        try:
            while time.monotonic() < stop:
                status, _, got = client.post("/echo", body, headers)
                if status != 200 or len(got) != out_bytes:
                    failures.append(f"{where}: HTTP {status}")
                    return
                counts[i] += 1
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    return sum(counts) / (time.perf_counter() - t0)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def part_stack(args, failures: list[str]) -> dict:
    """(b): the echo under each protocol x loop (and granian when asked)."""
    cases = [("16 MiB in / 4 MiB out", 16 * MIB, 4 * MIB, args.reps_large),
             ("64 MiB in / 64 MiB out", 64 * MIB, 64 * MIB, max(3, args.reps_large // 2)),
             ("10 KB in / 5 KB out", 10_000, 5_000, args.reps_small)]
    if args.quick:
        cases = [("4 MiB in / 1 MiB out", 4 * MIB, MIB, args.reps_large), cases[2]]
    configs = [(f"uvicorn {http} + {loop}", echo_server(http, loop)) for http in ("h11", "httptools")
               for loop in ("asyncio", "uvloop")]
    if args.granian:
        configs += [(f"granian (ASGI) + {loop}", granian_server(args.granian, loop)) for loop in ("asyncio", "uvloop")]
    print("\n(b) echo: median round trip ms / the server's CPU ms per request (one connection), and small-body "
          f"requests/s ({args.connections} connections, {args.seconds:g} s)")
    print(f"  {'server':28}" + "".join(f"{name:>26}" for name, *_ in cases) + f"{'small req/s':>13}")
    table = {}
    for name, server in configs:
        try:
            start(server)
        except RuntimeError as exc:
            failures.append(f"{name}: did not start: {exc}")
            continue
        try:
            row = {}
            for case, size_in, size_out, reps in cases:
                body = os.urandom(size_in)
                times, cpu_ms = round_trips(server, body, size_out, reps, args.budget_s, failures, f"{name} {case}")
                row[case] = {"median_ms": median(times), "server_cpu_ms": cpu_ms}
            row["small_rps"] = throughput(server.port, os.urandom(10_000), 5_000, args.connections, args.seconds,
                                          failures, f"{name} throughput")
        finally:
            server.stop()
            server.remove_log()
        table[name] = row
        print(f"  {name:28}" + "".join(f"{row[case]['median_ms']:>17.2f} / {row[case]['server_cpu_ms']:<6.2f}"
                                       for case, *_ in cases) + f"{row['small_rps']:>13.0f}", flush=True)
    return table


def loss_body(batch: int, length: int) -> tuple[bytes, dict[str, str]]:
    """A binary /v1/losses body: ppo_clip (verl) + kl_loss k3, [batch, length] float32 and a bool mask."""
    import numpy as np

    from advserve_client import framing
    from advserve_client.framing import RawTensor

    rng = np.random.default_rng(0)
    lengths = rng.integers(max(1, length // 8), length + 1, batch)
    mask = np.arange(length)[None, :] < lengths[:, None]
    logprobs = (-1.5 + 0.5 * rng.standard_normal((batch, length))).astype(np.float32)
    tensors = {"logprobs": logprobs,
               "old_logprobs": (logprobs + 0.05 * rng.standard_normal((batch, length))).astype(np.float32),
               "ref_logprobs": (logprobs + 0.05 * rng.standard_normal((batch, length))).astype(np.float32),
               "advantages": rng.standard_normal((batch, length)).astype(np.float32),
               "response_mask": mask}
    document = {"preset": "verl", "kl_loss": {"coef": 0.001, "estimator": "k3"}}
    n, chunks = framing.encode(document, {k: RawTensor.from_numpy(v) for k, v in tensors.items()})
    return b"".join(chunks), {"content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(n)}


def server_timing(value: str | None) -> dict[str, float]:
    out = {}
    for part in (value or "").split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            out[name] = float(rest[4:])
    return out


def part_echo(args, failures: list[str]) -> dict:
    """(a): advserve's binary /v1/losses against the echo of the same bytes, alternately."""
    from advserve.testing import ServerProcess

    batch, length = (64, 1024) if args.quick else (256, 4096)
    body, headers = loss_body(batch, length)
    server = ServerProcess("--workers", "1", *args.server_flags, name="advserve")  # one process, as the echo
    echo = echo_server(args.http, args.loop)
    out: dict = {"size": [batch, length], "request_bytes": len(body)}
    print(f"\n(a) POST /v1/losses [{batch}, {length}] binary (ppo_clip + kl k3), {len(body) / MIB:.1f} MiB in, vs a "
          f"uvicorn echo ({args.http} + {args.loop}) of the same bytes")
    try:
        start(server)
        start(echo)
        out["commands"] = {"advserve": server.command_line(), "echo": echo.command_line()}
        client, echo_client = Client(server.port), Client(echo.port)
        status, response_headers, first = client.post("/v1/losses", body, headers)
        if status != 200:
            failures.append(f"(a) advserve: HTTP {status}: {bytes(first[:300])!r}")
            return out
        out_bytes = len(first)
        echo_headers = {**headers, "x-echo-bytes": str(out_bytes)}
        totals, overheads, echoes, timings = [], [], [], []
        deadline = time.monotonic() + args.budget_s * 2
        for i in range(args.reps_echo + 2):
            for which in (("advserve", "echo") if i % 2 == 0 else ("echo", "advserve")):
                t0 = time.perf_counter()
                if which == "echo":
                    status, _, got = echo_client.post("/echo", body, echo_headers)
                    elapsed = (time.perf_counter() - t0) * 1e3
                    if status != 200 or len(got) != out_bytes:
                        failures.append(f"(a) echo: HTTP {status}, {len(got)} bytes")
                    if i >= 2:
                        echoes.append(elapsed)
                    continue
                status, response_headers, got = client.post("/v1/losses", body, headers)
                elapsed = (time.perf_counter() - t0) * 1e3
                if status != 200 or len(got) != out_bytes:
                    failures.append(f"(a) advserve: HTTP {status}, {len(got)} bytes")
                    continue
                timing = server_timing(response_headers.get("server-timing"))
                if i >= 2:
                    totals.append(elapsed)
                    overheads.append(elapsed - timing.get("compute", 0.0))
                    timings.append(timing)
            if time.monotonic() > deadline:
                print(f"  (time budget reached after {i + 1} rounds)")
                break
        client.close()
        echo_client.close()
    finally:
        for s in (server, echo):
            s.stop()
    phases = {k: median([t.get(k, 0.0) for t in timings]) for k in ("decode", "queue", "compute", "encode")}
    ratio = median(overheads) / median(echoes)
    out.update(response_bytes=out_bytes, total_ms=median(totals), minus_compute_ms=median(overheads),
               echo_ms=median(echoes), server_timing_ms=phases, ratio=ratio, samples=len(totals))
    print(f"  response {out_bytes / MIB:.1f} MiB; {len(totals)} samples each")
    print(f"  advserve total {median(totals):.2f} ms (" + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
          + f"); total - compute {median(overheads):.2f} ms")
    print(f"  echo total {median(echoes):.2f} ms")
    verdict = "ok" if ratio <= ECHO_TARGET else "MISS"
    note = "" if (batch, length) == (256, 4096) else f" (the target is for [256, 4096]; this run is [{batch}, {length}])"
    print(f"  (total - compute) / echo = {ratio:.2f}x   target <= {ECHO_TARGET}x: {verdict}{note}")
    return out


def part_gae(args, failures: list[str]) -> dict:
    """(c): POST /v1/advantages GAE [1024, 8192] binary end to end (the issue's GPU target: <= 60 ms with
    --server-flag=--device --server-flag=cuda); every answer checked against this process's CPU engine."""
    import numpy as np

    import advserve
    from advserve.testing import ServerProcess
    from advserve_client import framing
    from advserve_client.framing import RawTensor

    batch, length = (64, 1024) if args.quick else (1024, 8192)
    rng = np.random.default_rng(0)
    lengths = rng.integers(length // 8, length + 1, batch)
    tensors = {"token_rewards": (0.01 * rng.standard_normal((batch, length))).astype(np.float32),
               "values": rng.standard_normal((batch, length)).astype(np.float32),
               "response_mask": np.arange(length)[None, :] < lengths[:, None]}
    document = {"estimator": "gae", "params": {"gamma": 1.0, "lam": 0.95}}
    n, chunks = framing.encode(document, {k: RawTensor.from_numpy(v) for k, v in tensors.items()})
    body, headers = b"".join(chunks), {"content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(n)}
    reference = advserve.compute_advantages("gae", params=document["params"], device="cpu", **tensors)
    server = ServerProcess("--workers", "1", *args.server_flags, name="advserve")
    print(f"\n(c) POST /v1/advantages GAE [{batch}, {length}] binary, {len(body) / MIB:.0f} MiB in, advserve "
          f"{' '.join(args.server_flags) or '(default device)'}")
    totals, timings, out = [], [], {"size": [batch, length]}
    try:
        start(server)
        out["command"] = server.command_line()
        client = Client(server.port)
        for i in range(args.reps_gae + 1):
            t0 = time.perf_counter()
            status, response_headers, got = client.post("/v1/advantages", body, headers)
            elapsed = (time.perf_counter() - t0) * 1e3
            if status != 200:
                failures.append(f"(c) HTTP {status}: {bytes(got[:300])!r}")
                break
            _, raw = framing.decode(got, response_headers.get(framing.HEADER_LENGTH.lower()))
            for name in ("advantages", "returns"):
                want = np.asarray(getattr(reference, name), dtype=np.float64)
                diff = np.abs(raw[name].to_numpy().astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30)
                if not diff <= 1e-5:
                    failures.append(f"(c) {name}: max |diff| / max |ref| = {diff:.3g}")
            if i >= 1:  # one warm-up call
                totals.append(elapsed)
                timings.append(server_timing(response_headers.get("server-timing")))
        client.close()
        out["response_bytes"] = len(got)
    finally:
        server.stop()
    phases = {k: median([t.get(k, 0.0) for t in timings]) for k in ("decode", "queue", "compute", "encode")}
    out.update(total_ms=median(totals), server_timing_ms=phases, samples=len(totals))
    print(f"  {out.get('response_bytes', 0) / MIB:.0f} MiB out; total {median(totals):.1f} ms (" +
          ", ".join(f"{k} {v:.1f}" for k, v in phases.items()) + f"); {len(totals)} samples, every answer checked")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke run)")
    parser.add_argument("--parts", default="echo,stack", help="comma-separated: echo, stack, gae (default echo,stack)")
    parser.add_argument("--http", default="httptools", choices=("httptools", "h11"),
                        help="the echo's protocol in part (a): the server's (default httptools)")
    parser.add_argument("--loop", default="uvloop", choices=("uvloop", "asyncio"),
                        help="the echo's loop in part (a): the server's (advserve.server.run_event_loop: uvloop "
                        "where installed)")
    parser.add_argument("--server-flag", dest="server_flags", action="append", default=[],
                        help="an extra `advserve serve` argument for part (a) (repeatable)")
    parser.add_argument("--granian", metavar="PYTHON", help="also time granian, run by this interpreter")
    parser.add_argument("--reps-echo", type=int, default=15)
    parser.add_argument("--reps-large", type=int, default=9)
    parser.add_argument("--reps-gae", type=int, default=7)
    parser.add_argument("--reps-small", type=int, default=200)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=2.0, help="each throughput run")
    parser.add_argument("--budget-s", type=float, default=30.0, help="time budget of each timing loop")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where the figures go (default {RESULTS})")
    parser.add_argument("--echo-server", nargs=3, metavar=("PORT", "HTTP", "LOOP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.reps_echo, args.reps_large, args.reps_small, args.reps_gae, args.seconds = 5, 3, 50, 3, 0.5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.echo_server:
        port, http, loop = args.echo_server
        run_echo_server(int(port), http, loop)
        return 0
    sys.path.insert(0, str(ROOT / "bench"))
    from _common import machine

    info = machine("uvicorn", "httptools", "uvloop", "h11", "granian")
    print("machine:", json.dumps(info))
    print("command:", " ".join([sys.executable, *sys.argv]))
    failures: list[str] = []
    results: dict = {"machine": info, "command": sys.argv}
    parts = set(args.parts.split(","))
    if "echo" in parts:
        results["echo"] = part_echo(args, failures)
    if "stack" in parts:
        results["stack"] = part_stack(args, failures)
    if "gae" in parts:
        results["gae"] = part_gae(args, failures)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
