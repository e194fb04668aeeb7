"""Tensors on the wire: framed buffers (`advserve_client.framing.RawTensor`) <-> torch, shared by
the REST and gRPC transports. Decoding is a view of the received bytes, never a copy."""

from __future__ import annotations

import warnings

import torch

from advserve_client.framing import RawTensor

from .device import copy_to_host
from .errors import InvalidArgument

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16, "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8,
                "bool": torch.bool}
WIRE_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


def buffer_to_torch(data, dtype: torch.dtype, shape: tuple[int, ...], name: str, field: str) -> torch.Tensor:
    """A torch view of little-endian bytes holding exactly `shape` of `dtype`: no copy (the engine never
    writes into its inputs). Bool bytes must be 0 or 1 (InvalidArgument naming `field`)."""
    if memoryview(data).nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the body is read-only bytes; nothing writes to it
        if dtype == torch.bool:
            as_bytes = torch.frombuffer(data, dtype=torch.uint8)
            if int(as_bytes.max()) > 1:
                raise InvalidArgument(f"tensor {name!r}: bool bytes must be 0 or 1", field=field)
            return as_bytes.view(torch.bool).view(shape)
        return torch.frombuffer(data, dtype=dtype).view(shape)


def raw_to_torch(name: str, raw: RawTensor) -> torch.Tensor:
    """A torch view of a framed buffer (`buffer_to_torch`)."""
    return buffer_to_torch(raw.data, TORCH_DTYPES[raw.dtype], raw.shape, name, f"tensors.{name}")


def torch_to_raw(tensor: torch.Tensor) -> RawTensor:
    """A framed buffer of `tensor`'s bytes: its own memory on the CPU (a copy only if it is not
    contiguous); from CUDA a pinned copy, waiting for that copy alone (`device.copy_to_host`)."""
    copy = copy_to_host([tensor])[0]
    copy.wait()
    return RawTensor(WIRE_DTYPES[copy.tensor.dtype], tuple(copy.tensor.shape), copy.bytes_view())
