"""Where tensors live: device resolution and host <-> device copies.

CPU: no copies at all (a tensor already on the CPU is returned as is). CUDA: inputs go through
pinned host memory with non-blocking copies; results come back into pinned buffers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InvalidArgument


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None): CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgument(f"unknown device {device!r}: {exc}", field="device") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device 'cuda' requested but CUDA is not available", field="device")
    return resolved


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` on `device`; CPU -> CUDA through pinned memory, non-blocking."""
    if tensor.device == device or device.type != "cuda":
        return tensor.to(device)
    if tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def to_host(tensor: Tensor) -> Tensor:
    """`tensor` on the CPU; from CUDA into a pinned buffer, waiting for the copy to land."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host
