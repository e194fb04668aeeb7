"""Binary tensor framing of advserve's REST API (the Open Inference Protocol's binary extension).

A body is a JSON header followed by raw tensor buffers:

    body = header (n bytes of UTF-8 JSON) ++ buffer_1 ++ buffer_2 ++ ...
    HTTP: Content-Type: application/octet-stream, Inference-Header-Content-Length: n

The header is the JSON document of the JSON API, except that each binary tensor under "tensors" is
a descriptor `{"dtype": "float32", "shape": [B, T], "binary_data_size": nbytes}` instead of nested
lists; its buffer follows in the order the tensors appear in the header, little-endian, C order,
bool as one byte (0 or 1). A tensor may still be given inline as a JSON list (group ids as strings,
say), or name a shared-memory region registered with the server (`RegionRef`: a descriptor with
"shared_memory_region", "shared_memory_offset", "shared_memory_byte_size" and no buffer in the body).
docs/binary-framing.md has the byte-level specification and a worked example.

This module knows bytes and JSON only (numpy for encoding); each side turns `RawTensor`s into its
own arrays. Decoding copies nothing: each tensor is a memoryview into the body.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

CONTENT_TYPE = "application/octet-stream"
HEADER_LENGTH = "Inference-Header-Content-Length"
ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8, "uint8": 1, "bool": 1}
MAX_RANK = 8
MAX_DIMENSION = 2**31 - 1  # per dimension; and the product of the non-zero dimensions stays below 2**62
_NUMPY_DTYPES = {  # numpy has no bfloat16: its buffers travel as raw uint16 words
    np.dtype("<f4"): "float32", np.dtype("<f8"): "float64", np.dtype("<f2"): "float16", np.dtype("<i4"): "int32",
    np.dtype("<i8"): "int64", np.dtype("u1"): "uint8", np.dtype("bool"): "bool",
}


class FramingError(ValueError):
    """A malformed binary body. `field` names the tensor ("tensors.<name>") or the part at fault."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True)
class RawTensor:
    """One tensor as it travels: dtype name, shape, and its little-endian C-order bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @staticmethod
    def from_numpy(array: np.ndarray, dtype: str | None = None) -> "RawTensor":
        """Wrap a numpy array (made little-endian and C-contiguous if it is not). `dtype` names the wire
        dtype when numpy cannot (pass "bfloat16" with a uint16 array of bfloat16 words)."""
        array = np.asarray(array)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        if not array.flags.c_contiguous:
            array = array.copy(order="C")  # (ascontiguousarray would turn a 0-d array into shape (1,))
        name = dtype or _NUMPY_DTYPES.get(array.dtype)
        if name is None:
            raise TypeError(f"dtype {array.dtype} has no wire type; use one of {', '.join(ITEMSIZE)}")
        return RawTensor(name, tuple(array.shape), memoryview(array.reshape(-1)).cast("B"))

    def to_numpy(self) -> np.ndarray:
        """A read-only numpy view (bfloat16 is widened to float32, numpy having no bfloat16)."""
        if self.dtype == "bfloat16":
            words = np.frombuffer(self.data, dtype="<u2").astype(np.uint32) << 16
            return words.view(np.float32).reshape(self.shape)
        dtype = "bool" if self.dtype == "bool" else np.dtype(self.dtype).newbyteorder("<")
        return np.frombuffer(self.data, dtype=dtype).reshape(self.shape)


@dataclass(frozen=True)
class RegionRef:
    """A tensor held in a registered shared-memory region instead of the body: dtype name, shape, and
    `byte_size` bytes (exactly prod(shape) · itemsize) at `offset` of the region named `region`."""

    dtype: str
    shape: tuple[int, ...]
    region: str
    offset: int
    byte_size: int

    @property
    def nbytes(self) -> int:
        return self.byte_size

    def descriptor(self) -> dict[str, Any]:
        """The tensor's descriptor in a header."""
        return {"dtype": self.dtype, "shape": list(self.shape), "shared_memory_region": self.region,
                "shared_memory_offset": self.offset, "shared_memory_byte_size": self.byte_size}


REGION_KEYS = frozenset({"shared_memory_region", "shared_memory_offset", "shared_memory_byte_size"})
OUTPUTS_KEY = "shared_memory_outputs"  # request header: {"region", "offset", "byte_size"} for every output


def dumps(document: Any) -> bytes:
    """Compact UTF-8 JSON, the header's encoding (numpy scalars and arrays become numbers and lists)."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False, default=_numpy_default).encode()


def _numpy_default(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode(document: Mapping[str, Any], tensors: Mapping[str, RawTensor | RegionRef | list],
           dumps: Callable[[Any], bytes] = dumps) -> tuple[int, list[bytes | memoryview]]:
    """Frame `document` (without "tensors") and `tensors` (binary, a region reference whose bytes stay in
    the region, or a list sent inline as JSON).

    Returns (header length n, chunks): the body is b"".join(chunks); the chunks after the header are
    the tensors' own buffers, not copies, so a server can stream them. `dumps` serializes the header
    (the server passes a faster one).
    """
    described: dict[str, Any] = {}
    buffers: list[memoryview] = []
    for name, tensor in tensors.items():
        if isinstance(tensor, RawTensor):
            described[name] = {"dtype": tensor.dtype, "shape": list(tensor.shape), "binary_data_size": tensor.nbytes}
            buffers.append(tensor.data)
        elif isinstance(tensor, RegionRef):
            described[name] = tensor.descriptor()
        else:
            described[name] = tensor
    header = dumps({**document, "tensors": described})
    return len(header), [header, *buffers]


def decode(body: bytes | bytearray | memoryview, header_length: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a framed body into (document without "tensors", {name: RawTensor, RegionRef or inline list}).

    Every size is checked before anything is allocated: the header length within the body, each
    dtype and shape, binary_data_size (or shared_memory_byte_size) == prod(shape) · itemsize, and the
    buffers adding up exactly to the rest of the body. Raises FramingError naming the tensor or part
    at fault. A region reference is only checked for its form here: whether the region exists and
    holds those bytes is the reader's business (the server's registry).
    """
    view = memoryview(body).cast("B")
    n = _header_length(header_length, view.nbytes)
    try:
        document = json.loads(bytes(view[:n]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FramingError(f"the header (first {n} bytes) is not valid JSON: {exc}", "body") from None
    except RecursionError:  # e.g. [[[[...]]]] 100,000 deep: json's recursive parser gives up
        raise FramingError(f"the header (first {n} bytes) is nested too deeply to parse", "body") from None
    if not isinstance(document, dict):
        raise FramingError("the header must be a JSON object", "body")
    described = document.pop("tensors", None)
    if not isinstance(described, dict):
        raise FramingError("the header needs a 'tensors' object", "tensors")
    offset, tensors = n, {}
    for name, entry in described.items():
        if not isinstance(entry, dict):
            tensors[name] = entry  # an inline JSON tensor
            continue
        if any(key in entry for key in REGION_KEYS):
            tensors[name] = region_ref(name, entry)
            continue
        raw = _describe(name, entry)
        end = offset + raw[2]
        if end > view.nbytes:
            raise FramingError(f"tensor {name!r}: its {raw[2]} bytes run past the end of the body "
                               f"({view.nbytes - offset} left)", f"tensors.{name}")
        tensors[name] = RawTensor(raw[0], raw[1], view[offset:end])
        offset = end
    if offset != view.nbytes:
        raise FramingError(f"{view.nbytes - offset} bytes after the last tensor: the header's binary_data_size "
                           "values must add up to the body length minus the header length", "body")
    return document, tensors


def _header_length(value: Any, body_length: int) -> int:
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    elif isinstance(text, str) and text.isascii() and text.isdigit():
        n = int(text)
    else:
        raise FramingError(f"{HEADER_LENGTH} must be an integer (decimal digits), got {value!r}", HEADER_LENGTH)
    if not 0 < n <= body_length:
        raise FramingError(f"{HEADER_LENGTH} is {n} but the body has {body_length} bytes", HEADER_LENGTH)
    return n


def _describe(name: str, entry: dict) -> tuple[str, tuple[int, ...], int]:
    field = f"tensors.{name}"
    dtype, shape, size = entry.get("dtype"), entry.get("shape"), entry.get("binary_data_size")
    return (*_dtype_shape(name, dtype, shape), _size(name, "binary_data_size", size, dtype, shape, field))


def region_ref(name: str, entry: Mapping[str, Any]) -> RegionRef:
    """The `RegionRef` of a region descriptor {"dtype", "shape", "shared_memory_region",
    "shared_memory_byte_size", "shared_memory_offset" (default 0)}, checked as a binary descriptor is
    (FramingError naming `tensors.<name>`); a descriptor with both a region and binary_data_size is
    refused (which bytes would it mean?)."""
    field = f"tensors.{name}"
    if "binary_data_size" in entry:
        raise FramingError(f"tensor {name!r}: give either binary_data_size (bytes in the body) or "
                           "shared_memory_region (bytes in a region), not both", field)
    dtype, shape = _dtype_shape(name, entry.get("dtype"), entry.get("shape"))
    region = entry.get("shared_memory_region")
    if not isinstance(region, str) or not region:
        raise FramingError(f"tensor {name!r}: shared_memory_region must be the name of a registered region, "
                           f"got {region!r}", field)
    offset = entry.get("shared_memory_offset", 0)
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise FramingError(f"tensor {name!r}: shared_memory_offset must be a non-negative integer, got {offset!r}",
                           field)
    size = _size(name, "shared_memory_byte_size", entry.get("shared_memory_byte_size"), dtype, list(shape), field)
    return RegionRef(dtype, shape, region, offset, size)


def outputs_target(value: Any) -> tuple[str, int, int]:
    """(region, offset, byte_size) of a request's "shared_memory_outputs" {"region", "offset" (default 0),
    "byte_size"}: where every output tensor is to be written, one after the other. FramingError names
    `shared_memory_outputs` or its key."""
    if not isinstance(value, Mapping):
        raise FramingError(f"{OUTPUTS_KEY} must be an object {{\"region\", \"offset\", \"byte_size\"}}, "
                           f"got {type(value).__name__}", OUTPUTS_KEY)
    unknown = sorted(set(value) - {"region", "offset", "byte_size"})
    if unknown:
        raise FramingError(f"{OUTPUTS_KEY} has no key {unknown[0]!r}; valid: region, offset, byte_size",
                           f"{OUTPUTS_KEY}.{unknown[0]}")
    region, offset, size = value.get("region"), value.get("offset", 0), value.get("byte_size")
    if not isinstance(region, str) or not region:
        raise FramingError(f"{OUTPUTS_KEY}.region must be the name of a registered region, got {region!r}",
                           f"{OUTPUTS_KEY}.region")
    for key, number in (("offset", offset), ("byte_size", size)):
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            raise FramingError(f"{OUTPUTS_KEY}.{key} must be a non-negative integer, got {number!r}",
                               f"{OUTPUTS_KEY}.{key}")
    return region, offset, size


def _dtype_shape(name: str, dtype: Any, shape: Any) -> tuple[str, tuple[int, ...]]:
    field = f"tensors.{name}"
    if dtype not in ITEMSIZE:
        raise FramingError(f"tensor {name!r}: dtype must be one of {', '.join(ITEMSIZE)}, got {dtype!r}", field)
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIMENSION for d in shape)
            or math.prod(d for d in shape if d) >= 2**62):
        raise FramingError(f"tensor {name!r}: shape must be a list of at most {MAX_RANK} integers in "
                           f"[0, {MAX_DIMENSION}] whose non-zero product is below 2**62, got {shape!r}", field)
    return dtype, tuple(shape)


def _size(name: str, key: str, size: Any, dtype: str, shape: list, field: str) -> int:
    """`size` checked: an integer >= 0 equal to prod(shape) · itemsize(dtype)."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FramingError(f"tensor {name!r}: {key} must be a non-negative integer, got {size!r}", field)
    expected = math.prod(shape) * ITEMSIZE[dtype]  # Python ints: no overflow
    if size != expected:
        raise FramingError(f"tensor {name!r}: {key} is {size} but shape {shape} of {dtype} needs "
                           f"{expected} bytes", field)
    return size
