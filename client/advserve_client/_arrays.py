"""User arrays <-> wire tensors: numpy, torch (when installed, imported lazily) and nested lists in;
numpy out, or torch when any input was a torch tensor. Never imports torch unless a torch tensor is
passed in."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .errors import InvalidArgument
from .framing import ITEMSIZE, RawTensor

_WIRE_NUMPY = {np.dtype(name) for name in ITEMSIZE if name != "bfloat16"}


def is_torch(value: Any) -> bool:
    """A torch tensor, recognised without importing torch."""
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _field(name: str) -> str:
    return f"tensors.{name}"


def _torch_to_numpy(name: str, value: Any) -> tuple[np.ndarray, str | None]:
    """(numpy array, wire dtype override) of a torch tensor: detached, on the CPU; bfloat16 as raw words."""
    import torch  # only reached when the caller passed a torch tensor

    tensor = value.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy(), "bfloat16"
    if tensor.is_complex():
        raise InvalidArgument(f"tensor {name!r}: complex dtype {tensor.dtype} is not supported", field=_field(name))
    return tensor.numpy(), None


def _strings(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values.reshape(-1).tolist()]


def to_wire(name: str, value: Any) -> RawTensor | list:
    """A request tensor as it travels: a RawTensor, or (group ids given as strings) a list of str.

    Integer dtypes the wire lacks (int8, int16, uint16, ...) become int64, other floats float64;
    strings are only accepted for `group_ids`.
    """
    override = None
    if is_torch(value):
        array, override = _torch_to_numpy(name, value)
    else:
        try:
            array = np.asarray(value)
        except ValueError as exc:  # ragged nested lists
            raise InvalidArgument(f"tensor {name!r} is ragged or not numeric: {exc}", field=_field(name)) from None
    if override is not None:
        return RawTensor.from_numpy(array, dtype=override)
    kind = array.dtype.kind
    if kind in "USO":
        if name == "group_ids":
            return _strings(array)
        if kind == "O":
            try:
                array = array.astype(np.float64)
            except (TypeError, ValueError):
                raise InvalidArgument(f"tensor {name!r} is ragged or not numeric", field=_field(name)) from None
        else:
            raise InvalidArgument(f"tensor {name!r} must be numeric, got strings", field=_field(name))
    if array.dtype.newbyteorder("<") not in _WIRE_NUMPY:
        if kind in "iu":
            array = array.astype(np.int64)
        elif kind == "f":
            array = array.astype(np.float64)
        else:
            raise InvalidArgument(f"tensor {name!r}: dtype {array.dtype} is not supported", field=_field(name))
    return RawTensor.from_numpy(array)


def wire_tensors(tensors: Mapping[str, Any]) -> dict[str, RawTensor | list]:
    """Every given tensor (None values are left out, as the server does) in wire form."""
    return {name: to_wire(name, value) for name, value in tensors.items() if value is not None}


class Outputs:
    """Turns result tensors into the caller's kind of array: numpy (writable copies), or torch tensors
    on the device of the first torch input when any input was a torch tensor."""

    def __init__(self, tensors: Mapping[str, Any]):
        self.device = next((value.device for value in tensors.values() if is_torch(value)), None)

    @property
    def torch(self) -> bool:
        return self.device is not None

    def __call__(self, value: RawTensor | np.ndarray | None) -> Any:
        if value is None:
            return None
        # own, writable memory: a decoded body is read-only bytes (other arrays are the client's own already)
        array = np.array(value.to_numpy(), copy=True) if isinstance(value, RawTensor) else value
        if self.device is None:
            return array
        import torch

        return torch.from_numpy(array).to(self.device)
