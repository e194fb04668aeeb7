"""What the server benchmarks share: the machine and library versions they print, Server-Timing
parsing, result comparison against the in-process engine, latency summaries and failure collection.
(bench/ is on sys.path when a benchmark runs as `python bench/<name>.py`.)"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
from typing import Any, Callable

from advserve.testing import cpu_model, wait_for_quiet

REL_TOLERANCE = 1e-5  # max |got − ref| / max |ref| for an answer to count as equal to the in-process one
MIB = 1 << 20


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine(*dists: str) -> dict[str, Any]:
    """CPU, memory, Python, torch and advserve, plus the versions of `dists`."""
    import torch

    import advserve

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu_model": cpu_model(), "nproc": usable, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_num_threads": torch.get_num_threads(), "advserve": advserve.__version__,
            **{dist: version(dist) for dist in dists},
            "mem_total_mib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MIB}


def parse_server_timing(value: str | None) -> dict[str, float]:
    """{'decode': ms, 'queue': ms, 'compute': ms, 'encode': ms} from a Server-Timing value."""
    out: dict[str, float] = {}
    for part in (value or "").split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            try:
                out[name] = float(rest[4:])
            except ValueError:
                pass
    return out


def compare(what: str, got, ref) -> dict[str, Any]:
    """An answer against the in-process reference: ok when rel <= REL_TOLERANCE and all finite."""
    import numpy as np

    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return {"what": what, "ok": False, "error": f"shape {list(got.shape)} != {list(ref.shape)}"}
    diff = float(np.abs(got - ref).max()) if got.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    rel = diff / scale if scale > 0 else diff
    return {"what": what, "max_abs_diff": diff, "rel": rel,
            "ok": bool(rel <= REL_TOLERANCE and np.isfinite(got).all())}


def stats_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    return {"n": len(values), "p50": statistics.median(values), "p95": p95, "min": ordered[0], "max": ordered[-1]}


def median_timing(timings: list[dict[str, float]]) -> dict[str, float]:
    known = ["decode", "queue", "compute", "encode"]
    seen = {k for t in timings for k in t}
    keys = [k for k in known if k in seen] + sorted(seen - set(known))
    return {k: statistics.median([t[k] for t in timings if k in t]) for k in keys}


def fmt_timing(t: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in t.items()) + " ms" if t else "n/a"


class Failures:
    """Everything that went wrong (printed as it happens); a benchmark exits 1 when there is any."""

    def __init__(self):
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)
        print(f"  FAILURE: {message}", flush=True)

    def check(self, where: str, result: dict[str, Any]) -> None:
        if not result["ok"]:
            detail = result.get("error") or f"rel {result['rel']:.2e}"
            self.add(f"{where}: {result['what']}: {detail}")


def settler(loads: dict[str, Any], max_wait_s: float, once: bool) -> Callable[[str], None]:
    """A function to call before each timed part: it waits for a quiet CPU (recording the load in
    `loads[part]`) and warns when it never came; `once`: only before the first part (quick runs)."""

    def settle(part: str) -> None:
        if once and loads:
            return
        loads[part] = w = wait_for_quiet(max_wait_s)
        if not w["quiet"]:
            print(f"  warning: other processes keep {100 * w['load']:.0f}% of the CPUs busy before {part!r} "
                  f"(waited {w['waited_s']:.0f} s); timings are contended", flush=True)

    return settle


def finish(servers: list, failures: Failures, loads: dict[str, Any], commands: dict[str, str],
           results: dict[str, Any], out, started: float, correct_line: str) -> int:
    """The end of a server benchmark: server logs (kept only if they report errors), the commands run,
    the background load, the JSON results at `out`, and the exit status (1 for any failure)."""
    import json
    import sys
    import time
    from pathlib import Path

    for server in servers:
        problems = server.problems()
        if problems:
            failures.add(f"server {server.name} logged errors (log {server.log_path}):\n    "
                         + "\n    ".join(problems[:20]))
        else:
            Path(server.log_path).unlink(missing_ok=True)
    elapsed = time.perf_counter() - started
    print("\ncommands (each port a free loopback port picked at run time):")
    for name, line in commands.items():
        print(f"  {name:<14} {line}")
    busiest = max((w["load"] for w in loads.values() if w["load"] is not None), default=None)
    if busiest is not None:
        print(f"background CPU load before the parts (other processes): max {100 * busiest:.0f}%"
              f"{'' if busiest < 0.15 else '  <- CONTENDED: rerun on an idle machine'}")
    results.update({"commands": commands, "failures": failures.items, "correct": not failures.items,
                    "elapsed_s": elapsed, "background_load": loads, "rel_tolerance": REL_TOLERANCE})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {out} ({elapsed:.1f} s)")
    if failures.items:
        print(f"\n{len(failures.items)} FAILURE(S):", file=sys.stderr)
        for item in failures.items:
            print(f"  {item}", file=sys.stderr)
        return 1
    print(f"correctness: {correct_line} (rel <= {REL_TOLERANCE:g})")
    return 0
