"""Short smoke runs of the benchmarks: each runs, its correctness checks pass (speed is never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_quick(tmp_path: Path, name: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, Path]:
    """`bench/bench_<name>.py --quick --out <tmp>/<name>.json`: the process (asserted to exit 0) and the
    output path."""
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"bench_{name}.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, out


def test_bench_engine_quick(tmp_path):
    proc, out = run_quick(tmp_path, "engine")
    assert "correctness: all checks within" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["row"].split(",")[0] for r in rows} >= {"gae", "gae verl", "grpo sequence level", "grpo token level",
                                                      "losses", "gae openrlhf", "grpo trl batch std"}
    assert all(c["rel"] <= 1e-4 for r in rows for c in r["checks"])


def test_bench_output_pool_quick(tmp_path):
    proc, out = run_quick(tmp_path, "output_pool")
    rounds = json.loads(out.read_text())["rounds"]
    assert set(rounds) == {"pool", "no pool"} and all(len(r) == 2 for r in rounds.values())


def test_bench_launches_quick(tmp_path):
    """Every request counted on both paths; the Triton path launches fewer kernels for each."""
    proc, out = run_quick(tmp_path, "launches")
    rows = json.loads(out.read_text())["rows"]
    assert {r["request"].split(",")[0] for r in rows} == {"grpo", "rloo", "gae", "ppo_clip + k3 KL loss"}
    assert all(r["triton"]["compute"] < r["torch"]["compute"] for r in rows)


def test_bench_ray_quick(tmp_path):
    """One local Ray with Serve, an `advserve serve` beside it: every part runs, every answer is the
    in-process result (bench_ray exits 1 otherwise), the sharded ones bit for bit."""
    proc, out = run_quick(tmp_path, "ray", timeout=600)
    assert "all answers equal the in-process results" in proc.stdout
    results = json.loads(out.read_text())
    assert results["quick"] and set(results) >= {"handle", "ingress", "sharded"}
    assert results["sharded"]["bit_for_bit"] and results["sharded"]["grpo_batch_std_bit_for_bit"]


def test_bench_transport_quick(tmp_path):
    proc, out = run_quick(tmp_path, "transport", timeout=600)
    assert "correctness: every checked response matched" in proc.stdout
    assert out.exists()


def test_bench_oip_quick(tmp_path):
    proc, out = run_quick(tmp_path, "oip")
    assert "correctness: every answer matched the in-process result" in proc.stdout
    result = json.loads(out.read_text())
    assert result["correct"] and {"large", "small"} <= result.keys()


def test_bench_http_quick(tmp_path):
    proc, out = run_quick(tmp_path, "http")
    assert out.exists()


def test_bench_shm_quick(tmp_path):
    proc, out = run_quick(tmp_path, "shm")
    assert "correctness: every answer matched" in proc.stdout
    assert out.exists()
