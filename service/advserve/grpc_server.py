"""gRPC transport (grpc.aio): the Advserve service of proto/advserve/v1/advserve.proto, the standard
health service and server reflection, on the same engine, compute thread and admission as REST.

Each method only converts: proto -> the REST document (`advserve_client.protocol`) -> the domain
request -> the engine, and back. Errors map through `errors.STATUS`, the table REST uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from advserve_client import protocol
from advserve_client._pb import advserve_pb2, advserve_pb2_grpc
from advserve_client.framing import FramingError, RawTensor

from .analysis.batch import AnalysisRequest, prepare_analysis, run_analysis
from .errors import STATUS, AdvserveError, DeadlineExceeded, InvalidArgument, Unavailable, error_message
from .model import AdvantageRequest, LossRequest
from .observability import REQUEST_ID_HEADER, request_id, server_timing
from .runtime import Runtime
from .wire import raw_to_torch, torch_to_raw

log = logging.getLogger("advserve.grpc")
SERVICE = advserve_pb2.DESCRIPTOR.services_by_name["Advserve"].full_name
OIP_SERVICE = "inference.GRPCInferenceService"  # the Open Inference Protocol (advserve.oip.grpc_server)
HEALTH_NAMES = ("", SERVICE, OIP_SERVICE)  # the names the health service reports


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message size limits on both directions and keepalive settings that tolerate common client pings."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),                            # ping idle clients every minute
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),  # accept client pings every 5 s
        ("grpc.http2.max_ping_strikes", 0),                            # never close a connection for pinging
    ]


class AdvserveServicer(advserve_pb2_grpc.AdvserveServicer):
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.engine = runtime.engine
        self.scheduler = runtime.scheduler
        self.admission = runtime.admission

    async def ComputeAdvantages(self, request, context):
        return await self._serve(request, context, "advantages", self._advantages)

    async def ComputeLosses(self, request, context):
        return await self._serve(request, context, "losses", self._losses)

    async def ListEstimators(self, request, context):
        return await self._serve(request, context, "estimators", self._catalog)

    async def Analyze(self, request, context):
        return await self._serve(request, context, "analysis", self._analysis)

    async def _advantages(self, request: advserve_pb2.ComputeAdvantagesRequest, call: "_Call"):
        document, raw = protocol.advantages_request_from_pb(request)
        domain = AdvantageRequest(estimator=document["estimator"], tensors=_torch(raw), preset=document.get("preset"),
                                  params=document.get("params"), dtype=document.get("dtype"),
                                  layout=document.get("layout"))
        prepared = self.engine.prepare_advantages(domain)
        call.estimator, call.batch = prepared.estimator.name, tuple(prepared.batch.mask.shape)
        result = await call.compute(self.scheduler.advantages(prepared))
        with call.phase("encode"):
            return protocol.advantages_response_to_pb(
                {"params": result.params, "stats": result.stats},
                {"advantages": torch_to_raw(result.advantages), "returns": torch_to_raw(result.returns)})

    async def _losses(self, request: advserve_pb2.ComputeLossesRequest, call: "_Call"):
        document, raw = protocol.losses_request_from_pb(request)
        tensors = _torch(raw)
        domain = LossRequest(tensors=tensors, **document)
        mask = tensors.get("response_mask")
        call.batch = tuple(mask.shape) if mask is not None and mask.ndim == 2 else None
        result = await call.compute(self.scheduler.call(lambda: self.engine.compute_losses(domain)))
        grads = {"grad_logprobs": result.grad_logprobs, "grad_values": result.grad_values,
                 "grad_entropy": result.grad_entropy}
        with call.phase("encode"):
            return protocol.losses_response_to_pb(
                {"loss": result.loss, "components": result.components, "metrics": result.metrics,
                 "params": result.params},
                {name: torch_to_raw(t) for name, t in grads.items() if t is not None})

    async def _analysis(self, request: advserve_pb2.AnalyzeRequest, call: "_Call"):
        document, raw = protocol.analyze_request_from_pb(request)
        prepared = prepare_analysis(self.engine, AnalysisRequest(tensors=_torch(raw), **document))
        call.batch = tuple(prepared.batch.mask.shape)
        result = await call.compute(self.scheduler.call(lambda: run_analysis(self.engine, prepared)))
        with call.phase("encode"):
            return protocol.analyze_response_to_pb(result)

    async def _catalog(self, request, call: "_Call"):
        return catalog_to_pb(self.engine.catalog())

    async def _serve(self, request: Any, context: grpc.aio.ServicerContext, endpoint: str,
                     handler: Callable[[Any, "_Call"], Awaitable[Any]]):
        metadata = dict(context.invocation_metadata() or ())
        call = _Call(self.runtime, context, request_id(metadata.get(REQUEST_ID_HEADER)))
        await context.send_initial_metadata(((REQUEST_ID_HEADER, call.request_id),))
        size = request.ByteSize()
        status, error, response = "OK", None, None
        try:
            self.runtime.authenticate(metadata.get("authorization"))
            with self.runtime.serving():
                with self.admission.held(size):
                    response = await handler(request, call)
                    if call.phases:
                        context.set_trailing_metadata((("server-timing", server_timing(**call.phases)),))
                    return response
        except AdvserveError as exc:
            status, error = STATUS.get(exc.code, STATUS[AdvserveError.code])[1], exc.code
            await _abort(context, exc)
        except FramingError as exc:
            status, error = "INVALID_ARGUMENT", "invalid_argument"
            await _abort(context, InvalidArgument(exc.message, field=exc.field))
        except ValueError as exc:  # an enum value the proto does not define
            status, error = "INVALID_ARGUMENT", "invalid_argument"
            await _abort(context, InvalidArgument(str(exc)))
        except Exception as exc:  # noqa: BLE001 - a bug: logged, answered INTERNAL without details
            if isinstance(exc, asyncio.CancelledError):
                status, error = "CANCELLED", "cancelled"
                raise
            if type(exc).__name__ == "AbortError":  # grpc.aio's own abort unwinding: already answered
                raise
            status, error = "INTERNAL", "internal"
            log.exception("internal error in %s (request id %s)", endpoint, call.request_id)
            await _abort(context, AdvserveError("internal error"))
        finally:
            self.runtime.metrics.observe(
                transport="grpc", endpoint=endpoint, estimator=call.estimator, status=status, bytes_in=size,
                bytes_out=response.ByteSize() if response is not None else 0, phases=call.phases, batch=call.batch,
                request_id=call.request_id, started=call.arrived, error=error)


class _Call:
    """The state of one gRPC call: its request id, timings, and what the metrics need."""

    def __init__(self, runtime: Runtime, context: grpc.aio.ServicerContext, rid: str):
        self.runtime, self.context, self.request_id = runtime, context, rid
        self.arrived = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.estimator: str | None = None
        self.batch: tuple[int, int] | None = None

    @contextlib.contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - started

    async def compute(self, job: Awaitable[Any], timeout_s: float | None = None) -> Any:
        """The job's result within the tightest of the caller's deadline, the request timeout and
        `timeout_s` (a protocol's own, from the request's arrival)."""
        self.phases["decode"] = time.perf_counter() - self.arrived
        elapsed = time.perf_counter() - self.arrived
        budget = min(self.runtime.settings.request_timeout_s, math.inf if timeout_s is None else timeout_s) - elapsed
        remaining = self.context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining)
        if budget <= 0:
            raise DeadlineExceeded("the deadline passed before the request was computed")
        try:
            result, timing = await asyncio.wait_for(job, timeout=budget)
        except asyncio.TimeoutError:
            raise DeadlineExceeded("no result within the deadline") from None
        self.phases["queue"], self.phases["compute"] = timing.queue, timing.compute
        return result


def _torch(raw: dict[str, Any]) -> dict[str, Any]:
    return {name: raw_to_torch(name, t) if isinstance(t, RawTensor) else t for name, t in raw.items()}


async def _abort(context: grpc.aio.ServicerContext, error: AdvserveError) -> None:
    """End the call with the status of `errors.STATUS`; code, field and Retry-After as trailing metadata."""
    _, code_name = STATUS.get(error.code, STATUS[AdvserveError.code])
    metadata = [("advserve-error-code", error.code)]
    if error.field:
        metadata.append(("advserve-error-field", error.field))
    if isinstance(error, Unavailable):
        metadata.append(("retry-after", str(max(1, round(error.retry_after_s)))))
    await context.abort(grpc.StatusCode[code_name], error_message(error), trailing_metadata=tuple(metadata))


def catalog_to_pb(catalog: dict[str, Any]) -> advserve_pb2.ListEstimatorsResponse:
    from google.protobuf import json_format, struct_pb2

    response = advserve_pb2.ListEstimatorsResponse(
        default_preset=protocol.name_to_enum("preset", catalog["default_preset"]))
    json_format.ParseDict(catalog, response.catalog)
    for entry in catalog["estimators"]:
        info = response.estimators.add(
            estimator=protocol.name_to_enum("estimator", entry["name"]), name=entry["name"], summary=entry["summary"],
            formula=entry["formula"], reference=entry["reference"],
            required_tensors=entry["tensors"]["required"], optional_tensors=entry["tensors"]["optional"],
            reward_tensors=entry["tensors"]["one_of"])
        for name, spec in entry["params"].items():
            info.params.add(name=name, type=spec["type"], doc=spec["doc"], nullable=spec["nullable"],
                            choices=[str(c) for c in spec.get("choices", [])])
        for preset, defaults in entry["presets"].items():
            item = info.presets.add(preset=protocol.name_to_enum("preset", preset), available="defaults" in defaults,
                                    unavailable_hint=defaults.get("unavailable", ""))
            for key, value in defaults.get("defaults", {}).items():
                item.defaults[key].CopyFrom(json_format.ParseDict(value, struct_pb2.Value()))
    return response


async def start_grpc_server(runtime: Runtime) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """Start the gRPC server on settings.host:settings.grpc_port (TLS and mTLS as configured);
    returns (server, health servicer, bound port)."""
    settings = runtime.settings
    server = grpc.aio.server(options=grpc_options(settings.grpc_max_message_bytes))
    advserve_pb2_grpc.add_AdvserveServicer_to_server(AdvserveServicer(runtime), server)
    from .oip.grpc_server import add_oip_servicer  # imports this module

    add_oip_servicer(runtime, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.grpc_port}"
    if settings.tls_cert:
        with open(settings.tls_cert, "rb") as cert, open(settings.tls_key, "rb") as key:
            pair = (key.read(), cert.read())
        client_ca = open(settings.tls_client_ca, "rb").read() if settings.tls_client_ca else None
        credentials = grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                                  require_client_auth=client_ca is not None)
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC to {settings.host}:{settings.grpc_port}")
    await server.start()
    for name in HEALTH_NAMES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer, port
