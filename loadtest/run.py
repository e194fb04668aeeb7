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
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

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


# --- the server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class Server:
    def __init__(self, log_path: Path, extra: list[str], log_level: str):
        self.log_path, self.extra, self.log_level = log_path, extra, log_level
        self.process: subprocess.Popen | None = None
        self.http_port = self.grpc_port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout_s: float) -> None:
        for _attempt in range(3):  # a port found free can be taken before the server binds it
            self.http_port, self.grpc_port = free_port(), free_port()
            self.argv = [venv_bin("advserve"), "serve", "--host", "127.0.0.1", "--http-port", str(self.http_port),
                         "--grpc-port", str(self.grpc_port), "--log-level", self.log_level, *self.extra]
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(self.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=self.env())
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.process.poll() is None:
                if http_get(f"{self.url}/health/ready", 1.0)[0] == 200:
                    return
                time.sleep(0.1)
            if self.process.poll() is None:
                self.stop()
                raise RuntimeError(f"server not ready within {timeout_s:.0f} s:\n{self.log_tail()}")
            if "address already in use" not in self.log_tail().lower():
                break
        raise RuntimeError(f"server exited at start (rc {self.process.returncode}):\n{self.log_tail()}")

    @staticmethod
    def env() -> dict[str, str]:
        """The caller's environment without ADVSERVE_* settings (an auth token, limits, a device): the
        server runs with its defaults and the flags given here."""
        return {**{k: v for k, v in os.environ.items() if not k.startswith("ADVSERVE_")}, "PYTHONUNBUFFERED": "1"}

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if not self.alive():
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

    def cpu_s(self) -> float:
        """CPU seconds the server has used (user + system), NaN where /proc is not readable."""
        try:
            with open(f"/proc/{self.process.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, AttributeError):
            return float("nan")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def log_problems(self) -> list[str]:
        return [line for line in self.log_tail(1 << 22).splitlines()
                if any(k in line for k in ("ERROR", "Traceback", "CRITICAL"))]


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]  # total, idle + iowait


def background_load(max_wait_s: float, threshold: float = 0.15) -> float | None:
    """Share of all CPUs busy (other processes: the idle server uses none) over 0.5 s windows, waiting
    up to max_wait_s for it to drop below threshold; None where /proc/stat is not readable."""
    deadline = time.monotonic() + max_wait_s
    while True:
        try:
            total0, idle0 = _cpu_times()
            time.sleep(0.5)
            total1, idle1 = _cpu_times()
        except (OSError, ValueError, IndexError):
            return None
        load = 1.0 - (idle1 - idle0) / max(1, total1 - total0)
        if load < threshold or time.monotonic() >= deadline:
            return load


# --- one locust run -----------------------------------------------------------------------------


def run_locust(args: argparse.Namespace, server: Server, run: str, workload: str, transport: str,
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
    load = background_load(args.quiet_wait)
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
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return f"{usable} CPUs usable (nproc), {model}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    combos = list(itertools.product(args.workloads, args.transports, args.users_list))
    server = Server(args.results_dir / f"{args.name}_server.log", args.server_arg, args.server_log_level)
    server.log_path.unlink(missing_ok=True)
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
    problems += [f"server log: {line}" for line in server.log_problems()[:10]]
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
