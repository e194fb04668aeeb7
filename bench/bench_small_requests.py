"""Small requests: the time of each phase of an [8, 512] request in process, on the CPU or a GPU.

    .venv/bin/python bench/bench_small_requests.py                               # the CPU
    python3 bench/bench_small_requests.py --device cuda --kernels triton          # a GPU (device_check.sh)
    .venv/bin/python bench/bench_small_requests.py --quick                       # smoke run

Issue 14's target: an 8 x 512 GRPO request's compute at most 0.15 ms on a GPU. Per request, p50 over
`--repeats` runs: validation (`prepare_advantages(defer_checks=True)`, what a transport's thread does,
inputs given as host arrays as every transport gives them) and compute (`run_advantages`, the result
tensors copied to the host and the numbers read, its value checks with them: the compute thread's work
and the response's one sync). A loss request is one phase (its validation runs in its compute). Each
request with the `--kernels` given and with "torch" (the reference, same process). Written to
bench/results/small_requests-<device>.json (git-ignored). `bench_launches.py` counts the same phases'
kernel launches without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402
from advserve.device import copy_to_host  # noqa: E402
from advserve.engine import Engine  # noqa: E402
from advserve.model import AdvantageRequest, LossRequest  # noqa: E402


def requests(batch: int, width: int) -> dict[str, AdvantageRequest | LossRequest]:
    """Four small requests on host tensors: GRPO (verl), RLOO (paper), GAE (verl, whitened), and a
    ppo_clip + k3 KL loss (verl)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(width // 4, width + 1, (batch,), generator=g)
    mask = (torch.arange(width) < lengths[:, None]).float()
    rewards, ids = torch.randint(0, 2, (batch,), generator=g).float(), torch.arange(batch) // 4
    values = torch.randn(batch, width, generator=g) * mask
    logp = -torch.rand(batch, width, generator=g) * mask
    return {
        "grpo, verl": AdvantageRequest("grpo", {"response_mask": mask, "rewards": rewards, "group_ids": ids},
                                       preset="verl"),
        "rloo, paper": AdvantageRequest("rloo", {"response_mask": mask, "rewards": rewards, "group_ids": ids},
                                        preset="paper"),
        "gae, verl (whitened)": AdvantageRequest("gae", {"response_mask": mask, "rewards": rewards, "values": values},
                                                 preset="verl"),
        "ppo_clip + k3 KL loss, verl": LossRequest(
            {"response_mask": mask, "logprobs": logp, "old_logprobs": logp * 0.99, "ref_logprobs": logp * 1.01,
             "advantages": values}, preset="verl", kl_loss={"coef": 0.1}),
    }


def compute(engine: Engine, request: AdvantageRequest | LossRequest, prepared=None) -> None:
    """One request's compute phase, to its numbers and tensors on the host."""
    if isinstance(request, LossRequest):
        result = engine.compute_losses(request)
        tensors = [t for t in result.output_tensors().values() if t is not None]
    else:
        result = engine.run_advantages([prepared])[0]
        tensors = result.tensors()
    for copy in copy_to_host(tensors):
        copy.wait()
    if not isinstance(request, LossRequest):
        result.check()


def phases(engine: Engine, request: AdvantageRequest | LossRequest, repeats: int) -> dict[str, float]:
    """{validation, compute}: p50 milliseconds of each phase (validation None for a loss request)."""
    validation, computing = [], []
    for _ in range(repeats + 5):  # the first five warm up
        started = time.perf_counter()
        prepared = None if isinstance(request, LossRequest) else engine.prepare_advantages(request, defer_checks=True)
        validated = time.perf_counter()
        compute(engine, request, prepared)
        done = time.perf_counter()
        validation.append(validated - started)
        computing.append(done - validated)
    return {"validation": None if isinstance(request, LossRequest) else statistics.median(validation[5:]) * 1e3,
            "compute": statistics.median(computing[5:]) * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernels", default="auto", help="the engine's kernels setting (the reference: torch)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="20 repeats")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    repeats = 20 if args.quick else args.repeats
    info = machine()
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    print(f"{info['cpu_model']}, nproc {info['nproc']}, torch {info['torch']}{', ' + gpu if gpu else ''}; "
          f"[8, 512] float32 requests, p50 of {repeats}")
    rows = []
    settings = [args.kernels] + (["torch"] if args.kernels != "torch" else [])
    for name, request in requests(8, 512).items():
        row = {"request": name}
        for kernels in settings:
            engine = Engine(args.device, kernels=kernels)
            row[engine.kernels if kernels != "torch" else "torch"] = times = phases(engine, request, repeats)
            validation = "-" if times["validation"] is None else f"{times['validation']:.3f}"
            print(f"  {name:30s} kernels {engine.kernels:6s} validation {validation:>6s} ms, compute "
                  f"{times['compute']:.3f} ms")
        rows.append(row)
    out = args.out or Path(__file__).parent / "results" / f"small_requests-{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "gpu": gpu, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
