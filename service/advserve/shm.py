"""Shared-memory regions: tensors that callers on the same host place in memory both sides map,
sending a region's name, offset and byte size instead of the bytes (the Open Inference Protocol's
system and CUDA shared-memory extensions, as Triton implements them; docs/shared-memory.md).

`Regions` is the registry of one server, shared by all its worker processes: one small JSON file per
region under `<shared_dir>/shm/` (written to a temporary name and renamed into place; register and
unregister hold an fcntl lock on `<shared_dir>/shm/.lock`), so a region registered through one worker
is usable from every other. Each process maps a region the first time it uses it and keeps the
mapping keyed by (name, registration id); a mapping whose entry changed or disappeared is dropped at
its next use (and on every register, unregister and status call of that process). Region names are
one namespace for both kinds, as in Triton.

System regions name a POSIX shared-memory object by its key ("/name": the file /dev/shm/name, opened
without following symlinks, regular files only). Offset and byte size are checked against the
object's size at registration and at every use; a region whose object its owner unlinked
(st_nlink == 0), replaced (another inode behind the key) or shrank below the region is released
(unregistered) at its next use, with a 400 naming the field.

Safety (SIGBUS): reading or writing a mapping of a file that another process truncates raises SIGBUS
and kills the process. So a region is mapped (zero-copy) only when its object belongs to the server's
own effective uid or to root: whoever can truncate those can kill the server anyway. An object of any
other uid is read with os.preadv into a buffer the request's admission pays for (`charge`) and
written with os.pwrite: a copy, but no mapping to fault on; truncation is then an ordinary short read
and a 400. A mapped writable region's pages are reserved (posix_fallocate) when it is mapped, so an
output written into a hole of a full /dev/shm is ENOSPC at registration, not SIGBUS.

Who may register is the transports' question (`check_registrant`, --shared-memory local|any|off:
by default callers connected over loopback only).

CUDA regions are a cudaIpcMemHandle_t (64 bytes) of memory on device `device_id`, opened with
cudaIpcOpenMemHandle (through ctypes, on the CUDA runtime torch loaded) once per process and viewed as
a torch tensor (__cuda_array_interface__); the handle is closed when the last tensor viewing it is
gone after the region was unregistered. Registering one needs the engine on a CUDA device.

Bounds: MAX_REGIONS regions, names of at most MAX_NAME_LENGTH bytes, keys of at most MAX_KEY_LENGTH.
Every error is an InvalidArgument (400) or NotFound (404) naming the field.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import fcntl
import hashlib
import ipaddress
import json
import math
import mmap
import os
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .errors import InvalidArgument, NotFound
from .wire import buffer_to_torch

MAX_REGIONS = 256
MAX_NAME_LENGTH = 128  # bytes of UTF-8
MAX_KEY_LENGTH = 255  # NAME_MAX of /dev/shm
CUDA_IPC_HANDLE_SIZE = 64
SHM_DIR = "/dev/shm"
KINDS = ("system", "cuda")
_KIND_WORDS = {"system": "system shared memory", "cuda": "CUDA shared memory"}


def check_registrant(mode: str, peer: str | None) -> None:
    """May a caller at `peer` register regions under --shared-memory `mode`? `peer`: the caller's IP
    address as the transport reports it (gRPC's "ipv4:127.0.0.1:5555" form too), "unix" for a Unix
    socket, None when unknown. 'any' lets everyone in (auth still applies), 'off' no one, 'local' a
    loopback peer only: a region names memory on this host, and a remote caller has no business
    making the server read or write objects in its /dev/shm. InvalidArgument naming "peer" otherwise."""
    if mode == "any":
        return
    if mode == "off":
        raise InvalidArgument("shared memory is off on this server (--shared-memory off)", field="peer")
    host = peer_host(peer)
    if host == "unix":
        return
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        address = None
    if address is not None and (getattr(address, "ipv4_mapped", None) or address).is_loopback:  # ::ffff:127.0.0.1 too
        return
    raise InvalidArgument(f"shared memory regions are registered by callers on this host connected over loopback "
                          f"(127.0.0.1 or ::1); this call came from {host or 'an unknown address'} (the server runs "
                          "with --shared-memory local; 'any' lets every authenticated caller register)", field="peer")


def peer_host(peer: str | None) -> str | None:
    """The host of a peer address: "127.0.0.1" of gRPC's "ipv4:127.0.0.1:5555", "::1" of
    "ipv6:[::1]:5555", "unix" of "unix:..."; a bare address as it is."""
    if peer is None:
        return None
    if peer.startswith("unix"):
        return "unix"
    if peer.startswith("ipv4:"):
        return peer[5:].rpartition(":")[0]
    if peer.startswith("ipv6:"):
        return peer[5:].rpartition(":")[0].strip("[]")
    return peer


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise InvalidArgument(f"the kind of shared memory must be 'system' or 'cuda', got {kind!r}", field="kind")
    return kind


def _check_int(value: Any, what: str, *, minimum: int, field: str | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value < 2**62:
        raise InvalidArgument(f"{what} must be an integer >= {minimum}, got {value!r:.40}", field=field or what)
    return value


def check_name(name: Any) -> str:
    """A region name: a non-empty string of at most MAX_NAME_LENGTH bytes of UTF-8, no NUL."""
    if not isinstance(name, str) or not name or "\0" in name or len(name.encode("utf-8", "replace")) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"a region name must be a non-empty string of at most {MAX_NAME_LENGTH} bytes, "
                              f"got {name!r:.80}", field="name")
    return name


def object_name(key: Any) -> str:
    """The file name under /dev/shm of a POSIX shared-memory key ("/name" or "name"; no other '/')."""
    if not isinstance(key, str) or "\0" in key:
        raise InvalidArgument(f"key must be a string naming a POSIX shared memory object ('/name'), got {key!r:.80}",
                              field="key")
    name = key.lstrip("/")
    if not name or "/" in name or name in (".", "..") or len(name.encode()) > MAX_KEY_LENGTH:
        raise InvalidArgument(f"key must be '/name' with a name of 1 to {MAX_KEY_LENGTH} bytes and no other '/', "
                              f"got {key!r:.80}", field="key")
    return name


# --- mappings of one process ---------------------------------------------------------------------------


class Released(Exception):
    """A region's object is gone or no longer holds the region (raised by a mapping's check)."""


class _System:
    """One process's access to a system region: a shared mapping of [offset, offset + byte_size) when
    the object belongs to us or root, else the file descriptor for pread/pwrite copies."""

    def __init__(self, entry: dict):
        self.entry = entry
        self.offset, self.byte_size = entry["offset"], entry["byte_size"]
        self.lock = threading.Lock()
        self.map, self.base, self.fd = None, 0, -1
        try:
            self.fd, self.writable = _open_object(entry["key"])
        except InvalidArgument as exc:  # gone since it was registered (or no longer ours to open)
            raise Released(exc.message) from None
        try:
            info = os.fstat(self.fd)
            if "ino" in entry and (info.st_dev, info.st_ino) != (entry["dev"], entry["ino"]):
                raise Released(f"its key {entry['key']!r} names another object than the one registered")
            self._check(info)
            self.zero_copy = info.st_uid in (0, os.geteuid())
            if self.zero_copy and self.byte_size:
                if self.writable:  # pages of a sparse object are allocated now: a write through the mapping
                    try:         # into a hole of a full /dev/shm would raise SIGBUS, this raises ENOSPC
                        os.posix_fallocate(self.fd, self.offset, self.byte_size)
                    except OSError as exc:
                        raise InvalidArgument(f"cannot reserve the region's {self.byte_size} bytes of {entry['key']!r} "
                                              f"in {SHM_DIR}: {exc.strerror}", field="byte_size") from None
                start = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY
                prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
                try:
                    self.map = mmap.mmap(self.fd, self.offset + self.byte_size - start, mmap.MAP_SHARED, prot,
                                         offset=start)
                except OSError as exc:  # e.g. no address space for a huge region
                    raise InvalidArgument(f"cannot map {self.byte_size} bytes of {entry['key']!r}: {exc.strerror}",
                                          field="byte_size") from None
                self.base = self.offset - start
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def _check(self, info: os.stat_result | None = None) -> None:
        if self.fd < 0:
            raise Released("it was unregistered while this request used it")
        info = info or os.fstat(self.fd)
        if info.st_nlink == 0:
            raise Released(f"its object {self.entry['key']!r} was unlinked by its owner")
        if info.st_size < self.offset + self.byte_size:
            raise Released(f"its object {self.entry['key']!r} shrank to {info.st_size} bytes, below the region's "
                           f"end at {self.offset + self.byte_size}")

    def read(self, offset: int, size: int, charge: Callable[[int], None] | None) -> memoryview:
        """The bytes [offset, offset + size) of the region: a view of the mapping, or a copy (charged)."""
        with self.lock:
            self._check()
            if self.map is not None:
                return memoryview(self.map)[self.base + offset:self.base + offset + size]
            if charge is not None:
                charge(size)
            buffer = np.empty(size, np.uint8)
            try:
                got = os.preadv(self.fd, [memoryview(buffer)], self.offset + offset) if size else 0
            except OSError as exc:
                raise Released(f"reading its object {self.entry['key']!r} failed: {exc.strerror}") from None
            if got != size:
                raise Released(f"its object {self.entry['key']!r} was truncated while it was read")
            return memoryview(buffer)

    def write(self, offset: int, items: Sequence[Any]) -> None:
        """Write `items` (tensors, arrays, buffers) back to back from `offset`: into the mapping (a
        device tensor copied straight into it), or with pwrite."""
        with self.lock:
            if not self.writable:
                raise PermissionError
            self._check()
            position = offset
            for item in items:
                size = _nbytes(item)
                start = self.base + position
                if self.map is not None and isinstance(item, torch.Tensor) and item.device.type != "cpu":
                    target = torch.frombuffer(self.map, dtype=torch.uint8, count=size, offset=start)
                    target.copy_(_as_uint8_tensor(item))  # device to the region, no host copy in between
                elif self.map is not None:
                    self.map[start:start + size] = _host_bytes(item)
                else:
                    data, written = _host_bytes(item), 0
                    while written < size:  # (an OSError, e.g. ENOSPC of a full /dev/shm: Regions.write)
                        written += os.pwrite(self.fd, data[written:], self.offset + position + written)
                position += size

    def __del__(self):
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)

    def close(self) -> None:
        with self.lock:
            if self.map is not None:
                with contextlib.suppress(BufferError):  # tensors still view it: unmapped when they go
                    self.map.close()
                self.map = None
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def _open_object(key: str) -> tuple[int, bool]:
    """(fd, writable) of /dev/shm/<key>: read-write if permitted, else read-only; never through a
    symlink; InvalidArgument naming `key` when it is missing or not a regular file."""
    name = object_name(key)
    flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    directory = os.open(SHM_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd, writable = os.open(name, os.O_RDWR | flags, dir_fd=directory), True
        except PermissionError:
            fd, writable = os.open(name, os.O_RDONLY | flags, dir_fd=directory), False
    except FileNotFoundError:
        raise InvalidArgument(f"no POSIX shared memory object {key!r} exists (create it first: shm_open)",
                              field="key") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot open the shared memory object {key!r}: {exc.strerror} (it must be a regular "
                              "file, not a symlink)", field="key") from None
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidArgument(f"the shared memory object {key!r} is not a regular file", field="key")
    return fd, writable


class _IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * CUDA_IPC_HANDLE_SIZE)]


_CUDA_LIBS: dict[str, Any] = {}


def _cuda_library(kind: str) -> Any:
    """The CUDA runtime ("cudart") torch loaded, or the driver ("cuda"), through ctypes."""
    if kind not in _CUDA_LIBS:
        torch.cuda.init()
        path = None
        with open("/proc/self/maps") as maps:
            for line in maps:
                if f"/lib{kind}.so" in line:
                    path = line.split(None, 5)[-1].strip()
                    break
        path = path or ctypes.util.find_library(kind) or (f"lib{kind}.so.1" if kind == "cuda" else None)
        if path is None:
            raise InvalidArgument("CUDA shared memory needs the CUDA runtime library (libcudart), which this "
                                  "server cannot find", field="raw_handle")
        _CUDA_LIBS[kind] = ctypes.CDLL(path)
    return _CUDA_LIBS[kind]


class _IpcPointer:
    """A device pointer opened from an IPC handle; closed when the last tensor viewing it is gone."""

    def __init__(self, handle: bytes, device_id: int):
        self.device_id = device_id
        self.pointer = ctypes.c_void_p()
        cudart = _cuda_library("cudart")
        with torch.cuda.device(device_id):
            error = cudart.cudaIpcOpenMemHandle(ctypes.byref(self.pointer), _IpcMemHandle(handle), ctypes.c_uint(1))
        if error:
            cudart.cudaGetErrorString.restype = ctypes.c_char_p
            message = cudart.cudaGetErrorString(error).decode()
            raise InvalidArgument(f"cudaIpcOpenMemHandle failed on device {device_id}: {message} (raw_handle must be "
                                  "a cudaIpcMemHandle_t of another process)", field="raw_handle")

    def extent(self) -> int:
        """Bytes of the allocation from the pointer to its end (cuMemGetAddressRange)."""
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        with torch.cuda.device(self.device_id):
            error = _cuda_library("cuda").cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size),
                                                                  ctypes.c_uint64(self.pointer.value))
        if error:
            raise InvalidArgument(f"cuMemGetAddressRange failed on the opened handle (error {error})",
                                  field="raw_handle")
        return base.value + size.value - self.pointer.value

    def __del__(self):
        if self.pointer.value:
            with contextlib.suppress(Exception):
                with torch.cuda.device(self.device_id):
                    _cuda_library("cudart").cudaIpcCloseMemHandle(self.pointer)


class _CudaView:
    """An object with __cuda_array_interface__ for torch.as_tensor; holds the pointer open."""

    def __init__(self, owner: _IpcPointer, offset: int, size: int):
        self.owner = owner
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "version": 3, "strides": None,
                                         "data": (owner.pointer.value + offset, False)}


class _Cuda:
    """One process's access to a CUDA region."""

    def __init__(self, entry: dict):
        self.entry = entry
        self.byte_size, self.device_id = entry["byte_size"], entry["device_id"]
        try:
            self.pointer = _IpcPointer(base64.b64decode(entry["raw_handle"]), self.device_id)
            extent = self.pointer.extent()
        except (OSError, RuntimeError, AttributeError) as exc:  # no usable CUDA runtime or driver here
            raise InvalidArgument(f"cannot open the CUDA IPC handle: {exc}", field="raw_handle") from None
        if extent < self.byte_size:
            raise InvalidArgument(f"byte_size {self.byte_size} exceeds the {extent} bytes of the allocation behind "
                                  "raw_handle", field="byte_size")

    def tensor(self, offset: int, size: int) -> torch.Tensor:
        """A uint8 view [size] on the region's device of the bytes from `offset`."""
        pointer = self.pointer
        if pointer is None:
            raise Released("it was unregistered while this request used it")
        return torch.as_tensor(_CudaView(pointer, offset, size), device=f"cuda:{self.device_id}")

    def close(self) -> None:
        self.pointer = None  # closed when no tensor views it any more


# --- the registry ------------------------------------------------------------------------------------------


class Regions:
    """The shared-memory regions of one server (every worker process holds one over the same
    `shared_dir`). `device`: the engine's device (CUDA regions need a CUDA one)."""

    def __init__(self, shared_dir: str | os.PathLike | None = None, *, device: torch.device | str = "cpu",
                 max_regions: int = MAX_REGIONS):
        if shared_dir is None:
            import tempfile
            shared_dir = tempfile.mkdtemp(prefix="advserve-shm-")
        self.directory = Path(shared_dir) / "shm"
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.device = torch.device(device)
        self.max_regions = max_regions
        self._lock = threading.Lock()
        self._maps: dict[str, tuple[tuple[int, int], dict, Any]] = {}  # name -> (file identity, entry, mapping)
        self._paths: dict[str, Path] = {}

    # --- the registry files ---

    def _path(self, name: str) -> Path:
        path = self._paths.get(name)
        if path is None:
            path = self.directory / (hashlib.sha256(name.encode()).hexdigest()[:40] + ".json")
            if len(self._paths) < 4 * self.max_regions:  # names seen: bounded, a cache only
                self._paths[name] = path
        return path

    @contextlib.contextmanager
    def _locked(self):
        with open(self.directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _entries(self) -> list[dict]:
        entries = []
        for path in sorted(self.directory.glob("*.json")):
            entry = _load(path)
            if entry is not None:
                entries.append(entry)
        return entries

    def _add(self, entry: dict, mapping: Any) -> None:
        """Write `entry` under the lock: refused for a name already registered or a full registry."""
        name = entry["name"]
        with self._locked():
            existing = _load(self._path(name))
            if existing is not None:
                raise InvalidArgument(f"a {_KIND_WORDS[existing['kind']]} region named {name!r} is already registered; "
                                      "unregister it first", field="name")
            if len(list(self.directory.glob("*.json"))) >= self.max_regions:
                raise InvalidArgument(f"{self.max_regions} shared memory regions are registered, the most this server "
                                      "holds; unregister one first", field="name")
            temporary = self.directory / f".{uuid.uuid4().hex}.tmp"
            temporary.write_text(json.dumps(entry))
            os.replace(temporary, self._path(name))
            identity = _identity(self._path(name))
        with self._lock:
            self._maps[name] = (identity, entry, mapping)

    def _remove(self, name: str, entry_id: str | None = None) -> None:
        """Remove `name`'s entry (only if it is still registration `entry_id`, when given)."""
        with self._locked():
            current = _load(self._path(name))
            if current is not None and (entry_id is None or current["id"] == entry_id):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(name))
        self._drop(name)

    def _current(self, name: str, entry: dict) -> bool:
        """Whether `entry` is still the registration of `name` (its id, read from the file)."""
        current = _load(self._path(name))
        return current is not None and current.get("id") == entry["id"]

    def _drop(self, name: str) -> None:
        with self._lock:
            cached = self._maps.pop(name, None)
        if cached is not None:
            cached[2].close()

    def _prune(self) -> None:
        """Drop this process's mappings whose entries changed or disappeared."""
        for name, (identity, _, _) in list(self._maps.items()):
            if _identity(self._path(name)) != identity:
                self._drop(name)

    # --- the API ---

    def register_system(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Register system region `name`: [offset, offset + byte_size) of the POSIX shared memory
        object `key` ("/name"), which must exist and hold it."""
        check_name(name)
        object_name(key)
        _check_int(offset, "offset", minimum=0)
        _check_int(byte_size, "byte_size", minimum=1)
        entry = {"kind": "system", "name": name, "id": uuid.uuid4().hex, "key": key, "offset": offset,
                 "byte_size": byte_size}
        fd, _ = _open_object(key)
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        if info.st_size < offset + byte_size:
            raise InvalidArgument(f"offset {offset} + byte_size {byte_size} run past the end of the shared memory object "
                                  f"{key!r} ({info.st_size} bytes)", field="byte_size")
        entry.update(dev=info.st_dev, ino=info.st_ino)
        try:
            mapping = _System(entry)
        except Released as exc:
            raise InvalidArgument(f"the shared memory object {key!r} changed while it was registered: {exc}",
                                  field="key") from None
        self._install(entry, mapping)

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        """Register CUDA region `name`: `byte_size` bytes of device `device_id` memory exported by
        another process as `raw_handle` (a cudaIpcMemHandle_t, 64 bytes)."""
        check_name(name)
        if not isinstance(raw_handle, (bytes, bytearray)) or len(raw_handle) != CUDA_IPC_HANDLE_SIZE:
            size = len(raw_handle) if isinstance(raw_handle, (bytes, bytearray)) else type(raw_handle).__name__
            raise InvalidArgument(f"raw_handle must be a cudaIpcMemHandle_t of {CUDA_IPC_HANDLE_SIZE} bytes, got {size}",
                                  field="raw_handle")
        _check_int(device_id, "device_id", minimum=0)
        _check_int(byte_size, "byte_size", minimum=1)
        if self.device.type != "cuda":
            raise InvalidArgument(f"CUDA shared memory needs the engine on a CUDA device; this server's engine is on "
                                  f"{self.device} (start it with --device cuda)", field="device_id")
        if device_id >= torch.cuda.device_count():
            raise InvalidArgument(f"device_id {device_id} is not a CUDA device of this server "
                                  f"({torch.cuda.device_count()} devices)", field="device_id")
        entry = {"kind": "cuda", "name": name, "id": uuid.uuid4().hex,
                 "raw_handle": base64.b64encode(bytes(raw_handle)).decode(), "device_id": device_id,
                 "byte_size": byte_size}
        self._install(entry, _Cuda(entry))

    def _install(self, entry: dict[str, Any], mapping: Any) -> None:
        """Add a new region's entry and this process's mapping of it (closed again if that fails)."""
        try:
            self._prune()
            self._add(entry, mapping)
        except BaseException:
            mapping.close()
            raise

    def unregister(self, kind: str, name: str | None = None) -> None:
        """Unregister region `name` of `kind` ("system" or "cuda"), or every region of that kind
        (name None). A name that is not registered (as that kind) is no error, as in Triton."""
        _check_kind(kind)
        if name is None:
            for entry in self._entries():
                if entry["kind"] == kind:
                    self._remove(entry["name"], entry["id"])
        else:
            entry = _load(self._path(check_name(name)))
            if entry is not None and entry["kind"] == kind:
                self._remove(name, entry["id"])
        self._prune()

    def status(self, kind: str, name: str | None = None) -> list[dict]:
        """The regions of `kind` (or the one named): system {"name", "key", "offset", "byte_size"}, cuda
        {"name", "device_id", "byte_size"}. NotFound for a name not registered as that kind."""
        _check_kind(kind)
        self._prune()
        fields = ("name", "key", "offset", "byte_size") if kind == "system" else ("name", "device_id", "byte_size")
        if name is None:
            entries = [entry for entry in self._entries() if entry["kind"] == kind]
        else:
            entry = _load(self._path(check_name(name)))
            if entry is None or entry["kind"] != kind:
                raise NotFound(f"no {_KIND_WORDS[kind]} region named {name!r} is registered", field="name")
            entries = [entry]
        return [{key: entry[key] for key in fields} for entry in entries]

    def _mapping(self, name: str, field: str) -> tuple[dict, Any]:
        """(entry, this process's mapping) of region `name`, opened on first use."""
        identity = _identity(self._path(name)) if isinstance(name, str) else None
        with self._lock:
            cached = self._maps.get(name)
        if cached is not None and cached[0] == identity and (not _recent(identity) or self._current(name, cached[1])):
            return cached[1], cached[2]
        if cached is not None:
            self._drop(name)
        self._prune()  # a miss: let go of whatever other regions changed meanwhile too
        entry = _load(self._path(name)) if identity is not None else None
        if entry is None:
            raise InvalidArgument(f"no shared memory region named {name!r:.80} is registered", field=field)
        try:
            mapping = _System(entry) if entry["kind"] == "system" else _Cuda(entry)
        except (Released, InvalidArgument) as exc:  # its object or exporter is gone since it was registered
            self._remove(name, entry["id"])
            reason = exc.message if isinstance(exc, InvalidArgument) else str(exc)
            raise InvalidArgument(f"{_KIND_WORDS[entry['kind']]} region {name!r} was released: {reason}",
                                  field=field) from None
        with self._lock:  # another thread may have opened it meanwhile: one mapping is kept, the other closed
            existing = self._maps.get(name)
            if existing is not None and existing[0] == identity and existing[1]["id"] == entry["id"]:
                kept, closed = existing, mapping
            else:
                kept, closed = (identity, entry, mapping), existing and existing[2]
                self._maps[name] = kept
        if closed:
            closed.close()
        return kept[1], kept[2]

    def _span(self, entry: dict, offset: Any, byte_size: Any, field: str) -> tuple[int, int]:
        offset = _check_int(offset, "shared_memory_offset", minimum=0, field=field)
        byte_size = _check_int(byte_size, "shared_memory_byte_size", minimum=0, field=field)
        if offset + byte_size > entry["byte_size"]:
            raise InvalidArgument(f"offset {offset} + byte_size {byte_size} run past the end of shared memory region "
                                  f"{entry['name']!r} ({entry['byte_size']} bytes)", field=field)
        return offset, byte_size

    def check(self, name: str, offset: int, byte_size: int, *, field: str) -> str:
        """Region `name` is registered (and usable from this process) and holds [offset, offset +
        byte_size); returns its kind, "system" or "cuda". Errors name `field`."""
        entry, _ = self._mapping(name, field)
        self._span(entry, offset, byte_size, field)
        return entry["kind"]

    def buffer(self, name: str, offset: int, byte_size: int, *, field: str,
               charge: Callable[[int], None] | None = None) -> memoryview | torch.Tensor:
        """The bytes [offset, offset + byte_size) of region `name`: a memoryview of host memory (system:
        the mapping itself, or a copy charged to `charge` for a foreign owner's object) or a uint8
        tensor on the region's CUDA device. Errors name `field`."""
        entry, mapping = self._mapping(name, field)
        offset, byte_size = self._span(entry, offset, byte_size, field)
        try:
            if entry["kind"] == "cuda":
                return mapping.tensor(offset, byte_size)
            return mapping.read(offset, byte_size, charge)
        except Released as exc:
            self._remove(name, entry["id"])
            raise InvalidArgument(f"{_KIND_WORDS[entry['kind']]} region {name!r} was released: {exc}", field=field) from None

    def read(self, name: str, offset: int, byte_size: int, *, dtype: torch.dtype, shape: tuple[int, ...], field: str,
             charge: Callable[[int], None] | None = None) -> torch.Tensor:
        """A tensor of `dtype` and `shape` holding the region's bytes [offset, offset + byte_size), which
        must be exactly prod(shape) × the element size: a view of the region (system memory of our
        own uid, CUDA) or of a copy charged to `charge`. BOOL bytes must be 0 or 1."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        if byte_size != math.prod(shape) * itemsize:
            raise InvalidArgument(f"shared_memory_byte_size is {byte_size} but shape {list(shape)} of {dtype} needs "
                                  f"{math.prod(shape) * itemsize} bytes", field=field)
        data = self.buffer(name, offset, byte_size, field=field, charge=charge)
        if isinstance(data, memoryview):
            return buffer_to_torch(data, dtype, tuple(shape), name, field)
        if offset % itemsize:
            raise InvalidArgument(f"shared_memory_offset {offset} of a CUDA region must be a multiple of the element "
                                  f"size {itemsize}", field=field)
        if dtype == torch.bool and data.numel() and int(data.max()) > 1:
            raise InvalidArgument(f"tensor {name!r}: bool bytes must be 0 or 1", field=field)
        return data.view(dtype).view(shape)

    def write(self, name: str, offset: int, byte_size: int, tensors: Iterable[Any], *, field: str) -> int:
        """Write `tensors` (torch tensors, numpy arrays or buffers; contiguous bytes each, back to back)
        into region `name` at `offset`; they must fit in `byte_size` (which must fit in the region).
        Returns the bytes written."""
        entry, mapping = self._mapping(name, field)
        offset, byte_size = self._span(entry, offset, byte_size, field)
        items = list(tensors)
        total = sum(_nbytes(item) for item in items)
        if total > byte_size:
            raise InvalidArgument(f"shared_memory_byte_size is {byte_size} but the output needs {total} bytes",
                                  field=field)
        try:
            if entry["kind"] == "cuda":
                target, position = mapping.tensor(offset, total), 0
                for item in items:
                    source = _as_uint8_tensor(item)
                    target[position:position + source.numel()].copy_(source)
                    position += source.numel()
                torch.cuda.synchronize(mapping.device_id)
                return total
            mapping.write(offset, items)
        except PermissionError:
            raise InvalidArgument(f"shared memory region {name!r} is read-only to this server (its object's "
                                  "permissions): it cannot hold outputs", field=field) from None
        except OSError as exc:
            raise InvalidArgument(f"writing shared memory region {name!r} failed: {exc.strerror}", field=field) from None
        except Released as exc:
            self._remove(name, entry["id"])
            raise InvalidArgument(f"{_KIND_WORDS[entry['kind']]} region {name!r} was released: {exc}", field=field) from None
        return total

    def close(self) -> None:
        """Drop this process's mappings (the registry stays)."""
        for name in list(self._maps):
            self._drop(name)


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _recent(identity: tuple[int, int]) -> bool:
    """Whether an entry file was written in the last 2 s: within a coarse timestamp tick, a file written
    after another one was unlinked may reuse its inode and carry the same mtime, so the identity alone
    does not tell a fresh registration from the one cached: its id is read to tell them apart."""
    return time.time_ns() - identity[1] < 2_000_000_000


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns


def _nbytes(item: Any) -> int:
    if isinstance(item, torch.Tensor):
        return item.numel() * item.element_size()
    return memoryview(item).nbytes


def _as_uint8_tensor(item: Any) -> torch.Tensor:
    if not isinstance(item, torch.Tensor):
        item = torch.from_numpy(np.frombuffer(_host_bytes(item), np.uint8))
    return item.detach().contiguous().reshape(-1).view(torch.uint8)


def _host_bytes(item: Any) -> memoryview:
    """The bytes of a tensor, array or buffer on the host, as a flat memoryview."""
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().contiguous()
        item = item.reshape(-1).view(torch.uint8).numpy()
    elif isinstance(item, np.ndarray):
        item = np.ascontiguousarray(item).reshape(-1).view(np.uint8)
    return memoryview(item).cast("B")


__all__ = ["CUDA_IPC_HANDLE_SIZE", "MAX_KEY_LENGTH", "MAX_NAME_LENGTH", "MAX_REGIONS", "Regions", "check_name",
           "check_registrant", "object_name", "peer_host"]
