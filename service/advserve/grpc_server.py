"""gRPC transport (grpc.aio): the Advserve service of proto/advserve/v1/advserve.proto, the standard
health service and server reflection, on the same engine, compute thread and admission as REST.

Each method only converts: proto -> the REST document (`advserve_client.protocol`) -> the domain
request -> the engine, and back. Errors map through `errors.STATUS`, the table REST uses.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from advserve_client import protocol
from advserve_client._pb import advserve_pb2, advserve_pb2_grpc
from advserve_client.framing import FramingError, RawTensor

from .config import Settings
from .engine import Engine
from .errors import STATUS, AdvserveError, DeadlineExceeded, InvalidArgument, Overloaded, PayloadTooLarge, Unavailable
from .model import AdvantageRequest, LossRequest
from .rest import Admission
from .scheduler import Scheduler
from .wire import raw_to_torch, torch_to_raw

log = logging.getLogger("advserve.grpc")
SERVICE = advserve_pb2.DESCRIPTOR.services_by_name["Advserve"].full_name


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
    def __init__(self, engine: Engine, scheduler: Scheduler, admission: Admission):
        self.engine = engine
        self.scheduler = scheduler
        self.admission = admission

    async def ComputeAdvantages(self, request, context):
        return await self._serve(request, context, self._advantages)

    async def ComputeLosses(self, request, context):
        return await self._serve(request, context, self._losses)

    async def ListEstimators(self, request, context):
        return await self._serve(request, context, self._catalog)

    async def _advantages(self, request: advserve_pb2.ComputeAdvantagesRequest):
        document, raw = protocol.advantages_request_from_pb(request)
        domain = AdvantageRequest(estimator=document["estimator"], tensors=_torch(raw), preset=document.get("preset"),
                                  params=document.get("params"), dtype=document.get("dtype"),
                                  layout=document.get("layout"))
        prepared = self.engine.prepare_advantages(domain)
        result, _ = await self.scheduler.advantages(prepared)
        return protocol.advantages_response_to_pb(
            {"params": result.params, "stats": result.stats},
            {"advantages": torch_to_raw(result.advantages), "returns": torch_to_raw(result.returns)})

    async def _losses(self, request: advserve_pb2.ComputeLossesRequest):
        document, raw = protocol.losses_request_from_pb(request)
        domain = LossRequest(tensors=_torch(raw), **{k: v for k, v in document.items()})
        result, _ = await self.scheduler.call(lambda: self.engine.compute_losses(domain))
        grads = {"grad_logprobs": result.grad_logprobs, "grad_values": result.grad_values,
                 "grad_entropy": result.grad_entropy}
        return protocol.losses_response_to_pb(
            {"loss": result.loss, "components": result.components, "metrics": result.metrics,
             "params": result.params},
            {name: torch_to_raw(t) for name, t in grads.items() if t is not None})

    async def _catalog(self, request):
        return catalog_to_pb(self.engine.catalog())

    async def _serve(self, request: Any, context: grpc.aio.ServicerContext,
                     handler: Callable[[Any], Awaitable[Any]]):
        size = request.ByteSize()
        try:
            if size > self.admission.capacity:
                raise PayloadTooLarge(f"request of {size} bytes exceeds the server's admission capacity of "
                                      f"{self.admission.capacity} bytes", field="body")
            if not self.admission.try_acquire(size):
                raise Overloaded(f"server busy: {self.admission.in_flight} request bytes in flight of "
                                 f"{self.admission.capacity}; retry later")
            try:
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("the deadline passed before the request was computed")
                return await handler(request)
            finally:
                self.admission.release(size)
        except AdvserveError as exc:
            await _abort(context, exc)
        except FramingError as exc:
            await _abort(context, InvalidArgument(exc.message, field=exc.field))
        except ValueError as exc:  # an enum value the proto does not define
            await _abort(context, InvalidArgument(str(exc)))
        except Exception:  # noqa: BLE001 - a bug: logged, answered INTERNAL without details
            log.exception("internal error in %s", type(request).__name__)
            await _abort(context, AdvserveError("internal error"))


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
    message = f"{error.field}: {error.message}" if error.field and not error.message.startswith(error.field) \
        else error.message
    await context.abort(grpc.StatusCode[code_name], message, trailing_metadata=tuple(metadata))


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


async def start_grpc_server(engine: Engine, scheduler: Scheduler, admission: Admission, settings: Settings,
                            ) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """Start the gRPC server on settings.host:settings.grpc_port; returns (server, health, bound port)."""
    server = grpc.aio.server(options=grpc_options(settings.grpc_max_message_bytes))
    advserve_pb2_grpc.add_AdvserveServicer_to_server(AdvserveServicer(engine, scheduler, admission), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    if port == 0:
        raise OSError(f"cannot bind gRPC to {settings.host}:{settings.grpc_port}")
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer, port
