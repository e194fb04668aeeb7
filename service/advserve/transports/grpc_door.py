"""The gRPC door (grpc.aio), shared by the native Advserve service (`native_grpc`) and the Open
Inference Protocol's (`oip_grpc`): every call passes it, in this order:

1. the bearer token, from the call's metadata, before a byte of the message is read: a call without it
   is answered UNAUTHENTICATED and its message is never read (grpc.health.v1 and OIP's ServerLive /
   ServerReady are open; everything else, reflection included, needs the token);
2. admission before the message is read: the message's size is unknown until grpc core has all of it,
   so the call first reserves what the largest message the server accepts could cost (RECEIVE_COST ×
   the receive limit, `receive_limit`: at most 1/RECEIVE_SHARE of admission), and once the bytes are
   in keeps RECEIVE_COST × their length. The reservations of the calls whose message is still
   arriving may together hold at most 1/RECEIVING_SHARE of admission: stalled uploads (held up to
   --grpc-read-timeout-s) can delay other gRPC calls but never lock REST out, nor the work already
   admitted. A call waits in arrival order up to --grpc-admission-wait-s for room, then UNAVAILABLE
   with Retry-After. A message over the receive limit is refused by grpc core from its length prefix,
   unread. Every method takes its message as raw bytes (no deserializer), so nothing is parsed before
   this;
3. parsing, off the event loop for large messages, under the request's one deadline (reading,
   decoding, queue, compute and encoding: --request-timeout-s or the caller's shorter deadline);
   bytes that are not the method's message are INVALID_ARGUMENT naming field "body", never INTERNAL.

Errors end the call with the status of `errors.STATUS` (`_abort`). Calls in progress are capped
(--grpc-max-concurrent-rpcs) and so are streams per connection (--grpc-max-concurrent-streams). An
unread stream holds at most grpc's 64 KiB flow-control window (BDP probing, which would grow it to
megabytes, is off). The server itself is assembled in `advserve.server`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2

from advserve_client._pb import advserve_pb2
from advserve_client.framing import FramingError

from ..errors import (STATUS, AdvserveError, DeadlineExceeded, InvalidArgument, Overloaded, PayloadTooLarge,
                     RequestTimeout, Unavailable, error_message)
from ..observability import REQUEST_ID_HEADER, enum_field_name, request_id, server_timing
from ..runtime import COMPUTED, Lease, Runtime

log = logging.getLogger("advserve.grpc")
SERVICE = advserve_pb2.DESCRIPTOR.services_by_name["Advserve"].full_name
OIP_SERVICE = "inference.GRPCInferenceService"  # the Open Inference Protocol (transports.oip_grpc)
HEALTH_NAMES = ("", SERVICE, OIP_SERVICE)  # the names the health service reports
# methods open without the token: health (the gRPC health service, OIP's liveness and readiness)
OPEN_METHODS = frozenset({f"/{health.SERVICE_NAME}/Check", f"/{health.SERVICE_NAME}/Watch",
                          f"/{OIP_SERVICE}/ServerLive", f"/{OIP_SERVICE}/ServerReady"})
OWN_SERVICES = (f"/{SERVICE}/", f"/{OIP_SERVICE}/")  # registered through `Door` already

RECEIVE_COST = 3
"""Bytes of memory per byte of a request message while the server holds it, measured (the
"decode cost" lines of scripts/hostile_grpc_probe.py): while grpc core assembles a message and hands
it to Python, about 2.9 × its length at the peak (the HTTP/2 frames, the joined message, the Python
bytes); decoded, the bytes, the parsed message (protobuf's own copy) and the tensors (a copy of each
bytes field, which torch views) are about 3 × its length. Admission charges RECEIVE_COST × length."""

RECEIVE_SHARE = 4
"""A message being received reserves at most 1/RECEIVE_SHARE of admission (the receive limit is
admission / (RECEIVE_COST × RECEIVE_SHARE) unless --grpc-max-message-bytes is lower): at 256 MiB,
messages up to 21 MiB, larger than any whose compute would fit beside it (a losses message of M bytes
computes ~5.5 M more, an advantages one far more: `runtime.compute_bytes`)."""

RECEIVING_SHARE = 2
"""The reservations of all messages being received hold at most 1/RECEIVING_SHARE of admission
(RECEIVING_SHARE ≤ RECEIVE_SHARE: at least one fits): however many uploads stall, the rest of
admission stays free for REST and for admitted work."""

POLL_S = 0.005  # how often the head of the admission line looks for room


def receive_limit(settings) -> int:
    """The largest request message accepted: --grpc-max-message-bytes, at most admission_bytes //
    (RECEIVE_COST × RECEIVE_SHARE), so that its reservation holds at most 1/RECEIVE_SHARE of admission;
    grpc core refuses a larger one from its length prefix, before reading it (RESOURCE_EXHAUSTED)."""
    return max(1, min(settings.grpc_max_message_bytes, settings.admission_bytes // (RECEIVE_COST * RECEIVE_SHARE)))


def grpc_options(max_message_bytes: int, max_receive_bytes: int | None = None,
                 max_concurrent_streams: int = 32, reuseport: bool = False) -> list[tuple[str, int]]:
    """Message size limits (send: `max_message_bytes`; receive: `max_receive_bytes`, default the same),
    no SO_REUSEPORT (a busy port fails the bind) unless `reuseport` (a worker of --workers joining the
    port its supervisor reserved, advserve.workers), at most `max_concurrent_streams` calls per connection,
    no BDP probing (a stream's flow-control window stays at 64 KiB until its message is read), and
    keepalive settings that tolerate common client pings."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes if max_receive_bytes is None else max_receive_bytes),
        ("grpc.so_reuseport", int(reuseport)),
        ("grpc.max_concurrent_streams", max_concurrent_streams),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.keepalive_time_ms", 60_000),                            # ping idle clients every minute
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),  # accept client pings every 5 s
        ("grpc.http2.max_ping_strikes", 0),                            # never close a connection for pinging
    ]


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


def _metadata(pairs: Any) -> dict[str, Any]:
    return {key: value for key, value in pairs or ()}


async def _first(messages: AsyncIterator[bytes]) -> bytes | None:
    """The first message of a request stream; None when the client sent none (or grpc core refused
    it). The stream's generator is closed at once: left suspended, it keeps the message alive after
    the call (measured: the whole message, per call, for good)."""
    iterator = messages.__aiter__()
    try:
        return await iterator.__anext__()
    except StopAsyncIteration:
        return None
    finally:
        await iterator.aclose()


class Door:
    """What every gRPC method passes before its handler: see the module docstring (2 and 3)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        settings = runtime.settings
        self.max_receive = receive_limit(settings)
        self.reservation = RECEIVE_COST * self.max_receive
        self.receiving_capacity = max(self.reservation, settings.admission_bytes // RECEIVING_SHARE)
        self.receiving = 0  # bytes reserved by the calls whose message is still arriving
        self.read_timeout_s = settings.grpc_read_timeout_s
        self.admission_wait_s = settings.grpc_admission_wait_s
        self._line = asyncio.Lock()  # the calls waiting for their reservation, in arrival order (FIFO)
        # one thread decodes every large message: each thread that allocates a message keeps its own
        # malloc arena of freed pages, so a pool of decoders would multiply the peak RSS (measured)
        self.decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="advserve-grpc-decode")

    async def grow(self, lease: Lease, nbytes: int, deadline_s: float, what: str = "request", *,
                   receiving: bool = False, compute: bool = False) -> None:
        """Take `nbytes` more into `lease`, waiting in arrival order for admission to have room, at
        most the admission wait (and `deadline_s`): then Overloaded (UNAVAILABLE, Retry-After);
        PayloadTooLarge (RESOURCE_EXHAUSTED) at once if the request could never fit. `receiving`: a
        receive reservation, which also needs room among the receiving ones (RECEIVING_SHARE; counted
        in `self.receiving` until `received`). Admission is shared with REST and has no wake-up, so
        the call at the head of the line looks every POLL_S."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + max(0.0, min(self.admission_wait_s, deadline_s))
        async with self._line:
            while True:
                try:
                    if receiving and self.receiving + nbytes > self.receiving_capacity:
                        raise Overloaded(f"server busy: {self.receiving} bytes reserved by gRPC messages being "
                                         f"received, of the {self.receiving_capacity} they may hold; retry later")
                    lease.grow(nbytes, what, compute=compute)
                    if receiving:
                        self.receiving += nbytes
                    return
                except Overloaded:
                    if loop.time() >= give_up:
                        raise
                await asyncio.sleep(POLL_S)

    async def receive(self, messages: AsyncIterator[bytes], lease: Lease, deadline_s: float) -> bytes:
        """One message's bytes, admitted: the reservation for the largest message first (`grow`),
        then RECEIVE_COST × its length. InvalidArgument (field body) when the client sent none;
        RequestTimeout when it is not complete within the read timeout or `deadline_s` (seconds left
        of the request's deadline)."""
        started = time.perf_counter()
        await self.grow(lease, self.reservation, deadline_s, receiving=True)
        deadline_s -= time.perf_counter() - started
        timeout = min(self.read_timeout_s, deadline_s)
        try:
            raw = await asyncio.wait_for(_first(messages), timeout=max(timeout, 0.0))
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request message did not arrive within {timeout:g} s", field="body") from None
        finally:  # arrived, late or the caller gone: no longer receiving (the lease keeps what it holds)
            self.receiving -= self.reservation
        if raw is None:
            raise InvalidArgument(f"no request message (or one over the limit of {self.max_receive} bytes)",
                                  field="body")
        lease.shrink(self.reservation - RECEIVE_COST * len(raw))
        return raw

    async def parse(self, raw: bytes, message_type: Any, call: "_Call") -> Any:
        """The message of `message_type` in `raw`, parsed off the event loop when large, under the
        deadline. InvalidArgument (field body) when the bytes are not one; PayloadTooLarge on MemoryError."""
        try:
            return await call.off_loop(lambda: message_type.FromString(raw), len(raw))
        except DecodeError:
            raise InvalidArgument(f"the body is not a valid {message_type.DESCRIPTOR.full_name} message",
                                  field="body") from None
        except MemoryError:
            raise PayloadTooLarge("not enough memory to decode the request message", field="body") from None

    def unary(self, message_type: Any, handler: Callable[[Any, "_Call"], Awaitable[Any]], *, endpoint: str,
              transport: str = "grpc", compute: bool = True) -> grpc.RpcMethodHandler:
        """The handler of a unary method: the door, then `handler(request, call)` -> the response.
        `compute`: counted as a request in progress (refused while draining) and in the metrics."""
        door = self

        async def serve(messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
            metadata = _metadata(context.invocation_metadata())
            call = _Call(door, context, request_id(metadata.get(REQUEST_ID_HEADER)), transport, endpoint)
            await context.send_initial_metadata(((REQUEST_ID_HEADER, call.request_id),))
            status, error, response, failure, named = "OK", None, None, None, None
            try:
                with door.runtime.serving() if compute else contextlib.nullcontext():
                    try:
                        raw = await door.receive(messages, call.lease, call.remaining())
                    except RequestTimeout:
                        caller_left = context.time_remaining()
                        if caller_left is not None and caller_left < 0.05:  # the caller's own deadline ran out
                            raise DeadlineExceeded("the deadline passed before the request message arrived") \
                                from None
                        raise
                    call.size = len(raw)
                    request = await door.parse(raw, message_type, call)
                    named = enum_field_name(request, "estimator")  # for the access log, should it be refused
                    del raw  # the parsed message has its own copy
                    job, request = handler(request, call), None  # the handler drops it once converted
                    response = await job
                    if call.phases:
                        context.set_trailing_metadata((("server-timing", server_timing(**call.phases)),))
                    return response
            except Exception as exc:  # noqa: BLE001 - mapped by `_mapped`; a bug is logged there
                failure = _mapped(exc, call)
                status, error = STATUS.get(failure.code, STATUS[AdvserveError.code])[1], failure.code
            except asyncio.CancelledError:  # the caller went away: its queued job is dropped with the wait
                status, error = "CANCELLED", "cancelled"
                raise
            finally:
                if response is not None:  # its bytes are serialized and sent after this returns: held till then
                    context.add_done_callback(lambda _context: call.lease.close())
                else:
                    call.lease.close()
                if compute:
                    door.runtime.metrics.observe(
                        transport=call.transport, endpoint=call.endpoint, estimator=call.estimator, status=status,
                        bytes_in=call.size, bytes_out=response.ByteSize() if response is not None else 0,
                        phases=call.phases, batch=call.batch, request_id=call.request_id, started=call.arrived,
                        error=error, message=error_message(failure) if failure is not None else None,
                        named_estimator=named)
            await _abort(context, failure)  # outside the except block: the abort carries no traceback

        return grpc.stream_unary_rpc_method_handler(serve, request_deserializer=None, response_serializer=_serialize)

    def answer(self, respond: Callable[[], Any]) -> grpc.RpcMethodHandler:
        """A unary method answered without reading its (empty, by contract) request: liveness and readiness."""

        async def serve(messages, context):
            return respond()

        return grpc.stream_unary_rpc_method_handler(serve, request_deserializer=None, response_serializer=_serialize)

    def refuse(self, error: AdvserveError, response_streaming: bool) -> grpc.RpcMethodHandler:
        """A handler that ends the call with `error` without reading its message."""

        async def serve(messages, context):
            await _abort(context, error)

        if response_streaming:
            return grpc.stream_stream_rpc_method_handler(serve, request_deserializer=None,
                                                         response_serializer=_serialize)
        return grpc.stream_unary_rpc_method_handler(serve, request_deserializer=None, response_serializer=_serialize)

    def foreign(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """A handler registered by a library (health, reflection) behind the same door: health Check is
        answered without reading its request (SERVING unless the server is draining); a unary request
        is received and parsed as ours are; a request stream (reflection: small messages, token
        required) is parsed message by message, each on its own admission."""
        door = self
        if method == f"/{health.SERVICE_NAME}/Check":
            return self.answer(lambda: health_pb2.HealthCheckResponse(
                status=health_pb2.HealthCheckResponse.SERVING if door.runtime.ready
                else health_pb2.HealthCheckResponse.NOT_SERVING))
        deserialize = handler.request_deserializer or (lambda raw: raw)
        behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

        async def request(messages, context, call):
            if not handler.request_streaming:
                raw = await door.receive(messages, call.lease, call.remaining())
                return deserialize(raw)
            return door.stream(messages, deserialize, call)

        async def unary_response(messages, context):
            call = _Call(door, context, "", "grpc", method)
            try:
                return await behaviour(await request(messages, context, call), context)
            except (AdvserveError, DecodeError) as exc:
                failure = _mapped(exc, call)
            finally:
                call.lease.close()
            await _abort(context, failure)

        async def stream_response(messages, context):
            call = _Call(door, context, "", "grpc", method)
            try:
                result = behaviour(await request(messages, context, call), context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:
                    await result
                return
            except (AdvserveError, DecodeError) as exc:
                failure = _mapped(exc, call)
            finally:
                call.lease.close()
            await _abort(context, failure)

        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(stream_response, request_deserializer=None,
                                                         response_serializer=handler.response_serializer)
        return grpc.stream_unary_rpc_method_handler(unary_response, request_deserializer=None,
                                                    response_serializer=handler.response_serializer)

    async def stream(self, messages: AsyncIterator[bytes], deserialize: Callable[[bytes], Any], call: "_Call"):
        """The messages of a request stream, each parsed; RECEIVE_COST × its length held while the
        handler works on it. Read without a reservation: a reflection stream idles between messages,
        and an idle reservation would hold admission from everyone else."""
        async for raw in messages:
            held = RECEIVE_COST * len(raw)
            call.lease.grow(held)
            try:
                message = deserialize(raw)
                del raw
                yield message
            finally:
                call.lease.shrink(held)


class AuthGate(grpc.aio.ServerInterceptor):
    """The bearer token before anything is read (OPEN_METHODS are exempt); foreign handlers (health,
    reflection) put behind the `Door`."""

    def __init__(self, door: Door):
        self.door = door

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        if details.method not in OPEN_METHODS:
            try:
                self.door.runtime.authenticate(_metadata(details.invocation_metadata).get("authorization"))
            except AdvserveError as exc:
                return self.door.refuse(exc, handler.response_streaming)
        if details.method.startswith(OWN_SERVICES):
            return handler
        return self.door.foreign(details.method, handler)


def _mapped(exc: Exception, call: "_Call") -> AdvserveError:
    """The domain error a failed call answers with (`errors.STATUS`): malformed input is
    INVALID_ARGUMENT naming its field, MemoryError RESOURCE_EXHAUSTED; anything else is a bug, logged
    and answered INTERNAL without details. grpc.aio's own abort unwinding is re-raised (answered).
    The tracebacks of `exc` and of the exceptions it chains are dropped: their frames hold the
    request's message and tensors, which would otherwise live as long as the error does."""
    if type(exc).__name__ == "AbortError":
        raise exc
    try:
        return _domain_error(exc, call)
    finally:
        link: BaseException | None = exc
        for _ in range(16):  # a chain is short; a cycle must not loop forever
            if link is None:
                break
            link.__traceback__ = None
            link = link.__cause__ or link.__context__


def _domain_error(exc: Exception, call: "_Call") -> AdvserveError:
    if isinstance(exc, AdvserveError):
        return exc
    if isinstance(exc, FramingError):
        return InvalidArgument(exc.message, field=exc.field)
    if isinstance(exc, DecodeError):
        return InvalidArgument("the body is not a valid request message", field="body")
    if isinstance(exc, MemoryError):
        return PayloadTooLarge("not enough memory for the request", field="body")
    if isinstance(exc, ValueError):  # an enum value the proto does not define
        return InvalidArgument(str(exc))
    log.error("internal error in %s (request id %s)", call.endpoint, call.request_id, exc_info=exc)
    return AdvserveError("internal error")


class _Call:
    """The state of one gRPC call: its request id, admission lease, deadline, timings, and what the
    metrics need."""

    def __init__(self, door: Door, context: grpc.aio.ServicerContext, rid: str, transport: str, endpoint: str):
        self.door, self.context, self.request_id = door, context, rid
        runtime = door.runtime
        self.transport, self.endpoint = transport, endpoint
        self.arrived = time.perf_counter()
        self.deadline = runtime.deadline(context.time_remaining())  # --request-timeout-s or the caller's, if shorter
        self.lease = runtime.admission.lease()
        self.phases: dict[str, float] = {}
        self.estimator: str | None = None
        self.batch: tuple[int, int] | None = None
        self.size = 0

    def remaining(self, timeout_s: float | None = None) -> float:
        """Seconds left of the request's one deadline (and of `timeout_s` from its arrival, if given)."""
        return self.deadline.within(timeout_s).remaining()

    @contextlib.contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - started

    async def off_loop(self, fn: Callable[[], Any], size: int) -> Any:
        """`runtime.Deadline.off_loop` on the door's decode thread, the lease kept until it finishes."""
        return await self.deadline.off_loop(fn, size, self.lease, executor=self.door.decoder)

    async def charge(self, work: Any, timeout_s: float | None = None) -> None:
        """Bring the call's compute charge to `runtime.compute_bytes(work)` (the charge HTTP makes,
        `runtime.charge_compute`), waiting in line for room as the receive reservation does
        (`Door.grow`); an estimate that was too high is given back."""
        due = self.lease.compute_due(work)
        if due < 0:
            self.lease.shrink(-due, compute=True)
        else:
            await self.door.grow(self.lease, due, self.remaining(timeout_s), COMPUTED, compute=True)

    async def compute(self, job: Awaitable[Any], timeout_s: float | None = None, *, work: Any = None) -> Any:
        """The job's result within the request's one deadline (the caller's, or --request-timeout-s,
        from its arrival: reading and decoding count) and `timeout_s` (a protocol's own, from the
        arrival). Past it the wait is cancelled, which cancels the job's future: a job still queued
        is skipped by the compute thread. Before the job is queued, admission is charged its compute
        and encoding memory (`runtime.compute_bytes(work)`, `work` the decoded request; the same charge as
        HTTP's), waiting in line as the receive reservation does (`Door.grow`)."""
        self.phases["decode"] = time.perf_counter() - self.arrived
        try:
            await self.charge(work, timeout_s)
            budget = self.remaining(timeout_s)
            if budget <= 0:
                raise DeadlineExceeded("the deadline passed before the request was computed")
        except BaseException:
            if inspect.iscoroutine(job):
                job.close()
            raise
        try:
            result, timing = await asyncio.wait_for(job, timeout=budget)
        except asyncio.TimeoutError:
            raise DeadlineExceeded("no result within the deadline") from None
        self.phases["queue"], self.phases["compute"] = timing.queue, timing.compute
        return result


def header_value(text: str) -> str:
    """`text` as a legal metadata value (printable ASCII): any other character escaped as Python
    writes it (a field may quote a client's tensor name; an illegal value would fail the call)."""
    return "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii") for c in text)


async def _abort(context: grpc.aio.ServicerContext, error: AdvserveError) -> None:
    """End the call with the status of `errors.STATUS`; code, field and Retry-After as trailing metadata."""
    _, code_name = STATUS.get(error.code, STATUS[AdvserveError.code])
    metadata = [("advserve-error-code", error.code)]
    if error.field:
        metadata.append(("advserve-error-field", header_value(error.field)))
    if isinstance(error, Unavailable):
        metadata.append(("retry-after", str(max(1, round(error.retry_after_s)))))
    await context.abort(grpc.StatusCode[code_name], error_message(error), trailing_metadata=tuple(metadata))
