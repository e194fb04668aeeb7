"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` (proto/inference/
grpc_service.proto) on the native gRPC server, over the same engine, compute thread, admission, auth
and metrics (transport label "oip_grpc").

Inputs come in `raw_input_contents` (one entry per input, as the stock clients send them), in the
typed `contents`, or from a shared memory region their parameters name (then without a raw entry);
outputs always go out in `raw_output_contents`, the only place the stock tritonclient reads them (an
empty entry for one written into a region). The System/CudaSharedMemory* methods register,
unregister and list regions (`runtime.regions`; docs/shared-memory.md). Parameters are read from whichever InferParameter field holds them. Errors
end the call with the status of `errors.STATUS` and the message "<field>: <message>", like the
native service (`grpc_door._abort`). Every method passes the native service's door (auth before the
message is read, admission before it is parsed, one deadline: `grpc_door` module docstring).
ServerLive and ServerReady need no token (health, like the gRPC health service) and are answered
without reading their (empty) request; the other methods need it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Callable

import grpc

from .._oip_pb import grpc_service_pb2 as pb
from ..errors import InvalidArgument
from ..oip.core import SHM_PARAMETERS, InferInput, InferRequest, InferResponse, OipService, RequestedOutput, region_ref
from ..oip.tensors import from_bytes_list, from_json, from_raw
from ..runtime import Runtime
from ..shm import check_registrant
from .grpc_door import Door, _Call

log = logging.getLogger("advserve.oip")
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
TRANSPORT = "oip_grpc"
# the typed field of InferTensorContents holding each datatype (FP16 and BF16 travel raw only)
CONTENTS_FIELD = {"BOOL": "bool_contents", "UINT8": "uint_contents", "INT8": "int_contents", "INT16": "int_contents",
                  "INT32": "int_contents", "INT64": "int64_contents", "FP32": "fp32_contents",
                  "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def parameter_value(parameter: pb.InferParameter) -> Any:
    """The Python value of an InferParameter (bool, int, float or str); None when none is set."""
    which = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, which) if which else None


def set_parameter(parameter: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = str(value)


def model_metadata_response(service: Any, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
    """ModelMetadata: the model's inputs and outputs (`OipService.model(...).metadata()`) as the message."""
    metadata = service.model(request.name, request.version).metadata()
    response = pb.ModelMetadataResponse(name=metadata["name"], versions=metadata["versions"],
                                        platform=metadata["platform"])
    for side in ("inputs", "outputs"):
        for tensor in metadata[side]:
            getattr(response, side).add(**tensor)
    return response

def request_from_pb(request: pb.ModelInferRequest, service: OipService,
                    charge: Callable[[int], None] | None = None) -> InferRequest:
    """A ModelInferRequest -> an InferRequest with decoded inputs: raw ones are views of the bytes,
    those in a shared memory region views of the region (or copies charged to `charge`:
    `OipService.read_region`). raw_input_contents holds one entry per input not in a region."""
    model = service.model(request.model_name, request.model_version)
    raw = request.raw_input_contents
    regions = [region_ref({key: parameter_value(value) for key, value in tensor.parameters.items()},
                          f"inputs.{tensor.name}") for tensor in request.inputs]
    carried = sum(region is None for region in regions)
    if raw and len(raw) != carried:
        raise InvalidArgument(f"raw_input_contents has {len(raw)} entries for {carried} inputs not in shared memory: "
                              "one per such input, in the order of inputs", field="raw_input_contents")
    inputs, raw_index = [], 0
    for tensor, region in zip(request.inputs, regions):
        item = InferInput(tensor.name, tensor.datatype, tuple(tensor.shape), region=region)
        datatype = service.check_input(model, item)
        extra = sorted(set(tensor.parameters) - set(SHM_PARAMETERS))
        if extra:
            raise InvalidArgument(f"input {tensor.name!r}: unknown parameter {extra[0]!r}", field=f"inputs.{tensor.name}")
        if region is not None:
            if tensor.HasField("contents"):
                raise InvalidArgument(f"input {tensor.name!r} is in shared memory region {region.name!r} and also has "
                                      "contents: give one", field=f"inputs.{tensor.name}.parameters.shared_memory_region")
            service.read_region(item, datatype, charge)
        elif raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(f"input {tensor.name!r} has contents, but raw_input_contents is used",
                                      field=f"inputs.{tensor.name}")
            item.data = from_raw(tensor.name, datatype, item.shape, raw[raw_index])
            raw_index += 1
        else:
            contents_field = CONTENTS_FIELD.get(item.datatype)
            if contents_field is None:
                raise InvalidArgument(f"input {tensor.name!r}: {item.datatype} data must be in raw_input_contents",
                                      field=f"inputs.{tensor.name}")
            values = getattr(tensor.contents, contents_field)
            if item.datatype == "BYTES":
                item.data = from_bytes_list(tensor.name, list(values), item.shape)
            else:
                item.data = from_json(tensor.name, datatype, item.shape, list(values))
        inputs.append(item)
    outputs = None
    if request.outputs:
        outputs = []
        for wanted in request.outputs:
            extra = sorted(set(wanted.parameters) - {"binary_data", *SHM_PARAMETERS})
            if extra:
                raise InvalidArgument(f"output {wanted.name!r}: parameter {extra[0]!r} is not supported",
                                      field=f"outputs.{wanted.name}")
            params = {key: parameter_value(value) for key, value in wanted.parameters.items()}
            outputs.append(RequestedOutput(wanted.name, region=region_ref(params, f"outputs.{wanted.name}")))
    parameters = {key: parameter_value(value) for key, value in request.parameters.items()}
    return InferRequest(request.model_name, request.model_version, request.id, parameters, inputs, outputs)


def response_to_pb(response: InferResponse) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(model_name=response.model, model_version=response.version, id=response.id)
    for key, value in response.parameters.items():
        set_parameter(message.parameters[key], value)
    for out in response.outputs:
        tensor = message.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        for key, value in (out.parameters or {}).items():  # written into a region: its parameters, no bytes
            set_parameter(tensor.parameters[key], value)
        message.raw_output_contents.append(b"" if out.array is None else out.array.tobytes())
    return message


class OipServicer:
    """The methods of inference.GRPCInferenceService: each converts and delegates (`handlers`
    registers them, every one behind the native service's door, `grpc_door.Door`)."""

    def __init__(self, runtime: Runtime, service: OipService):
        self.runtime = runtime
        self.service = service

    def handlers(self, door: Door) -> dict[str, grpc.RpcMethodHandler]:
        def meta(message_type, fn):  # a metadata method: no compute, no metrics
            return door.unary(message_type, fn, endpoint="metadata", transport=TRANSPORT, compute=False)

        return {
            "ServerLive": door.answer(lambda: pb.ServerLiveResponse(live=True)),
            "ServerReady": door.answer(lambda: pb.ServerReadyResponse(ready=self.runtime.ready)),
            "ModelReady": meta(pb.ModelReadyRequest, self._model_ready),
            "ServerMetadata": meta(pb.ServerMetadataRequest, self._server_metadata),
            "ModelMetadata": meta(pb.ModelMetadataRequest, self._model_metadata),
            "ModelInfer": door.unary(pb.ModelInferRequest, self._infer, endpoint="infer", transport=TRANSPORT),
            "SystemSharedMemoryStatus": meta(pb.SystemSharedMemoryStatusRequest, self._system_status),
            "SystemSharedMemoryRegister": meta(pb.SystemSharedMemoryRegisterRequest, self._system_register),
            "SystemSharedMemoryUnregister": meta(pb.SystemSharedMemoryUnregisterRequest, self._system_unregister),
            "CudaSharedMemoryStatus": meta(pb.CudaSharedMemoryStatusRequest, self._cuda_status),
            "CudaSharedMemoryRegister": meta(pb.CudaSharedMemoryRegisterRequest, self._cuda_register),
            "CudaSharedMemoryUnregister": meta(pb.CudaSharedMemoryUnregisterRequest, self._cuda_unregister),
        }

    # --- shared memory (Triton's extensions: docs/shared-memory.md); an empty name means every region ---

    async def _status(self, kind: str, name: str, response: Any) -> Any:
        """`response` (a System/CudaSharedMemoryStatusResponse) filled with the regions of `kind`."""
        for region in await asyncio.to_thread(self.runtime.regions.status, kind, name or None):
            response.regions[region["name"]].CopyFrom(type(response).RegionStatus(**region))
        return response

    async def _system_status(self, request: pb.SystemSharedMemoryStatusRequest,
                             call: _Call) -> pb.SystemSharedMemoryStatusResponse:
        return await self._status("system", request.name, pb.SystemSharedMemoryStatusResponse())

    async def _system_register(self, request: pb.SystemSharedMemoryRegisterRequest,
                               call: _Call) -> pb.SystemSharedMemoryRegisterResponse:
        check_registrant(self.runtime.settings.shared_memory, call.context.peer())
        await asyncio.to_thread(self.runtime.regions.register_system, request.name, request.key, request.offset,
                                request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def _system_unregister(self, request: pb.SystemSharedMemoryUnregisterRequest,
                                 call: _Call) -> pb.SystemSharedMemoryUnregisterResponse:
        await asyncio.to_thread(self.runtime.regions.unregister, "system", request.name or None)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def _cuda_status(self, request: pb.CudaSharedMemoryStatusRequest,
                           call: _Call) -> pb.CudaSharedMemoryStatusResponse:
        return await self._status("cuda", request.name, pb.CudaSharedMemoryStatusResponse())

    async def _cuda_register(self, request: pb.CudaSharedMemoryRegisterRequest,
                             call: _Call) -> pb.CudaSharedMemoryRegisterResponse:
        check_registrant(self.runtime.settings.shared_memory, call.context.peer())
        await asyncio.to_thread(self.runtime.regions.register_cuda, request.name, request.raw_handle,
                                request.device_id, request.byte_size)
        return pb.CudaSharedMemoryRegisterResponse()

    async def _cuda_unregister(self, request: pb.CudaSharedMemoryUnregisterRequest,
                               call: _Call) -> pb.CudaSharedMemoryUnregisterResponse:
        await asyncio.to_thread(self.runtime.regions.unregister, "cuda", request.name or None)
        return pb.CudaSharedMemoryUnregisterResponse()

    async def _model_ready(self, request: pb.ModelReadyRequest, call: _Call) -> pb.ModelReadyResponse:
        self.service.model(request.name, request.version)
        return pb.ModelReadyResponse(ready=self.runtime.ready)

    async def _server_metadata(self, request: pb.ServerMetadataRequest, call: _Call) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self.service.server_metadata())

    async def _model_metadata(self, request: pb.ModelMetadataRequest, call: _Call) -> pb.ModelMetadataResponse:
        return model_metadata_response(self.service, request)

    def _decode(self, request: pb.ModelInferRequest, charge: Callable[[int], None]) -> Any:
        return request_from_pb(request, self.service, charge)

    async def _infer(self, request: pb.ModelInferRequest, call: _Call) -> pb.ModelInferResponse:
        model = self.service.models.get(request.model_name)
        if model is not None:
            call.endpoint = model.kind
            call.estimator = model.name if model.kind == "advantages" else None

        decode = functools.partial(self._decode, request, call.lease.grow)
        del request  # once decoded, the message's copy of the inputs goes, not after the compute
        decoded = await call.off_loop(decode, call.size)
        del decode
        await call.charge(decoded)  # its shapes known: its compute charged before it is validated
        prepared = await call.off_loop(functools.partial(self.service.prepare, decoded), call.size)
        del decoded
        call.batch = prepared.batch
        with self.service.checks_first(prepared):  # a request that could never fit: its own mistake first
            result = await call.compute(self.service.compute(prepared), timeout_s=prepared.timeout_s, work=prepared)
        with call.phase("encode"):
            return response_to_pb(self.service.respond(prepared, result))


def add_servicer(runtime: Runtime, server: grpc.aio.Server, door: Door) -> None:
    """Register the OIP service on `server` (the native gRPC server), behind `door`."""
    service = OipService(runtime.engine, runtime.scheduler, runtime.regions)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        SERVICE, OipServicer(runtime, service).handlers(door))])
