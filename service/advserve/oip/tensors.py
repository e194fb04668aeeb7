"""Tensors of the Open Inference Protocol: its datatypes, and its three ways of carrying elements
(raw little-endian bytes: HTTP's binary extension and gRPC's raw_input_contents; JSON `data`; gRPC's
typed `contents`) turned into what the engine takes (torch views, numpy arrays), and results back.

Every size is checked before anything is allocated: the shape (non-negative integers, rank at most
8), the byte count of raw data against prod(shape) x the element size, the element count of JSON
data. BYTES elements are a 4-byte little-endian length and that many bytes each (Triton's
serialization), at most MAX_GROUP_ID_LENGTH bytes each (JSON strings: in UTF-8), and come out as
numpy object arrays of Python bytes or str, never widened to a fixed width. Errors name the input
(`inputs.<name>`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..batch import MAX_GROUP_ID_LENGTH, check_id_length
from ..device import to_host
from ..errors import InvalidArgument
from ..wire import buffer_to_torch

MAX_RANK = 8
MAX_ELEMENTS = 2**62


@dataclass(frozen=True)
class Datatype:
    """One OIP datatype: element size in bytes (None: BYTES, variable), numpy and torch dtypes."""

    name: str
    itemsize: int | None
    numpy: np.dtype | None  # None for BF16 (numpy has none) and BYTES
    torch: torch.dtype | None


DATATYPES: dict[str, Datatype] = {d.name: d for d in (
    Datatype("BOOL", 1, np.dtype(np.bool_), torch.bool),
    Datatype("UINT8", 1, np.dtype(np.uint8), torch.uint8),
    Datatype("INT8", 1, np.dtype(np.int8), torch.int8),
    Datatype("INT16", 2, np.dtype("<i2"), torch.int16),
    Datatype("INT32", 4, np.dtype("<i4"), torch.int32),
    Datatype("INT64", 8, np.dtype("<i8"), torch.int64),
    Datatype("FP16", 2, np.dtype("<f2"), torch.float16),
    Datatype("BF16", 2, None, torch.bfloat16),
    Datatype("FP32", 4, np.dtype("<f4"), torch.float32),
    Datatype("FP64", 8, np.dtype("<f8"), torch.float64),
    Datatype("BYTES", None, None, None),
)}
INTEGERS = frozenset({"UINT8", "INT8", "INT16", "INT32", "INT64"})
FLOATS = frozenset({"FP16", "BF16", "FP32", "FP64"})
OUTPUT_DATATYPES = {torch.float32: "FP32", torch.float64: "FP64"}
KNOWN_UNSERVED = frozenset({"UINT16", "UINT32", "UINT64"})  # OIP datatypes advserve has no use for


def field(name: str) -> str:
    return f"inputs.{name}"


def check_datatype(name: str, datatype: Any, accepted: frozenset[str]) -> Datatype:
    """The Datatype of input `name`, or InvalidArgument listing the datatypes that input accepts."""
    if datatype not in accepted:
        listed = ", ".join(sorted(accepted))
        known = "" if datatype in DATATYPES or datatype in KNOWN_UNSERVED else " (not an OIP datatype)"
        raise InvalidArgument(f"input {name!r}: datatype {datatype!r}{known} is not accepted; use one of {listed}",
                              field=field(name))
    return DATATYPES[datatype]


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    """A shape as a tuple: a list of at most MAX_RANK non-negative integers whose product is sane."""
    if (not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
            or math.prod(d for d in shape if d) >= MAX_ELEMENTS):
        raise InvalidArgument(f"input {name!r}: shape must be a list of at most {MAX_RANK} non-negative integers "
                              f"below 2**31, got {shape!r}", field=field(name))
    return tuple(shape)


def from_raw(name: str, datatype: Datatype, shape: tuple[int, ...], data: bytes | memoryview) -> Any:
    """Raw little-endian bytes -> a torch view of them (no copy), or for BYTES a numpy array of bytes
    strings. The byte count must be exactly what the shape and datatype need."""
    view = memoryview(data).cast("B")
    count = math.prod(shape)
    if datatype.itemsize is None:
        return from_bytes_elements(name, view, count).reshape(shape)
    expected = count * datatype.itemsize
    if view.nbytes != expected:
        raise InvalidArgument(f"input {name!r}: {view.nbytes} bytes of data but shape {list(shape)} of "
                              f"{datatype.name} needs {expected}", field=field(name))
    return buffer_to_torch(view, datatype.torch, shape, name, field(name))


def from_bytes_elements(name: str, view: memoryview, count: int) -> np.ndarray:
    """`count` BYTES elements (each a uint32 little-endian length, then the bytes) -> a numpy array of
    them, each at most MAX_GROUP_ID_LENGTH bytes. Elements of one length (ids such as UUIDs, the usual
    case) are read without a Python loop, as fixed-width bytes of exactly that length; others one by
    one, the format being sequential (each length says where the next element starts; group ids are
    [B], not [B, T]), into an object array of bytes."""
    total = view.nbytes
    if count == 0:
        if total:
            raise InvalidArgument(f"input {name!r}: {total} bytes of data for 0 elements", field=field(name))
        return np.empty(0, dtype="S1")
    if total >= 4:
        width = int.from_bytes(view[:4], "little")
        if total == count * (4 + width):
            rows = np.frombuffer(view, dtype=np.uint8).reshape(count, 4 + width)
            lengths = rows[:, :4].copy().view("<u4").reshape(-1)
            if bool((lengths == width).all()):
                _check_element_length(name, width)
                return rows[:, 4:].copy().view(f"S{max(width, 1)}").reshape(-1) if width else np.zeros(count, "S1")
    elements, offset = [], 0
    for _ in range(count):
        if offset + 4 > total:
            raise InvalidArgument(f"input {name!r}: BYTES data ends inside element {len(elements)} of {count}",
                                  field=field(name))
        length = int.from_bytes(view[offset:offset + 4], "little")
        offset += 4
        if offset + length > total:
            raise InvalidArgument(f"input {name!r}: BYTES element {len(elements)} runs past the end of the data",
                                  field=field(name))
        _check_element_length(name, length)
        elements.append(bytes(view[offset:offset + length]))
        offset += length
    if offset != total:
        raise InvalidArgument(f"input {name!r}: {total - offset} bytes left after {count} BYTES elements",
                              field=field(name))
    return _object_array(elements)


def from_bytes_list(name: str, values: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    """gRPC `bytes_contents` -> an object array of `shape` (no fixed-width copy), each element at most
    MAX_GROUP_ID_LENGTH bytes."""
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgument(f"input {name!r}: bytes_contents has {len(values)} elements but shape {list(shape)} "
                              f"needs {count}", field=field(name))
    check_id_length(values, field(name))
    return _object_array(values).reshape(shape)


def _strings_from_json(name: str, data: list, shape: tuple[int, ...]) -> np.ndarray:
    """JSON BYTES data (strings, flat or nested row-major) -> an object array of str of `shape`; each
    at most MAX_GROUP_ID_LENGTH bytes in UTF-8. C-level builtins only (map, chain): no loop per element."""
    flat = data
    for _ in range(MAX_RANK):
        if set(map(type, flat)) != {list}:
            break
        flat = list(itertools.chain.from_iterable(flat))
    if not set(map(type, flat)) <= {str}:
        raise InvalidArgument(f"input {name!r}: BYTES data must hold strings (nested row-major lists of them)",
                              field=field(name))
    count = math.prod(shape)
    if len(flat) != count:
        raise InvalidArgument(f"input {name!r}: data has {len(flat)} elements but shape {list(shape)} needs {count}",
                              field=field(name))
    check_id_length(flat, field(name))  # counted in UTF-8, as the binary form carries them
    return _object_array(flat).reshape(shape)


def _check_element_length(name: str, length: int) -> None:
    if length > MAX_GROUP_ID_LENGTH:
        raise InvalidArgument(f"input {name!r}: an element is {length} bytes long; BYTES elements (group ids) may "
                              f"have at most {MAX_GROUP_ID_LENGTH}", field=field(name))


def _object_array(values: list) -> np.ndarray:
    """A 1-D object array holding `values` as they are (np.array would widen strings, or nest bytes)."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def from_json(name: str, datatype: Datatype, shape: tuple[int, ...], data: Any) -> np.ndarray:
    """JSON `data` (flat or nested, row-major) -> a numpy array of `shape`. Element kinds must match
    the datatype: true/false for BOOL, integers in range for INT*, numbers for FP*, strings for BYTES
    (JSON has no NaN or Inf: send those as binary)."""
    if datatype.name == "BF16":
        raise InvalidArgument(f"input {name!r}: BF16 data must be binary (the binary extension or raw contents)",
                              field=field(name))
    if not isinstance(data, list):
        raise InvalidArgument(f"input {name!r}: data must be a JSON array, got {type(data).__name__}",
                              field=field(name))
    if datatype.name == "BYTES":
        return _strings_from_json(name, data, shape)
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidArgument(f"input {name!r}: data is ragged (nested arrays of different lengths)",
                              field=field(name)) from None
    count = math.prod(shape)
    if array.size != count:
        raise InvalidArgument(f"input {name!r}: data has {array.size} elements but shape {list(shape)} needs {count}",
                              field=field(name))
    kind = array.dtype.kind if array.size else None
    expected = {"BOOL": "b"}.get(datatype.name, "iu" if datatype.name in INTEGERS else "iuf")
    if kind is not None and kind not in expected:
        what = {"b": "true/false", "iu": "integers"}.get(expected, "numbers")
        raise InvalidArgument(f"input {name!r}: {datatype.name} data must hold {what} (no null: JSON has no NaN or "
                              "Inf, send such values as binary)", field=field(name))
    if datatype.name in INTEGERS and array.size:
        info = np.iinfo(datatype.numpy)
        if int(array.min()) < info.min or int(array.max()) > info.max:
            raise InvalidArgument(f"input {name!r}: a value is outside the range of {datatype.name}", field=field(name))
    with np.errstate(over="ignore"):  # FP16 overflow gives Inf, which validation then reports
        return array.astype(datatype.numpy).reshape(shape)


def host_array(tensor: torch.Tensor) -> np.ndarray:
    """A result tensor as a C-contiguous little-endian numpy array on the host."""
    return to_host(tensor.detach()).contiguous().numpy()
