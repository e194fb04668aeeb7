"""The native gRPC API: the Advserve service of proto/advserve/v1/advserve.proto. Each method only
converts: proto -> the REST document (`advserve_client.protocol`) -> the domain request -> the engine,
and back; the door (`grpc_door`) has already authenticated, admitted and parsed the message. Errors map
through `errors.STATUS`, the table REST uses."""

from __future__ import annotations

from typing import Any

import grpc

from advserve_client import protocol
from advserve_client._pb import advserve_pb2

from advserve_client.framing import OUTPUTS_KEY, FramingError, outputs_target

from ..analysis.batch import AnalysisRequest, prepare_analysis, run_analysis
from ..errors import InvalidArgument
from ..model import AdvantageRequest, LossRequest
from ..runtime import Runtime
from ..wire import torch_to_raw
from . import shm_tensors
from .grpc_door import Door, _Call


class AdvserveServicer:
    """The methods of advserve.v1.Advserve: each converts and delegates (`handlers` registers them)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.engine = runtime.engine
        self.scheduler = runtime.scheduler

    def handlers(self, door: Door) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "ComputeAdvantages": door.unary(advserve_pb2.ComputeAdvantagesRequest, self._advantages,
                                           endpoint="advantages"),
            "ComputeLosses": door.unary(advserve_pb2.ComputeLossesRequest, self._losses, endpoint="losses"),
            "ListEstimators": door.unary(advserve_pb2.ListEstimatorsRequest, self._catalog, endpoint="estimators"),
            "Analyze": door.unary(advserve_pb2.AnalyzeRequest, self._analysis, endpoint="analysis"),
        }

    def _tensors(self, document: dict[str, Any], raw: dict[str, Any], call: _Call) -> tuple[dict[str, Any], Any]:
        """(torch tensors of the request: views of its bytes or of shared-memory regions (copies charged to
        the call where a region cannot be mapped), the outputs' region target or None; checked to exist
        and hold its span before the compute)."""
        target = None
        if document.get(OUTPUTS_KEY) is not None:
            try:
                target = outputs_target(document.pop(OUTPUTS_KEY))
            except FramingError as exc:
                raise InvalidArgument(exc.message, field=exc.field) from None
            shm_tensors.check_target(self.runtime.regions, target)
        return shm_tensors.resolve(self.runtime.regions, raw, call.lease.grow), target

    def _outputs(self, target: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        """The result tensors as the response carries them: their bytes, or (written into the request's
        output region) where they lie."""
        if target is not None:
            return shm_tensors.write_outputs(self.runtime.regions, target, tensors)
        return {name: torch_to_raw(t) for name, t in tensors.items() if t is not None}

    async def _advantages(self, request: advserve_pb2.ComputeAdvantagesRequest, call: _Call):
        document, raw = protocol.advantages_request_from_pb(request)
        del request  # converted: its copy of the tensors' bytes goes now, not after the compute
        tensors, target = self._tensors(document, raw, call)
        domain = AdvantageRequest(estimator=document["estimator"], tensors=tensors, preset=document.get("preset"),
                                  params=document.get("params"), dtype=document.get("dtype"),
                                  layout=document.get("layout"))
        await call.charge(domain)  # its shapes known: its compute charged before it is validated
        prepared = self.engine.prepare_advantages(domain, defer_checks=True)  # checked with its stats
        with prepared.errors_after_checks():
            shm_tensors.advantages_room(target, prepared)
        call.estimator, call.batch = prepared.estimator.name, tuple(prepared.batch.mask.shape)
        with prepared.errors_after_checks():  # a request that could never fit: its own mistake first
            result = await call.compute(self.scheduler.advantages(prepared), work=prepared)
        with call.phase("encode"):
            result.check()  # before a byte of the tensors is written
            return protocol.advantages_response_to_pb(
                {"params": result.params, "stats": result.stats},
                self._outputs(target, {"advantages": result.advantages, "returns": result.returns}))

    async def _losses(self, request: advserve_pb2.ComputeLossesRequest, call: _Call):
        document, raw = protocol.losses_request_from_pb(request)
        del request  # converted: its copy of the tensors' bytes goes now, not after the compute
        tensors, target = self._tensors(document, raw, call)
        domain = LossRequest(tensors=tensors, **document)
        mask = tensors.get("response_mask")
        call.batch = tuple(mask.shape) if mask is not None and mask.ndim == 2 else None
        result = await call.compute(self.scheduler.call(lambda: self.engine.compute_losses(domain)), work=domain)
        grads = result.output_tensors()
        with call.phase("encode"):
            return protocol.losses_response_to_pb(
                {"loss": result.loss, "components": result.components, "metrics": result.metrics,
                 "params": result.params},
                self._outputs(target, grads))

    async def _analysis(self, request: advserve_pb2.AnalyzeRequest, call: _Call):
        document, raw = protocol.analyze_request_from_pb(request)
        del request  # converted: its copy of the tensors' bytes goes now, not after the compute
        tensors, _ = self._tensors(document, raw, call)
        domain = AnalysisRequest(tensors=tensors, **document)
        await call.charge(domain)  # its shapes known: its compute charged before it is validated
        prepared = prepare_analysis(self.engine, domain)
        call.batch = tuple(prepared.batch.mask.shape)
        result = await call.compute(self.scheduler.call(lambda: run_analysis(self.engine, prepared)), work=prepared)
        with call.phase("encode"):
            return protocol.analyze_response_to_pb(result)

    async def _catalog(self, request, call: _Call):
        return catalog_to_pb(self.engine.catalog())




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
