"""Serving benchmark: the parallel front end (--workers, docs/workers.md) under concurrent load.

    .venv/bin/python bench/bench_serving.py                      # every part, 10 s per measurement
    .venv/bin/python bench/bench_serving.py --duration 3 --parts a,c
    .venv/bin/python bench/bench_serving.py --baseline 53ad58a   # part b's "today" (the default)

Everything runs on 127.0.0.1: real `advserve serve --device cpu` processes on free ports (advserve.testing),
stopped at the end, also on error. Every ratio compares measurements taken in this one run.

The load generators are cheap on purpose, since they share the machine's cores with the server: bodies
are encoded once before the clock starts, each client is a thread with one keep-alive http.client
connection, and the clients are spread over separate processes (`--client-procs`), so the client side
never holds one GIL for everyone. The output says how many cores the machine has.

Parts:
  a. 8 concurrent clients, binary POST /v1/losses [256, 4096] (preset verl + kl_loss k3, ~17 MB in):
     requests/s with --workers 2 against --workers 1 (target >= 1.6x).
  b. 64 concurrent clients, binary POST /v1/advantages GRPO, 8 sequences x 512 tokens: requests/s of this
     tree with --workers 2 against "today", the server of --baseline REF (a `git worktree` of REF in a
     temporary directory, run by this .venv with PYTHONPATH=<worktree>/service:<worktree>/client;
     target >= 2x).
  c. 32 concurrent clients, [256, 4096] losses with --workers 2 and --admission-bytes 256 MiB: peak RSS
     summed over the supervisor and its workers (Pss, sampled every 10 ms) against the admission limit
     plus a stated constant per worker (PER_WORKER_MIB, SUPERVISOR_MIB), --workers 1 alongside; every request answered 200, or 503 and retried
     (its Retry-After honoured up to 0.25 s) until answered: nothing accepted is dropped.
  balance. How 8 keep-alive connections opened at once land on 2 asyncio processes: one inherited
     listening socket vs one SO_REUSEPORT socket each (why the workers use SO_REUSEPORT), and the
     connections per worker of a real --workers 2 server under part a's load.

Writes nothing unless --out FILE (JSON). Exit status 1 when a request fails (a status other than 200, or
503 in part c, or a transport error); speeds never affect it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from advserve.testing import ServerProcess, cpu_model, wait_for_quiet

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
PER_WORKER_MIB = 700
"""Part c's stated constant per worker: its resting size (Python, torch, FastAPI, grpc: 200-400 MiB
measured here) plus the 256 MiB it may keep beyond its admitted bytes before it trims
(runtime.MEMORY_SLACK); plus SUPERVISOR_MIB once (docs/workers.md: admission + N x 700 MiB + 128 MiB)."""
SUPERVISOR_MIB = 128
TARGETS = {"a": 1.6, "b": 2.0}
RETRY_CAP_S = 0.25  # part c: a 503's Retry-After is honoured up to this (as bench_transport.py part 4)
RETRIED = ("200", "503 retried", "closed unread, retried")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="a,b,c,balance", help="comma-separated subset of a,b,c,balance")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per measurement")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measurement")
    parser.add_argument("--rounds", type=int, default=3,
                        help="parts a and b: alternating measurements of each server (the median counts)")
    parser.add_argument("--baseline", default="53ad58a", help="git ref of part b's 'today' server")
    parser.add_argument("--max-wait", type=float, default=30.0,
                        help="seconds to wait, before each measurement, for other processes to use < 15%% of the CPUs")
    parser.add_argument("--client-procs", type=int, default=4, help="processes the clients are spread over")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (default: nothing written)")
    return parser.parse_args(argv)


# --- bodies ---------------------------------------------------------------------------------------


def frame(document: dict[str, Any], tensors: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    from advserve_client import framing

    n, chunks = framing.encode(document, {k: framing.RawTensor.from_numpy(v) for k, v in tensors.items()})
    return b"".join(chunks), {"Content-Type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(n)}


def losses_body(batch: int = 256, length: int = 4096) -> tuple[bytes, dict[str, str]]:
    import numpy as np

    rng = np.random.default_rng(0)
    old = (-3 * rng.random((batch, length))).astype(np.float32)
    tensors = {"logprobs": old + 0.2 * rng.standard_normal((batch, length), np.float32), "old_logprobs": old,
               "ref_logprobs": old + 0.2 * rng.standard_normal((batch, length), np.float32),
               "advantages": rng.standard_normal((batch, length), np.float32),
               "response_mask": np.arange(length)[None, :] < rng.integers(length // 8, length + 1, batch)[:, None]}
    return frame({"preset": "verl", "kl_loss": {"estimator": "k3"}}, tensors)


def grpo_bodies(count: int = 16, group: int = 8, length: int = 512) -> list[tuple[bytes, dict[str, str]]]:
    import numpy as np

    rng = np.random.default_rng(1)
    bodies = []
    for _ in range(count):
        mask = np.arange(length)[None, :] < rng.integers(length // 8, length + 1, group)[:, None]
        tensors = {"rewards": rng.integers(0, 2, group).astype(np.float32), "response_mask": mask,
                   "group_ids": np.zeros(group, np.int64)}
        bodies.append(frame({"estimator": "grpo", "preset": "verl"}, tensors))
    return bodies


# --- load -------------------------------------------------------------------------------------------


SEND_CHUNK = 1 << 20


def _send(conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str]) -> bool:
    """Send the request as a careful client does: the body in 1 MiB pieces, stopping early when the server
    has answered already (a refusal before the body was read, followed by closing the connection). True
    when the whole body went out."""
    conn.putrequest("POST", path, skip_accept_encoding=True)
    for name, value in {**headers, "Content-Length": str(len(body))}.items():
        conn.putheader(name, value)
    conn.endheaders()
    view = memoryview(body)
    for offset in range(0, len(body), SEND_CHUNK):
        if select.select([conn.sock], [], [], 0)[0]:  # an early answer (or a close): stop sending
            return False
        try:
            conn.send(view[offset:offset + SEND_CHUNK])
        except (BrokenPipeError, ConnectionResetError):
            return False
    return True


def _client(port: int, path: str, bodies, start: float, end: float, retry_503: bool, out: Counter) -> None:
    """One client: one keep-alive connection, requests back to back from `start`; completions before `end`
    count. retry_503: a 503 is retried (after min(Retry-After, RETRY_CAP_S)) until answered, and so is a request
    whose connection the server closed before the body was all sent (refused unread). An error after the
    whole body was sent is a failure: that request was accepted and not answered."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    i = 0
    time.sleep(max(0.0, start - time.monotonic()))
    while time.monotonic() < end:
        body, headers = bodies[i % len(bodies)]
        sent = False
        try:
            sent = _send(conn, path, body, headers)
            response = conn.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as exc:
            out[f"reset after sending {type(exc).__name__}" if sent or not retry_503 else "closed unread, retried"] += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            time.sleep(0.05)
            continue
        if response.will_close:
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        if status == 503 and retry_503:
            out["503 retried"] += 1
            time.sleep(min(float(response.getheader("Retry-After") or RETRY_CAP_S), RETRY_CAP_S))
            continue
        out[str(status) if time.monotonic() <= end else f"{status} after the end"] += 1
        i += 1
    conn.close()


def _client_proc(port, path, bodies, start, end, threads, retry_503, queue) -> None:
    counts: Counter = Counter()
    workers = [threading.Thread(target=_client, args=(port, path, bodies, start, end, retry_503, counts))
               for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    queue.put(dict(counts))


def load(port: int, path: str, bodies, clients: int, duration_s: float, procs: int, retry_503: bool = False,
         during=None) -> dict[str, Any]:
    """`clients` clients over `procs` processes for `duration_s`; `during()` runs meanwhile in this process.
    Returns the status counts and requests/s (200s per second)."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = min(procs, clients)
    start = time.monotonic() + 0.5
    end = start + duration_s
    children = [ctx.Process(target=_client_proc, args=(port, path, bodies, start, end,
                                                       clients // procs + (k < clients % procs), retry_503, queue))
                for k in range(procs)]
    for child in children:
        child.start()
    extra = during(end) if during is not None else None
    counts: Counter = Counter()
    for _ in children:
        counts.update(queue.get(timeout=duration_s + 600))
    for child in children:
        child.join(timeout=60)
    return {"counts": dict(counts), "rps": counts["200"] / duration_s, "extra": extra}


# --- servers -----------------------------------------------------------------------------------------


def server(*flags: str, name: str, baseline: Path | None = None) -> ServerProcess:
    common = ("--device", "cpu", "--max-connections", "1024")
    if baseline is None:
        return ServerProcess(*common, *flags, name=name).start()

    def argv(http_port: int, grpc_port: int) -> list[str]:
        return [sys.executable, "-m", "advserve.cli", "serve", "--host", "127.0.0.1", "--http-port", str(http_port),
                "--grpc-port", str(grpc_port), "--log-level", "warning", *common, *flags]

    env = {"PYTHONPATH": f"{baseline / 'service'}{os.pathsep}{baseline / 'client'}"}
    return ServerProcess(name=name, argv=argv, env=env).start()


def server_counts(srv: ServerProcess) -> dict[str, float]:
    """From the server's /metrics (any worker: the sums): requests answered 200, and refusals."""
    text = urllib.request.urlopen(f"{srv.url}/metrics", timeout=30).read().decode()  # noqa: S310 - loopback
    answered = sum(float(v) for v in re.findall(r'^advserve_requests_total{[^}]*status="200"[^}]*} (\S+)$', text, re.M))
    refused = sum(float(v) for v in re.findall(r"^advserve_rejections_total{[^}]*} (\S+)$", text, re.M))
    return {"answered_200": answered, "refused": refused}


def process_tree(pid: int) -> list[int]:
    """`pid` and its children (the supervisor and its workers)."""
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return pids


def memory_kb(pid: int) -> int:
    """The process's proportional set size (Pss, /proc/PID/smaps_rollup): its resident pages, each page it
    shares (copy-on-write after the fork, libraries) divided among its sharers, so the sum over the
    supervisor and its workers counts every page once (a sum of RSS would count shared pages N times)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def warm(srv: ServerProcess, path: str, bodies, clients: int, seconds: float, procs: int) -> None:
    if seconds > 0:
        load(srv.port, path, bodies, clients, seconds, procs)


def throughput(args, flags: tuple[str, ...], name: str, path: str, bodies, clients: int,
               baseline: Path | None = None, during=None) -> dict[str, Any]:
    return compare_throughput(args, {name: (flags, baseline)}, path, bodies, clients, during=during, rounds=1)[name]


def compare_throughput(args, configs: dict[str, tuple[tuple[str, ...], Path | None]], path: str, bodies,
                       clients: int, during=None, rounds: int | None = None) -> dict[str, dict[str, Any]]:
    """Requests/s of each configuration {name: (flags, baseline worktree)}: every server started first,
    then `rounds` rounds measuring each in turn (alternating, so drifting background load hits all
    alike); each one's median round, its status counts summed."""
    servers = {}
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, (flags, baseline) in configs.items():
            servers[name] = server(*flags, name=name, baseline=baseline)
            warm(servers[name], path, bodies, clients, args.warmup, args.client_procs)
            results[name] = {"command": servers[name].command_line(), "rounds_rps": [], "counts": Counter(),
                             "background_load": 0.0}
        for _ in range(rounds or args.rounds):
            for name, srv in servers.items():
                quiet = wait_for_quiet(args.max_wait)
                run = load(srv.port, path, bodies, clients, args.duration, args.client_procs,
                           during=(lambda end, srv=srv: during(srv, end)) if during else None)
                r = results[name]
                r["rounds_rps"].append(run["rps"])
                r["counts"].update(run["counts"])
                r["extra"] = run["extra"]
                r["background_load"] = max(r["background_load"], quiet["load"] or 0.0)
    finally:
        for srv in servers.values():
            srv.stop()
            srv.remove_log()
    for r in results.values():
        r["rps"] = statistics.median(r["rounds_rps"])
        r["counts"] = dict(r["counts"])
    return results


# --- connection balance ------------------------------------------------------------------------------


def connections_per_worker(srv: ServerProcess) -> list[int]:
    """Established connections on the HTTP port held by each worker (from /proc: their socket inodes)."""
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == srv.port and fields[3] == "01":
                    established.add(fields[9])
    counts = []
    for pid in process_tree(srv.pid)[1:]:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        counts.append(len(inodes & established))
    return counts


def _accept_child(sock: socket.socket | None, port: int, ready, stop) -> None:
    import asyncio

    async def main() -> None:
        listener = sock
        if listener is None:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(128)
        listener.setblocking(False)

        async def answer(reader, writer) -> None:
            writer.write(f"{os.getpid()}\n".encode())
            await writer.drain()
            await reader.read()  # held until the client closes

        server = await asyncio.start_server(answer, sock=listener)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.01)
        server.close()

    asyncio.run(main())


def accept_balance(mode: str, rounds: int = 20, clients: int = 8) -> dict[str, Any]:
    """`rounds` bursts of `clients` connections opened at once to 2 asyncio processes; the share of the
    busier process in each round. mode: 'inherited' (one listening socket, forked) or 'reuseport'."""
    ctx = multiprocessing.get_context("fork")
    shared = None
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    if mode == "inherited":
        shared = socket.socket()
        shared.bind(("127.0.0.1", port))
        shared.listen(128)
    stop = ctx.Event()
    readies = [ctx.Event() for _ in range(2)]
    children = [ctx.Process(target=_accept_child, args=(shared, port, ready, stop)) for ready in readies]
    for child in children:
        child.start()
    for ready in readies:
        ready.wait(30)
    busier = []
    try:
        for _ in range(rounds):
            conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(clients)]
            pids = Counter(c.makefile().readline() for c in conns)
            busier.append(max(pids.values()))
            for c in conns:
                c.close()
    finally:
        stop.set()
        for child in children:
            child.join(10)
        if shared is not None:
            shared.close()
    return {"mode": mode, "rounds": rounds, "clients": clients, "busier_process_connections": busier,
            "all_on_one": sum(b == clients for b in busier), "mean_busier_share": sum(busier) / rounds / clients}


# --- parts -------------------------------------------------------------------------------------------


def part_a(args, results: dict) -> None:
    runs = compare_throughput(args, {"workers1": (("--workers", "1"), None), "workers2": (("--workers", "2"), None)},
                              "/v1/losses", [losses_body()], 8)
    results["a"] = {**runs, "ratio": runs["workers2"]["rps"] / max(runs["workers1"]["rps"], 1e-9)}


def part_b(args, results: dict) -> None:
    bodies = grpo_bodies()
    worktree = Path(tempfile.mkdtemp(prefix="advserve-baseline-"))
    try:
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.baseline], cwd=ROOT, check=True,
                       capture_output=True)
        runs = compare_throughput(args, {"today": ((), worktree), "workers2": (("--workers", "2"), None)},
                                  "/v1/advantages", bodies, 64)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(worktree, ignore_errors=True)
    results["b"] = {"baseline": args.baseline, **runs, "ratio": runs["workers2"]["rps"] / max(runs["today"]["rps"], 1e-9)}


def part_c(args, results: dict) -> None:
    results["c"] = {f"workers{n}": memory_run(args, n) for n in (1, 2)}


def memory_run(args, workers: int) -> dict[str, Any]:
    """Part c for one --workers: idle and peak memory of the server's processes, the status counts."""
    admission = 256 * MIB
    srv = server("--workers", str(workers), "--admission-bytes", str(admission), name=f"c-workers{workers}")
    try:
        time.sleep(1.0)
        warm(srv, "/v1/losses", [losses_body()], 2, args.warmup, 2)
        time.sleep(3.0)  # idle: freed memory trimmed (--memory-trim-idle-s 2)
        pids = process_tree(srv.pid)
        idle = {pid: memory_kb(pid) for pid in pids}
        wait_for_quiet(args.max_wait)

        def sample(end: float) -> dict[str, Any]:
            peak, each = 0, dict.fromkeys(pids, 0)
            while time.monotonic() < end:
                now = {pid: memory_kb(pid) for pid in pids}
                peak = max(peak, sum(now.values()))
                each = {pid: max(each[pid], now[pid]) for pid in pids}
                time.sleep(0.01)
            return {"peak_sum_kb": peak, "peak_kb_each": each}

        before = server_counts(srv)
        run = load(srv.port, "/v1/losses", [losses_body()], 32, args.duration, args.client_procs, retry_503=True,
                   during=sample)
        after = server_counts(srv)
        run["server"] = {key: after[key] - before[key] for key in after}
        run["command"] = srv.command_line()
    finally:
        srv.stop()
        srv.remove_log()
    bound_kb = (admission + workers * PER_WORKER_MIB * MIB + SUPERVISOR_MIB * MIB) // 1024
    return {"processes": len(pids), "workers": workers, "idle_kb": idle, "admission_bytes": admission,
            "per_worker_mib": PER_WORKER_MIB, "bound_kb": bound_kb, **run}


def part_balance(args, results: dict) -> None:
    results["balance"] = {"inherited": accept_balance("inherited"), "reuseport": accept_balance("reuseport")}

    def count(srv, end):
        time.sleep(min(1.0, max(0.0, end - time.monotonic()) / 2))
        return connections_per_worker(srv)

    args_short = argparse.Namespace(**{**vars(args), "warmup": 0.0, "duration": min(args.duration, 3.0)})
    run = throughput(args_short, ("--workers", "2"), "balance", "/v1/losses", [losses_body()], 8, during=count)
    results["balance"]["server_connections_per_worker"] = run["extra"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    results: dict[str, Any] = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count()}, "duration_s": args.duration}
    print(f"bench_serving: {os.cpu_count()} cores ({cpu_model()}), shared by the server and the load generators "
          f"({args.client_procs} client processes, one keep-alive http.client connection per client thread, bodies "
          f"encoded beforehand); {args.duration:g} s per measurement after {args.warmup:g} s of warm-up")
    for part in parts:
        {"a": part_a, "b": part_b, "c": part_c, "balance": part_balance}[part](args, results)
        report(part, results[part])
    failed = [(part, counts) for part in parts if part in "ab" for counts in _counts(results[part])
              if set(counts) - {"200", "200 after the end"}]
    failed += [("c", m["counts"]) for m in results.get("c", {}).values() if not accounting(m)["ok"]]
    for part, counts in failed:
        print(f"FAILED part {part}: statuses {counts}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


def accounting(m: dict) -> dict[str, Any]:
    """Part c's books: every 200 the server sent reached a client, and every refusal the server counted is a
    503 a client saw, a connection closed before its body was all sent, or a reset after it was (a refusal
    mid-body whose 503 the reset destroyed); so no accepted request went unanswered."""
    counts, server = m["counts"], m["server"]
    client_200 = counts.get("200", 0) + counts.get("200 after the end", 0)
    resets = sum(v for k, v in counts.items() if k.startswith("reset after sending"))
    refusals = counts.get("503 retried", 0) + counts.get("closed unread, retried", 0) + resets
    other = {k: v for k, v in counts.items()
             if k not in RETRIED and k != "200 after the end" and not k.startswith("reset after sending")}
    refusals_match = refusals == server["refused"]
    return {"client_200": client_200, "server_200": server["answered_200"], "resets": resets,
            "server_refused": server["refused"], "refusals_match": refusals_match, "other": other,
            "ok": client_200 == server["answered_200"] and refusals_match and not other}


def _counts(result: dict) -> list[dict]:
    return [value["counts"] for value in result.values() if isinstance(value, dict) and "counts" in value] + (
        [result["counts"]] if "counts" in result else [])


def report(part: str, r: dict) -> None:
    def verdict(ratio, target):
        return f"{ratio:.2f}x (target >= {target}x: {'ok' if ratio >= target else 'MISS'})"

    loads = [v["background_load"] for v in r.values() if isinstance(v, dict) and v.get("background_load") is not None]
    if loads and max(loads) >= 0.15:
        print(f"   (contended: other processes used up to {max(loads):.0%} of the CPUs before a measurement)")

    if part == "a":
        print(f"a. 8 clients, /v1/losses [256, 4096] binary: --workers 1 {r['workers1']['rps']:.1f} req/s, "
              f"--workers 2 {r['workers2']['rps']:.1f} req/s: {verdict(r['ratio'], TARGETS['a'])}")
        print(f"   rounds (req/s): --workers 1 {_rounds(r['workers1'])}; --workers 2 {_rounds(r['workers2'])}")
        print(f"   {r['workers2']['command']}")
    elif part == "b":
        print(f"b. 64 clients, /v1/advantages GRPO 8 x 512 binary: today ({r['baseline']}) {r['today']['rps']:.1f} "
              f"req/s, --workers 2 {r['workers2']['rps']:.1f} req/s: {verdict(r['ratio'], TARGETS['b'])}")
        print(f"   rounds (req/s): today {_rounds(r['today'])}; --workers 2 {_rounds(r['workers2'])}")
        print(f"   today: {r['today']['command']}")
    elif part == "c":
        for name, m in r.items():
            peak, idle = m["extra"]["peak_sum_kb"], sum(m["idle_kb"].values())
            print(f"c. 32 clients, /v1/losses [256, 4096], --{name.replace('workers', 'workers ')}, admission "
                  f"{m['admission_bytes'] // MIB} MiB: peak memory (Pss) summed over {m['processes']} processes "
                  f"{peak / 1024:.0f} MiB (idle {idle / 1024:.0f}, growth {(peak - idle) / 1024:.0f}); bound admission "
                  f"+ {m['workers']} x {m['per_worker_mib']} + {SUPERVISOR_MIB} MiB = {m['bound_kb'] / 1024:.0f} MiB: "
                  f"{'ok' if peak <= m['bound_kb'] else 'MISS'}")
            print("   per process, idle -> peak MiB: " + ", ".join(
                f"{m['idle_kb'][pid] / 1024:.0f} -> {m['extra']['peak_kb_each'][pid] / 1024:.0f}"
                for pid in m["idle_kb"]) + (" (the supervisor first)" if m["processes"] > 1 else ""))
            counts, books = m["counts"], accounting(m)
            print(f"   clients got 200: {books['client_200']} (server answered {books['server_200']:.0f}), 503 and "
                  f"retried: {counts.get('503 retried', 0)}, closed before the body was all sent and retried: "
                  f"{counts.get('closed unread, retried', 0)}, reset after the whole body was sent: {books['resets']}; "
                  f"server refusals {books['server_refused']:.0f} = the clients' 503s + closes + resets: "
                  f"{'yes' if books['refusals_match'] else 'NO'}; other statuses: {books['other'] or 'none'}")
            print(f"   nothing accepted was dropped: {'yes' if books['ok'] else 'NO'}")
    elif part == "balance":
        for mode in ("inherited", "reuseport"):
            m = r[mode]
            print(f"balance: {m['clients']} connections at once to 2 asyncio processes, {mode} socket(s): the busier "
                  f"took {m['mean_busier_share']:.0%} on average, all of them in {m['all_on_one']}/{m['rounds']} rounds")
        print(f"balance: --workers 2 under part a's load, connections per worker: {r['server_connections_per_worker']}")


def _rounds(r: dict) -> str:
    return ", ".join(f"{x:.1f}" for x in r["rounds_rps"])


if __name__ == "__main__":
    sys.exit(main())
