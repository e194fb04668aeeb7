"""Running `advserve serve` as a real process, for the test suite, the benchmarks and the load test.

    server = ServerProcess("--max-tokens", "65536").start()   # free loopback ports, waits until live
    httpx.get(f"{server.url}/v1/estimators"); grpc.insecure_channel(server.grpc_address)
    server.stop()                                               # SIGTERM, then SIGKILL after 15 s

The server's output goes to a log file (a pipe could fill up and block it); the caller's ADVSERVE_*
variables are dropped so a developer's settings cannot leak in. Also the machine facts the
benchmarks print and their wait for a quiet CPU (a 2-core box shared with anything else gives
meaningless timings). Standard library only, so that every script can import it.
"""

from __future__ import annotations

import os
import platform
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

LOG_PROBLEMS = ("ERROR", "Traceback", "CRITICAL")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process may take it before it is bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def advserve_command() -> list[str]:
    """How to start this installation's `advserve`: the module of the running interpreter."""
    return [sys.executable, "-m", "advserve.cli"]


def _http_status(url: str, timeout: float, verify: bool | ssl.SSLContext) -> int:
    if isinstance(verify, ssl.SSLContext):
        context = verify
    else:
        context = None if verify else ssl._create_unverified_context()  # noqa: S323 - self-signed test certs
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310 - loopback
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return 0


class ServerProcess:
    """An `advserve serve` process (or any server started by `argv`) on free loopback ports.

    args: extra `advserve serve` flags. env: variables added to the scrubbed environment. scheme and
    verify: for a TLS server (False accepts any certificate; an SSLContext is used as it is). ready_path: polled until 200.
    argv: instead of `advserve serve`, a function (http_port, grpc_port) -> command line.
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None, scheme: str = "http", verify: bool | ssl.SSLContext = True,
                 log_level: str = "warning", ready_path: str = "/health/live", name: str = "advserve",
                 argv: Callable[[int, int], list[str]] | None = None, log_path: Path | None = None):
        self.args, self.extra_env, self.scheme, self.verify = args, env or {}, scheme, verify
        self.log_level, self.ready_path, self.name, self.argv_of = log_level, ready_path, name, argv
        if log_path is None:
            fd, path = tempfile.mkstemp(prefix=f"advserve-{name}-", suffix=".log")
            os.close(fd)
            log_path = Path(path)
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None
        self.port = self.grpc_port = 0
        self.argv: list[str] = []

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def command(self, http_port: int, grpc_port: int) -> list[str]:
        if self.argv_of is not None:
            return self.argv_of(http_port, grpc_port)
        # one process unless the caller asks for workers (their --workers comes later and wins)
        return [*advserve_command(), "serve", "--host", "127.0.0.1", "--http-port", str(http_port),
                "--grpc-port", str(grpc_port), "--log-level", self.log_level, "--workers", "1", *self.args]

    def environment(self) -> dict[str, str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("ADVSERVE_")}
        return {**clean, "PYTHONUNBUFFERED": "1", **self.extra_env}

    def command_line(self) -> str:
        """The command as a shell line, with the variables this process adds."""
        env = " ".join(f"{k}={v}" for k, v in self.extra_env.items())
        return (env + " " if env else "") + shlex.join(self.argv)

    def start(self, timeout_s: float = 60.0) -> "ServerProcess":
        """Start and wait until `ready_path` answers 200; retried on new ports if one was taken."""
        for _attempt in range(3):
            self.port, self.grpc_port = free_port(), free_port()
            self.argv = self.command(self.port, self.grpc_port)
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=self.environment())
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.process.poll() is None:
                if _http_status(f"{self.url}{self.ready_path}", 1.0, self.verify) == 200:
                    return self
                time.sleep(0.05)
            if self.process.poll() is None:
                self.stop()
                raise RuntimeError(f"{self.name} not ready within {timeout_s:.0f} s:\n{self.log_tail()}")
            if "address already in use" not in self.log_tail().lower():
                break
        raise RuntimeError(f"{self.name} exited at start (rc {self.process.returncode}):\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM (the server drains), SIGKILL if it is still there after 15 s."""
        if not self.alive():
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

    def remove_log(self) -> None:
        """Delete the log file (after `stop`, once nobody needs the output)."""
        self.log_path.unlink(missing_ok=True)

    def output(self) -> str:
        """Everything the server printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 4000) -> str:
        return self.output()[-n:]

    def problems(self) -> list[str]:
        """Log lines that report an error."""
        return [line for line in self.output().splitlines() if any(k in line for k in LOG_PROBLEMS)]

    def cpu_s(self) -> float:
        """CPU seconds the process has used (user + system); NaN where /proc is not readable."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, AssertionError):
            return float("nan")

    def status_kb(self, field: str) -> int | None:
        """A kB field of /proc/PID/status (VmRSS, VmHWM), None where unreadable."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except (OSError, ValueError, AssertionError):
            return None
        return None


# --- the machine --------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]), idle


def background_load(window_s: float = 0.3) -> float | None:
    """Share of all CPUs busy over `window_s` while this process sleeps (other processes' load)."""
    try:
        total0, idle0 = _cpu_times()
        time.sleep(window_s)
        total1, idle1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return 1.0 - (idle1 - idle0) / total if total > 0 else None


def wait_for_quiet(max_wait_s: float, threshold: float = 0.15) -> dict[str, Any]:
    """Wait (up to max_wait_s) until other processes use less than `threshold` of the CPUs."""
    start = time.perf_counter()
    load = background_load()
    while load is not None and load >= threshold and time.perf_counter() - start < max_wait_s:
        load = background_load(1.0)
    return {"load": load, "waited_s": time.perf_counter() - start, "quiet": load is None or load < threshold}


def start_local_ray(**init_kwargs: Any) -> Any:
    """`ray.init(**init_kwargs)` for a local test cluster, tried twice: on a busy small machine Ray's raylet
    sometimes fails to register with its GCS within Ray's fixed 30 s ("The current node timed out during
    startup"), a start-up failure of Ray's own that a second start does not repeat. Any other error,
    or the same one twice, is raised."""
    import ray

    try:
        return ray.init(**init_kwargs)
    except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this one
        if "timed out during startup" not in str(exc):
            raise
        print(f"advserve.testing: Ray did not start ({exc}); starting it again", file=sys.stderr, flush=True)
        ray.shutdown()
        return ray.init(**init_kwargs)


__all__: Sequence[str] = ("ServerProcess", "free_port", "start_local_ray", "advserve_command", "cpu_model", "background_load",
                          "wait_for_quiet")
