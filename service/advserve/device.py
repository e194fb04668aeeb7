"""Where tensors live: device resolution and host <-> device copies.

CPU: no copies at all (a tensor already on the CPU is returned as is). CUDA: inputs go through
pinned host memory with non-blocking copies; results come back into pinned buffers, either at once
(`to_host`) or as copies on a side stream that a response writes out one by one as each lands
(`copy_to_host`); `host_scalars` brings many statistics back with one synchronization.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

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


@dataclass
class HostCopy:
    """One result tensor on its way to the host: `tensor` is contiguous host memory (pinned when it comes
    from a device), complete once `event` (None: nothing to wait for) has completed."""

    tensor: Tensor
    event: Any = None

    def done(self) -> bool:
        """Whether the bytes have landed (never blocks)."""
        return self.event is None or self.event.query()

    def wait(self) -> None:
        """Block until the bytes have landed (this copy only, not the device)."""
        if self.event is not None:
            self.event.synchronize()

    def bytes_view(self) -> memoryview:
        """The tensor's own bytes, little-endian C order, as a flat memoryview (no copy); read after `wait`."""
        tensor = self.tensor.view(torch.uint16) if self.tensor.dtype == torch.bfloat16 else self.tensor
        return memoryview(tensor.reshape(-1).numpy()).cast("B")


_side_streams: dict[int, Any] = {}
_side_streams_lock = threading.Lock()


def _side_stream(device: torch.device):
    """One copy stream per CUDA device, shared by every request (copies on it run in issue order)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _side_streams_lock:
        if index not in _side_streams:
            _side_streams[index] = torch.cuda.Stream(device=index)
        return _side_streams[index]


def copy_to_host(tensors: Sequence[Tensor], ready: Any = None) -> list[HostCopy]:
    """Start bringing `tensors` to the host, waiting for none of it: a CPU tensor is returned as it is
    (made contiguous: no copy when it already is); a CUDA tensor is copied into a pinned host buffer by
    a non-blocking copy on a side stream, with an event recorded after each copy, so that each buffer
    can be written out as soon as its own copy has landed while the next ones are still on the way
    (and the caller's stream is never synchronized). The copies start after `ready` (a CUDA event
    recorded when the tensors were computed; without one, the event `mark_ready` noted on the tensor), or
    failing both after all the work queued so far on the tensors' stream (which may include later
    requests' kernels)."""
    copies = []
    for tensor in tensors:
        after = ready if ready is not None else getattr(tensor, "_advserve_ready", None)  # `mark_ready`
        tensor = tensor.detach()
        if tensor.device.type != "cuda":
            copies.append(HostCopy(tensor.contiguous()))
            continue
        stream = _side_stream(tensor.device)
        if after is not None:
            stream.wait_event(after)
        else:
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        tensor.record_stream(stream)  # the allocator must not hand its memory out again before the copy has read it
        copies.append(HostCopy(host, event))
    return copies


def host_scalars(values: Mapping[str, Tensor | float | int | None]) -> dict[str, Any]:
    """Python numbers of a set of 0-d tensors (and numbers, passed through) with at most one device
    synchronization: the tensors of each device are flattened and copied together (float64, so float32
    and integer counts below 2**53 come back exact); a tensor of an integer or bool dtype comes back
    as an int; a 1-d tensor comes back as a list of them (what `tolist` gives). `fetch_scalars(...)
    .result()`."""
    return fetch_scalars(values).result()


class ScalarFetch:
    """`host_scalars`' numbers on their way to the host: `result()` waits for this copy alone (its
    event), not for whatever else has been queued on the device since."""

    def __init__(self, names: list[str], done: dict[str, Any], copies: list[tuple[list[str], list[Tensor], Tensor,
                                                                                 Any]]):
        self._names, self._done, self._copies = names, done, copies

    def result(self) -> dict[str, Any]:
        for names, tensors, host, event in self._copies:
            event.synchronize()
            numbers = host.tolist()
            start = 0
            for name, tensor in zip(names, tensors):
                cast = float if tensor.dtype.is_floating_point else int
                taken = [cast(number) for number in numbers[start:start + tensor.numel()]]
                start += tensor.numel()
                self._done[name] = taken[0] if tensor.ndim == 0 else taken
        self._copies = []
        return {name: self._done[name] for name in self._names}


def fetch_scalars(values: Mapping[str, Tensor | float | int | None]) -> ScalarFetch:
    """Start `host_scalars` without waiting: CPU tensors are read at once (nothing to synchronize); the
    tensors of a CUDA device are packed there (float64) and copied into pinned memory by one
    non-blocking copy on the current stream, with an event recorded after it."""
    done: dict[str, Any] = {}
    by_device: dict[torch.device, list[str]] = {}
    for name, value in values.items():
        if isinstance(value, Tensor):
            if value.ndim > 1:
                raise ValueError(f"host_scalars: {name!r} has {value.ndim} dimensions; 0-d or 1-d tensors only")
            by_device.setdefault(value.device, []).append(name)
        else:
            done[name] = value
    copies = []
    for device, names in by_device.items():
        tensors = [values[name].detach() for name in names]
        if device.type != "cuda":  # nothing to synchronize: each value as it is (what the copy gives)
            for name, tensor in zip(names, tensors):
                number = tensor.tolist()
                done[name] = number if tensor.dtype != torch.bool else (
                    int(number) if tensor.ndim == 0 else [int(n) for n in number])
            continue
        names, tensors, flat = packed_float64(names, tensors)
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        copies.append((names, tensors, host, event))
    return ScalarFetch(list(values), done, copies)


def packed_float64(names: Sequence[str], tensors: Sequence[Tensor]) -> tuple[list[str], list[Tensor], Tensor]:
    """(names, tensors, flat): 0-d and 1-d tensors of one device flattened into one float64 vector, in
    few kernels (one concatenation per dtype, one conversion each, one to join them: a small request's
    numbers are a dozen launches fewer than converting each), names and tensors reordered as `flat`
    holds them (grouped by dtype, in their order within a dtype)."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(i)
    order = [i for indices in by_dtype.values() for i in indices]
    parts = []
    for dtype, indices in by_dtype.items():
        part = [tensors[i].reshape(-1) for i in indices]
        part = part[0] if len(part) == 1 else torch.cat(part)
        parts.append(part.to(torch.float64))
    flat = parts[0] if len(parts) == 1 else torch.cat(parts)
    return [names[i] for i in order], [tensors[i] for i in order], flat


def mark_ready(tensors: Sequence[Tensor | None], event: Any) -> None:
    """Note on each tensor the CUDA event recorded after the work that computed it (the scheduler, after
    each job), so that `copy_to_host` without a `ready` waits for that job alone, not for later requests'
    kernels queued on the stream since. None entries and tensors off CUDA are skipped."""
    for tensor in tensors:
        if tensor is not None and tensor.device.type == "cuda":
            tensor._advserve_ready = event
