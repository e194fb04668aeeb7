"""Prometheus metrics and structured request logs, shared by the REST and gRPC transports.

Metrics (prometheus-client, one registry per server, served at GET /metrics):
  advserve_requests_total{transport, endpoint, estimator, status}
  advserve_request_phase_seconds{transport, endpoint, phase}    phase: decode, queue, compute, encode
  advserve_request_bytes_total{transport, direction}             direction: in, out
  advserve_tokens_total{endpoint}, advserve_sequences_total{endpoint}
  advserve_rejections_total{transport, reason}                   the error code of every non-200
  advserve_queue_depth, advserve_bytes_in_flight, advserve_requests_in_progress (gauges)
Logs: one JSON line per compute request on the "advserve.access" logger, with the request id that
is also returned to the caller (X-Request-ID header / x-request-id metadata). On an error the line has
the error code ("error") and the message the caller got ("message", cut to MESSAGE_LIMIT characters),
and the estimator the request named even when it was refused before validation. Tokens are never logged.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

access_log = logging.getLogger("advserve.access")
REQUEST_ID_HEADER = "x-request-id"
MESSAGE_LIMIT = 500  # characters of an error message in the access log
_NAME_LIMIT = 64  # characters of a requested estimator name in the access log
_NAMED_ESTIMATOR = re.compile(rb'"estimator"\s*:\s*"([^"\\]{1,%d})"' % _NAME_LIMIT)
_PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def request_id(given: str | None) -> str:
    """The caller's request id when it is a sane token, else a new one."""
    if given and len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return uuid.uuid4().hex


def server_timing(**durations_s: float) -> str:
    """The standard Server-Timing header: `decode;dur=1.234, queue;dur=...` (milliseconds)."""
    return ", ".join(f"{name};dur={seconds * 1e3:.3f}" for name, seconds in durations_s.items())


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def error_body_message(body: bytes) -> str | None:
    """The message of a JSON error body: `{"error": {"message": ...}}` (REST) or `{"error": "..."}`
    (the Open Inference Protocol); None for anything else (an empty 499)."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    message = error.get("message") if isinstance(error, dict) else error
    return message if isinstance(message, str) else None


def estimator_named_in(body: bytes) -> str | None:
    """The estimator a REST advantages body names ("estimator": "..."), read from the raw bytes: for the
    log line of a request refused before its document was validated. None when there is none."""
    found = _NAMED_ESTIMATOR.search(body)
    return found.group(1).decode("utf-8", "replace") if found else None


def enum_field_name(message: Any, field: str) -> str | None:
    """The lower-case name of enum `field` of a protobuf request (ComputeAdvantagesRequest.estimator),
    None when unset, unknown or absent."""
    descriptor = getattr(message, "DESCRIPTOR", None)
    if descriptor is None or field not in descriptor.fields_by_name:
        return None
    enum = descriptor.fields_by_name[field].enum_type
    value = enum.values_by_number.get(getattr(message, field)) if enum is not None else None
    if value is None or value.number == 0:
        return None
    prefix = f"{field.upper()}_"
    return value.name[len(prefix):].lower() if value.name.startswith(prefix) else value.name.lower()


class Metrics:
    """The metrics of one server. `registry` is what /metrics serves. With `multiprocess_dir` (a worker
    of --workers: PROMETHEUS_MULTIPROC_DIR, set before prometheus_client was imported) the counters and
    histograms are written to files there by every worker and `registry` sums them over the workers
    (a dead worker's counts stay); the three gauges are then the callables' values, which the caller
    makes server-wide (the workers' shared board)."""

    def __init__(self, queue_depth: Callable[[], float], bytes_in_flight: Callable[[], float],
                 in_progress: Callable[[], float], multiprocess_dir: str | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        gauges = (("advserve_queue_depth", "Jobs waiting for the compute thread", queue_depth),
                  ("advserve_bytes_in_flight", "Request bytes admitted and not yet answered", bytes_in_flight),
                  ("advserve_requests_in_progress", "Compute requests being served", in_progress))
        if multiprocess_dir is not None:
            from prometheus_client import multiprocess

            r = CollectorRegistry()  # this process's own metrics (their values live in the files)
            multiprocess.MultiProcessCollector(self.registry, path=multiprocess_dir)
            self.registry.register(_Gauges(gauges))
        self.requests = Counter("advserve_requests", "Compute requests", ["transport", "endpoint", "estimator", "status"],
                                registry=r)
        self.phases = Histogram("advserve_request_phase_seconds", "Time per request phase",
                                ["transport", "endpoint", "phase"], buckets=_PHASE_BUCKETS, registry=r)
        self.bytes = Counter("advserve_request_bytes", "Request and response body bytes", ["transport", "direction"],
                             registry=r)
        self.tokens = Counter("advserve_tokens", "Tokens (B·T) processed", ["endpoint"], registry=r)
        self.sequences = Counter("advserve_sequences", "Sequences (B) processed", ["endpoint"], registry=r)
        self.rejections = Counter("advserve_rejections", "Requests answered with an error, by error code",
                                  ["transport", "reason"], registry=r)
        if multiprocess_dir is None:
            for name, documentation, value in gauges:
                Gauge(name, documentation, registry=r).set_function(value)

    def observe(self, *, transport: str, endpoint: str, estimator: str | None, status: str, bytes_in: int,
                bytes_out: int, phases: dict[str, float], batch: tuple[int, int] | None, request_id: str,
                started: float, error: str | None = None, message: str | None = None,
                named_estimator: str | None = None) -> None:
        """Record one finished request (metrics and its access-log line).

        estimator: the validated estimator (a metric label); named_estimator: the name the request gave,
        logged when `estimator` is None (a refused request; never a label: any string can arrive).
        error: the error code; message: what the caller was told (logged, cut to MESSAGE_LIMIT)."""
        self.requests.labels(transport, endpoint, estimator or "", status).inc()
        for phase, seconds in phases.items():
            self.phases.labels(transport, endpoint, phase).observe(seconds)
        self.bytes.labels(transport, "in").inc(bytes_in)
        self.bytes.labels(transport, "out").inc(bytes_out)
        if batch is not None:
            self.sequences.labels(endpoint).inc(batch[0])
            self.tokens.labels(endpoint).inc(batch[0] * batch[1])
        if error is not None:
            self.rejections.labels(transport, error).inc()
        if access_log.isEnabledFor(logging.INFO):
            record: dict[str, Any] = {
                "request_id": request_id, "transport": transport, "endpoint": endpoint,
                "estimator": estimator or (_cut(named_estimator, _NAME_LIMIT) if named_estimator else None),
                "status": status, "duration_ms": round((time.perf_counter() - started) * 1e3, 3),
                "bytes_in": bytes_in, "bytes_out": bytes_out,
                **{f"{phase}_ms": round(seconds * 1e3, 3) for phase, seconds in phases.items()},
            }
            if error is not None:
                record["error"] = error
                if message:
                    record["message"] = _cut(message, MESSAGE_LIMIT)
            if batch is not None:
                record["sequences"], record["tokens"] = batch[0], batch[0] * batch[1]
            access_log.info(json.dumps(record))


class _Gauges:
    """A collector of gauges read from callables at each scrape: (name, documentation, callable)."""

    def __init__(self, gauges):
        self.gauges = gauges

    def collect(self):
        for name, documentation, value in self.gauges:
            yield GaugeMetricFamily(name, documentation, value=float(value()))


class JsonFormatter(logging.Formatter):
    """Log records as JSON lines: time, level, logger, message (an access line is merged in); with
    `pid`, the process id too (--workers)."""

    def __init__(self, pid: bool = False):
        super().__init__()
        self.pid = pid

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name}
        if self.pid:
            entry["pid"] = record.process
        message = record.getMessage()
        if record.name == access_log.name and message.startswith("{"):
            entry.update(json.loads(message))
        else:
            entry["message"] = message
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)
