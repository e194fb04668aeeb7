"""The CPU kernel's output pool in a trainer's process: GAE [256, 4096] in process, glibc's defaults.

    .venv/bin/python bench/bench_output_pool.py            # ~10 s
    .venv/bin/python bench/bench_output_pool.py --quick    # smoke run, [64, 1024]

A trainer calls `advserve.compute_advantages` between its own work, in a process whose allocator nobody
tuned (the server tunes glibc at start; this script does not). Each round runs other allocation work
first (the verl-style GAE loop of bench_engine.py, as a trainer's step would allocate), then times
`--repeats` engine calls (p50) and counts the minor page faults per call, with the kernel's output pool
(advserve.kernels.outputs.OUTPUTS) on and off in alternate rounds. The results are printed and written
to bench/results/output_pool.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import advserve  # noqa: E402
from advserve.kernels.outputs import OUTPUTS  # noqa: E402
from bench_engine import gae_inputs, gae_loop, machine  # noqa: E402


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="[64, 1024], 2 rounds each")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per setting (default 4; --quick 2)")
    parser.add_argument("--repeats", type=int, default=21, help="timed engine calls per round")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "output_pool.json")
    args = parser.parse_args()
    batch, width = (64, 1024) if args.quick else (256, 4096)
    rounds = args.rounds or (2 if args.quick else 4)
    x = gae_inputs(batch, width, torch.Generator().manual_seed(0), 0.0)
    info = machine(False, False)
    print(f"machine: {info['cpu_model']}, nproc {info['nproc']}, torch {info['torch']}; glibc defaults; "
          f"GAE [{batch}, {width}] float32, preset paper")

    def engine():
        return advserve.compute_advantages("gae", preset="paper", params={"gamma": 1.0, "lam": 0.95}, **x)

    results: dict[str, list[dict]] = {"pool": [], "no pool": []}
    for round_ in range(2 * rounds):
        setting = "pool" if round_ % 2 == 0 else "no pool"
        OUTPUTS.enabled = setting == "pool"
        gae_loop(x["token_rewards"], x["values"], x["response_mask"], 1.0, 0.95)  # the trainer's other work
        engine()
        times, before = [], faults()
        for _ in range(args.repeats):
            started = time.perf_counter()
            engine()
            times.append(time.perf_counter() - started)
        results[setting].append({"p50_ms": statistics.median(times) * 1e3,
                                 "faults_per_call": (faults() - before) / args.repeats})
    OUTPUTS.enabled = True
    for setting, rows in results.items():
        p50s = ", ".join(f"{r['p50_ms']:.2f}" for r in rows)
        flts = ", ".join(f"{r['faults_per_call']:.0f}" for r in rows)
        print(f"  {setting:<8} p50 per round: {p50s} ms; page faults per call: {flts}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "shape": [batch, width], "rounds": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
