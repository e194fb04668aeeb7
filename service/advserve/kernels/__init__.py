"""Fused kernels for the engine's hot math: Triton on CUDA (optional: `pip install advserve[kernels]`),
numba on the CPU (`cpu`: GAE and reward-to-go with their validation in one pass).

The torch functions in `advserve.functional` are the reference; the kernels here compute the same
values in fewer passes. Which one runs is the engine's `kernels` setting, resolved once by
`resolve_kernels`:

  * "torch": always the torch path.
  * "triton": the Triton kernels; needs the triton package, and a CUDA device, or Triton's
    interpreter (TRITON_INTERPRET=1) for CPU tensors (slow: for testing the kernels without a GPU).
  * "numba": on a CPU device, the numba kernels of `cpu` where they apply, the torch path elsewhere.
  * "auto": "triton" when the engine's device is CUDA and triton imports, "numba" when it is the CPU
    and numba imports, else "torch".

This module imports neither triton nor numba; `scan` and `cpu` do (`scan` reads TRITON_INTERPRET then).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..errors import InvalidArgument

KERNEL_SETTINGS = ("auto", "torch", "triton", "numba")
_TRUE = ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the triton package can be imported."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install is an absent one
        return False
    return True


@functools.lru_cache(maxsize=1)
def numba_available() -> bool:
    """True when numba can be imported."""
    if importlib.util.find_spec("numba") is None:
        return False
    try:
        import numba  # noqa: F401
    except Exception:  # a broken install (numba and numpy versions that do not fit) is an absent one
        return False
    return True


def interpreting() -> bool:
    """True when Triton's interpreter is on (TRITON_INTERPRET, read as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def resolve_kernels(setting: str | None, device: torch.device) -> str:
    """"torch", "triton" or "numba": what the `kernels` setting means on `device`; an impossible
    "triton" or "numba" is an InvalidArgument naming the field `kernels`."""
    setting = "auto" if setting is None else setting
    if setting not in KERNEL_SETTINGS:
        raise InvalidArgument(f"kernels must be one of {', '.join(KERNEL_SETTINGS)}, got {setting!r}",
                              field="kernels")
    if setting == "torch":
        return "torch"
    if setting == "auto":
        if device.type == "cuda":
            return "triton" if triton_available() and not interpreting() else "torch"
        return "numba" if device.type == "cpu" and numba_available() else "torch"
    if setting == "numba":
        if not numba_available():
            raise InvalidArgument("kernels 'numba' needs the numba package (pip install numba); or use kernels "
                                  "'auto' or 'torch'", field="kernels")
        if device.type != "cpu":
            raise InvalidArgument(f"kernels 'numba' runs on the CPU, but the device is {device.type!r}: use "
                                  "kernels 'auto', 'torch' or 'triton'", field="kernels")
        return "numba"
    if not triton_available():
        raise InvalidArgument("kernels 'triton' needs the triton package (pip install 'advserve[kernels]'); "
                              "or use kernels 'auto' or 'torch'", field="kernels")
    if device.type != "cuda" and not interpreting():
        raise InvalidArgument(f"kernels 'triton' runs on CUDA tensors, but the device is {device.type!r}: use a "
                              "CUDA device, or kernels 'auto' or 'torch' (TRITON_INTERPRET=1 runs the kernels "
                              "on the CPU, slowly, for testing)", field="kernels")
    return "triton"
