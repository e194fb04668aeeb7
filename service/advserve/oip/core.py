"""The Open Inference Protocol's view of advserve, independent of the transport: the models, their
metadata, and an inference request turned into the engine's domain request and its result back.

Models: every advantage estimator of the catalog is a model of its name ("grpo", "gae", ...) and
"losses" is one more. Each has version "1" and platform "advserve". Inputs are the estimator's (or
the loss terms') tensors under their API names; outputs are "advantages" and "returns", or
"grad_logprobs", "grad_values", "grad_entropy" and "loss". Request parameters carry what the native
API has as fields: "preset", "dtype", "layout", the estimator's parameters by name ("gamma",
"kl_coef", ...), and for "losses" the terms' parameters as "<term>.<param>" ("policy_loss.clip_high",
"kl_loss.coef") with "<term>" true/false switching a term on or off. docs/oip.md is the reference.

The transports (`transports.oip_rest`, `transports.oip_grpc`) parse their wire into `InferRequest`, call
`OipService.prepare`, `compute` and `respond`, and encode the `InferResponse`; errors are the
engine's `AdvserveError`s with fields renamed to the protocol's words (`inputs.<name>`,
`parameters.<name>`), so one message reads the same on both transports.
"""

from __future__ import annotations

import dataclasses
import copy
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .. import __version__
from ..batch import TOKEN_TENSORS
from ..engine import Engine
from ..errors import AdvserveError, InvalidArgument, NotFound
from ..model import AdvantageRequest, LossRequest
from ..scheduler import Scheduler
from .tensors import FLOATS, INTEGERS, OUTPUT_DATATYPES, Datatype, check_datatype, check_shape, host_array

SERVER_NAME = "advserve"
PLATFORM = "advserve"
MODEL_VERSION = "1"
LOSSES = "losses"
EXTENSIONS = ("binary_tensor_data", "parameters")

NUMERIC = frozenset(INTEGERS | FLOATS)
ACCEPTED: dict[str, frozenset[str]] = {  # input name -> datatypes it accepts; others: NUMERIC
    "response_mask": frozenset(NUMERIC | {"BOOL"}),
    "group_ids": frozenset(INTEGERS | {"BYTES"}),
    "cu_seqlens": frozenset({"INT32", "INT64"}),
}
PREFERRED = {"response_mask": "BOOL", "group_ids": "INT64", "cu_seqlens": "INT64"}  # others: FP32
# request parameters every model takes (besides its own), and their kinds
COMMON_PARAMETERS = {"preset": ("str", False), "dtype": ("str", False), "layout": ("str", False)}
LOSS_PARAMETERS = {"num_tokens": ("float", False), "num_sequences": ("float", False)}
# parameters of the protocol itself (Triton's names); "binary_data_output" is HTTP's, read there
PROTOCOL_PARAMETERS = ("binary_data_output", "timeout", "priority", "sequence_id", "sequence_start", "sequence_end")
TERM_OUTPUTS = {"grad_logprobs": ("policy_loss", "kl_loss"), "grad_values": ("value_loss",),
                "grad_entropy": ("entropy_bonus",)}


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of a model: its name, preferred datatype and shape (-1: variable)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    accepts: frozenset[str] = frozenset()

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Model:
    """One OIP model: an estimator (kind "advantages") or the losses (kind "losses")."""

    name: str
    kind: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    parameters: dict[str, tuple[str, bool]]  # name -> (kind: float, int, bool or str; nullable)

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": [MODEL_VERSION], "platform": PLATFORM,
                "inputs": [t.metadata() for t in self.inputs.values()],
                "outputs": [t.metadata() for t in self.outputs.values()]}


def _input(name: str) -> TensorSpec:
    shape = (-1, -1) if name in TOKEN_TENSORS else (-1,)
    accepts = ACCEPTED.get(name, NUMERIC)
    return TensorSpec(name, PREFERRED.get(name, "FP32"), shape, accepts)


def _kind(spec: Mapping[str, Any]) -> tuple[str, bool]:
    return spec["type"], bool(spec.get("nullable"))


def build_models(catalog: Mapping[str, Any]) -> dict[str, Model]:
    """The models of an engine catalog (`Engine.catalog()`): one per estimator, and "losses"."""
    models: dict[str, Model] = {}
    token_out = {name: TensorSpec(name, "FP32", (-1, -1)) for name in ("advantages", "returns")}
    for entry in catalog["estimators"]:
        tensors = entry["tensors"]
        names = [*tensors["one_of"], *tensors["required"], *tensors["optional"], "cu_seqlens"]
        params = {name: _kind(spec) for name, spec in entry["params"].items()}
        models[entry["name"]] = Model(entry["name"], "advantages", {n: _input(n) for n in dict.fromkeys(names)},
                                      dict(token_out), {**COMMON_PARAMETERS, **params})
    losses = catalog["losses"]
    names = ["response_mask", *(name for term in losses.values() for name in term["tensors"]), "cu_seqlens"]
    params: dict[str, tuple[str, bool]] = {**COMMON_PARAMETERS, **LOSS_PARAMETERS}
    for term, spec in losses.items():
        params[term] = ("bool", False)
        params.update({f"{term}.{name}": _kind(p) for name, p in spec["params"].items()})
    outputs = {name: TensorSpec(name, "FP32", (-1, -1)) for name in TERM_OUTPUTS}
    outputs["loss"] = TensorSpec("loss", "FP64", (1,))
    models[LOSSES] = Model(LOSSES, "losses", {n: _input(n) for n in dict.fromkeys(names)}, outputs, params)
    return models


# --- requests and responses -----------------------------------------------------------------------


@dataclass
class InferInput:
    """One input as parsed by a transport: `data` is a torch tensor, a numpy array, or None until the
    transport fills it (`decode` turns wire data into either)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any = None


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # HTTP's per-output binary_data parameter


@dataclass
class InferRequest:
    model: str
    version: str = ""
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    inputs: list[InferInput] = field(default_factory=list)
    outputs: list[RequestedOutput] | None = None  # None: every output the request produces


@dataclass
class InferOutput:
    name: str
    datatype: str
    shape: list[int]
    array: Any  # numpy, C-contiguous, little-endian


@dataclass
class InferResponse:
    model: str
    id: str
    parameters: dict[str, Any]
    outputs: list[InferOutput]
    version: str = MODEL_VERSION


@dataclass
class Prepared:
    """A validated request ready for the compute thread."""

    model: Model
    request: InferRequest
    domain: Any  # PreparedAdvantages or LossRequest
    outputs: list[RequestedOutput]
    timeout_s: float | None
    batch: tuple[int, int] | None


# --- the service ------------------------------------------------------------------------------------


class OipService:
    """The protocol over one engine and compute thread (those of the native API)."""

    def __init__(self, engine: Engine, scheduler: Scheduler):
        self.engine = engine
        self.scheduler = scheduler
        self.models = build_models(engine.catalog())

    @staticmethod
    def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    def model(self, name: str, version: str = "") -> Model:
        """The model, or NotFound naming the valid models (or versions)."""
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"unknown model {name!r}; models: {', '.join(self.models)}", field="model_name")
        if version not in ("", MODEL_VERSION):
            raise NotFound(f"model {name!r} has no version {version!r}; versions: {MODEL_VERSION}",
                           field="model_version")
        return model

    def check_input(self, model: Model, item: InferInput) -> Datatype:
        """The input's name, datatype and shape against the model, before its data is decoded; returns
        the input's datatype."""
        spec = model.inputs.get(item.name)
        if spec is None:
            raise InvalidArgument(f"model {model.name!r} has no input {item.name!r}; inputs: "
                                  f"{', '.join(model.inputs)}", field=f"inputs.{item.name}")
        datatype = check_datatype(item.name, item.datatype, spec.accepts)
        item.shape = check_shape(item.name, item.shape)
        return datatype

    def prepare(self, request: InferRequest) -> Prepared:
        """Everything but the math (in a transport's thread): model, parameters, tensors, outputs."""
        try:
            model = self.model(request.model, request.version)
            return self._prepare(model, request)
        except AdvserveError as exc:
            raise protocol_error(exc) from None

    def _prepare(self, model: Model, request: InferRequest) -> Prepared:
        params, timeout_s = read_parameters(model, request.parameters)
        tensors: dict[str, Any] = {}
        for item in request.inputs:
            if item.name in tensors:
                raise InvalidArgument(f"input {item.name!r} is given twice", field=f"inputs.{item.name}")
            tensors[item.name] = item.data
        if model.kind == "advantages":
            domain = self.engine.prepare_advantages(AdvantageRequest(
                estimator=model.name, tensors=tensors, preset=params.pop("preset", None),
                dtype=params.pop("dtype", None), layout=params.pop("layout", None), params=params))
            produced = list(model.outputs)
            batch = tuple(domain.batch.mask.shape)
        else:
            domain = loss_request(params, tensors)
            produced = produced_loss_outputs(domain)
            mask = tensors.get("response_mask")
            batch = tuple(mask.shape) if getattr(mask, "ndim", 0) == 2 else None
        outputs = requested_outputs(model, request.outputs, produced)
        return Prepared(model, request, domain, outputs, timeout_s, batch)

    async def compute(self, prepared: Prepared):
        """(result, Timing) from the compute thread."""
        try:
            if prepared.model.kind == "advantages":
                return await self.scheduler.advantages(prepared.domain)
            return await self.scheduler.call(lambda: self.engine.compute_losses(prepared.domain))
        except AdvserveError as exc:
            raise protocol_error(exc) from None

    @staticmethod
    def respond(prepared: Prepared, result: Any) -> InferResponse:
        """The response: the requested outputs in order, the scalars as response parameters."""
        model = prepared.model
        parameters: dict[str, Any] = {"preset": result.preset}
        if model.kind == "advantages":
            tensors = {"advantages": result.advantages, "returns": result.returns}
            parameters.update(_scalars(result.params))
        else:
            tensors = {"grad_logprobs": result.grad_logprobs, "grad_values": result.grad_values,
                       "grad_entropy": result.grad_entropy}
            parameters["loss"] = result.loss
            parameters.update(_scalars(result.components, "components."))
            parameters.update(_scalars(result.metrics, "metrics."))
            for term, values in result.params.items():
                parameters.update(_scalars(values, f"{term}."))
        outputs = []
        for wanted in prepared.outputs:
            if wanted.name == "loss":
                array = torch.tensor([result.loss], dtype=torch.float64).numpy()
                outputs.append(InferOutput("loss", "FP64", [1], array))
                continue
            tensor = tensors[wanted.name]
            outputs.append(InferOutput(wanted.name, OUTPUT_DATATYPES[tensor.dtype], list(tensor.shape),
                                       host_array(tensor)))
        return InferResponse(model.name, prepared.request.id, parameters, outputs)


def _scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Response parameters from a mapping of scalars (None left out: the protocol has no null)."""
    return {f"{prefix}{k}": v for k, v in values.items() if isinstance(v, (bool, int, float, str))}


# --- parameters ---------------------------------------------------------------------------------------


def read_parameters(model: Model, given: Mapping[str, Any]) -> tuple[dict[str, Any], float | None]:
    """(the model's parameters as typed values, Triton's "timeout" in seconds or None).

    A string given for a numeric, boolean or nullable parameter is read as JSON text ("0.28",
    "true", "null"): clients whose stubs lack double_param send floats that way. Types and ranges
    are checked by the engine (the preset's parameter specs)."""
    params: dict[str, Any] = {}
    timeout_s = None
    for name, value in given.items():
        if name in PROTOCOL_PARAMETERS:
            timeout_s = _protocol_parameter(name, value, timeout_s)
            continue
        kind = model.parameters.get(name)
        if kind is None:
            valid = ", ".join(sorted(model.parameters))
            raise InvalidArgument(f"unknown parameter {name!r} for model {model.name!r}; valid: {valid}",
                                  field=f"parameters.{name}")
        params[name] = _typed(value, *kind)
    return params, timeout_s


def _typed(value: Any, kind: str, nullable: bool) -> Any:
    """A string parameter value as JSON text where the parameter is not a string ("0.28", "true",
    "null"); for a nullable string parameter, "null" is null. Anything else as given."""
    if not isinstance(value, str):
        return value
    if kind == "str":
        return None if nullable and value == "null" else value
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    return parsed if parsed is None or isinstance(parsed, (bool, int, float)) else value


def _protocol_parameter(name: str, value: Any, timeout_s: float | None) -> float | None:
    if name == "binary_data_output":
        if not isinstance(value, bool):
            raise InvalidArgument("parameters.binary_data_output must be true or false",
                                  field="parameters.binary_data_output")
    elif name == "timeout":  # Triton: microseconds; a deadline tighter than the server's
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise InvalidArgument("parameters.timeout must be a positive number of microseconds",
                                  field="parameters.timeout")
        return value / 1e6
    elif name == "priority":
        if value not in (0, None):
            raise InvalidArgument("parameters.priority is not supported: one FIFO queue serves every request",
                                  field="parameters.priority")
    else:
        raise InvalidArgument(f"parameters.{name} is not supported: advserve's models are stateless (no sequences)",
                              field=f"parameters.{name}")
    return timeout_s


def loss_request(params: dict[str, Any], tensors: dict[str, Any]) -> LossRequest:
    """The LossRequest of the "losses" model's parameters: "<term>" switches a term on or off,
    "<term>.<param>" overrides a default (and switches the term on)."""
    terms: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(LossRequest)}
    switches = {name: value for name, value in params.items() if "." not in name and name in fields
                and name not in ("preset", "dtype", "layout", "num_tokens", "num_sequences")}
    for term, on in switches.items():
        if not isinstance(on, bool):
            raise InvalidArgument(f"parameters.{term} must be true or false (a loss term on or off), got {on!r}",
                                  field=f"parameters.{term}")
        terms[term] = {} if on else False
    for name, value in params.items():
        if "." not in name:
            continue
        term, key = name.split(".", 1)
        if terms.get(term) is False:
            raise InvalidArgument(f"parameters.{name} is given but parameters.{term} is false (the term is off)",
                                  field=f"parameters.{term}")
        terms.setdefault(term, {})[key] = value
    return LossRequest(tensors=tensors, preset=params.get("preset"), dtype=params.get("dtype"),
                       layout=params.get("layout"), num_tokens=params.get("num_tokens"),
                       num_sequences=params.get("num_sequences"), **terms)


def produced_loss_outputs(request: LossRequest) -> list[str]:
    """The outputs a loss request produces: each gradient whose term is on, and "loss" (a term is on
    when given; policy_loss also when left out, as in the native API)."""
    on = {name for name in ("policy_loss", "kl_loss", "value_loss", "entropy_bonus")
          if getattr(request, name) is not False and (getattr(request, name) is not None or name == "policy_loss")}
    return [name for name, terms in TERM_OUTPUTS.items() if on & set(terms)] + ["loss"]


def requested_outputs(model: Model, requested: list[RequestedOutput] | None, produced: list[str]) -> list[RequestedOutput]:
    if requested is None:
        return [RequestedOutput(name) for name in produced]
    seen = set()
    for wanted in requested:
        if wanted.name not in model.outputs:
            raise InvalidArgument(f"model {model.name!r} has no output {wanted.name!r}; outputs: "
                                  f"{', '.join(model.outputs)}", field=f"outputs.{wanted.name}")
        if wanted.name in seen:
            raise InvalidArgument(f"output {wanted.name!r} is requested twice", field=f"outputs.{wanted.name}")
        if wanted.name not in produced:
            terms = " or ".join(TERM_OUTPUTS[wanted.name])
            raise InvalidArgument(f"output {wanted.name!r} is produced only when {terms} is on",
                                  field=f"outputs.{wanted.name}")
        seen.add(wanted.name)
    return requested


# --- errors ---------------------------------------------------------------------------------------------

_RENAMES = (("params.", "parameters."), ("tensors.", "inputs."), ("estimator", "model_name"))
_PARAMETER_FIELDS = ("preset", "dtype", "layout", "num_tokens", "num_sequences", "policy_loss", "kl_loss",
                     "value_loss", "entropy_bonus", "rollout_correction")


def protocol_error(error: AdvserveError) -> AdvserveError:
    """The engine's error with its field in the protocol's words: params.x -> parameters.x,
    tensors.x -> inputs.x, a loss term's policy_loss.x -> parameters.policy_loss.x; the same class."""
    old = error.field
    if not old or old.startswith(("parameters.", "inputs.", "outputs.", "model_")):
        return error
    new = old
    for before, after in _RENAMES:
        if old == before or old.startswith(before):
            new = after + old[len(before):] if before.endswith(".") else after
            break
    else:
        if old.split(".", 1)[0] in _PARAMETER_FIELDS:
            new = f"parameters.{old}"
    if new == old:
        return error
    renames_the_subject = "." in old or old in _PARAMETER_FIELDS  # "params.gamma must be ...", "dtype must be ..."
    message = error.message.replace(old, new, 1) if renames_the_subject and error.message.startswith(old) \
        else error.message
    renamed = copy.copy(error)  # the same class (and retry_after_s, if any)
    renamed.message, renamed.field, renamed.args = message, new, (message,)
    return renamed


__all__ = ["InferInput", "InferOutput", "InferRequest", "InferResponse", "Model", "OipService",
           "Prepared", "RequestedOutput", "protocol_error"]
