"""Shared fixtures: real `advserve serve` processes on loopback ports the tests pick themselves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, *extra_args: str, env: dict[str, str] | None = None, scheme: str = "http",
                 verify=True):
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.grpc_port = free_port()
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        cmd = [sys.executable, "-m", "advserve.cli", "serve", "--host", "127.0.0.1", "--http-port", str(self.port),
               "--grpc-port", str(self.grpc_port), "--log-level", "warning", *extra_args]
        self.process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early: {self.process.stdout.read().decode()}")
            try:
                if httpx.get(f"{self.url}/health/live", timeout=1, verify=verify).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not become live within 60 s")

    def output(self) -> str:
        """Everything the server printed (after it stopped)."""
        return self.process.stdout.read().decode(errors="replace")

    def stop(self) -> None:
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
