"""The native REST API (/v1): JSON or binary-framed tensors over HTTP. Converts the wire to the domain
model and back; the engine and the scheduler do the rest; the door (`http_door`) has already
authenticated and admitted the request and read its body. Errors of every kind leave as
`{"error": {"code", "message", "field"}}` with the status of `errors.STATUS`; an unexpected
exception is logged and answered 500 without details. Every response to a compute request carries
a Server-Timing header (decode, queue, compute, encode, in ms)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Literal, Union

import numpy as np
import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from advserve_client import framing
from advserve_client.framing import (CONTENT_TYPE, HEADER_LENGTH, OUTPUTS_KEY, REGION_KEYS, FramingError, RegionRef,
                                     outputs_target, region_ref)

from ..analysis.batch import AnalysisRequest, prepare_analysis, run_analysis
from ..device import copy_to_host, to_host
from ..engine import checks_first
from ..errors import (InvalidArgument)
from ..model import AdvantageRequest, AdvantageResult, LossRequest, LossResult
from ..observability import REQUEST_ID_HEADER, error_body_message, estimator_named_in, request_id, server_timing
from ..loss_specs import LOSS_TERMS
from ..params import resolve_params
from ..presets import DEFAULT_PRESET, PRESETS
from ..runtime import (Runtime, admitted, charge_compute,
                      watch_disconnect)
from ..shm import Regions
from ..wire import WIRE_DTYPES
from . import shm_tensors
from .http_door import (FramedResponse, JSONResponse, _error_response, _failure_response, _orjson_dumps,
                        body_length, is_binary)

log = logging.getLogger("advserve")

TermSpec = Union[dict[str, Any], bool, None]
OUTPUTS_DESCRIPTION = ('{"region", "offset", "byte_size"}: write every output tensor, one after the other, into this '
                       "registered shared-memory region; the response's descriptors then name where each lies "
                       "(docs/binary-framing.md)")


def _presets_text() -> str:
    """Every preset, the default marked: "'paper' (default), 'verl', ..." (from presets.PRESETS)."""
    return ", ".join(f"'{name}'" + (" (default)" if name == DEFAULT_PRESET else "") for name in PRESETS)


def _policy_default_text() -> str:
    """The default preset's policy loss, e.g. "paper: ppo_clip, clip 0.2/0.2, agg seq-mean-token-sum"
    (its defaults resolved: a default may depend on the mode)."""
    policy = resolve_params(LOSS_TERMS["policy_loss"], PRESETS[DEFAULT_PRESET].losses["policy_loss"], None,
                            "policy_loss")
    return (f"{DEFAULT_PRESET}: {policy['mode']}, clip {policy['clip_low']:g}/{policy['clip_high']:g}, "
            f"agg {policy['agg']}")


class AdvantagesBody(BaseModel):
    """Request of POST /v1/advantages."""

    model_config = ConfigDict(extra="forbid")
    estimator: str = Field(description="estimator name, see GET /v1/estimators", examples=["grpo"])
    preset: str | None = Field(None, description=f"{_presets_text()}; defaults per estimator: GET /v1/estimators")
    params: dict[str, Any] | None = Field(None, description="overrides of the preset's parameters")
    dtype: Literal["float32", "float64"] | None = Field(None, description="compute dtype (default float32)")
    layout: Literal["padded", "packed"] | None = Field(None, description="padded (default): token tensors [B,T]; "
                                                       "packed: flat [N] with cu_seqlens [B+1]")
    tensors: dict[str, Any] = Field(
        description="nested lists: rewards [B] or token_rewards [B,T], response_mask [B,T], group_ids [B] "
        "(ints or strings), values, old_logprobs, ref_logprobs [B,T], greedy_rewards [B]")
    shared_memory_outputs: dict[str, Any] | None = Field(None, description=OUTPUTS_DESCRIPTION)


class LossesBody(BaseModel):
    """Request of POST /v1/losses."""

    model_config = ConfigDict(extra="forbid")
    preset: str | None = Field(None, description=f"{_presets_text()}; the policy loss defaults to the preset's "
                               f"({_policy_default_text()})")
    policy_loss: TermSpec = Field(None, description="mode, clip_low, clip_high, dual_clip, ratio_clamp, ratio_cap, "
                                  "cispo_cap, cispo_level, sequence_ratio_gradient, agg, loss_scale_factor, "
                                  f"seq_denominator; null = the preset's defaults ({_policy_default_text()}), "
                                  "false = no policy term")
    kl_loss: TermSpec = Field(None, description="coef, estimator, clamp, agg, loss_scale_factor, seq_denominator, "
                              "unbiased_gradient, importance_weighted, gradient_estimator; off unless given")
    value_loss: TermSpec = Field(None, description="coef, clip, clip_ties, clip_form, agg, loss_scale_factor, "
                                 "seq_denominator; off unless given")
    entropy_bonus: TermSpec = Field(None, description="coef, agg, loss_scale_factor, seq_denominator; off unless given")
    rollout_correction: TermSpec = Field(None, description="level, mode, low, high, log_clamp, gating, weight; "
                                         "off unless given")
    token_loss: TermSpec = Field(None, description="coef, agg, loss_scale_factor, seq_denominator: coef · agg of "
                                 "tensor token_losses (any per-token loss matrix); off unless given")
    num_tokens: float | None = Field(None, strict=True, description="global token count (token-mean) when this is "
                                     "a shard; an error when no term aggregates with token-mean")
    num_sequences: float | None = Field(None, strict=True, description="global sequence count (seq-mean-*) when "
                                        "this is a shard; an error when no term aggregates with a seq-mean mode")
    dp_size: int | None = Field(None, strict=True, description="data-parallel size D (verl's agg_loss): every "
                                "term × D; D > 1 needs the global num_tokens / num_sequences its aggregations read; "
                                "null: 1")
    return_kl_values: bool | None = Field(None, strict=True, description="true: the response carries kl_values "
                                          "[B,T], the KL term's per-token estimate")
    dtype: Literal["float32", "float64"] | None = None
    layout: Literal["padded", "packed"] | None = None
    tensors: dict[str, Any] = Field(
        description="nested lists [B,T]: logprobs, old_logprobs, advantages, response_mask, ref_logprobs, values, "
        "old_values, returns, entropy, rollout_logprobs, rollout_is_weights, token_losses")
    shared_memory_outputs: dict[str, Any] | None = Field(None, description=OUTPUTS_DESCRIPTION)


class AnalysisBody(BaseModel):
    """Request of POST /v1/analysis: a batch as for /v1/advantages (group_ids required) and the
    estimators to compare."""

    model_config = ConfigDict(extra="forbid")
    estimators: list[str] | None = Field(None, description="estimator names (default: every estimator of the "
                                         "preset that the given tensors allow)", examples=[["grpo", "rloo"]])
    preset: str | None = Field(None, description=_presets_text())
    params: dict[str, dict[str, Any] | None] | None = Field(
        None, description="per-estimator overrides of the preset's parameters: {estimator: {param: value}}")
    dtype: Literal["float32", "float64"] | None = Field(None, description="compute dtype (default float32)")
    layout: Literal["padded", "packed"] | None = Field(None, description="as for /v1/advantages")
    tensors: dict[str, Any] = Field(
        description="as for /v1/advantages: rewards [B] or token_rewards [B,T], response_mask [B,T], group_ids [B] "
        "(required; groups of at least 2), values [B,T] (gae, orz), greedy_rewards [B] (remax), old_logprobs, "
        "ref_logprobs [B,T] (KL)")


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class AdvantagesResponse(BaseModel):
    estimator: str
    preset: str
    params: dict[str, Any]
    tensors: dict[str, list] = Field(description="advantages, returns [B,T]")
    stats: dict[str, Any]


class LossesResponse(BaseModel):
    preset: str
    loss: float
    components: dict[str, float | None]
    metrics: dict[str, float]
    params: dict[str, Any]
    tensors: dict[str, list] = Field(description="grad_logprobs, grad_values, grad_entropy, grad_token_losses, "
                                     "kl_values [B,T] (those that apply)")


class WeightSummary(BaseModel):
    """Over the groups with signal; null when none has."""

    min: float | None
    median: float | None
    max: float | None
    mean: float | None
    token_weighted_mean: float | None = Field(description="each group weighted by its valid tokens")
    max_over_min: float | None = Field(description="null when min is 0")


class EstimatorAnalysis(BaseModel):
    bias: Literal["unbiased", "scaled", "reweighted"] = Field(description="the seed's bias table")
    formula: str = Field(description="the implied weight w of a prompt relative to the unbiased gradient")
    params: dict[str, Any] = Field(description="the estimator's parameters as resolved")
    whitening_scale: float | None = Field(description="1/σ of batch whitening, null when not whitened")
    weights: list[float | None] = Field(description="[G] implied weight of each group's prompt")
    weights_exact: list[float | None] | None = Field(description="[G] exact finite-group weight (0/1 rewards; "
                                                     "rloo, dr_grpo, grpo), else null")
    relative_to_median: list[float | None] | None = Field(description="[G] weights / their median over the groups "
                                                          "with signal (null when that median is 0)")
    zero_advantage_fraction: float | None = Field(description="share of groups whose advantages are all 0")
    summary: WeightSummary


class GroupAnalysis(BaseModel):
    count: int
    ids: list[str] = Field(description="group ids (as strings) in order of first appearance")
    size: list[int]
    pass_rate: list[float | None] = Field(description="mean reward per group")
    reward_std: list[float | None] = Field(description="population std of the rewards per group")
    mean_length: list[float | None]
    harmonic_mean_length: list[float | None]
    tokens: list[int] = Field(description="valid tokens per group")
    no_signal: list[bool] = Field(description="all rewards of the group equal")


class AnalysisResponse(BaseModel):
    preset: str
    estimators: list[str] = Field(description="the analysed estimators; the order of the sign matrices")
    sequences: int
    tokens: int
    binary_rewards: bool
    groups: GroupAnalysis
    no_signal_fraction: float | None
    no_signal_token_fraction: float | None
    analysis: dict[str, EstimatorAnalysis] = Field(description="per estimator")
    sign_disagreement: list[list[float | None]] = Field(description="[E, E] share of valid tokens whose advantage "
                                                        "signs (−, 0, +) differ")
    sign_opposition: list[list[float | None]] = Field(description="[E, E] share of valid tokens with A_a · A_b < 0")


# --- tensors on the wire ------------------------------------------------------------------------



def _wants_binary(headers, binary_request: bool) -> bool:
    """Content negotiation on Accept (with q-values) between the binary framing and JSON; without a
    preference, a response has the request's format."""
    quality = {}
    for part in headers.get("accept", "").split(","):
        media, *options = (piece.strip() for piece in part.split(";"))
        q = 1.0
        for option in options:
            if option.lower().startswith("q="):
                try:
                    q = float(option[2:])
                except ValueError:
                    q = 0.0
        quality[media.lower()] = max(q, quality.get(media.lower(), 0.0))
    binary_q, json_q = quality.get(CONTENT_TYPE, 0.0), quality.get("application/json", 0.0)
    if binary_q == json_q:
        return binary_request
    return binary_q > json_q


def decode_body(body: bytes, headers, model: type[BaseModel], regions: Regions | None = None,
                charge: Callable[[int], None] | None = None) -> tuple[BaseModel, dict[str, Any]]:
    """(the request document validated by `model`, its tensors: torch views (of the body, or of a
    shared-memory region of `regions` for a descriptor naming one; a copy charged to `charge` where the
    region cannot be mapped) or nested lists). A requested output region ("shared_memory_outputs") is
    checked to exist and hold its span."""
    try:
        if is_binary(headers):
            document, raw = framing.decode(body, headers.get(HEADER_LENGTH.lower()))
            document["tensors"] = {}
        else:
            try:
                document = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise InvalidArgument(f"body is not valid JSON: {exc}", field="body") from None
            if not isinstance(document, dict):
                raise InvalidArgument("body must be a JSON object", field="body")
            raw = document.get("tensors")
            if isinstance(raw, dict):  # a JSON object with a shared_memory_region key names a region
                raw = {name: region_ref(name, t) if isinstance(t, dict) and REGION_KEYS & t.keys() else t
                       for name, t in raw.items()}
                document = {**document, "tensors": {}}
        target = outputs_target(document[OUTPUTS_KEY]) if document.get(OUTPUTS_KEY) is not None else None
    except FramingError as exc:
        raise InvalidArgument(exc.message, field=exc.field) from None
    parsed = model.model_validate(document)
    if target is not None:
        shm_tensors.check_target(regions, target)
    tensors = shm_tensors.resolve(regions, raw, charge) if isinstance(raw, dict) else raw
    return parsed, tensors


def requested_outputs(parsed: BaseModel) -> shm_tensors.Target | None:
    """(region, offset, byte_size) where the request asked its outputs written, or None (checked by
    `decode_body` already)."""
    value = getattr(parsed, OUTPUTS_KEY, None)
    return None if value is None else outputs_target(value)


def _outputs_to_region(regions: Regions | None, target: shm_tensors.Target, document: dict[str, Any],
                       tensors: dict[str, torch.Tensor | None], binary: bool) -> Response:
    """The response of a request whose outputs go to a shared-memory region: they are written there
    and the response's descriptors (binary framing, or JSON) name region, offset and byte size; the
    body carries no tensor bytes."""
    refs: dict[str, RegionRef] = shm_tensors.write_outputs(regions, target, tensors)
    if binary:
        header_length, chunks = framing.encode(document, refs, dumps=_orjson_dumps)
        return Response(chunks[0], media_type=CONTENT_TYPE, headers={HEADER_LENGTH: str(header_length)})
    return JSONResponse({**document, "tensors": {name: ref.descriptor() for name, ref in refs.items()}})


def encode_response(document: dict[str, Any] | Callable[[], dict[str, Any]],
                    tensors: dict[str, torch.Tensor | None], binary: bool, headers: dict[str, str]) -> Response:
    """The response of a computed request: binary (a `FramedResponse` streaming the tensors' own host
    memory after the framing header, byte for byte what `framing.encode` frames) or JSON (nested lists).
    `document` is the JSON part or a function building it (its statistics may wait on the device): on
    CUDA the device-to-host copies of the tensors are started first, so they run while it is built."""
    present = {name: t for name, t in tensors.items() if t is not None}
    if binary:
        copies = copy_to_host(list(present.values()))
        described = {name: {"dtype": WIRE_DTYPES[copy.tensor.dtype], "shape": list(copy.tensor.shape),
                            "binary_data_size": copy.tensor.numel() * copy.tensor.element_size()}
                     for name, copy in zip(present, copies)}
        header = _orjson_dumps({**(document() if callable(document) else document), "tensors": described})
        headers[HEADER_LENGTH] = str(len(header))
        return FramedResponse(header, copies, headers=headers)
    document = document() if callable(document) else document
    if not tensors:  # a document without a tensors part (POST /v1/analysis)
        return JSONResponse(document, headers=headers)
    numpy = {name: np.ascontiguousarray(to_host(t.detach()).numpy()) for name, t in present.items()}  # orjson: C order
    return JSONResponse({**document, "tensors": numpy}, headers=headers)


def advantages_document(result: AdvantageResult) -> tuple[Callable[[], dict[str, Any]], dict[str, torch.Tensor]]:
    """(a function building the JSON part, which reads the stats and with them the request's value checks
    if they were left to be read with the results: it raises a failed check's error before anything is
    written, and the result tensors)."""
    return (lambda: {"estimator": result.estimator, "preset": result.preset, "params": result.params,
                     "stats": result.stats},
            {"advantages": result.advantages, "returns": result.returns})


def losses_document(result: LossResult) -> tuple[Callable[[], dict[str, Any]], dict[str, torch.Tensor | None]]:
    return (lambda: {"preset": result.preset, "loss": result.loss, "components": result.components,
                     "metrics": result.metrics, "params": result.params},
            result.output_tensors())


def _batch_shape(prepared: Any) -> tuple[int, int] | None:
    """(B, T) of a prepared request, for the token and sequence counters."""
    batch = getattr(prepared, "batch", None)
    if batch is not None:
        return tuple(batch.mask.shape)
    mask = prepared.tensors.get("response_mask") if isinstance(getattr(prepared, "tensors", None), dict) else None
    shape = getattr(mask, "shape", None)
    return (int(shape[0]), int(shape[1])) if shape is not None and len(shape) == 2 else None


# --- the routes ---------------------------------------------------------------------------------


def add_routes(app: FastAPI, runtime: Runtime) -> None:
    """The native API on `app`: POST /v1/advantages, /v1/losses, /v1/analysis; GET /v1/estimators,
    /health/live, /health/ready and (without --metrics-port) /metrics."""
    engine, scheduler = runtime.engine, runtime.scheduler

    def body_schema(model: type[BaseModel]) -> dict:
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        return {"requestBody": {"required": True, "content": {
            "application/json": {"schema": ref},
            CONTENT_TYPE: {"schema": {"type": "string", "format": "binary", "description":
                           "the same document as JSON header + raw tensor buffers (docs/binary-framing.md)"}}}}}

    error_responses = {code: {"model": ErrorBody} for code in (400, 401, 404, 408, 413, 503, 504)}
    binary_200 = {"content": {CONTENT_TYPE: {"schema": {"type": "string", "format": "binary", "description":
                  "the same document as JSON header + raw tensor buffers (docs/binary-framing.md)"}}}}
    json_object = {200: {"description": "a JSON object", "content": {"application/json": {"schema": {"type": "object"}}}}}

    async def serve(request: Request, model: type[BaseModel], endpoint: str, prepare, compute,
                    document_of) -> Response:
        arrived = time.perf_counter()
        rid = request_id(request.headers.get(REQUEST_ID_HEADER))
        phases: dict[str, float] = {}
        body, estimator, batch, status, error = b"", None, None, "200", None
        response: Response | None = None
        try:
            with runtime.serving():
                body, deadline, lease = await admitted(request, runtime)  # read by AdmissionControl
                started = time.perf_counter()
                headers = request.headers
                outputs_to = None  # (region, offset, byte_size) when the outputs go to shared memory

                def decode():  # charged for its compute once its shapes are known, before it is validated
                    nonlocal outputs_to
                    parsed, tensors = decode_body(body, headers, model, runtime.regions, lease.grow)
                    outputs_to = requested_outputs(parsed)
                    return prepare(parsed, tensors, lambda request: charge_compute(lease, request))

                prepared = await deadline.off_loop(decode, len(body), lease)
                phases["decode"] = time.perf_counter() - started
                estimator = getattr(getattr(prepared, "estimator", None), "name", None)
                batch = _batch_shape(prepared)
                with checks_first(prepared):
                    charge_compute(lease, prepared)  # as validated, before it is queued (503/413 at once)
                result, timing = await deadline.wait(compute(prepared), abandon=watch_disconnect(request))
                phases["queue"], phases["compute"] = timing.queue, timing.compute
                encode_started = time.perf_counter()
                document, tensors = document_of(result)

                def encode():
                    binary = _wants_binary(headers, is_binary(headers))
                    if outputs_to is not None:
                        return _outputs_to_region(runtime.regions, outputs_to, document(), tensors, binary)
                    return encode_response(document, tensors, binary, {})

                output_size = sum(t.numel() * t.element_size() for t in tensors.values() if t is not None)
                response = await deadline.off_loop(encode, output_size, lease)
                phases["encode"] = time.perf_counter() - encode_started
                response.headers["Server-Timing"] = server_timing(**phases)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes an answer (or none, if the caller left)
            if isinstance(exc, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                raise
            response, status, error = _failure_response(exc, endpoint, rid, _error_response)
        response.headers[REQUEST_ID_HEADER] = rid
        runtime.metrics.observe(transport="http", endpoint=endpoint, estimator=estimator, status=status,
                                bytes_in=len(body), bytes_out=body_length(response), phases=phases, batch=batch,
                                request_id=rid, started=arrived, error=error,
                                message=error_body_message(response.body) if error else None,
                                named_estimator=estimator_named_in(body) if error and endpoint == "advantages" else None)
        return response

    @app.post("/v1/advantages", openapi_extra=body_schema(AdvantagesBody),
              responses={200: {"model": AdvantagesResponse, **binary_200}, **error_responses}, tags=["compute"])
    async def advantages(request: Request):
        """Token advantages and returns of one estimator for a batch."""

        def prepare(body: AdvantagesBody, tensors, charge):
            request = AdvantageRequest(estimator=body.estimator, tensors=tensors, preset=body.preset,
                                       params=body.params, dtype=body.dtype, layout=body.layout)
            charge(request)
            prepared = engine.prepare_advantages(request, defer_checks=True)  # checked with its stats
            with prepared.errors_after_checks():
                shm_tensors.advantages_room(requested_outputs(body), prepared)
            return prepared

        return await serve(request, AdvantagesBody, "advantages", prepare, scheduler.advantages, advantages_document)

    @app.post("/v1/losses", openapi_extra=body_schema(LossesBody),
              responses={200: {"model": LossesResponse, **binary_200}, **error_responses}, tags=["compute"])
    async def losses(request: Request):
        """Policy, KL, value, entropy and token loss terms with per-token gradients."""

        def prepare(body: LossesBody, tensors, charge):
            request = LossRequest(tensors=tensors, preset=body.preset, policy_loss=body.policy_loss,
                                  kl_loss=body.kl_loss, value_loss=body.value_loss, entropy_bonus=body.entropy_bonus,
                                  rollout_correction=body.rollout_correction, token_loss=body.token_loss,
                                  num_tokens=body.num_tokens, num_sequences=body.num_sequences, dp_size=body.dp_size,
                                  return_kl_values=body.return_kl_values, dtype=body.dtype, layout=body.layout)
            charge(request)
            return request

        return await serve(request, LossesBody, "losses", prepare,
                           lambda domain: scheduler.call(lambda: engine.compute_losses(domain)), losses_document)

    @app.post("/v1/analysis", openapi_extra=body_schema(AnalysisBody),
              responses={200: {"model": AnalysisResponse, **binary_200}, **error_responses}, tags=["analysis"])
    async def analysis(request: Request):
        """What each estimator makes of a batch: per group, the implied weight of the prompt relative to
        the unbiased policy gradient; per pair of estimators, the share of tokens whose advantage signs
        disagree (docs/analysis.md)."""

        def prepare(body: AnalysisBody, tensors, charge):
            request = AnalysisRequest(tensors=tensors, estimators=body.estimators, preset=body.preset,
                                      params=body.params, dtype=body.dtype, layout=body.layout)
            charge(request)
            return prepare_analysis(engine, request)

        return await serve(request, AnalysisBody, "analysis", prepare,
                           lambda prepared: scheduler.call(lambda: run_analysis(engine, prepared)),
                           lambda document: (lambda: document, {}))

    @app.get("/v1/estimators", response_class=JSONResponse, responses=json_object, tags=["catalog"])
    async def estimators():
        """Every estimator with its tensors, parameters and per-preset defaults; the loss terms."""
        return JSONResponse(engine.catalog())

    @app.get("/health/live", response_class=JSONResponse, responses=json_object, tags=["health"])
    async def live():
        return JSONResponse({"status": "live"})

    @app.get("/health/ready", response_class=JSONResponse, tags=["health"],
             responses={**json_object, 503: {"description": "draining (shutting down)"}})
    async def ready():
        if not runtime.ready:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ready", "device": str(engine.device)})

    if not runtime.settings.metrics_port:
        @app.get("/metrics", tags=["health"], response_class=Response,
                 responses={200: {"description": "Prometheus text exposition format",
                                  "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
        async def metrics():
            """Prometheus metrics (text exposition format)."""
            return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def openapi_components() -> dict[str, Any]:
    """The JSON schemas of the request bodies (the routes read raw bodies, so FastAPI does not list them)."""
    components: dict[str, Any] = {}
    for model in (AdvantagesBody, LossesBody, AnalysisBody):
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(model_schema.pop("$defs", {}))
        components[model.__name__] = model_schema
    return components
