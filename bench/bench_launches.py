"""Kernel launches per small request, as a GPU would run it: the launch overhead a small batch pays.

    .venv/bin/python bench/bench_launches.py            # a few seconds
    .venv/bin/python bench/bench_launches.py --quick    # the same (the counts do not depend on the machine)

On a GPU each kernel launch costs microseconds of host time whatever its size, so a small request's
compute time is about its launches (issue 14: an 8 x 512 GRPO request's compute at most 0.15 ms). This
counts them without a GPU: the engine takes the device's branches (`host_reads_are_free` False: nothing
read on the host but the one fetch of its numbers, its value checks read with them) on CPU tensors, the
Triton kernels under Triton's interpreter (TRITON_INTERPRET=1, set here before triton is imported).
Counted: each Triton launch, and each torch operation outside them that is not a view or an allocation
(`NOT_KERNELS`), the packing of the numbers a device's fetch does included (not its one copy to the host).
Two phases per request: validation (`prepare_advantages` with `defer_checks`: the transport's thread) and
compute (`run_advantages` to the numbers and tensors on the host: the compute thread and the response).
Each request with kernels "torch" (the reference, in the same process) and "triton" (what a GPU runs by
default). Printed, and written to bench/results/launches.json (git-ignored).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run on CPU tensors

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Iterator  # noqa: E402

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402
from advserve import engine as engine_module  # noqa: E402
import torch  # noqa: E402
from advserve.device import copy_to_host, packed_float64  # noqa: E402
from advserve.engine import Engine  # noqa: E402
from advserve.functional import masks  # noqa: E402
from advserve.model import AdvantageRequest, LossRequest  # noqa: E402
from bench_small_requests import requests  # noqa: E402, F401 (the requests counted, also for the tests)

# torch operations that launch no kernel: views, allocations, and the interpreter's own copies
NOT_KERNELS = ("detach", "alias", "view", "_unsafe_view", "slice", "select", "unsqueeze", "expand", "as_strided",
               "empty", "new_empty", "empty_like", "set_", "lift_fresh")


@contextlib.contextmanager
def launches() -> Iterator[SimpleNamespace]:
    """Count the kernels launched in the block: `.triton` (launches of interpreted Triton kernels),
    `.torch` (torch operations but views and allocations, outside the Triton launches) and `.ops`
    (those torch operations' names)."""
    from triton.runtime.interpreter import InterpretedFunction

    counted = SimpleNamespace(triton=0, torch=0, ops=[])
    inside = [False]

    class Torch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not inside[0] and (name if name == "set_" else name.rstrip("_")) not in NOT_KERNELS:
                counted.torch += 1
                counted.ops.append(name)
            return func(*args, **(kwargs or {}))

    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        counted.triton += 1
        inside[0] = True
        try:
            return original(self, *args, **kwargs)
        finally:
            inside[0] = False

    InterpretedFunction.run = run
    try:
        with Torch():
            yield counted
    finally:
        InterpretedFunction.run = original


@contextlib.contextmanager
def as_on_a_gpu() -> Iterator[None]:
    """The engine's branches for a device where a host read is a sync, and its fetch of the numbers
    packing them as on a device (`device.packed_float64`; on the CPU it reads them as they are)."""
    saved = masks.host_reads_are_free, engine_module.host_reads_are_free, engine_module.fetch_scalars

    def fetch_scalars(values):
        tensors = {name: value for name, value in values.items() if isinstance(value, torch.Tensor)}
        if tensors:  # the kernels a device's fetch launches before its one copy to the host
            packed_float64(list(tensors), list(tensors.values()))
        return saved[2](values)

    masks.host_reads_are_free = engine_module.host_reads_are_free = lambda device: False
    engine_module.fetch_scalars = fetch_scalars
    try:
        yield
    finally:
        masks.host_reads_are_free, engine_module.host_reads_are_free, engine_module.fetch_scalars = saved


def count(kernels: str, request: AdvantageRequest | LossRequest) -> dict[str, int]:
    """{validation, compute}: kernels launched by each phase of `request` (see the module docstring)."""
    engine = Engine("cpu", kernels=kernels)
    with as_on_a_gpu():
        if isinstance(request, LossRequest):
            engine.compute_losses(request)  # warm: one-time work is no request's
            with launches() as compute:
                result = engine.compute_losses(request)
                copy_to_host([t for t in result.output_tensors().values() if t is not None])
            return {"validation": 0, "compute": compute.triton + compute.torch, "triton": compute.triton,
                    "note": "validation is part of compute_losses"}
        engine.compute_advantages(request)
        with launches() as validation:
            prepared = engine.prepare_advantages(request, defer_checks=True)
        with launches() as compute:
            result = engine.run_advantages([prepared])[0]
            copy_to_host(result.tensors())
            result.check()
    return {"validation": validation.triton + validation.torch, "compute": compute.triton + compute.torch,
            "triton": compute.triton}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the same run (kept for `make bench`'s smoke test)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "launches.json")
    args = parser.parse_args()
    info = machine()
    print(f"torch {info['torch']}, advserve {info['advserve']}; the device's branches on CPU tensors, Triton "
          "interpreted; kernel launches per request [8, 512] float32")
    rows = []
    for name, request in requests(8, 512).items():
        torch_path, triton_path = count("torch", request), count("triton", request)
        rows.append({"request": name, "torch": torch_path, "triton": triton_path})
        print(f"  {name:32s} validation: torch path {torch_path['validation']:3d}, triton {triton_path['validation']:3d}"
              f" | compute: torch path {torch_path['compute']:3d}, triton {triton_path['compute']:3d} "
              f"({triton_path['triton']} Triton), {torch_path['compute'] / max(triton_path['compute'], 1):.1f}x fewer")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
