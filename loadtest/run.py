"""Load test of advserve: starts `advserve serve` on free loopback ports, runs locust headless against
it (loadtest/locustfile.py) for a bounded time, writes CSV and HTML reports, stops everything.

    .venv/bin/python loadtest/run.py                                  # 8 users, 30 s, mix, all transports
    .venv/bin/python loadtest/run.py --users 1,8,32 --duration 30 --workload small,large --transport bin,grpc
    make loadtest USERS=16 DURATION=60 WORKLOAD=large TRANSPORT=grpc MAX_P95_MS=5000

--users, --workload and --transport take comma-separated lists: each combination is one locust run
(against the same server, one after the other), named <name>-<workload>-<transport>-u<users>; a single
combination is named <name>. Transports: bin (REST, binary framing), json (REST, JSON), grpc, all (the
three user classes together, equal weights). Workloads: see loadtest/locustfile.py (small: GRPO 8x512,
medium: GAE 64x1024, large: /v1/losses 256x4096, mix, small-mix, or "grpo:8x512=3,losses:256x4096=1").

Per run, under --results-dir (default loadtest/results/): <run>_stats.csv, <run>_stats_history.csv,
<run>_failures.csv, <run>_exceptions.csv, <run>.html (locust), <run>_summary.json (exact percentiles
and Server-Timing means per request name), <run>.log (locust's output); and <name>_table.md, the table
of all runs. The server's log is <name>_server.log.

Exit status: 0 when every run had no failed request, no aggregate p95 above --max-p95-ms (exact, from
the summary), locust exited 0, and the server is still alive and healthy with no ERROR/Traceback in
its log; 1 otherwise; 2 for bad arguments. Each locust run is killed if it outlives --duration + 60 s;
the server is stopped (SIGTERM, then SIGKILL after 15 s) at the end, also on error or Ctrl-C.
Everything listens and connects on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from advserve.testing import ServerProcess, cpu_model, wait_for_quiet

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
USER_CLASSES = {"bin": ["BinaryHttpUser"], "json": ["JsonHttpUser"], "grpc": ["GrpcUser"],
                "all": ["BinaryHttpUser", "JsonHttpUser", "GrpcUser"]}
LOCUST_GRACE_S = 60  # a locust run is killed this long after --duration


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", default="8", help="concurrent users; a comma list runs each (default 8)")
    parser.add_argument("--spawn-rate", type=float, default=0,
                        help="users started per second (default: all at once, = users)")
    parser.add_argument("--duration", type=float, default=30, help="seconds of load per run (default 30)")
    parser.add_argument("--workload", default="mix", help="small, medium, large, mix, small-mix, or a weighted list "
                        "'grpo:8x512=3,losses:256x4096=1'; ';' separates several to run each (default mix)")
    parser.add_argument("--transport", default="all", help="bin, json, grpc or all; a comma list runs each "
                        "(default all)")
    parser.add_argument("--max-p95-ms", type=float, default=2000,
                        help="fail when a run's aggregate p95 latency exceeds this (default 2000)")
    parser.add_argument("--tolerate-overload", action="store_true",
                        help="503 overloaded / gRPC UNAVAILABLE overloaded are not failures")
    parser.add_argument("--wait-ms", type=float, default=0, help="pause between a user's requests (default 0)")
    parser.add_argument("--name", default="loadtest", help="report name prefix (default loadtest)")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "loadtest" / "results")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra flag for `advserve serve` (repeatable), e.g. --server-arg=--no-coalesce")
    parser.add_argument("--server-log-level", default="warning")
    parser.add_argument("--startup-timeout", type=float, default=90)
    parser.add_argument("--quiet-wait", type=float, default=0,
                        help="before each run, wait up to this many seconds for other processes to use < 15%% of "
                        "the CPUs (default 0: don't wait; the measured background load is reported either way)")
    args = parser.parse_args(argv)
    try:
        args.users_list = [int(u) for u in args.users.split(",") if u.strip()]
    except ValueError:
        parser.error(f"--users: integers expected, got {args.users!r}")
    if not args.users_list or min(args.users_list) < 1:
        parser.error("--users: at least one user")
    args.transports = [t.strip() for t in args.transport.split(",") if t.strip()]
    unknown = [t for t in args.transports if t not in USER_CLASSES]
    if unknown or not args.transports:
        parser.error(f"--transport: one of {', '.join(USER_CLASSES)} (comma-separated), got {args.transport!r}")
    # a weighted workload list uses commas itself: several workloads are separated by ';', or by ','
    # when every item is a named workload
    items = [w.strip() for w in args.workload.replace(";", ",").split(",") if w.strip()]
    if ";" in args.workload or all(":" not in w for w in items):
        args.workloads = [w.strip() for w in args.workload.split(";" if ";" in args.workload else ",") if w.strip()]
    else:
        args.workloads = [args.workload]
    if args.duration <= 0 or args.duration > 3600:
        parser.error("--duration: 0 < seconds <= 3600")
    return args


# --- helpers -------------------------------------------------------------------------------------


def venv_bin(name: str) -> str:
    for candidate in (Path(sys.executable).parent / name, ROOT / ".venv" / "bin" / name):
        if candidate.exists():
            return str(candidate)
    raise SystemExit(f"{name} not found next to {sys.executable} nor in .venv/bin (make venv)")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback only
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


# --- one locust run -----------------------------------------------------------------------------


def run_locust(args: argparse.Namespace, server: ServerProcess, run: str, workload: str, transport: str,
               users: int) -> dict[str, Any]:
    prefix = args.results_dir / run
    summary_path = Path(f"{prefix}_summary.json")
    for stale in (summary_path, Path(f"{prefix}_stats.csv"), Path(f"{prefix}.html")):
        stale.unlink(missing_ok=True)
    spawn = args.spawn_rate or users
    argv = [venv_bin("locust"), "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", f"{spawn:g}",
            "--run-time", f"{args.duration:g}s", "--stop-timeout", "10", "--host", server.url,
            "--csv", str(prefix), "--csv-full-history", "--html", f"{prefix}.html", "--only-summary",
            "--loglevel", "INFO", "--exit-code-on-error", "1",
            "--grpc-address", server.grpc_address, "--workload", workload, "--summary-json", str(summary_path),
            "--wait-ms", f"{args.wait_ms:g}", *(["--tolerate-overload"] if args.tolerate_overload else []),
            *USER_CLASSES[transport]]
    command = shlex.join(argv)
    load = wait_for_quiet(args.quiet_wait)["load"]
    print(f"\n== {run}: {users} users, {args.duration:g} s, workload {workload}, transport {transport}; "
          f"background CPU load before: {'n/a' if load is None else f'{load:.0%}'}", flush=True)
    print(f"   {command}", flush=True)
    # locust's own env vars (LOCUST_*) of the caller would change the run: drop them
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "ADVSERVE_"))}
    env["PYTHONUNBUFFERED"] = "1"
    started = time.monotonic()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = server.cpu_s()
    with open(f"{prefix}.log", "wb") as log:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
        try:
            rc = process.wait(timeout=args.duration + LOCUST_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: locust and nothing else
            process.wait()
            rc = -9
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    wall = time.monotonic() - started
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {"locust_cpu_s": (children_after.ru_utime + children_after.ru_stime
                            - children_before.ru_utime - children_before.ru_stime),
           "server_cpu_s": server.cpu_s() - server_before, "wall_s": wall}
    summary: dict[str, Any] = {}
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
    problems = []
    if rc != 0:
        problems.append(f"locust exited {rc}" + (" (killed: ran past its time)" if rc == -9 else ""))
    total = summary.get("total", {})
    if not summary:
        problems.append("no summary written (see the log)")
    else:
        if total.get("failures"):
            problems.append(f"{total['failures']} failed requests: " + "; ".join(summary["failure_samples"][:3]))
        if not total.get("requests"):
            problems.append("no successful request")
        if total.get("p95_ms", 0) > args.max_p95_ms:
            problems.append(f"p95 {total['p95_ms']:.1f} ms > --max-p95-ms {args.max_p95_ms:g}")
    for suffix in ("_stats.csv", ".html"):
        if not Path(f"{prefix}{suffix}").exists():
            problems.append(f"locust wrote no {prefix}{suffix}")
    csv_rows = read_stats_csv(Path(f"{prefix}_stats.csv"))
    for row in summary.get("requests", []):
        timing = ", ".join(f"{k} {v:.2f}" for k, v in row["server_timing_mean_ms"].items()) or "n/a"
        print(f"   {row['name']:<44} {row['requests']:6d} ok {row['failures']:4d} failed {row['rps']:8.1f} req/s "
              f"p50 {row['p50_ms']:8.2f} p95 {row['p95_ms']:8.2f} p99 {row['p99_ms']:8.2f} ms; "
              f"Server-Timing mean {timing}", flush=True)
    if total:
        print(f"   total: {total['requests']} ok, {total['failures']} failed, {total['rps']:.1f} req/s, "
              f"p95 {total['p95_ms']:.2f} ms ({wall:.1f} s wall; CPU: locust {cpu['locust_cpu_s'] / wall:.0%}, "
              f"server {cpu['server_cpu_s'] / wall:.0%} of one core)", flush=True)
    for problem in problems:
        print(f"   FAILURE: {problem}", flush=True)
    if problems:
        print(f"   locust log: {prefix}.log\n" + indent(tail(Path(f"{prefix}.log"), 2500)), flush=True)
    return {"run": run, "workload": workload, "transport": transport, "users": users, "command": command,
            "background_load_before": load, **cpu,
            "rc": rc, "summary": summary, "csv_aggregated": csv_rows.get("Aggregated"), "problems": problems}


def read_stats_csv(path: Path) -> dict[str, dict[str, str]]:
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def tail(path: Path, n: int) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def indent(text: str) -> str:
    return "\n".join("   | " + line for line in text.splitlines())


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| run | request | users | req/s | p50 ms | p95 ms | p99 ms | failed | Server-Timing mean ms "
             "(decode / queue / compute / encode) | CPU locust / server |", "|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for row in result["summary"].get("requests", []):
            t = row["server_timing_mean_ms"]
            timing = " / ".join(f"{t[k]:.2f}" for k in ("decode", "queue", "compute", "encode")) \
                if all(k in t for k in ("decode", "queue", "compute", "encode")) else "n/a"
            lines.append(f"| {result['run']} | {row['name']} | {result['users']} | {row['rps']:.1f} | "
                         f"{row['p50_ms']:.2f} | {row['p95_ms']:.2f} | {row['p99_ms']:.2f} | {row['failures']} | "
                         f"{timing} | {result['locust_cpu_s'] / result['wall_s']:.0%} / "
                         f"{result['server_cpu_s'] / result['wall_s']:.0%} |")
    return "\n".join(lines)


def machine() -> str:
    model = cpu_model()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return f"{usable} CPUs usable (nproc), {model}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    combos = list(itertools.product(args.workloads, args.transports, args.users_list))
    log_path = args.results_dir / f"{args.name}_server.log"
    log_path.unlink(missing_ok=True)
    server = ServerProcess(*args.server_arg, log_level=args.server_log_level, ready_path="/health/ready",
                           log_path=log_path)
    results: list[dict[str, Any]] = []
    problems: list[str] = []
    print(f"machine: {machine()}", flush=True)
    try:
        server.start(args.startup_timeout)
        print(f"server: {shlex.join(server.argv)} (log {server.log_path})", flush=True)
        for workload, transport, users in combos:
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in workload)
            run = args.name if len(combos) == 1 else f"{args.name}-{safe}-{transport}-u{users}"
            result = run_locust(args, server, run, workload, transport, users)
            results.append(result)
            problems += [f"{run}: {p}" for p in result["problems"]]
            if not server.alive():
                problems.append(f"server died during {run}:\n{server.log_tail()}")
                break
        if server.alive():
            status, _ = http_get(f"{server.url}/health/ready", 5.0)
            if status != 200:
                problems.append(f"server not ready after the load (GET /health/ready: {status})")
    except KeyboardInterrupt:
        problems.append("interrupted")
    except RuntimeError as exc:
        problems.append(str(exc))
    finally:
        server.stop()
    problems += [f"server log: {line}" for line in server.problems()[:10]]
    text = table(results)
    header = f"machine: {machine()}\nserver: {shlex.join(getattr(server, 'argv', []))}\n\n"
    (args.results_dir / f"{args.name}_table.md").write_text(header + text + "\n")
    (args.results_dir / f"{args.name}_runs.json").write_text(json.dumps(
        {"machine": machine(), "server": getattr(server, "argv", []), "runs": results}, indent=1))
    print("\n" + text)
    if problems:
        print("\nFAILED:\n" + "\n".join(f"  - {p}" for p in problems), flush=True)
        return 1
    print(f"\nOK: {len(results)} run(s), reports in {args.results_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
