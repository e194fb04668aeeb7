"""Shared-memory tensors for a client on the server's host (`Client(..., shared_memory=True)`).

The client keeps system shared-memory regions of its own (`multiprocessing.shared_memory`, in
/dev/shm), registers each with the server under a unique name (the Open Inference Protocol's
system shared-memory extension: REST `POST /v2/systemsharedmemory/region/{name}/register`, gRPC
`SystemSharedMemoryRegister`), writes a call's input tensors into one, sends descriptors that name
the region instead of the bytes, and asks the server to write every output into the same region
after the inputs. A call takes a region from a pool for its duration (concurrent calls use
different regions); a region too small for a batch is replaced by one at least twice its size. Every
region is unregistered and unlinked by `close()` (and at interpreter exit if the client was not
closed).
"""

from __future__ import annotations

import atexit
import os
import secrets
import threading
from multiprocessing import shared_memory
from typing import Any, Callable, Mapping

import numpy as np

from .errors import AdvserveError, InvalidArgument
from .framing import ITEMSIZE, OUTPUTS_KEY, RawTensor, RegionRef

ALIGNMENT = 64  # every tensor starts at a multiple of 64 bytes of the region
MIN_REGION_BYTES = 1 << 20
# advantages, returns; the loss's grad_logprobs, grad_values, grad_entropy, grad_token_losses and kl_values
OUTPUTS_PER_TOKEN_TENSOR = {"/v1/advantages": 2, "/v1/losses": 5, "/v1/analysis": 0}

Register = Callable[[str, str, int], None]  # (name, key, byte_size); raises the server's error
Unregister = Callable[[str], None]


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def layout(path: str, document: Mapping[str, Any], tensors: Mapping[str, RawTensor | list],
           ) -> tuple[dict[str, int], int, int]:
    """({input name: offset}, offset of the outputs, bytes the region needs) of one call: the inputs
    one after the other (64-byte aligned), then room for the outputs: per output the token count in
    the compute dtype (every output is a token tensor; tokens: the largest input's element count, or
    N = cu_seqlens[-1] of a packed batch)."""
    offsets, end, largest = {}, 0, 0
    for name, tensor in tensors.items():
        if isinstance(tensor, RawTensor):
            offsets[name] = _aligned(end)
            end = offsets[name] + tensor.nbytes
            largest = max(largest, int(np.prod(tensor.shape, dtype=np.int64)))
    cu_seqlens = tensors.get("cu_seqlens")
    if isinstance(cu_seqlens, RawTensor) and cu_seqlens.nbytes and cu_seqlens.dtype in ("int32", "int64", "uint8"):
        largest = max(largest, int(cu_seqlens.to_numpy().reshape(-1)[-1]))
    itemsize = ITEMSIZE["float64" if document.get("dtype") == "float64" else "float32"]
    outputs = _aligned(end)
    return offsets, outputs, outputs + OUTPUTS_PER_TOKEN_TENSOR.get(path, 3) * largest * itemsize


class Region:
    """One registered system shared-memory region: `name` on the server, `key` in /dev/shm, `size` bytes."""

    def __init__(self, size: int, register: Register):
        self.name = f"advserve-client-{os.getpid()}-{secrets.token_hex(6)}"
        self._memory = shared_memory.SharedMemory(name=self.name, create=True, size=size)
        self.key = "/" + self._memory.name  # the POSIX shm_open name the server opens
        self.size = size
        try:
            register(self.name, self.key, size)
        except BaseException:
            self._release()
            raise

    def place(self, path: str, document: Mapping[str, Any], tensors: Mapping[str, RawTensor | list],
              ) -> tuple[dict[str, Any], dict[str, RawTensor | RegionRef | list]]:
        """The call's (document, tensors) with the inputs copied into this region and named by RegionRefs,
        and the outputs asked into it after them (none for /v1/analysis)."""
        offsets, outputs, needed = layout(path, document, tensors)
        placed: dict[str, RawTensor | RegionRef | list] = dict(tensors)
        for name, offset in offsets.items():
            raw = tensors[name]
            assert isinstance(raw, RawTensor)
            self._memory.buf[offset:offset + raw.nbytes] = raw.data
            placed[name] = RegionRef(raw.dtype, raw.shape, self.name, offset, raw.nbytes)
        if needed == outputs:
            return dict(document), placed
        return {**document, OUTPUTS_KEY: {"region": self.name, "offset": outputs, "byte_size": needed - outputs}}, placed

    def results(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """The response's tensors with those the server wrote into this region copied out of it (numpy
        arrays of their own, so the region can take the next call)."""
        out = {}
        for name, ref in tensors.items():
            if isinstance(ref, RegionRef):
                if ref.region != self.name or ref.offset + ref.byte_size > self.size:
                    raise AdvserveError(f"the server answered {name!r} in region {ref.region!r} at "
                                        f"[{ref.offset}, {ref.offset + ref.byte_size}), not within {self.name!r}")
                data = self._memory.buf[ref.offset:ref.offset + ref.byte_size]
                ref = np.array(RawTensor(ref.dtype, ref.shape, data).to_numpy(), copy=True)
                data.release()
            out[name] = ref
        return out

    def close(self, unregister: Unregister) -> None:
        """Unregister from the server (best effort: it may be gone) and unlink the memory."""
        try:
            unregister(self.name)
        except AdvserveError:
            pass
        finally:
            self._release()

    def _release(self) -> None:
        self._memory.close()
        try:
            self._memory.unlink()
        except FileNotFoundError:
            pass


class RegionPool:
    """The client's regions: `acquire` one holding at least `size` bytes for a call, `release` it after."""

    def __init__(self, register: Register, unregister: Unregister):
        self._register, self._unregister = register, unregister
        self._free: list[Region] = []
        self._all: set[Region] = set()
        self._lock = threading.Lock()
        self._closed = False
        atexit.register(self.close)

    def acquire(self, size: int) -> Region:
        with self._lock:
            if self._closed:
                raise InvalidArgument("the client is closed")
            region = self._free.pop() if self._free else None
        if region is not None and region.size >= size:
            return region
        if region is not None:
            self._forget(region)
            size = max(size, 2 * region.size)
        region = Region(max(size, MIN_REGION_BYTES), self._register)
        with self._lock:
            self._all.add(region)
        return region

    def release(self, region: Region) -> None:
        with self._lock:
            if not self._closed:
                self._free.append(region)
                return
        self._forget(region)

    def _forget(self, region: Region) -> None:
        with self._lock:
            self._all.discard(region)
        region.close(self._unregister)

    @property
    def names(self) -> list[str]:
        """The names of the regions registered now."""
        with self._lock:
            return sorted(region.name for region in self._all)

    def close(self) -> None:
        """Unregister and unlink every region (those of calls still running when they finish)."""
        with self._lock:
            self._closed = True
            idle, self._free = self._free, []
        for region in idle:
            self._forget(region)
        atexit.unregister(self.close)
