"""Ray Serve benchmark (advserve.ray, docs/deploy.md): what the Serve paths cost against the engine in
process and against `advserve serve`, and what a second replica gives a sharded batch.

    .venv/bin/python bench/bench_ray.py            # about 2-3 min on an idle 2-core box
    .venv/bin/python bench/bench_ray.py --quick    # smoke run: small sizes, fewer repeats

One local Ray (`ray.init(num_cpus=2)`, no dashboard), Serve's HTTP proxy on a free loopback port, the
application of advserve.ray (replicas of one CPU each, the engine on the CPU), and an `advserve serve
--workers 1` process for the comparison. Parts, medians of --repeat calls, each pair timed alternately:

  1. Handle call overhead: `RayClient(...).compute_advantages` (one replica) against
     `advserve.compute_advantages` in this process: GRPO [8, 256] (one group), and GAE [256, 4096]
     float32 (rewards, values, mask: 8.4 MB in, 8.4 MB out). Overhead = handle − in process.
  2. Ingress: `advserve_client.Client` (binary framing) through Serve's HTTP proxy to a replica against
     the same client to `advserve serve`: the GRPO [8, 256] request and POST /v1/losses [256, 4096]
     (logprobs, old_logprobs, advantages float32, bool mask: 13.6 MB in, 4.2 MB out). Ratio Serve / serve.
  3. Sharded throughput: GAE [512, 4096] float32 with whitening (two passes), 1 replica and shards=1
     against 2 replicas and shards=2; the sharded result is checked bit for bit against the one call,
     and so is a sharded GRPO with the batch's std (TRL's scale_rewards='batch': a batch statistic
     sent with the shards) on 4,096 sequences of 64 groups.

Every answer is checked against the in-process result (exit 1 on a mismatch). Results go to
bench/results/ray.json (git-ignored; --out to choose).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from _common import compare, machine  # noqa: E402 (bench/ on sys.path)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "ray.json"


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """(median ms over `repeat` calls after one warm-up, the last result)."""
    result = fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def alternate(a: Callable[[], Any], b: Callable[[], Any], repeat: int) -> tuple[float, float, Any, Any]:
    """Medians (ms) of a and b timed alternately, one warm-up each, and their last results."""
    ra, rb = a(), b()
    ta, tb = [], []
    for _ in range(repeat):
        for fn, out in ((a, ta), (b, tb)):
            start = time.perf_counter()
            result = fn()
            out.append((time.perf_counter() - start) * 1e3)
            if fn is a:
                ra = result
            else:
                rb = result
    return statistics.median(ta), statistics.median(tb), ra, rb


def load() -> str:
    """The 1-minute load average over the CPUs (other processes share them: timings are contended above ~0.2)."""
    import os

    return f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"


def batches(quick: bool, rng: np.random.Generator) -> dict[str, dict[str, Any]]:
    b, t = (64, 1024) if quick else (256, 4096)
    mask = np.arange(t) < rng.integers(t // 8, t + 1, b)[:, None]
    small_mask = np.ones((8, 256), bool)
    logp = (rng.standard_normal((b, t)).astype(np.float32) - 2) * mask
    big_b = b * 2
    big_mask = np.arange(t) < rng.integers(t // 8, t + 1, big_b)[:, None]
    return {
        "grpo_small": dict(rewards=rng.integers(0, 2, 8).astype(np.float32), response_mask=small_mask,
                           group_ids=np.zeros(8, np.int64)),
        "gae": dict(rewards=rng.standard_normal(b).astype(np.float32),
                    values=(rng.standard_normal((b, t)).astype(np.float32)) * mask, response_mask=mask),
        "losses": dict(logprobs=logp, old_logprobs=logp + np.float32(0.05) * rng.standard_normal((b, t),
                                                                                                  np.float32) * mask,
                       advantages=rng.standard_normal((b, t)).astype(np.float32) * mask, response_mask=mask),
        "grpo_batch_std": dict(rewards=rng.random(4096).astype(np.float32), response_mask=np.ones((4096, 64), bool),
                               group_ids=rng.permutation(np.repeat(np.arange(64), 64))),
        "gae_big": dict(rewards=rng.standard_normal(big_b).astype(np.float32),
                        values=rng.standard_normal((big_b, t)).astype(np.float32) * big_mask, response_mask=big_mask),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS})")
    args = parser.parse_args()
    repeat = args.repeat or (3 if args.quick else 15)
    started = time.perf_counter()

    import ray
    from ray import serve

    import advserve
    from advserve.ray import RayClient
    from advserve.ray.deployment import Options, deployment
    from advserve.testing import ServerProcess, free_port, start_local_ray
    from advserve_client import Client

    import torch

    torch.set_num_threads(1)  # as a replica of one CPU runs (Ray sets OMP_NUM_THREADS=1 there)
    info = machine("ray")
    print("machine:", json.dumps(info), flush=True)
    rng = np.random.default_rng(0)
    data = batches(args.quick, rng)
    failures: list[str] = []
    results: dict[str, Any] = {"machine": info, "quick": args.quick, "repeat": repeat}

    def check(where: str, got: Any, ref: Any) -> None:
        outcome = compare(where, got, ref)
        if not outcome["ok"]:
            failures.append(f"{where}: {outcome}")
            print(f"  FAILURE {where}: {outcome}", flush=True)

    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    http_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    settings = {"device": "cpu", "kernels": "auto"}  # the in-process references below use "auto" too

    def deploy(replicas: int) -> None:
        options = Options(num_replicas=replicas, num_cpus=1.0, max_ongoing_requests=2)
        serve.run(deployment(options).bind(settings), name="advserve", route_prefix="/")

    server = ServerProcess("--device", "cpu", "--kernels", "auto", name="bench-ray-serve").start()
    try:
        deploy(1)
        handle = RayClient("advserve", timeout=120.0)

        print(f"\n1. handle call vs in process (1 replica); load average {load()}", flush=True)
        part1 = {}
        for name, estimator in (("grpo_small", "grpo"), ("gae", "gae")):
            batch = data[name]
            local, remote, ref, got = alternate(lambda: advserve.compute_advantages(estimator, **batch),
                                                lambda: handle.compute_advantages(estimator, **batch), repeat)
            check(f"handle {name}", got.advantages, ref.advantages)
            shape = list(batch["response_mask"].shape)
            part1[name] = {"shape": shape, "in_process_ms": local, "handle_ms": remote, "overhead_ms": remote - local,
                           "ratio": remote / local}
            print(f"  {estimator} {shape}: in process {local:.2f} ms, handle {remote:.2f} ms "
                  f"(+{remote - local:.2f} ms, x{remote / local:.2f})", flush=True)
        results["handle"] = part1

        print(f"\n2. Serve's HTTP proxy vs advserve serve (advserve_client.Client, binary framing); load average "
              f"{load()}", flush=True)
        part2 = {}
        with Client(f"127.0.0.1:{http_port}") as via_serve, Client(server.url) as direct:
            cases = (("grpo_small", lambda c: c.compute_advantages("grpo", **data["grpo_small"]).advantages,
                      advserve.compute_advantages("grpo", **data["grpo_small"]).advantages),
                     ("losses", lambda c: c.compute_losses(preset="verl", **data["losses"]).grad_logprobs,
                      advserve.compute_losses(preset="verl", **data["losses"]).grad_logprobs))
            for name, call, ref in cases:
                t_serve, t_direct, got_serve, got_direct = alternate(lambda: call(via_serve), lambda: call(direct),
                                                                     repeat)
                check(f"serve proxy {name}", got_serve, ref)
                check(f"advserve serve {name}", got_direct, ref)
                shape = list(data[name]["response_mask"].shape)
                part2[name] = {"shape": shape, "serve_proxy_ms": t_serve, "advserve_serve_ms": t_direct,
                               "ratio": t_serve / t_direct, "extra_ms": t_serve - t_direct}
                print(f"  {name} {shape}: Serve proxy {t_serve:.2f} ms, advserve serve {t_direct:.2f} ms "
                      f"(x{t_serve / t_direct:.2f}, +{t_serve - t_direct:.2f} ms)", flush=True)
        results["ingress"] = part2

        print(f"\n3. sharded GAE with whitening: 1 replica (one call) vs 2 replicas (shards=2); load average "
              f"{load()}", flush=True)
        batch = data["gae_big"]
        params = {"whiten": True}
        ref = advserve.compute_advantages("gae", params=params, **batch).advantages
        sharded_client = RayClient("advserve", shards=2, timeout=120.0)
        one_ms, one = timed(lambda: handle.compute_advantages("gae", params=params, **batch), repeat)
        split_ms, _ = timed(lambda: sharded_client.compute_advantages("gae", params=params, **batch), repeat)
        deploy(2)
        two_ms, two = timed(lambda: sharded_client.compute_advantages("gae", params=params, **batch), repeat)
        check("1 replica", one.advantages, ref)
        if two.advantages.tobytes() != ref.tobytes():
            failures.append("2 replicas, shards=2: not the one-call result bit for bit")
        grpo = data["grpo_batch_std"]
        grpo_one = advserve.compute_advantages("grpo", preset="trl", params={"std_scope": "batch"}, **grpo)
        grpo_two = sharded_client.compute_advantages("grpo", preset="trl", params={"std_scope": "batch"}, **grpo)
        grpo_exact = grpo_two.advantages.tobytes() == grpo_one.advantages.tobytes()
        if not grpo_exact:
            failures.append("GRPO batch std, 2 replicas, shards=2: not the one-call result bit for bit")
        shape = list(batch["response_mask"].shape)
        results["sharded"] = {"shape": shape, "one_replica_ms": one_ms, "one_replica_shards2_ms": split_ms,
                              "two_replicas_shards2_ms": two_ms, "speedup": one_ms / two_ms,
                              "bit_for_bit": two.advantages.tobytes() == ref.tobytes(),
                              "grpo_batch_std_bit_for_bit": grpo_exact}
        print(f"  gae {shape} whiten: 1 replica {one_ms:.1f} ms (shards=2 on it: {split_ms:.1f} ms), "
              f"2 replicas shards=2 {two_ms:.1f} ms (x{one_ms / two_ms:.2f} throughput; bit for bit: "
              f"{two.advantages.tobytes() == ref.tobytes()})", flush=True)
        print(f"  grpo {list(grpo['response_mask'].shape)} std_scope batch, shards=2: bit for bit {grpo_exact}",
              flush=True)
    finally:
        server.stop()
        serve.shutdown()
        ray.shutdown()

    results["elapsed_s"] = time.perf_counter() - started
    results["failures"] = failures
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nadvserve serve: {' '.join(server.argv)}\nresults: {args.out} ({results['elapsed_s']:.0f} s)")
    print("FAILED" if failures else "all answers equal the in-process results")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
