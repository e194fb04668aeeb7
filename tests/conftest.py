"""Shared fixtures: real `advserve serve` processes on loopback ports the tests pick themselves."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from hypothesis import settings

from advserve.testing import ServerProcess, free_port  # noqa: F401 (free_port: imported by tests)

# CI runs every property test on the same examples (derandomized): a failure there is reproducible,
# never a coin toss; locally each run explores new examples.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

ROOT = Path(__file__).resolve().parents[1]


class RunningServer(ServerProcess):
    """`advserve serve` on free loopback ports, started and live when constructed (advserve.testing).
    Every one still running at the end of the session is stopped, and every log file deleted."""

    started: list["RunningServer"] = []

    def __init__(self, *args: str, **kwargs):
        super().__init__(*args, **kwargs)
        RunningServer.started.append(self)
        self.start()


@pytest.fixture(scope="session", autouse=True)
def _remove_server_logs():
    yield
    for server in RunningServer.started:
        server.stop()
        server.remove_log()


@pytest.fixture(scope="session")
def server():
    running = RunningServer()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
