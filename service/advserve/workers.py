"""The parallel front end (`--workers N`, N > 1): one supervisor process and N worker processes serving
REST, /v2 and gRPC on the same ports (docs/workers.md).

The supervisor never imports torch, grpc or numpy (forking a process that started their threads is
unsafe). It reserves the ports (`reserve_port`: a clear exit naming host:port when one is taken),
makes the server's private `shared_dir` and the `Board` (the shared counters: each worker's admitted
bytes, requests in progress and queued jobs, one slot per worker), then forks the workers. Each
worker (`server.serve(settings, worker)`) imports torch, builds its own engine and runtime, and binds
its own SO_REUSEPORT listening sockets (`listen_socket`, grpc.so_reuseport): the kernel spreads new
connections over the workers, and a dead worker's share goes to the others. While the supervisor
lives, its bound (never listening) SO_REUSEPORT socket keeps each port reserved; Linux lets only
sockets of the same effective user join a SO_REUSEPORT group, so no other user's process can.

SIGTERM or SIGINT to the supervisor: every worker drains (as a single process does) and exits, then
the supervisor exits 0; a second signal stops the workers at once. A worker that dies unexpectedly is
logged and restarted after a bounded backoff, its slot of the board zeroed first.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import mmap
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

log = logging.getLogger("advserve")

ADMITTED, IN_PROGRESS, QUEUED, READY = range(4)
_FIELDS = 4
BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # between restarts of a worker that keeps dying
STABLE_S = 30.0  # a worker that lived this long starts the backoff again from its first step
MAX_START_FAILURES = 3  # workers dying before they ever served, in a row: the supervisor gives up


class Board:
    """Counters shared by every process of one server: an anonymous MAP_SHARED mmap made before the fork,
    `_FIELDS` int64 per worker slot (ADMITTED bytes, IN_PROGRESS requests, QUEUED jobs, READY), so a dead
    worker's share can be zeroed by the supervisor. Each process writes only its own slot; `locked`
    (flock on a file of shared_dir, opened once per process, plus a thread lock) makes a read of every
    slot and a write of one atomic across processes (admission's check-and-take)."""

    def __init__(self, slots: int, lock_path: str):
        self.slots = slots
        self._map = mmap.mmap(-1, slots * _FIELDS * 8)  # MAP_SHARED | MAP_ANONYMOUS: inherited by the fork
        self.values = memoryview(self._map).cast("q")
        self.lock_path = lock_path
        with open(lock_path, "a"):
            pass
        self._fd, self._fd_pid = -1, -1
        self._thread_lock = threading.Lock()

    def _lock_fd(self) -> int:
        if self._fd_pid != os.getpid():  # flock excludes open files, not processes: one open per process
            self._fd, self._fd_pid = os.open(self.lock_path, os.O_RDWR | os.O_CLOEXEC), os.getpid()
        return self._fd

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across the threads and processes of the server (released if a holder dies)."""
        with self._thread_lock:
            fd = self._lock_fd()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def get(self, slot: int, field: int) -> int:
        return self.values[slot * _FIELDS + field]

    def set(self, slot: int, field: int, value: int) -> None:
        self.values[slot * _FIELDS + field] = value

    def add(self, slot: int, field: int, delta: int) -> None:
        self.values[slot * _FIELDS + field] += delta

    def total(self, field: int) -> int:
        """The sum of `field` over every worker (a snapshot)."""
        return sum(self.values[field::_FIELDS])

    def clear(self, slot: int) -> None:
        """Zero a dead worker's slot (its admitted bytes died with it)."""
        with self.locked():
            for field in range(_FIELDS):
                self.set(slot, field, 0)


@dataclass
class Worker:
    """What one worker process gets from the supervisor."""

    slot: int
    count: int
    shared_dir: str
    board: Board
    metrics_dir: str

    @property
    def intra_op_threads(self) -> int:
        """torch threads of this worker: the cores shared out, at least one."""
        from .config import usable_cores

        return max(1, usable_cores() // self.count)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, never listening SO_REUSEPORT socket on host:port, held by the supervisor for its whole
    life so the port stays ours while workers come and go. First a plain bind (no SO_REUSEPORT) checks
    that nobody holds the port, not even a SO_REUSEPORT group of another process. Port 0: a free one.
    Raises OSError (EADDRINUSE) when it is taken."""
    family = _family(host)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # an earlier run's TIME_WAIT is no owner
        probe.bind((host, port))
        port = probe.getsockname()[1]
    holder = socket.socket(family, socket.SOCK_STREAM)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((host, port))
    except OSError:
        holder.close()
        raise
    return holder


def listen_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A worker's own listening socket on host:port, joining the server's SO_REUSEPORT group."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the supervisor dies (a worker never outlives it)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def supervise(settings, configure_logging: Callable[[], None]) -> int:
    """Run `settings.workers` (resolved: config.worker_count) workers until a signal; the exit status."""
    from dataclasses import replace

    from .config import worker_count

    count = worker_count(settings)
    shared_dir = tempfile.mkdtemp(prefix=f"advserve-{os.getpid()}-")
    os.chmod(shared_dir, 0o700)
    metrics_dir = os.path.join(shared_dir, "metrics")
    os.mkdir(metrics_dir, 0o700)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before prometheus_client is imported anywhere
    configure_logging()
    holders: list[socket.socket] = []
    try:
        ports = {}
        # (setting, host, what the single process says of it when the port is taken)
        wanted = [("http_port", settings.host, "cannot bind REST on"), ("grpc_port", settings.host,
                                                                        "cannot start gRPC on")]
        if settings.metrics_port:
            wanted.append(("metrics_port", "127.0.0.1", "cannot serve metrics on"))
        for name, host, what in wanted:
            try:
                holders.append(reserve_port(host, getattr(settings, name)))
            except OSError as exc:
                sys.exit(f"advserve: {what} {host}:{getattr(settings, name)} (--{name.replace('_', '-')}): "
                         f"{exc.strerror or exc}")
            ports[name] = holders[-1].getsockname()[1]
        settings = replace(settings, **ports)
        board = Board(count, os.path.join(shared_dir, "board.lock"))
        return Supervisor(settings, count, board, shared_dir, metrics_dir, holders).run()
    finally:
        for holder in holders:
            holder.close()
        shutil.rmtree(shared_dir, ignore_errors=True)


class Supervisor:
    """Forks the workers, restarts those that die, and forwards the exit signals."""

    def __init__(self, settings, count: int, board: Board, shared_dir: str, metrics_dir: str,
                 holders: list[socket.socket]):
        self.settings, self.count, self.board = settings, count, board
        self.shared_dir, self.metrics_dir, self.holders = shared_dir, metrics_dir, holders
        self.pids: dict[int, int] = {}  # pid -> slot
        self.started: dict[int, float] = {}  # slot -> when its current worker started
        self.failures: dict[int, int] = {}  # slot -> consecutive early deaths (for the backoff)
        self.signals = 0

    def _on_signal(self, signum, frame) -> None:
        self.signals += 1
        first = self.signals == 1
        log.info("supervisor: %s; %s", signal.Signals(signum).name,
                 "draining every worker" if first else "stopping every worker now")
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # a worker's second SIGTERM stops it at once

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        s = self.settings
        log.info("supervisor %d: %d workers on REST %s:%d, gRPC %s:%d", os.getpid(), self.count, s.host,
                 s.http_port, s.host, s.grpc_port)
        for slot in range(self.count):
            self._spawn(slot)
        status = 0
        start_failures = 0
        while self.pids:
            try:
                pid, wait_status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            slot = self.pids.pop(pid, None)
            if slot is None:
                continue
            code = os.waitstatus_to_exitcode(wait_status)
            served = self.board.get(slot, READY) == 1
            self.board.clear(slot)
            if self.signals:
                status = status or (0 if code == 0 else 1)
                continue
            lived = time.monotonic() - self.started[slot]
            log.log(logging.WARNING if code == 0 else logging.ERROR, "worker %d (pid %d) %s after %.1f s; restarting it",
                    slot, pid, f"exited with status {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}",
                    lived)
            start_failures = 0 if served else start_failures + 1
            if start_failures >= MAX_START_FAILURES:
                log.error("supervisor: %d workers in a row died before serving; stopping", start_failures)
                self._on_signal(signal.SIGTERM, None)
                status = 1
                continue
            self.failures[slot] = 0 if lived >= STABLE_S else self.failures.get(slot, 0) + 1
            delay = BACKOFF_S[min(self.failures[slot], len(BACKOFF_S)) - 1] if self.failures[slot] else 0.0
            end = time.monotonic() + delay
            while not self.signals and time.monotonic() < end:
                time.sleep(min(0.05, max(end - time.monotonic(), 0)))
            if not self.signals:
                self._spawn(slot)
        log.info("supervisor: every worker exited")
        return status

    def _spawn(self, slot: int) -> None:
        worker = Worker(slot, self.count, self.shared_dir, self.board, self.metrics_dir)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            self.pids[pid] = slot
            self.started[slot] = time.monotonic()
            return
        code = 1
        try:
            os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor only, which drains every worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _die_with_parent()
            for holder in self.holders:
                holder.close()
            from .server import serve

            serve(self.settings, worker)
            code = 0
        except SystemExit as exc:
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
            code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - logged; the supervisor restarts the worker
            log.exception("worker %d failed", slot)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
