"""gRPC transport (grpc / grpc.aio) with the generated stubs and the proto <-> document conversions of
`protocol`, so that both transports speak the same documents and raise the same errors."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping

import grpc
import grpc.aio
import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from . import protocol
from ._pb import advserve_pb2 as pb
from ._pb import advserve_pb2_grpc as pb_grpc
from .errors import AdvserveError, InvalidArgument, NotFound, error_from, parse_retry_after, region_error
from .framing import RawTensor

ADVANTAGES = "/v1/advantages"
LOSSES = "/v1/losses"
ANALYSIS = "/v1/analysis"


def target(address: str) -> str:
    """"host:port" (a "grpc://" or "grpcs://" prefix is dropped)."""
    for prefix in ("grpc://", "grpcs://"):
        if address.startswith(prefix):
            return address[len(prefix):]
    return address


def credentials(tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> grpc.ChannelCredentials:
    """TLS credentials: trust `tls_ca` (default: gRPC's roots); for mTLS present `tls_cert` with the key
    `tls_key` (None: the key is in the certificate file)."""
    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    chain = read(tls_cert)
    return grpc.ssl_channel_credentials(root_certificates=read(tls_ca), private_key=read(tls_key) or chain,
                                        certificate_chain=chain)


def channel_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    """The channel's message limits, and per-call balancing over every address the target resolves to
    (gRPC's round_robin: a "dns:///name:port" of a Kubernetes headless Service spreads calls over its pods)."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.lb_policy_name", "round_robin")]


def metadata(headers: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    """Extra headers as gRPC metadata (keys lower-cased, as gRPC requires)."""
    return tuple((key.lower(), str(value)) for key, value in (headers or {}).items())


def rpc_error(exc: grpc.RpcError) -> AdvserveError:
    """The typed error of a failed call: the status code, and the trailing metadata advserve-error-code,
    advserve-error-field and retry-after when the server set them."""
    status = exc.code() if callable(getattr(exc, "code", None)) else None
    name = status.name if status is not None else "UNKNOWN"
    trailing = exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else None
    values: dict[str, Any] = {}
    for key, value in trailing or ():
        values[key] = value.decode("latin-1") if isinstance(value, bytes) else value
    details = (exc.details() if callable(getattr(exc, "details", None)) else None) or name
    field = values.get("advserve-error-field")
    if field and details.startswith(f"{field}: ") and not details[len(field) + 2:].startswith(field):
        details = details[len(field) + 2:]  # the server prefixes the field; REST's message has no prefix
    return error_from(values.get("advserve-error-code"), details, field=field, grpc_code=name,
                      retry_after=parse_retry_after(values.get("retry-after")))


# --- requests: REST documents -> messages, with the server's error codes and fields ---------------


def _name(kind: str, value: Any, field: str, error: type[AdvserveError]) -> None:
    """Check a name the REST API would check (estimator, preset: NotFound; others: InvalidArgument)."""
    if value is None:
        return
    try:
        ok = protocol.enum_to_name(kind, protocol.name_to_enum(kind, value)) == value
        message = f"unknown {field} {value!r}"
    except ValueError as exc:
        ok, message = False, str(exc)
    if not ok:
        raise error(message, field=field)


def _dtype(value: Any) -> None:
    if value is not None and value not in ("float32", "float64"):
        raise InvalidArgument(f"dtype must be 'float32' or 'float64', got {value!r}", field="dtype")


def _value(field: Any, value: Any, name: str) -> Any:
    """A parameter value checked against its proto field as the server checks it (protobuf alone would
    take 7 for a bool and True for a double): bools true/false, numbers not bools, integers whole
    (1.0 is 1); enum names are checked by `protocol.name_to_enum`."""
    if value is None or field.enum_type is not None:
        return value
    if protocol.is_repeated_field(field):  # a list parameter (gdpo's reward_weights), as ParamSpec checks it
        if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
            raise InvalidArgument(f"{name} must be a list of numbers, got {value!r}", field=name)
        items = list(value)
        if not items or any(isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real)
                            or not math.isfinite(v) for v in items):
            raise InvalidArgument(f"{name} must be a non-empty list of finite numbers, got {value!r}", field=name)
        return [float(v) for v in items]
    if field.type == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, (bool, np.bool_)):
            raise InvalidArgument(f"{name} must be true or false, got {value!r}", field=name)
        return bool(value)
    if field.type == FieldDescriptor.TYPE_STRING:
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidArgument(f"{name} must be a number, got {value!r}", field=name)
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return float(value)
    if not float(value).is_integer():
        raise InvalidArgument(f"{name} must be an integer, got {value!r}", field=name)
    return int(value)


def _params(message_type: Callable[[], Any], params: Any, prefix: str) -> Any:
    """The parameters checked one by one into a scratch message, so that a bad one is named as REST names
    it; returns them with values as the proto takes them (1.0 for an int field is 1)."""
    if params is None or isinstance(params, bool):
        return params
    if not isinstance(params, Mapping):
        raise InvalidArgument(f"{prefix} must be an object of parameters, got {type(params).__name__}", field=prefix)
    fields = message_type.DESCRIPTOR.fields_by_name
    checked = {}
    for key, value in params.items():
        if key in fields:
            value = _value(fields[key], value, f"{prefix}.{key}")
        try:
            protocol.params_to_pb(message_type(), {key: value})
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"{prefix}: {exc}", field=f"{prefix}.{key}") from None
        checked[key] = value
    return checked


def _dp_size(value: Any) -> Any:
    """dp_size as the server checks it (an integer from 1 to 2^31), so that the int64 field can carry it."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or not 1 <= value <= 2**31:
        raise InvalidArgument(f"dp_size must be an integer from 1 to 2^31, got {value!r}", field="dp_size")
    return int(value)


def _count(document: Mapping[str, Any], key: str) -> Any:
    """num_tokens / num_sequences: a positive number (not a bool, not text), as the server requires."""
    value = document.get(key)
    if value is not None and (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)):
        raise InvalidArgument(f"{key} must be a positive number", field=key)
    return value


def _tensor_names(tensors: Mapping[str, Any], names: tuple[str, ...]) -> None:
    for name in tensors:
        if name not in names:
            raise InvalidArgument(f"tensor {name!r} is unknown; accepted: {', '.join(sorted(names))}",
                                  field=f"tensors.{name}")


def advantages_request(document: Mapping[str, Any], tensors: Mapping[str, RawTensor | list],
                       ) -> pb.ComputeAdvantagesRequest:
    _name("estimator", document.get("estimator"), "estimator", NotFound)
    _name("preset", document.get("preset"), "preset", NotFound)
    _name("layout", document.get("layout"), "layout", InvalidArgument)
    _dtype(document.get("dtype"))
    params = _params(pb.AdvantageParams, document.get("params"), "params")
    _tensor_names(tensors, protocol.ADVANTAGE_TENSORS)
    return protocol.advantages_request_to_pb({**document, "params": params}, tensors)


_TERM_MESSAGES = {"policy_loss": pb.PolicyLoss, "kl_loss": pb.KLLoss, "value_loss": pb.ValueLoss,
                  "entropy_bonus": pb.EntropyBonus, "rollout_correction": pb.RolloutCorrection,
                  "token_loss": pb.TokenLoss}


def losses_request(document: Mapping[str, Any], tensors: Mapping[str, RawTensor | list]) -> pb.ComputeLossesRequest:
    _name("preset", document.get("preset"), "preset", NotFound)
    _name("layout", document.get("layout"), "layout", InvalidArgument)
    _dtype(document.get("dtype"))
    checked = dict(document)
    for term, message_type in _TERM_MESSAGES.items():
        checked[term] = _params(message_type, document.get(term), term)
    for key in ("num_tokens", "num_sequences"):
        _count(document, key)
    checked["dp_size"] = _dp_size(document.get("dp_size"))
    if document.get("return_kl_values") is not None:
        checked["return_kl_values"] = _value(pb.ComputeLossesRequest.DESCRIPTOR.fields_by_name["return_kl_values"],
                                             document["return_kl_values"], "return_kl_values")
    _tensor_names(tensors, protocol.LOSS_TENSORS)
    return protocol.losses_request_to_pb(checked, tensors)


def analyze_request(document: Mapping[str, Any], tensors: Mapping[str, RawTensor | list]) -> pb.AnalyzeRequest:
    estimators = document.get("estimators")
    if estimators is not None:
        if isinstance(estimators, (str, bytes)) or not isinstance(estimators, (list, tuple)):
            raise InvalidArgument("estimators must be a list of estimator names", field="estimators")
        if not estimators:  # the proto cannot tell an empty list from an unset one: refuse it here, as REST does
            raise InvalidArgument("estimators is empty: name at least one, or leave it out for all that apply",
                                  field="estimators")
        for name in estimators:
            _name("estimator", name, "estimators", NotFound)
    _name("preset", document.get("preset"), "preset", NotFound)
    _name("layout", document.get("layout"), "layout", InvalidArgument)
    _dtype(document.get("dtype"))
    params = document.get("params")
    if params is not None and not isinstance(params, Mapping):
        raise InvalidArgument("params must map estimator names to their parameter overrides", field="params")
    checked = {estimator: _params(pb.AdvantageParams, overrides, f"params.{estimator}")
               for estimator, overrides in (params or {}).items()}
    _tensor_names(tensors, protocol.ADVANTAGE_TENSORS)
    return protocol.analyze_request_to_pb({**document, "params": checked or params}, tensors)


# --- responses ------------------------------------------------------------------------------------


def advantages_response(response: pb.ComputeAdvantagesResponse, document: Mapping[str, Any],
                        ) -> tuple[dict[str, Any], dict[str, RawTensor]]:
    out, tensors = protocol.advantages_response_from_pb(response)
    out["estimator"] = document.get("estimator")
    out["preset"] = document.get("preset") or "paper"
    return out, tensors


def losses_response(response: pb.ComputeLossesResponse, document: Mapping[str, Any],
                    ) -> tuple[dict[str, Any], dict[str, RawTensor | None]]:
    out, tensors = protocol.losses_response_from_pb(response)
    out["preset"] = document.get("preset") or "paper"
    return out, tensors


def catalog(response: pb.ListEstimatorsResponse) -> dict[str, Any]:
    """The REST catalog from ListEstimatorsResponse.catalog, integer parameters restored (a protobuf
    Struct holds every number as a double)."""
    document = json_format.MessageToDict(response.catalog)
    _restore_ints(document)
    return document


def _restore_ints(node: Any) -> None:
    """Where a "params" table declares a parameter of type int, make its choices, bounds and defaults
    (in the sibling "presets"/"defaults" tables) ints again."""
    if isinstance(node, list):
        for item in node:
            _restore_ints(item)
        return
    if not isinstance(node, dict):
        return
    params = node.get("params")
    if isinstance(params, dict):
        ints = {name for name, spec in params.items() if isinstance(spec, dict) and spec.get("type") == "int"}
        for name in ints:
            spec = params[name]
            for key in ("choices", "minimum", "maximum", "default"):
                if key in spec:
                    spec[key] = _as_int(spec[key])
        for table in (node.get("presets"), node.get("defaults")):
            for per_preset in (table or {}).values():
                if not isinstance(per_preset, dict):
                    continue
                defaults = per_preset.get("defaults", per_preset)
                if isinstance(defaults, dict):
                    for name in ints & defaults.keys():
                        defaults[name] = _as_int(defaults[name])
    for value in node.values():
        _restore_ints(value)


def _as_int(value: Any) -> Any:
    if isinstance(value, list):
        return [_as_int(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_int(v) for k, v in value.items()}
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# --- the Open Inference Protocol's shared-memory calls ----------------------------------------------

OIP_SERVICE = "inference.GRPCInferenceService"


def _pb_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _pb_string(number: int, text: str) -> bytes:
    """A protobuf string field, encoded by hand: the client carries no OIP stubs for two small messages
    (SystemSharedMemoryRegisterRequest {name = 1, key = 2, offset = 3, byte_size = 4} and
    SystemSharedMemoryUnregisterRequest {name = 1}, proto/inference/grpc_service.proto)."""
    data = text.encode()
    return _pb_varint(number << 3 | 2) + _pb_varint(len(data)) + data


def _pb_uint(number: int, value: int) -> bytes:
    return _pb_varint(number << 3) + _pb_varint(value)


# --- transports -----------------------------------------------------------------------------------


class GrpcTransport:
    """Synchronous gRPC transport over one channel."""

    def __init__(self, address: str, *, timeout: float | None, headers: Mapping[str, str] | None,
                 max_message_bytes: int, tls: grpc.ChannelCredentials | None = None):
        self.address = target(address)
        self.timeout = timeout
        self.metadata = metadata(headers)
        options = channel_options(max_message_bytes)
        self._channel = (grpc.insecure_channel(self.address, options=options) if tls is None
                         else grpc.secure_channel(self.address, tls, options=options))
        self._stub = pb_grpc.AdvserveStub(self._channel)

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None

    def compute(self, path: str, document: Mapping[str, Any], tensors: Mapping[str, RawTensor | list],
                ) -> tuple[dict[str, Any], dict[str, Any]]:
        if path == ADVANTAGES:
            return advantages_response(self._call(self._stub.ComputeAdvantages,
                                                  advantages_request(document, tensors)), document)
        if path == ANALYSIS:
            return protocol.analyze_response_from_pb(self._call(self._stub.Analyze,
                                                                analyze_request(document, tensors))), {}
        return losses_response(self._call(self._stub.ComputeLosses, losses_request(document, tensors)), document)

    def catalog(self) -> dict[str, Any]:
        return catalog(self._call(self._stub.ListEstimators, pb.ListEstimatorsRequest()))

    def register_region(self, name: str, key: str, byte_size: int) -> None:
        """Register the system shared-memory region `key` (all of its `byte_size` bytes) as `name`
        (the Open Inference Protocol's SystemSharedMemoryRegister, on the same port)."""
        request = _pb_string(1, name) + _pb_string(2, key) + _pb_uint(4, byte_size)  # offset (3): 0
        self._region_call("SystemSharedMemoryRegister", request, f"registering {name!r} ({key})")

    def unregister_region(self, name: str) -> None:
        self._region_call("SystemSharedMemoryUnregister", _pb_string(1, name), f"unregistering {name!r}")

    def _region_call(self, method: str, request: bytes, what: str) -> None:
        call = self._channel.unary_unary(f"/{OIP_SERVICE}/{method}")  # bytes in, bytes out
        try:
            call(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise region_error(rpc_error(exc), what) from None

    def close(self) -> None:
        self._channel.close()


class AsyncGrpcTransport:
    """Asynchronous gRPC transport (grpc.aio). The channel is opened on first use, in the running event
    loop, and belongs to that loop."""

    def __init__(self, address: str, *, timeout: float | None, headers: Mapping[str, str] | None,
                 max_message_bytes: int, tls: grpc.ChannelCredentials | None = None):
        self.address = target(address)
        self.timeout = timeout
        self.metadata = metadata(headers)
        self.options = channel_options(max_message_bytes)
        self.tls = tls
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.AdvserveStub | None = None

    def _stub_now(self) -> pb_grpc.AdvserveStub:
        if self._stub is None:
            self._channel = (grpc.aio.insecure_channel(self.address, options=self.options) if self.tls is None
                             else grpc.aio.secure_channel(self.address, self.tls, options=self.options))
            self._stub = pb_grpc.AdvserveStub(self._channel)
        return self._stub

    async def _call(self, name: str, request: Any) -> Any:
        method = getattr(self._stub_now(), name)
        try:
            return await method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None

    async def compute(self, path: str, document: Mapping[str, Any], tensors: Mapping[str, RawTensor | list],
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
        if path == ADVANTAGES:
            response = await self._call("ComputeAdvantages", advantages_request(document, tensors))
            return advantages_response(response, document)
        if path == ANALYSIS:
            return protocol.analyze_response_from_pb(await self._call("Analyze", analyze_request(document, tensors))), {}
        return losses_response(await self._call("ComputeLosses", losses_request(document, tensors)), document)

    async def catalog(self) -> dict[str, Any]:
        return catalog(await self._call("ListEstimators", pb.ListEstimatorsRequest()))

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None
