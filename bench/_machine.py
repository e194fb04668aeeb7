"""What both benchmarks print about the machine, and their wait for a quiet CPU."""

from __future__ import annotations

import platform
import time
from typing import Any


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
    """Wait (up to max_wait_s) until other processes use less than `threshold` of the CPUs: two
    busy threads here contend with anything else on a 2-core box and the timings mean little."""
    start = time.perf_counter()
    load = background_load()
    while load is not None and load >= threshold and time.perf_counter() - start < max_wait_s:
        load = background_load(1.0)
    return {"load": load, "waited_s": time.perf_counter() - start, "quiet": load is None or load < threshold}
