"""Locust load test of advserve: REST with binary framing, REST with JSON, and gRPC, from one file.

Normally started by `loadtest/run.py` (`make loadtest`), which also starts the server. By hand:

    .venv/bin/locust -f loadtest/locustfile.py --headless -u 8 -r 8 --run-time 30s \
        --host http://127.0.0.1:8000 --grpc-address 127.0.0.1:8001 --workload mix \
        [BinaryHttpUser JsonHttpUser GrpcUser]        # user classes (default: all three)

Options added to locust's (each also an environment variable):
  --grpc-address HOST:PORT   ADVSERVE_GRPC_ADDRESS   gRPC server (GrpcUser; required when it runs)
  --workload W               ADVSERVE_WORKLOAD       small | medium | large | mix | small-mix, or a weighted
                                                     list "grpo:8x512=3,losses:256x4096=1" (default mix)
  --tolerate-overload        ADVSERVE_TOLERATE_OVERLOAD   503 overloaded / UNAVAILABLE is not a failure:
                                                     reported under "<name> (overloaded)", then the
                                                     user waits Retry-After (at most 1 s)
  --summary-json PATH        ADVSERVE_SUMMARY_JSON   write the end-of-test summary here
  --wait-ms MS               ADVSERVE_WAIT_MS        pause between a user's requests (default 0: closed loop)
  --request-timeout S        ADVSERVE_REQUEST_TIMEOUT     per-request timeout (default 120 s)

Request names: "<transport> <endpoint> <estimator> <B>x<T>", transport bin / json / grpc (request type
POST for REST, grpc for gRPC). Every payload (request bodies, protobuf messages) is built once per
process at start, never per request. Every response is checked: status 200 (gRPC OK), the framing or
JSON decodes, the result tensors have the expected names, dtype and shape, their values are finite;
group estimators' advantages sum to zero within each group; and each response equals the first one of
its payload (the server is deterministic; coalescing must not mix requests), to a tolerance of 1e-5 -
on every response whose results are under 1 MiB, on every 16th otherwise (so that the load generator
does not steal the server's CPU). Any other outcome is a locust failure.

Server-Timing (decode, queue, compute, encode) is recorded per request name from REST's response header
and summarised at test stop (gRPC sends the same as trailing metadata `server-timing`, which this file
does not read yet: its gRPC rows say n/a): logged, and written with exact client-side latency percentiles to
--summary-json. Locust's own CSV statistics round response times (to 10 ms above 100 ms); the summary's
are exact. The summary is per process: use it with a single locust process (no --processes/workers).
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
import locust.stats
import numpy as np
from locust import User, events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.runners import MasterRunner, WorkerRunner

from advserve_client import framing, protocol
from advserve_client._pb import advserve_pb2_grpc as pb_grpc

grpc_gevent.init_gevent()  # grpc's I/O on gevent's loop; before any channel exists

log = logging.getLogger("advserve.loadtest")

# --- workloads ----------------------------------------------------------------------------------

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "gae", "reinforce_pp")
GROUP_SIZE = 8  # responses per prompt in group estimators
WORKLOADS: dict[str, dict[str, float]] = {
    "small": {"grpo:8x512": 1},
    "medium": {"gae:64x1024": 1},
    "large": {"losses:256x4096": 1},
    # a trainer fleet: many small GRPO-family calls, some rollout-sized advantage batches, a few big losses
    "mix": {"grpo:8x512": 30, "dr_grpo:8x512": 15, "rloo:8x512": 15, "gae:64x1024": 20,
            "reinforce_pp:64x1024": 10, "losses:256x4096": 10},
    # every estimator and both endpoints, small batches (the smoke test)
    "small-mix": {"grpo:8x512": 3, "dr_grpo:8x512": 1, "rloo:8x512": 1, "gae:8x512": 1, "reinforce_pp:8x512": 1,
                  "losses:8x512": 1},
}
JSON_MAX_TOKENS = 64 * 1024  # JSON users skip bigger payloads (JSON is for small batches)
VERIFY_ALWAYS_BYTES = 1 << 20  # results below this are compared with the first response every time
VERIFY_EVERY = 16  # larger ones: every 16th response of a user
TOLERANCE = 1e-5
RETRY_CAP_S = 1.0


def parse_workload(text: str) -> dict[str, float]:
    if text in WORKLOADS:
        return dict(WORKLOADS[text])
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        spec, _, weight = item.partition("=")
        out[spec] = float(weight or 1)
    if not out:
        raise ValueError(f"empty workload {text!r}")
    return out


@dataclass
class Payload:
    """One request, prebuilt for every transport."""

    spec: str                 # "grpo:8x512"
    kind: str                 # "advantages" or "losses"
    estimator: str            # estimator, or the policy loss mode for losses
    batch: int
    length: int
    group_ids: np.ndarray | None
    binary_body: bytes = b""
    binary_headers: dict[str, str] = field(default_factory=dict)
    json_body: bytes = b""
    grpc_request: Any = None
    outputs: tuple[str, ...] = ()
    reference: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # transport -> first results
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def tokens(self) -> int:
        return self.batch * self.length

    @property
    def output_bytes(self) -> int:
        return 4 * self.tokens * len(self.outputs)

    def name(self, transport: str) -> str:
        endpoint = {"bin": "advantages", "json": "advantages", "grpc": "ComputeAdvantages"}[transport] \
            if self.kind == "advantages" else {"bin": "losses", "json": "losses", "grpc": "ComputeLosses"}[transport]
        return f"{transport} {endpoint} {self.estimator} {self.batch}x{self.length}"


def build_payload(spec: str, seed: int) -> Payload:
    what, _, size = spec.partition(":")
    try:
        batch, length = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"payload {spec!r}: expected ESTIMATOR:BxT or losses:BxT") from None
    if what != "losses" and what not in ESTIMATORS:
        raise ValueError(f"payload {spec!r}: estimator must be one of {', '.join(ESTIMATORS)} or 'losses'")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, length // 8), length + 1, batch)
    lengths[0] = length  # the padded width is used
    mask = np.arange(length)[None, :] < lengths[:, None]
    tensors: dict[str, np.ndarray] = {}
    group_ids = None
    if what == "losses":
        logprobs = (-1.5 + 0.5 * rng.standard_normal((batch, length))).astype(np.float32)
        tensors = {"logprobs": logprobs,
                   "old_logprobs": (logprobs + 0.05 * rng.standard_normal((batch, length))).astype(np.float32),
                   "advantages": rng.standard_normal((batch, length)).astype(np.float32), "response_mask": mask}
        document: dict[str, Any] = {"preset": "verl", "policy_loss": {"mode": "ppo_clip"}}
        payload = Payload(spec, "losses", "ppo_clip", batch, length, None, outputs=("grad_logprobs",))
    else:
        rewards = rng.integers(0, 2, batch).astype(np.float32)
        tensors = {"rewards": rewards, "response_mask": mask}
        if what in ("grpo", "dr_grpo", "rloo"):
            group_ids = (np.arange(batch) // GROUP_SIZE).astype(np.int64)
            tensors["group_ids"] = group_ids
            for g in np.unique(group_ids):  # no zero-variance groups: each has a 1 and a 0
                rows = np.flatnonzero(group_ids == g)
                if len(rows) > 1:
                    rewards[rows[0]], rewards[rows[1]] = 1.0, 0.0
        if what == "gae":
            tensors["values"] = (0.5 + 0.1 * rng.standard_normal((batch, length))).astype(np.float32)
        document = {"estimator": what, "preset": "verl"}
        payload = Payload(spec, "advantages", what, batch, length, group_ids, outputs=("advantages", "returns"))

    raw = {name: framing.RawTensor.from_numpy(np.ascontiguousarray(v)) for name, v in tensors.items()}
    n, chunks = framing.encode(document, raw)
    payload.binary_body = b"".join(chunks)
    payload.binary_headers = {"content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(n),
                              "accept": framing.CONTENT_TYPE}
    if payload.tokens <= JSON_MAX_TOKENS:
        payload.json_body = json.dumps({**document, "tensors": {k: v.tolist() for k, v in tensors.items()}},
                                       separators=(",", ":")).encode()
    if payload.kind == "losses":
        payload.grpc_request = protocol.losses_request_to_pb(document, raw)
    else:
        payload.grpc_request = protocol.advantages_request_to_pb(document, raw)
    return payload


# --- per-process state, built at init ---------------------------------------------------------


class State:
    payloads: list[Payload] = []
    weights: list[float] = []
    tolerate_overload = False
    wait_s = 0.0
    timeout_s = 120.0
    grpc_address = ""
    summary_path = ""
    started = 0.0


class Recorder:
    """Exact client latencies and Server-Timing per request name (gevent: one thread, no locking)."""

    def __init__(self):
        self.latency_ms: dict[tuple[str, str], list[float]] = {}
        self.failures: dict[tuple[str, str], int] = {}
        self.bytes: dict[tuple[str, str], int] = {}
        self.timing: dict[str, dict[str, list[float]]] = {}
        self.failure_samples: list[str] = []

    def request(self, request_type, name, response_time, response_length, exception=None, **_):
        key = (request_type, name)
        if exception is None:
            self.latency_ms.setdefault(key, []).append(float(response_time))
            self.bytes[key] = self.bytes.get(key, 0) + int(response_length or 0)
        else:
            self.failures[key] = self.failures.get(key, 0) + 1
            if len(self.failure_samples) < 20:
                self.failure_samples.append(f"{request_type} {name}: {exception}")

    def server_timing(self, name: str, header: str | None) -> None:
        parts = parse_server_timing(header)
        if parts:
            per_name = self.timing.setdefault(name, {})
            for key, value in parts.items():
                per_name.setdefault(key, []).append(value)


RECORDER = Recorder()


def parse_server_timing(header: str | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";")
        for option in rest.split(";"):
            key, _, value = option.strip().partition("=")
            if key == "dur":
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
    return out


@events.init_command_line_parser.add_listener
def _arguments(parser):
    parser.add_argument("--grpc-address", type=str, env_var="ADVSERVE_GRPC_ADDRESS", default="",
                        help="advserve gRPC address HOST:PORT (GrpcUser)")
    parser.add_argument("--workload", type=str, env_var="ADVSERVE_WORKLOAD", default="mix",
                        help=f"{' | '.join(WORKLOADS)}, or 'grpo:8x512=3,losses:256x4096=1'")
    parser.add_argument("--tolerate-overload", action="store_true", env_var="ADVSERVE_TOLERATE_OVERLOAD",
                        default=False, help="503 overloaded / UNAVAILABLE is not a failure")
    parser.add_argument("--summary-json", type=str, env_var="ADVSERVE_SUMMARY_JSON", default="",
                        help="write the end-of-test summary (exact percentiles, Server-Timing) here")
    parser.add_argument("--wait-ms", type=float, env_var="ADVSERVE_WAIT_MS", default=0.0,
                        help="pause between a user's requests, ms (0: closed loop)")
    parser.add_argument("--request-timeout", type=float, env_var="ADVSERVE_REQUEST_TIMEOUT", default=120.0,
                        help="per-request timeout, seconds")


@events.init.add_listener
def _init(environment, **_):
    options = environment.parsed_options
    if options is None:
        return
    if isinstance(environment.runner, MasterRunner):
        return  # a master sends nothing
    if isinstance(environment.runner, WorkerRunner):
        log.warning("summary (--summary-json, Server-Timing) is per process; workers' summaries are not merged")
    workload = parse_workload(options.workload)
    started = time.perf_counter()
    State.payloads = [build_payload(spec, seed) for seed, spec in enumerate(workload)]
    State.weights = list(workload.values())
    State.tolerate_overload = bool(options.tolerate_overload)
    State.wait_s = max(0.0, options.wait_ms / 1e3)
    State.timeout_s = options.request_timeout
    State.grpc_address = options.grpc_address
    State.summary_path = options.summary_json
    environment.events.request.add_listener(RECORDER.request)
    log.info("payloads built in %.2f s: %s", time.perf_counter() - started,
             ", ".join(f"{p.spec} ({len(p.binary_body) / 2**20:.2f} MiB)" for p in State.payloads))


@events.test_start.add_listener
def _test_start(environment, **_):
    State.started = time.perf_counter()


@events.quitting.add_listener
def _final_csv(environment, **_):
    """locust's CSV writer rewrites the files once a second and is stopped without a last write: let it
    write the final numbers (the users are stopped by now), else _stats.csv misses the last second."""
    options = environment.parsed_options
    if options is not None and getattr(options, "csv_prefix", None):
        gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.25)


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))  # nearest rank
    return ordered[rank]


def summary(elapsed_s: float) -> dict[str, Any]:
    rows = []
    keys = sorted(set(RECORDER.latency_ms) | set(RECORDER.failures))
    all_ok: list[float] = []
    for key in keys:
        values = sorted(RECORDER.latency_ms.get(key, []))
        all_ok.extend(values)
        timing = RECORDER.timing.get(key[1], {})
        rows.append({
            "type": key[0], "name": key[1], "requests": len(values), "failures": RECORDER.failures.get(key, 0),
            "rps": len(values) / elapsed_s if elapsed_s > 0 else float("nan"),
            "mean_ms": sum(values) / len(values) if values else float("nan"),
            "p50_ms": _percentile(values, 0.50), "p95_ms": _percentile(values, 0.95),
            "p99_ms": _percentile(values, 0.99), "max_ms": values[-1] if values else float("nan"),
            "mean_response_bytes": RECORDER.bytes.get(key, 0) / len(values) if values else 0,
            "server_timing_mean_ms": {k: sum(v) / len(v) for k, v in timing.items()},
            "server_timing_p50_ms": {k: _percentile(sorted(v), 0.5) for k, v in timing.items()},
        })
    all_ok.sort()
    total = {"requests": len(all_ok), "failures": sum(RECORDER.failures.values()),
             "rps": len(all_ok) / elapsed_s if elapsed_s > 0 else float("nan"),
             "p50_ms": _percentile(all_ok, 0.5), "p95_ms": _percentile(all_ok, 0.95),
             "p99_ms": _percentile(all_ok, 0.99)}
    return {"elapsed_s": elapsed_s, "workload": {p.spec: w for p, w in zip(State.payloads, State.weights)},
            "total": total, "requests": rows, "failure_samples": RECORDER.failure_samples}


@events.test_stop.add_listener
def _test_stop(environment, **_):
    if isinstance(environment.runner, MasterRunner) or not State.started:
        return
    result = summary(time.perf_counter() - State.started)
    for row in result["requests"]:
        timing = ", ".join(f"{k} {v:.2f}" for k, v in row["server_timing_mean_ms"].items()) or "n/a"
        log.info("%-44s %6d ok %4d failed %8.1f req/s  p50 %8.2f  p95 %8.2f  p99 %8.2f ms; Server-Timing mean: %s",
                 row["name"], row["requests"], row["failures"], row["rps"], row["p50_ms"], row["p95_ms"],
                 row["p99_ms"], timing)
    if State.summary_path:
        with open(State.summary_path, "w") as f:
            json.dump(result, f, indent=1)


# --- response checks ----------------------------------------------------------------------------


class CheckFailed(Exception):
    pass


def check_results(payload: Payload, transport: str, document: dict[str, Any], arrays: dict[str, np.ndarray],
                  counter: int) -> None:
    """Names, shapes, finiteness, group sums, and equality with the first response of this payload."""
    shape = (payload.batch, payload.length)
    for name in payload.outputs:
        array = arrays.get(name)
        if array is None:
            raise CheckFailed(f"no tensor {name!r} in the response (has {sorted(arrays)})")
        if array.shape != shape:
            raise CheckFailed(f"{name}: shape {list(array.shape)}, expected {list(shape)}")
    if payload.kind == "losses":
        if not isinstance(document.get("loss"), (int, float)) or not math.isfinite(document["loss"]):
            raise CheckFailed(f"loss is {document.get('loss')!r}")
    elif document.get("stats", {}).get("sequences", payload.batch) != payload.batch:
        raise CheckFailed(f"stats.sequences {document['stats'].get('sequences')} != {payload.batch}")
    verify = payload.output_bytes < VERIFY_ALWAYS_BYTES or counter % VERIFY_EVERY == 0
    if not verify:
        return
    for name in payload.outputs:
        if not np.isfinite(arrays[name]).all():
            raise CheckFailed(f"{name}: non-finite values")
    if payload.group_ids is not None:  # group estimators: advantages (row values) sum to 0 per group
        first = arrays["advantages"][:, 0].astype(np.float64)
        sums = np.bincount(payload.group_ids, weights=first)
        if np.abs(sums).max() > 1e-3:
            raise CheckFailed(f"advantages do not sum to 0 within groups: {sums.tolist()}")
    with payload.lock:
        reference = payload.reference.setdefault(transport, {k: np.array(arrays[k]) for k in payload.outputs})
    for name in payload.outputs:
        ref, got = reference[name], arrays[name]
        if got is ref:
            continue
        scale = max(1.0, float(np.abs(ref).max()))
        diff = float(np.abs(got.astype(np.float64) - ref).max())
        if diff > TOLERANCE * scale:
            raise CheckFailed(f"{name} differs from the first response of this payload by {diff:.3g}")


def _retry_after(value: str | None) -> float:
    try:
        return min(RETRY_CAP_S, max(0.0, float(value or 1)))
    except ValueError:
        return RETRY_CAP_S


def _detail(response) -> str:
    """The error body (the server's {"error": ...}), else the transport error."""
    try:
        if response.content:
            return response.content[:300].decode(errors="replace")
    except Exception:  # noqa: BLE001 - no body at all (connection error)
        pass
    return repr(getattr(response, "error", None))


def pick() -> Payload:
    return random.choices(State.payloads, State.weights)[0]


# --- users --------------------------------------------------------------------------------------


class _RestUser(FastHttpUser):
    abstract = True
    transport = "bin"
    network_timeout = 120.0
    connection_timeout = 30.0
    tolerate_overload: bool | None = None  # None: --tolerate-overload decides

    def on_start(self):
        self.network_timeout = State.timeout_s
        self.counter = 0
        self.usable = [(p, w) for p, w in zip(State.payloads, State.weights) if self.accepts(p)]
        if not self.usable:
            raise RuntimeError(f"{type(self).__name__}: no payload of the workload fits this transport")
        self.payloads, self.weights = zip(*self.usable)

    def accepts(self, payload: Payload) -> bool:
        return True

    def wait_time(self):
        return State.wait_s

    def body(self, payload: Payload) -> tuple[bytes, dict[str, str]]:
        raise NotImplementedError

    def decode(self, payload: Payload, response) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        raise NotImplementedError

    @task
    def compute(self):
        payload = random.choices(self.payloads, self.weights)[0]
        body, headers = self.body(payload)
        name = payload.name(self.transport)
        path = "/v1/advantages" if payload.kind == "advantages" else "/v1/losses"
        self.counter += 1
        tolerate = State.tolerate_overload if self.tolerate_overload is None else self.tolerate_overload
        retry_s = 0.0
        with self.client.post(path, data=body, headers=headers, name=name, catch_response=True) as response:
            if response.status_code == 503 and tolerate:
                response.request_meta["name"] = f"{name} (overloaded)"
                retry_s = _retry_after(response.headers.get("retry-after"))
                response.success()
            elif response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {_detail(response)}")
            else:
                try:
                    document, arrays = self.decode(payload, response)
                    check_results(payload, self.transport, document, arrays, self.counter)
                    RECORDER.server_timing(name, response.headers.get("server-timing"))
                    if "server-timing" not in response.headers:
                        raise CheckFailed("no Server-Timing header")
                except Exception as exc:  # noqa: BLE001 - any decoding or check error is a failure
                    response.failure(f"{type(exc).__name__}: {exc}")
        if retry_s:
            gevent.sleep(retry_s)


class BinaryHttpUser(_RestUser):
    """POST /v1/advantages and /v1/losses with binary-framed tensors (binary responses)."""

    transport = "bin"

    def body(self, payload):
        return payload.binary_body, payload.binary_headers

    def decode(self, payload, response):
        if response.headers.get("content-type", "") != framing.CONTENT_TYPE:
            raise CheckFailed(f"content-type {response.headers.get('content-type')!r}")
        document, raw = framing.decode(response.content, response.headers.get(framing.HEADER_LENGTH))
        arrays = {}
        for name, tensor in raw.items():
            if not isinstance(tensor, framing.RawTensor) or tensor.dtype != "float32":
                raise CheckFailed(f"{name}: expected a float32 binary tensor, got {tensor!r:.80}")
            arrays[name] = tensor.to_numpy()
        return document, arrays


class JsonHttpUser(_RestUser):
    """The same requests as JSON (nested lists); payloads above 64Ki tokens are left to the others."""

    transport = "json"

    def accepts(self, payload):
        return bool(payload.json_body)

    def body(self, payload):
        return payload.json_body, {"content-type": "application/json", "accept": "application/json"}

    def decode(self, payload, response):
        document = json.loads(response.content)
        return document, {name: np.asarray(value, dtype=np.float32)
                          for name, value in document.get("tensors", {}).items()}


class GrpcUser(User):
    """advserve.v1.Advserve over gRPC: one channel (own connection) per user; each call reported to
    locust as request type "grpc"."""

    tolerate_overload: bool | None = None

    def wait_time(self):
        return State.wait_s

    def on_start(self):
        if not State.grpc_address:
            raise RuntimeError("GrpcUser needs --grpc-address HOST:PORT (or ADVSERVE_GRPC_ADDRESS)")
        self.channel = grpc.insecure_channel(State.grpc_address, options=[
            ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
            ("grpc.use_local_subchannel_pool", 1)])  # a connection per user, as separate trainers have
        self.stub = pb_grpc.AdvserveStub(self.channel)
        self.counter = 0

    def on_stop(self):
        self.channel.close()

    @task
    def compute(self):
        payload = pick()
        name = payload.name("grpc")
        method = self.stub.ComputeAdvantages if payload.kind == "advantages" else self.stub.ComputeLosses
        self.counter += 1
        tolerate = State.tolerate_overload if self.tolerate_overload is None else self.tolerate_overload
        exception: Exception | None = None
        length, retry_s = 0, 0.0
        started = time.perf_counter()
        try:
            response, call = method.with_call(payload.grpc_request, timeout=State.timeout_s)
            elapsed_ms = (time.perf_counter() - started) * 1e3
            length = response.ByteSize()
            try:
                if payload.kind == "advantages":
                    document, raw = protocol.advantages_response_from_pb(response)
                else:
                    document, raw = protocol.losses_response_from_pb(response)
                arrays = {}
                for key, tensor in raw.items():
                    if tensor is None:
                        continue
                    if tensor.dtype != "float32":
                        raise CheckFailed(f"{key}: dtype {tensor.dtype}")
                    arrays[key] = tensor.to_numpy()
                check_results(payload, "grpc", document, arrays, self.counter)
                metadata = dict(call.initial_metadata() or ()) | dict(call.trailing_metadata() or ())
                RECORDER.server_timing(name, metadata.get("server-timing"))
            except Exception as exc:  # noqa: BLE001
                exception = exc
        except grpc.RpcError as exc:
            elapsed_ms = (time.perf_counter() - started) * 1e3
            trailing = dict(exc.trailing_metadata() or ())
            if exc.code() == grpc.StatusCode.UNAVAILABLE and trailing.get("advserve-error-code") == "overloaded" \
                    and tolerate:
                name = f"{name} (overloaded)"
                retry_s = _retry_after(trailing.get("retry-after"))
            else:
                exception = CheckFailed(f"{exc.code().name}: {exc.details()}")
        self.environment.events.request.fire(request_type="grpc", name=name, response_time=elapsed_ms,
                                             response_length=length, exception=exception, context={})
        if retry_s:
            gevent.sleep(retry_s)
