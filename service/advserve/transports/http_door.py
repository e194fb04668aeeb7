"""The HTTP door, shared by the native REST API (`rest`) and the Open Inference Protocol's (`oip_rest`):
the admission middleware (`AdmissionControl`: auth, drain, body limits, admission, deadlines), the
connection guard (`guarded_protocol`) and the one mapping of failures to answers in each API's error
shape (`{"error": {"code", "message", "field"}}` on /v1, `{"error": "..."}` on /v2)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from typing import Any, Callable

import numpy as np
import orjson
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from advserve_client.framing import CONTENT_TYPE, HEADER_LENGTH

from ..config import Settings
from ..errors import (STATUS, AdvserveError, InvalidArgument, PayloadTooLarge, RequestTimeout, Unavailable,
                      error_message)
from ..runtime import JSON_DECODE_COST, Abandoned, Deadline, Lease, Runtime

log = logging.getLogger("advserve")


def is_binary(headers) -> bool:
    """Whether a /v1 request is binary-framed (docs/binary-framing.md, section 1)."""
    return HEADER_LENGTH.lower() in headers or headers.get("content-type", "").lower().startswith(CONTENT_TYPE)


def is_oip_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _orjson_dumps(document: Any) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)


def _error_response(error: AdvserveError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(error.retry_after_s)))} if isinstance(error, Unavailable) else None
    return JSONResponse({"error": error.to_dict()}, status_code=STATUS.get(error.code, (500, ""))[0], headers=headers)


_UNION_MEMBER = re.compile(r"^(dict|list|bool|int|float|str|none)(\[.*\])?$")


def _validation_error(exc: ValidationError | RequestValidationError) -> JSONResponse:
    from ..hints import field_hint  # where a misplaced top-level field (a parameter, a tensor) belongs

    first = exc.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    # a union's member ("policy_loss.dict[str,any]") is no field: the field is where the union is
    location = list(itertools.takewhile(lambda part: not _UNION_MEMBER.match(part), location))
    field = ".".join(location) or None
    message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
    kind = {"AdvantagesBody": "advantages", "LossesBody": "losses", "AnalysisBody": "analysis"}.get(
        getattr(exc, "title", None))
    hint = field_hint(location[0], kind) if first.get("type") == "extra_forbidden" and len(location) == 1 else None
    if hint is not None:
        message = f"{field}: not a request field; {hint}"
    return _error_response(InvalidArgument(message, field=field))


def oip_error_response(error: AdvserveError) -> Response:
    """The protocol's error: `{"error": "..."}` with the status of errors.STATUS (and Retry-After)."""
    headers = {"Retry-After": str(max(1, round(error.retry_after_s)))} if isinstance(error, Unavailable) else None
    return JSONResponse({"error": error_message(error)}, status_code=STATUS.get(error.code, (500, ""))[0],
                        headers=headers)


def _failure_response(exc: BaseException, endpoint: str, rid: str, error_response) -> tuple[Response, str, str]:
    """(response, status, error code) of a request that failed with `exc`: a domain error as the table
    says; a pydantic validation error 400; input nested too deeply for a parser (RecursionError) 400 on
    the body; MemoryError 413 on the body (the request needs more memory than the server has); the
    caller gone 499 (nothing is sent); anything else is a bug: logged with the request id, 500."""
    if isinstance(exc, (ValidationError, RequestValidationError)):
        return _validation_error(exc), "400", "invalid_argument"
    if isinstance(exc, RecursionError):
        exc = InvalidArgument("the request is nested too deeply to parse", field="body")
    elif isinstance(exc, MemoryError):
        exc = PayloadTooLarge("the request needs more memory than the server can give it; send a smaller batch",
                              field="body")
    if isinstance(exc, AdvserveError):
        return error_response(exc), str(STATUS.get(exc.code, (500,))[0]), exc.code
    if isinstance(exc, (ClientDisconnect, Abandoned)):  # the caller went away: nothing to answer, not a bug
        return Response(status_code=499), "499", "client_disconnected"
    log.error("internal error on %s (request id %s)", endpoint, rid, exc_info=exc)
    return error_response(AdvserveError("internal error")), "500", "internal"


class FramedResponse(Response):
    """A binary-framed body (docs/binary-framing.md; the Open Inference Protocol's binary outputs have
    the same shape) with Content-Length set up front. A large one is written as it lies: the header,
    then each buffer as its own ASGI body message, straight from the tensors' memory (no joined copy);
    one under JOINED_BODY_BYTES goes out as one message (one write: a copy of a few KiB costs less
    than a system call per piece). A buffer is a memoryview, or a `device.HostCopy` whose copy from a
    device, if not done, is awaited in a worker thread just before it is written, so the copies of the
    later buffers overlap with writing the earlier ones. `nbytes` is the body's length."""

    media_type = CONTENT_TYPE

    def __init__(self, header: bytes, buffers: list, headers: dict[str, str] | None = None):
        self.header, self.buffers = header, buffers
        self.nbytes = len(header) + sum(_nbytes(buffer) for buffer in buffers)
        super().__init__(None, media_type=CONTENT_TYPE, headers=headers)
        self.headers["content-length"] = str(self.nbytes)

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if self.nbytes < JOINED_BODY_BYTES:
            views = [await _landed(buffer) for buffer in self.buffers]
            await send({"type": "http.response.body", "body": b"".join([self.header, *views])})
            return
        await send({"type": "http.response.body", "body": self.header, "more_body": True})
        for buffer in self.buffers:
            view = await _landed(buffer)
            if view.nbytes:
                await send({"type": "http.response.body", "body": view, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


JOINED_BODY_BYTES = 256 << 10  # a framed response body under this is sent as one message


async def _landed(buffer) -> memoryview:
    """The bytes of a memoryview or of a `device.HostCopy` (its copy awaited off the loop if in flight)."""
    if isinstance(buffer, memoryview):
        return buffer
    if not buffer.done():
        await asyncio.get_running_loop().run_in_executor(None, buffer.wait)
    return buffer.bytes_view()


def _nbytes(buffer) -> int:
    """The length of a memoryview or of a `device.HostCopy`'s tensor."""
    return buffer.nbytes if isinstance(buffer, memoryview) else buffer.tensor.numel() * buffer.tensor.element_size()


def body_length(response: Response) -> int:
    """The length of a response's body (a `FramedResponse` is not held as one bytes object)."""
    return response.nbytes if isinstance(response, FramedResponse) else len(response.body)


# --- admission ----------------------------------------------------------------------------------


class AdmissionControl:
    """ASGI middleware, the door: bearer-token auth on everything but /health/* and /v2/health/* (401),
    then on POST /v1/* and /v2/* (the Open Inference Protocol): refusal while draining (503), and the
    body, read here, in full, before the application runs:

    - a declared Content-Length over the body limit (binary and JSON have their own) or over the
      admission capacity: 413 at once; over the capacity free now: 503 + Retry-After at once. Nothing
      is reserved on the declared length: bytes are admitted as they arrive (a chunk that does not
      fit: 503), so a connection that declares much and sends little holds only what it sent. A JSON
      body is charged JSON_DECODE_COST times its length (parsing it costs that), once it is in; once
      decoded (B·T known), the route charges the memory to compute it (`runtime.charge_compute`, as
      gRPC does) before queueing it: 413 if body and compute could never fit, 503 + Retry-After at
      once if not now (HTTP has no admission line to wait in);
    - nothing for --body-idle-timeout-s between two chunks, or the body not complete within
      --request-timeout-s of the request's arrival: 408 request_timeout;
    - a response that leaves part of a body unread closes the connection (Connection: close).

    The body (bytes, or a memoryview of one buffer of its length for a large declared length: no join,
    its pages touched only as bytes arrive), the request's `Deadline` and its admission `Lease` are
    handed to the routes in the ASGI scope ("advserve.body", "advserve.deadline", "advserve.lease");
    the lease is released once the response has been sent (or, when a worker thread abandoned at the
    deadline still uses the bytes, once it ends). A request turned away here costs no compute. Errors
    on /v2 paths have the protocol's body, {"error": "..."}."""

    def __init__(self, app: Callable, runtime: Runtime):
        self.app = app
        self.runtime = runtime
        self.admission = runtime.admission
        self.max_body_bytes = runtime.settings.max_body_bytes
        self.max_json_bytes = runtime.settings.max_json_bytes
        self.idle_timeout_s = runtime.settings.body_idle_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        oip = is_oip_path(scope["path"])
        transport, error_response = ("oip_http", oip_error_response) if oip else ("http", _error_response)
        compute = scope["method"] == "POST" and (scope["path"].startswith("/v1/") or oip)

        async def refuse(error: AdvserveError, close: bool) -> None:
            self.runtime.metrics.rejections.labels(transport, error.code).inc()
            response = error_response(error)
            if close:  # the rest of the body is not worth reading
                response.headers["connection"] = "close"
            await response(scope, receive, send)

        try:
            if not scope["path"].startswith(("/health/", "/v2/health/")):
                self.runtime.authenticate(headers.get("authorization"))
            if compute and self.runtime.draining:
                raise Unavailable("the server is shutting down; retry on another instance")
        except AdvserveError as error:
            return await refuse(error, close=compute)
        if not compute:
            return await self.app(scope, receive, send)
        # binary as each endpoint parses it: /v2 only with Triton's header-length header (a JSON body
        # under an octet-stream Content-Type is still JSON, and gets the JSON limit)
        binary = HEADER_LENGTH.lower() in headers if oip else is_binary(headers)
        limit = self.max_body_bytes if binary else self.max_json_bytes
        kind = "binary" if binary else "JSON (use the binary framing for large batches)"
        declared_text = headers.get("content-length", "")
        declared = int(declared_text) if declared_text.isascii() and declared_text.isdigit() else None
        deadline = self.runtime.deadline()
        lease = self.admission.lease()
        replay: _Replay | None = None
        try:
            with self.runtime.serving():
                try:
                    if declared is not None:
                        if declared > limit:
                            raise PayloadTooLarge(f"request body exceeds the {kind} limit of {limit} bytes",
                                                  field="body")
                        if not binary:
                            self._check_json(declared)
                        self.admission.check(declared * (1 if binary else JSON_DECODE_COST))
                except AdvserveError as error:  # nothing read yet: a short body is drained, keeping the connection
                    return await refuse(error, close=declared is None or declared > _DRAINED_REST)
                try:
                    body = await self._read_body(receive, declared, limit, kind, lease, deadline)
                except AdvserveError as error:  # part of the body read: the rest is not worth waiting for
                    return await refuse(error, close=True)
                except ClientDisconnect:
                    return
                try:
                    if not binary:  # what parsing it will cost (Python lists), before it is parsed
                        self._check_json(len(body))
                        lease.grow((JSON_DECODE_COST - 1) * len(body))
                except AdvserveError as error:
                    return await refuse(error, close=False)
                scope.update({"advserve.body": body, "advserve.deadline": deadline, "advserve.lease": lease,
                              "advserve.receive": receive})
                replay = _Replay(body, receive)
                del body
                await self.app(scope, replay, send)
        except Unavailable as error:  # draining began between the check and `serving`
            await refuse(error, close=True)
        finally:
            # the body leaves with the request: uvicorn keeps the scope until the connection's next request,
            # and the scope is in reference cycles (its receive is the connection's), freed only by the GC
            for key in _SCOPE_KEYS:
                scope.pop(key, None)
            if replay is not None:
                replay.body = None
            lease.close()

    def _check_json(self, nbytes: int) -> None:
        """413 for a JSON body whose parsing could never fit the admission capacity."""
        if nbytes * JSON_DECODE_COST > self.admission.capacity:
            raise PayloadTooLarge(f"a JSON body of {nbytes} bytes takes {JSON_DECODE_COST} times that to parse, more "
                                  f"than the server's admission capacity of {self.admission.capacity} bytes; use the "
                                  "binary framing for large batches", field="body")

    async def _read_body(self, receive, declared: int | None, limit: int, kind: str, lease: Lease,
                         deadline: Deadline) -> bytes | memoryview:
        """The whole body, each chunk admitted as it arrives, under the idle timeout and the deadline."""
        buffer = body_buffer(declared) if declared is not None and declared >= ONE_BUFFER_BYTES else None
        try:
            return await self._receive_into(receive, buffer, limit, kind, lease, deadline)
        except BaseException as exc:  # noqa: BLE001 - re-raised as it is, less the frames that hold the buffer
            # at once: the traceback's frames would keep the buffer alive as long as the exception
            buffer = None
            raise exc.with_traceback(None) from None

    async def _receive_into(self, receive, buffer: memoryview | None, limit: int, kind: str, lease: Lease,
                            deadline: Deadline) -> bytes | memoryview:
        chunks: list[bytes] = []
        seen = 0
        while True:
            remaining = deadline.remaining()
            if remaining <= 0:
                raise _body_timeout(deadline.timeout_s, "--request-timeout-s", seen)
            idle = self.idle_timeout_s < remaining  # which bound this wait is armed with (a loop's timer may
            try:  # fire a little early: uvloop's by up to its millisecond clock, so no clock is read after it)
                message = await _within(receive(), self.idle_timeout_s if idle else remaining)
            except asyncio.TimeoutError:
                raise _body_timeout(self.idle_timeout_s if idle else deadline.timeout_s,
                                    "--body-idle-timeout-s" if idle else "--request-timeout-s", seen) from None
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            if chunk:
                if seen + len(chunk) > limit:
                    raise PayloadTooLarge(f"request body exceeds the {kind} limit of {limit} bytes", field="body")
                lease.grow(len(chunk))
                if buffer is not None:
                    buffer[seen:seen + len(chunk)] = chunk
                else:
                    chunks.append(chunk)
                seen += len(chunk)
            if not message.get("more_body", False):
                break
        if buffer is not None:
            return buffer[:seen]
        # joined in one synchronous step on the event loop: at most one body's transient copy at a time
        # (a body under ONE_BUFFER_BYTES, or an upload without Content-Length)
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def body_buffer(nbytes: int) -> memoryview:
    """Uninitialized memory for a body of `nbytes`, taken from the heap (the server raises glibc's mmap
    threshold: runtime.tune_allocator): pages already mapped by earlier requests are reused without a
    fault or a zeroing pass (an anonymous mapping per request cost 0.5 ms per MiB on the 2-core VM:
    bench/bench_http.py), and fresh ones are touched only as bytes arrive, so a connection that
    declares much and sends little adds only what it sent to the resident memory."""
    return memoryview(np.empty(nbytes, dtype=np.uint8))


ONE_BUFFER_BYTES = 256 << 10  # a declared body at least this large is read into one buffer of its length
_DRAINED_REST = 64 << 10  # a refused body with at most this much declared is read and dropped (keep-alive)
_timeout = getattr(asyncio, "timeout", None)  # Python >= 3.11: no task per wait


async def _within(awaitable, seconds: float):
    """`await awaitable`, asyncio.TimeoutError after `seconds`."""
    if _timeout is None:
        return await asyncio.wait_for(awaitable, seconds)
    async with _timeout(seconds):
        return await awaitable


def _body_timeout(seconds: float, flag: str, seen: int) -> RequestTimeout:
    return RequestTimeout(f"the request body did not arrive in time ({flag} {seconds:g}; {seen} bytes "
                          f"received)", field="body")


_SCOPE_KEYS = ("advserve.body", "advserve.deadline", "advserve.lease", "advserve.receive")


class _Replay:
    """The application's receive: the body already read (once, as one message), then the connection's
    own messages (http.disconnect)."""

    def __init__(self, body: bytes | memoryview, receive):
        self.body, self.receive = body, receive

    async def __call__(self):
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": bytes(body), "more_body": False}
        return await self.receive()


# --- connections ----------------------------------------------------------------------------------

_FULL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
         b"connection: close\r\ncontent-length: %d\r\n\r\n%s")


HTTP_PROTOCOLS = ("httptools", "h11")  # uvicorn's HTTP/1.1 implementations, the fastest first (bench/bench_http.py)


def guarded_protocol(settings: Settings, http: str = "httptools") -> type:
    """uvicorn's HTTP/1.1 protocol (`http`: "httptools", the default, llhttp in C; or "h11", pure Python)
    with two bounds uvicorn lacks. uvicorn arms no timer on a new connection, and any byte disarms its
    keep-alive timer, so a connection that never sends a request (or trickles its headers) stays open
    for ever: here a connection must complete its request line and headers within --header-timeout-s
    of opening or of its previous response, else it is closed (the body then has its own timeouts,
    AdmissionControl's). And at most --max-connections are open at once: past that, a new connection
    is answered 503 (Retry-After: 1) and closed."""
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    elif http == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    else:
        raise ValueError(f"http must be one of {', '.join(HTTP_PROTOCOLS)}, got {http!r}")

    timeout_s, most = settings.header_timeout_s, settings.max_connections
    busy = orjson.dumps({"error": {"code": "overloaded", "message": f"more than {most} connections open; retry "
                                   "later", "field": None}})

    class GuardedProtocol(base):
        # both bases keep `cycle` (the current request), `connections` (every open one), `loop`, `transport`
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            full = len(self.connections) >= most
            super().connection_made(transport)
            if full:
                transport.write(_FULL % (len(busy), busy))
                transport.close()
                return
            self._await_headers()

        def _await_headers(self) -> None:
            self._stop_header_timer()
            self._header_timer = self.loop.call_later(timeout_s, self._headers_late)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a request's headers are in: its body has its own timeouts
                self._stop_header_timer()

        def on_response_complete(self) -> None:
            cycle = self.cycle
            super().on_response_complete()
            if self.cycle is cycle and not self.transport.is_closing():  # no pipelined request started
                self._await_headers()
            else:
                self._stop_header_timer()

        def connection_lost(self, exc) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

    if http == "httptools":
        from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT

        class GuardedProtocol(GuardedProtocol):  # noqa: F811 - the same class, one copy less per body chunk
            def on_body(self, body: bytes) -> None:
                """A chunk that finds the request's buffer empty is kept as it came (uvicorn's receive
                hands over `bytes(body)`, the same object), instead of being appended to uvicorn's
                bytearray and copied out again; chunks that arrive before the application takes the
                previous one are appended as uvicorn does."""
                cycle = self.cycle
                if cycle.body or cycle.response_complete or self.parser.should_upgrade():
                    if isinstance(cycle.body, bytes):
                        cycle.body = bytearray(cycle.body)
                    return super().on_body(body)
                cycle.body = body
                if len(body) > HIGH_WATER_LIMIT:
                    self.flow.pause_reading()
                cycle.message_event.set()

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol
