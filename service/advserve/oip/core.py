"""The Open Inference Protocol's view of advserve, independent of the transport: the models, their
metadata, and an inference request turned into the engine's domain request and its result back.

Models: every advantage estimator of the catalog is a model of its name ("grpo", "gae", ...) and
"losses" is one more. Each has version "1" and platform "advserve". Inputs are the estimator's (or
the loss terms') tensors under their API names; outputs are "advantages" and "returns", or
"grad_logprobs", "grad_values", "grad_entropy", "grad_token_losses", "kl_values" and "loss". Request parameters carry what the native
API has as fields: "preset", "dtype", "layout", the estimator's parameters by name ("gamma",
"kl_coef", ...), and for "losses" the terms' parameters as "<term>.<param>" ("policy_loss.clip_high",
"kl_loss.coef") with "<term>" true/false switching a term on or off. docs/oip.md is the reference.

The transports (`transports.oip_rest`, `transports.oip_grpc`) parse their wire into `InferRequest`, call
`OipService.prepare`, `compute` and `respond`, and encode the `InferResponse`; errors are the
engine's `AdvserveError`s with fields renamed to the protocol's words (`inputs.<name>`,
`parameters.<name>`), so one message reads the same on both transports.

Shared memory (Triton's extensions, docs/shared-memory.md): a tensor whose parameters name a region
(`region_ref`) is read from it (`OipService.read_region`) or, an output, written into it
(`OipService.place`), through the server's registry (`shm.Regions`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import copy
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

from .. import __version__
from ..batch import COMPONENT_TENSORS, TOKEN_TENSORS
from ..engine import Engine, checks_first
from ..errors import AdvserveError, InvalidArgument, NotFound
from ..model import AdvantageRequest, LossRequest
from ..scheduler import Scheduler
from ..shm import Regions
from .tensors import FLOATS, INTEGERS, OUTPUT_DATATYPES, Datatype, check_datatype, check_shape, from_raw, host_array

SERVER_NAME = "advserve"
PLATFORM = "advserve"
MODEL_VERSION = "1"
LOSSES = "losses"
EXTENSIONS = ("binary_tensor_data", "parameters", "system_shared_memory", "cuda_shared_memory")
SHM_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
SNAPSHOT = frozenset({"cu_seqlens", "group_ids"})
"""Index inputs copied out of a region when read: the caller can write its region at any time, and
these are validated once and then used as indices (the others are only values)."""

NUMERIC = frozenset(INTEGERS | FLOATS)
ACCEPTED: dict[str, frozenset[str]] = {  # input name -> datatypes it accepts; others: NUMERIC
    "response_mask": frozenset(NUMERIC | {"BOOL"}),
    "group_ids": frozenset(INTEGERS | {"BYTES"}),
    "cu_seqlens": frozenset({"INT32", "INT64"}),
}
PREFERRED = {"response_mask": "BOOL", "group_ids": "INT64", "cu_seqlens": "INT64"}  # others: FP32
# request parameters every model takes (besides its own), and their kinds
COMMON_PARAMETERS = {"preset": ("str", False), "dtype": ("str", False), "layout": ("str", False)}
LOSS_PARAMETERS = {"num_tokens": ("float", False), "num_sequences": ("float", False), "dp_size": ("int", False),
                   "return_kl_values": ("bool", False)}
# parameters of the protocol itself (Triton's names); "binary_data_output" is HTTP's, read there
PROTOCOL_PARAMETERS = ("binary_data_output", "timeout", "priority", "sequence_id", "sequence_start", "sequence_end")
TERM_OUTPUTS = {"grad_logprobs": ("policy_loss", "kl_loss"), "grad_values": ("value_loss",),
                "grad_entropy": ("entropy_bonus",), "grad_token_losses": ("token_loss",)}
KL_VALUES = "kl_values"  # an output of the kl_loss term when return_kl_values is true


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
    shape = (-1, -1) if name in TOKEN_TENSORS or name in COMPONENT_TENSORS else (-1,)
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
    names = ["response_mask", *(name for term in losses.values()
                                for name in (*term["tensors"], *term.get("optional_tensors", ()))), "cu_seqlens"]
    params: dict[str, tuple[str, bool]] = {**COMMON_PARAMETERS, **LOSS_PARAMETERS}
    for term, spec in losses.items():
        params[term] = ("bool", False)
        params.update({f"{term}.{name}": _kind(p) for name, p in spec["params"].items()})
    outputs = {name: TensorSpec(name, "FP32", (-1, -1)) for name in (*TERM_OUTPUTS, KL_VALUES)}
    outputs["loss"] = TensorSpec("loss", "FP64", (1,))
    models[LOSSES] = Model(LOSSES, "losses", {n: _input(n) for n in dict.fromkeys(names)}, outputs, params)
    return models


# --- requests and responses -----------------------------------------------------------------------


@dataclass(frozen=True)
class RegionRef:
    """Where a tensor lies in shared memory: a registered region's name, the byte size, the offset."""

    name: str
    byte_size: int
    offset: int = 0

    def parameters(self, byte_size: int | None = None) -> dict[str, Any]:
        """The tensor parameters naming this place (an output's: the bytes written)."""
        given = {"shared_memory_region": self.name,
                 "shared_memory_byte_size": self.byte_size if byte_size is None else byte_size}
        return {**given, "shared_memory_offset": self.offset} if self.offset else given


def region_ref(parameters: Mapping[str, Any], where: str) -> RegionRef | None:
    """The RegionRef of a tensor's parameters ("shared_memory_region", "shared_memory_byte_size",
    optional "shared_memory_offset"; Triton's names), or None without them. Errors name
    `<where>.parameters.<name>` (`where`: "inputs.<name>" or "outputs.<name>")."""
    if not any(name in parameters for name in SHM_PARAMETERS):
        return None
    region = parameters.get("shared_memory_region")
    if not isinstance(region, str) or not region:
        raise InvalidArgument(f"{where}.parameters.shared_memory_region must name a registered shared memory region "
                              f"(a string), got {region!r:.80}", field=f"{where}.parameters.shared_memory_region")
    values = {}
    for name, required in (("shared_memory_byte_size", True), ("shared_memory_offset", False)):
        value = parameters.get(name, None if required else 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
            raise InvalidArgument(f"{where}.parameters.{name} must be a non-negative integer"
                                  f"{' (the tensor is in a shared memory region)' if required else ''}, "
                                  f"got {value!r:.40}", field=f"{where}.parameters.{name}")
        values[name] = value
    return RegionRef(region, values["shared_memory_byte_size"], values["shared_memory_offset"])


@dataclass
class InferInput:
    """One input as parsed by a transport: `data` is a torch tensor, a numpy array, or None until the
    transport fills it (`decode` turns wire data into either, `OipService.read_region` reads a
    region's)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any = None
    region: RegionRef | None = None


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # HTTP's per-output binary_data parameter
    region: RegionRef | None = None  # written into this shared memory region, not returned


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
    array: Any  # numpy, C-contiguous, little-endian; None when written into a region
    parameters: dict[str, Any] | None = None  # a region's: where the output was written


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

    def __init__(self, engine: Engine, scheduler: Scheduler, regions: Regions | None = None):
        self.engine = engine
        self.scheduler = scheduler
        self.regions = regions
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

    def read_region(self, item: InferInput, datatype: Datatype, charge: Callable[[int], None] | None = None) -> None:
        """Fill `item.data` from its shared memory region (`item.region`): a view of the region, or a
        copy charged to `charge` (an object of another uid: `shm` module docstring; a BYTES input
        of a CUDA region; the SNAPSHOT index inputs). Its byte size must be exactly what shape and
        datatype need (BYTES: the serialized elements, each a 4-byte length and its bytes)."""
        where = f"inputs.{item.name}.parameters"
        ref = item.region
        regions = self._regions(f"{where}.shared_memory_region")
        region_field = f"{where}.shared_memory_region"
        if datatype.itemsize is not None and ref.byte_size != math.prod(item.shape) * datatype.itemsize:
            raise InvalidArgument(f"input {item.name!r}: shared_memory_byte_size is {ref.byte_size} but shape "
                                  f"{list(item.shape)} of {datatype.name} needs "
                                  f"{math.prod(item.shape) * datatype.itemsize} bytes",
                                  field=f"{where}.shared_memory_byte_size")
        kind = regions.check(ref.name, ref.offset, ref.byte_size, field=region_field)
        if kind == "cuda" and datatype.torch is not None:
            item.data = regions.read(ref.name, ref.offset, ref.byte_size, dtype=datatype.torch, shape=item.shape,
                                     field=region_field)
        else:
            data = regions.buffer(ref.name, ref.offset, ref.byte_size, field=region_field, charge=charge)
            if isinstance(data, torch.Tensor):  # BYTES in a CUDA region: to the host, charged
                if charge is not None:
                    charge(ref.byte_size)
                data = memoryview(data.cpu().numpy())
            item.data = from_raw(item.name, datatype, item.shape, data)
        if item.name in SNAPSHOT and isinstance(item.data, torch.Tensor):
            item.data = item.data.clone()

    def _regions(self, field: str) -> Regions:
        if self.regions is None:
            raise InvalidArgument("shared memory is not available on this server", field=field)
        return self.regions

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
                dtype=params.pop("dtype", None), layout=params.pop("layout", None), params=params),
                defer_checks=True)  # on a device, its value checks are read with the results (`respond`)
            produced = list(model.outputs)
            batch = tuple(domain.batch.mask.shape)
        else:
            domain = loss_request(params, tensors)
            produced = produced_loss_outputs(domain)
            mask = tensors.get("response_mask")
            batch = tuple(mask.shape) if getattr(mask, "ndim", 0) == 2 else None
        with checks_first(domain):
            outputs = requested_outputs(model, request.outputs, produced)
            for wanted in outputs:
                if wanted.region is not None:  # before the compute: the region is there and holds the span
                    ref = wanted.region
                    self._regions(f"outputs.{wanted.name}.parameters.shared_memory_region").check(
                        ref.name, ref.offset, ref.byte_size, field=f"outputs.{wanted.name}.parameters.shared_memory_region")
        return Prepared(model, request, domain, outputs, timeout_s, batch)

    @contextlib.contextmanager
    def checks_first(self, prepared: Prepared) -> Iterator[None]:
        """A block (a door's admission charge) whose errors come after the request's value checks where
        those are still to be read (`engine.checks_first`), a failed check's error in the protocol's words."""
        try:
            with checks_first(prepared.domain):
                yield
        except AdvserveError as exc:
            raise protocol_error(exc) from None

    async def compute(self, prepared: Prepared):
        """(result, Timing) from the compute thread."""
        try:
            if prepared.model.kind == "advantages":
                return await self.scheduler.advantages(prepared.domain)
            return await self.scheduler.call(lambda: self.engine.compute_losses(prepared.domain))
        except AdvserveError as exc:
            raise protocol_error(exc) from None

    def respond(self, prepared: Prepared, result: Any) -> InferResponse:
        """The response: the requested outputs in order, the scalars as response parameters; an output
        with a region is written there (`place`) and carries the region's parameters, no array."""
        model = prepared.model
        parameters: dict[str, Any] = {"preset": result.preset}
        if model.kind == "advantages":
            try:
                result.check()  # value checks read with the results: before anything is written
            except AdvserveError as exc:
                raise protocol_error(exc) from None
            tensors = {"advantages": result.advantages, "returns": result.returns}
            parameters.update(_scalars(result.params))
        else:
            tensors = result.output_tensors()
            parameters["loss"] = result.loss
            parameters.update(_scalars(result.components, "components."))
            parameters.update(_scalars(result.metrics, "metrics."))
            for term, values in result.params.items():
                parameters.update(_scalars(values, f"{term}."))
        if model.kind == "losses":
            tensors["loss"] = torch.tensor([result.loss], dtype=torch.float64)
        outputs = []
        for wanted in prepared.outputs:
            tensor = tensors[wanted.name]
            output = InferOutput(wanted.name, OUTPUT_DATATYPES[tensor.dtype], list(tensor.shape), None)
            if wanted.region is None:
                output.array = host_array(tensor)
            else:
                output.parameters = self.place(wanted, tensor)
            outputs.append(output)
        return InferResponse(model.name, prepared.request.id, parameters, outputs)

    def place(self, wanted: RequestedOutput, tensor: torch.Tensor) -> dict[str, Any]:
        """Write output `tensor` into its region (from the device straight into a CUDA region); the
        region's parameters for the response. The region's byte size must hold it (Triton's rule: at
        least the output's size)."""
        ref, where = wanted.region, f"outputs.{wanted.name}.parameters"
        needed = tensor.numel() * tensor.element_size()
        if ref.byte_size < needed:
            raise InvalidArgument(f"output {wanted.name!r}: shared_memory_byte_size is {ref.byte_size} but the output "
                                  f"{list(tensor.shape)} of {OUTPUT_DATATYPES[tensor.dtype]} needs {needed} bytes",
                                  field=f"{where}.shared_memory_byte_size")
        written = self._regions(f"{where}.shared_memory_region").write(
            ref.name, ref.offset, ref.byte_size, [tensor.detach()], field=f"{where}.shared_memory_region")
        return ref.parameters(written)


def _scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Response parameters from a mapping of scalars (None left out: the protocol has no null; a list
    parameter as JSON text, as requests carry it)."""
    return {f"{prefix}{k}": json.dumps(v) if isinstance(v, list) else v for k, v in values.items()
            if isinstance(v, (bool, int, float, str, list))}


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
    "null", a list parameter's "[1.0, 0.5]"); for a nullable string parameter, "null" is null. Anything
    else as given."""
    if not isinstance(value, str):
        return value
    if kind == "str":
        return None if nullable and value == "null" else value
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    if kind == "list" and isinstance(parsed, list):
        return parsed
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
                and name not in ("preset", "dtype", "layout", *LOSS_PARAMETERS)}
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
                       layout=params.get("layout"), **{name: params.get(name) for name in LOSS_PARAMETERS}, **terms)


def produced_loss_outputs(request: LossRequest) -> list[str]:
    """The outputs a loss request produces: each gradient whose term is on, kl_values when asked for
    (and kl_loss is on), and "loss" (a term is on when given; policy_loss also when left out, as in
    the native API)."""
    on = {name for name in ("policy_loss", "kl_loss", "value_loss", "entropy_bonus", "token_loss")
          if getattr(request, name) is not False and (getattr(request, name) is not None or name == "policy_loss")}
    kl_values = [KL_VALUES] if request.return_kl_values is True and "kl_loss" in on else []
    return [name for name, terms in TERM_OUTPUTS.items() if on & set(terms)] + kl_values + ["loss"]


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
        if wanted.name == KL_VALUES and wanted.name not in produced:
            raise InvalidArgument(f"output {KL_VALUES!r} is produced only when kl_loss is on and return_kl_values is "
                                  "true", field=f"outputs.{wanted.name}")
        if wanted.name not in produced:
            terms = " or ".join(TERM_OUTPUTS[wanted.name])
            raise InvalidArgument(f"output {wanted.name!r} is produced only when {terms} is on",
                                  field=f"outputs.{wanted.name}")
        seen.add(wanted.name)
    return requested


# --- errors ---------------------------------------------------------------------------------------------

_RENAMES = (("params.", "parameters."), ("tensors.", "inputs."), ("estimator", "model_name"))
_PARAMETER_FIELDS = ("preset", "dtype", "layout", "num_tokens", "num_sequences", "dp_size", "return_kl_values",
                     "policy_loss", "kl_loss", "value_loss", "entropy_bonus", "rollout_correction", "token_loss")


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
           "Prepared", "RegionRef", "RequestedOutput", "protocol_error", "region_ref"]
