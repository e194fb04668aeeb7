"""Smoke run of the load test (loadtest/run.py + loadtest/locustfile.py): a server on free loopback
ports, 20 s of locust with 6 users (binary REST, JSON REST and gRPC, two of each) sending small batches
of every estimator and /v1/losses; no failed request, p95 under a bound generous enough for a 2-core CI
machine, the CSV / HTML reports written.

locust monkey-patches the process with gevent, so it only ever runs in a subprocess: this module must
not import locust.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DURATION_S = 20
USERS = 6
MAX_P95_MS = 2000  # every request here is 8x512; on an idle 2-core box p95 is tens of ms


def test_loadtest_smoke(tmp_path):
    argv = [sys.executable, str(ROOT / "loadtest" / "run.py"), "--users", str(USERS), "--duration", str(DURATION_S),
            "--workload", "small-mix", "--transport", "all", "--max-p95-ms", str(MAX_P95_MS), "--name", "smoke",
            "--results-dir", str(tmp_path)]
    # run.py bounds locust itself (duration + 60 s) and always stops its server; this is the outer bound
    process = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=DURATION_S + 150)
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-6000:]

    for name in ("smoke_stats.csv", "smoke_stats_history.csv", "smoke_failures.csv", "smoke.html",
                 "smoke_summary.json", "smoke_table.md"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, f"{name} missing\n{output[-3000:]}"
    assert "<html" in (tmp_path / "smoke.html").read_text(errors="replace").lower()[:2000]

    with open(tmp_path / "smoke_stats.csv", newline="") as f:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    aggregated = rows.pop(("", "Aggregated"))
    assert int(aggregated["Failure Count"]) == 0 and int(aggregated["Request Count"]) > 0
    with open(tmp_path / "smoke_failures.csv", newline="") as f:
        assert list(csv.DictReader(f)) == []

    summary = json.loads((tmp_path / "smoke_summary.json").read_text())
    assert summary["total"]["failures"] == 0
    assert summary["total"]["p95_ms"] <= MAX_P95_MS
    by_transport: dict[str, int] = {}
    for row in summary["requests"]:
        transport = row["name"].split()[0]
        by_transport[transport] = by_transport.get(transport, 0) + row["requests"]
        if transport in ("bin", "json") and row["requests"]:  # REST responses carry Server-Timing
            assert set(row["server_timing_mean_ms"]) == {"decode", "queue", "compute", "encode"}, row
    assert set(by_transport) == {"bin", "json", "grpc"} and min(by_transport.values()) > 0, by_transport
    names = {row["name"] for row in summary["requests"]}
    for estimator in ("grpo", "dr_grpo", "rloo", "gae", "reinforce_pp"):  # each at least once over some transport
        assert any(f" {estimator} " in name for name in names), (estimator, sorted(names))
    assert any("losses" in name or "ComputeLosses" in name for name in names), sorted(names)
