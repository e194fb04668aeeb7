"""Tensors in shared-memory regions for the native transports (REST /v1 and native gRPC): a request's
tensor may name a region of the server's registry (`shm.Regions`, registered through /v2) instead of
carrying bytes (`advserve_client.framing.RegionRef`), and a request may ask that every output be
written into a region ("shared_memory_outputs" / `output_shared_memory`), the response then naming
where each output lies. Errors name the field: `tensors.<name>` for an input, `shared_memory_outputs`
(or its key) for the outputs."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from advserve_client.framing import OUTPUTS_KEY, RawTensor, RegionRef

from ..errors import InvalidArgument
from ..shm import Regions
from ..wire import TORCH_DTYPES, WIRE_DTYPES, raw_to_torch

SNAPSHOT = ("cu_seqlens", "group_ids")
"""Index tensors copied out of a region when read: the caller can write its region at any time, and
these are validated once and then used as indices (the others are only values)."""

Target = tuple[str, int, int]  # (region, offset, byte_size) of the outputs


def resolve(regions: Regions | None, raw: Mapping[str, Any], charge: Callable[[int], None] | None = None,
            ) -> dict[str, Any]:
    """{name: torch tensor, or an inline list as it came}: body buffers viewed (`raw_to_torch`), region
    references read from the registry (views of the region, or copies charged to `charge` where the
    registry cannot map it; `SNAPSHOT` tensors copied)."""
    tensors: dict[str, Any] = {}
    for name, tensor in raw.items():
        if isinstance(tensor, RegionRef):
            tensors[name] = read(regions, name, tensor, charge)
        elif isinstance(tensor, RawTensor):
            tensors[name] = raw_to_torch(name, tensor)
        else:
            tensors[name] = tensor
    return tensors


def read(regions: Regions | None, name: str, ref: RegionRef, charge: Callable[[int], None] | None = None,
         ) -> torch.Tensor:
    """The tensor `name` that `ref` points at (InvalidArgument naming tensors.<name>: an unknown region,
    bytes past its end, a byte size that is not the shape's)."""
    field = f"tensors.{name}"
    tensor = _registry(regions, field).read(ref.region, ref.offset, ref.byte_size, dtype=TORCH_DTYPES[ref.dtype],
                                           shape=ref.shape, field=field, charge=charge)
    return tensor.clone() if name in SNAPSHOT else tensor


def check_target(regions: Regions | None, target: Target) -> None:
    """Before the compute: the outputs' region exists and holds [offset, offset + byte_size) (whether
    the outputs fit: `advantages_room` before the compute, `write_outputs` after it)."""
    region, offset, byte_size = target
    _registry(regions, OUTPUTS_KEY).check(region, offset, byte_size, field=OUTPUTS_KEY)


def advantages_room(target: Target | None, prepared: Any) -> None:
    """Before the compute of a prepared advantage request whose outputs go to a region: advantages and
    returns, [B, T] each ([N] packed) in the compute dtype, must fit its byte_size."""
    if target is None:
        return
    batch = prepared.batch
    tokens = batch.layout.tokens if batch.layout is not None else batch.mask.numel()
    needed = 2 * tokens * torch.empty((), dtype=prepared.dtype).element_size()
    if needed > target[2]:
        raise InvalidArgument(f"{OUTPUTS_KEY}.byte_size is {target[2]} but advantages and returns need {needed} "
                              "bytes", field=f"{OUTPUTS_KEY}.byte_size")


def write_outputs(regions: Regions | None, target: Target, tensors: Mapping[str, torch.Tensor | None],
                  ) -> dict[str, RegionRef]:
    """Write the outputs (those not None, in order, back to back) into the target region and return where
    each lies. Nothing is written unless all fit (InvalidArgument naming shared_memory_outputs.byte_size)."""
    region, offset, byte_size = target
    present = {name: tensor for name, tensor in tensors.items() if tensor is not None}
    refs: dict[str, RegionRef] = {}
    position = offset
    for name, tensor in present.items():
        size = tensor.numel() * tensor.element_size()
        refs[name] = RegionRef(WIRE_DTYPES[tensor.dtype], tuple(tensor.shape), region, position, size)
        position += size
    if position - offset > byte_size:
        sizes = ", ".join(f"{name} {ref.byte_size}" for name, ref in refs.items())
        raise InvalidArgument(f"{OUTPUTS_KEY}.byte_size is {byte_size} but the outputs need {position - offset} "
                              f"bytes ({sizes})", field=f"{OUTPUTS_KEY}.byte_size")
    _registry(regions, OUTPUTS_KEY).write(region, offset, byte_size, list(present.values()), field=OUTPUTS_KEY)
    return refs


def _registry(regions: Regions | None, field: str) -> Regions:
    if regions is None:
        raise InvalidArgument("this server has no shared-memory registry", field=field)
    return regions
