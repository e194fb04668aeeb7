"""The real verl 0.9.1 and OpenRLHF 0.11.2 for the integration tests, installed by the suite itself.

Each is installed once per checkout, without its dependencies, into build/real-libraries/<name> by this
interpreter's pip (the package index is reachable wherever `make test` can install the project, CI
included); their other import-time dependencies are stubbed by tests/golden/verl_stub.py and
openrlhf_stub.py, and torch, numpy and PyYAML are the project venv's. The check scripts then run under
this interpreter with that directory first on the path. An install that fails fails the tests that need
it: nothing is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> the requirements installed --no-deps (omegaconf: verl's config; its own dependency is PyYAML)
REQUIREMENTS = {"verl": ("verl==0.9.1", "omegaconf==2.4.0"), "openrlhf": ("openrlhf==0.11.2",)}


def installed(name: str) -> Path:
    """The directory holding library `name` (REQUIREMENTS), installed into it now if it is not yet."""
    target = ROOT / "build" / "real-libraries" / name
    marker = target / ".requirements"
    wanted = "\n".join(REQUIREMENTS[name])
    if marker.exists() and marker.read_text() == wanted:
        return target
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--upgrade",
                    "--disable-pip-version-check", "--target", str(target), *REQUIREMENTS[name]],
                   check=True, timeout=600)
    marker.write_text(wanted)
    return target


def run(name: str, script: Path | str, *args: str, cwd: Path = ROOT, timeout: float = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`script` (a path under tests/) under this interpreter with library `name` first on the path."""
    path = os.pathsep.join([str(installed(name)), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={**os.environ, **(env or {}), "PYTHONPATH": path})
