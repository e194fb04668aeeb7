"""Shared fixtures: real `advserve serve` processes on loopback ports the tests pick themselves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import settings

# CI runs every property test on the same examples (derandomized): a failure there is reproducible,
# never a coin toss; locally each run explores new examples.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """`advserve serve` on free loopback ports, its output in a log file (a pipe could fill and block
    it). The caller's ADVSERVE_* variables are dropped so that a developer's settings cannot leak in."""

    def __init__(self, *extra_args: str, env: dict[str, str] | None = None, scheme: str = "http",
                 verify=True, log_level: str = "warning", ready_path: str = "/health/live"):
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.grpc_port = free_port()
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.log_path = Path(tempfile.mkstemp(prefix="advserve-test-", suffix=".log")[1])
        cmd = [sys.executable, "-m", "advserve.cli", "serve", "--host", "127.0.0.1", "--http-port", str(self.port),
               "--grpc-port", str(self.grpc_port), "--log-level", log_level, *extra_args]
        clean = {k: v for k, v in os.environ.items() if not k.startswith("ADVSERVE_")}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL,
                                            env={**clean, "PYTHONUNBUFFERED": "1", **(env or {})})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early: {self.output()}")
            try:
                if httpx.get(f"{self.url}{ready_path}", timeout=1, verify=verify).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become ready within 60 s: {self.output()}")

    def output(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def problems(self) -> list[str]:
        """Log lines that report an error."""
        return [line for line in self.output().splitlines() if any(k in line for k in ("ERROR", "Traceback",
                                                                                      "CRITICAL"))]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def server():
    running = RunningServer()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
