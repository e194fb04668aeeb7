"""Server settings: one table, read from CLI flags and ADVSERVE_* environment variables."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any


def _default_admission_bytes() -> int:
    """A quarter of physical memory, capped at 8 GiB (bytes of request bodies in flight)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return max(64 << 20, min(total // 4, 8 << 30))


@dataclass(frozen=True)
class Settings:
    """Every knob of `advserve serve`. Each field is the flag --<name-with-dashes> and the environment
    variable ADVSERVE_<NAME> (flags win)."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    http_port: int = field(default=8000, metadata={"help": "REST port"})
    grpc_port: int = field(default=8001, metadata={"help": "gRPC port (the Advserve service, grpc.health.v1, "
                                                           "reflection)"})
    grpc_max_message_bytes: int = field(default=1 << 30, metadata={"help": "largest gRPC message, both ways; a "
                                                                         "request at most admission / 12 (its "
                                                                         "reservation while it arrives, 3 x its "
                                                                         "size, is a quarter of admission)"})
    grpc_max_concurrent_rpcs: int = field(default=256, metadata={"help": "gRPC calls in progress at once"})
    grpc_max_concurrent_streams: int = field(default=32, metadata={"help": "gRPC calls at once on one connection"})
    grpc_read_timeout_s: float = field(default=30.0, metadata={"help": "a gRPC request message must arrive whole "
                                                                      "within this long"})
    grpc_admission_wait_s: float = field(default=1.0, metadata={"help": "gRPC: longest wait for room in admission "
                                                                       "before UNAVAILABLE + Retry-After"})
    device: str = field(default="auto", metadata={"help": "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'"})
    log_level: str = field(default="info", metadata={"help": "critical, error, warning, info or debug",
                                                     "choices": ("critical", "error", "warning", "info", "debug")})
    max_body_bytes: int = field(default=1 << 30, metadata={"help": "largest binary request body (bytes)"})
    max_json_bytes: int = field(default=64 << 20, metadata={"help": "largest JSON request body (bytes); JSON is "
                                                                    "for small batches, use the binary framing"})
    max_inflate_ratio: int = field(default=1024, metadata={"help": "/v2 gzip/deflate bodies: most inflated bytes per "
                                                                  "compressed byte (413 past it: a compression bomb)"})
    max_tokens: int = field(default=1 << 28, metadata={"help": "most tokens in one request (B·T; for a packed "
                                                               "request, its padded form): 413 above"})
    admission_bytes: int = field(default_factory=_default_admission_bytes, metadata={
        "help": "request bytes admitted in flight (decoding, queued, computing, encoding); HTTP bodies are taken "
                "as they arrive, never on a declared length, a JSON body counting 16 x its length (its parsing); "
                "past it: 503 + Retry-After, 413 for one request that could never fit (default: a quarter of RAM, "
                "at most 8 GiB)"})
    request_timeout_s: float = field(default=600.0, metadata={"help": "per-request deadline from arrival to the "
                                                                    "answer: reading and decoding the body, the queue, "
                                                                    "compute and encoding (a body not complete by "
                                                                    "then: 408; later: 504 / DEADLINE_EXCEEDED)"})
    body_idle_timeout_s: float = field(default=10.0, metadata={"help": "HTTP: longest wait for the next chunk of a "
                                                                      "request body (408 request_timeout past it, "
                                                                      "the connection closed)"})
    header_timeout_s: float = field(default=10.0, metadata={"help": "HTTP: a connection must send a complete request "
                                                                   "line and headers within this long of opening or "
                                                                   "of its previous response, else it is closed"})
    max_connections: int = field(default=256, metadata={"help": "HTTP connections open at once; past it a new "
                                                               "connection is answered 503 (Retry-After: 1) and "
                                                               "closed (each holds at most ~320 KiB outside "
                                                               "admission)"})
    auth_token: str = field(default="", metadata={"help": "require 'Authorization: Bearer <token>' on both "
                                                         "transports (health exempt); prefer the environment "
                                                         "variable or --auth-token-file to a flag", "secret": True})
    auth_token_file: str = field(default="", metadata={"help": "read the bearer token from this file"})
    tls_cert: str = field(default="", metadata={"help": "PEM certificate chain: serve both transports over TLS"})
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: str = field(default="", metadata={"help": "PEM CA bundle: require client certificates (mTLS)"})
    metrics_port: int = field(default=0, metadata={"help": "serve Prometheus metrics on this port, bound to "
                                                           "127.0.0.1 only, plain HTTP and no auth (for a sidecar or "
                                                           "node agent; 0: at /metrics on the HTTP port, with the "
                                                           "HTTP port's auth and TLS)"})
    log_format: str = field(default="text", metadata={"help": "text or json (one JSON object per line)",
                                                      "choices": ("text", "json")})
    shutdown_grace_s: float = field(default=30.0, metadata={"help": "on SIGTERM: readiness off, then up to this "
                                                                   "long to finish accepted requests"})
    coalesce: bool = field(default=True, metadata={"help": "run small compatible advantage requests that arrive "
                                                           "together as one device batch"})
    max_wait_ms: float = field(default=0.0, metadata={"help": "how long the compute thread waits for more "
                                                              "requests to coalesce (0: only those already queued)"})
    max_batch_tokens: int = field(default=1 << 18, metadata={"help": "largest coalesced batch, in tokens (B·T)"})
    workers: int = field(default=0, metadata={"help": "front-end processes serving REST, /v2 and gRPC on the same "
                                                      "ports, each with its own engine, one admission budget and "
                                                      "one /metrics view across them (docs/workers.md); 0: auto, "
                                                      "min(usable CPU cores, 4); 1: a single process"})
    memory_trim_idle_s: float = field(default=2.0, metadata={"help": "return freed heap memory to the system "
                                                                    "(malloc_trim) once no request has been in "
                                                                    "flight for this long (0: never)"})
    kernels: str = field(default="auto", metadata={"help": "the engine's math: 'triton' (fused Triton kernels; a "
                                                         "CUDA device and the triton package), 'numba' (GAE and "
                                                         "reward-to-go in one pass on the CPU), 'torch', or 'auto' "
                                                         "(triton on CUDA, numba on the CPU, where installed)",
                                                 "choices": ("auto", "torch", "triton", "numba")})
    shared_memory: str = field(default="local", metadata={
        "help": "who may register shared-memory regions (/v2/systemsharedmemory, /v2/cudasharedmemory; "
                "docs/shared-memory.md): 'local' (callers connected over loopback), 'any' (every authenticated "
                "caller) or 'off'", "choices": ("local", "any", "off")})

    def validate(self) -> "Settings":
        """This Settings, checked: every number finite and in its range, each problem naming its flag;
        with --auth-token-file read into auth_token. Raises ValueError listing every problem."""
        problems = []

        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        for name, low, high in _INT_RANGES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                problems.append(f"{flag(name)} must be an integer in [{low}, {high}], got {value!r}")
        for name, low, high, low_inclusive in _FLOAT_RANGES:
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not (low <= value if low_inclusive else low < value) or value > high):
                interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}]"
                problems.append(f"{flag(name)} must be a finite number in {interval}, got {value!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key go together (--tls-cert, --tls-key)")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("--tls-client-ca needs --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                problems.append(f"{flag(name)}: no such file {path!r}")
        if self.auth_token and self.auth_token_file:
            problems.append("give --auth-token or --auth-token-file, not both")
        if problems:
            raise ValueError("; ".join(problems))
        if self.auth_token_file:
            with open(self.auth_token_file) as f:
                token = f.read().strip()
            if not token:
                raise ValueError(f"auth_token_file {self.auth_token_file!r} is empty")
            return dataclasses.replace(self, auth_token=token, auth_token_file="")
        return self

    def __repr__(self) -> str:  # never print the token
        shown = {f.name: ("***" if f.metadata.get("secret") and getattr(self, f.name) else getattr(self, f.name))
                 for f in fields(self)}
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


_DAY_S = 86400.0
# (setting, lowest, highest): the integers; ports 0 pick a free one (http, grpc) or mean "off" (metrics)
_INT_RANGES = (
    ("http_port", 0, 65535), ("grpc_port", 0, 65535), ("metrics_port", 0, 65535),
    ("grpc_max_message_bytes", 1, 2**31 - 1),  # protobuf's limit: below 2 GiB
    ("max_body_bytes", 1, 1 << 40), ("max_json_bytes", 1, 1 << 40), ("max_tokens", 1, 1 << 40),
    ("admission_bytes", 1, 1 << 44), ("max_batch_tokens", 1, 1 << 40), ("max_connections", 1, 1 << 20),
    ("max_inflate_ratio", 1, 1 << 20), ("grpc_max_concurrent_rpcs", 1, 1 << 20),
    ("grpc_max_concurrent_streams", 1, 1 << 20), ("workers", 0, 256),
)
# (setting, lowest, highest, lowest allowed): the durations, in seconds or milliseconds
_FLOAT_RANGES = (
    ("request_timeout_s", 0.0, 7 * _DAY_S, False), ("shutdown_grace_s", 0.0, _DAY_S, False),
    ("body_idle_timeout_s", 0.0, _DAY_S, False), ("header_timeout_s", 0.0, _DAY_S, False),
    ("max_wait_ms", 0.0, 60_000.0, True), ("memory_trim_idle_s", 0.0, _DAY_S, True),
    ("grpc_read_timeout_s", 0.0, _DAY_S, False), ("grpc_admission_wait_s", 0.0, _DAY_S, True),
)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity: taskset, a container's cpuset), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def worker_count(settings: Settings) -> int:
    """The front-end processes to run: --workers, or when 0 (auto) min(usable CPU cores, 4)."""
    return settings.workers or min(usable_cores(), 4)


def env_name(name: str) -> str:
    return f"ADVSERVE_{name.upper()}"


def parse_value(kind: Any, text: str) -> Any:
    """A setting's value from its text (flags and environment variables alike)."""
    if kind in (bool, "bool"):
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    return {"int": int, "float": float, "str": str}.get(kind, kind)(text)


def setting_fields():
    return fields(Settings)
