"""REST transport: JSON or binary-framed tensors over HTTP. Converts the wire to the domain model
and back; the engine and the scheduler do the rest. Errors of every kind leave as
`{"error": {"code", "message", "field"}}` with the status of `errors.STATUS`; an unexpected
exception is logged and answered 500 without details. Every response to a compute request carries
a Server-Timing header (decode, queue, compute, encode, in ms)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import mmap
import re
import time
from typing import Any, Callable, Literal, Union

import numpy as np
import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from advserve_client import framing
from advserve_client.framing import CONTENT_TYPE, HEADER_LENGTH, FramingError, RawTensor

from . import __version__
from .analysis.batch import AnalysisRequest, prepare_analysis, run_analysis
from .config import Settings
from .device import to_host
from .errors import (STATUS, AdvserveError, InvalidArgument, MethodNotAllowed, NotFound, PayloadTooLarge,
                     RequestTimeout, Unavailable)
from .model import AdvantageRequest, AdvantageResult, LossRequest, LossResult
from .observability import REQUEST_ID_HEADER, error_body_message, estimator_named_in, request_id, server_timing
from .oip.rest import add_oip_routes, is_oip_path, oip_error_response
from .presets import DEFAULT_PRESET, PRESETS
from .runtime import (JSON_DECODE_COST, Abandoned, Deadline, Lease, Runtime, admitted, charge_compute,
                      watch_disconnect)
from .wire import raw_to_torch, torch_to_raw

log = logging.getLogger("advserve")

TermSpec = Union[dict[str, Any], bool, None]


def _presets_text() -> str:
    """Every preset, the default marked: "'paper' (default), 'verl', ..." (from presets.PRESETS)."""
    return ", ".join(f"'{name}'" + (" (default)" if name == DEFAULT_PRESET else "") for name in PRESETS)


def _policy_default_text() -> str:
    """The default preset's policy loss, e.g. "paper: ppo_clip, clip 0.2/0.2, agg seq-mean-token-sum"."""
    policy = PRESETS[DEFAULT_PRESET].losses["policy_loss"]
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


class LossesBody(BaseModel):
    """Request of POST /v1/losses."""

    model_config = ConfigDict(extra="forbid")
    preset: str | None = Field(None, description=f"{_presets_text()}; the policy loss defaults to the preset's "
                               f"({_policy_default_text()})")
    policy_loss: TermSpec = Field(None, description="mode, clip_low, clip_high, dual_clip, ratio_clamp, ratio_cap, "
                                  "cispo_cap, cispo_level, sequence_ratio_gradient, agg, loss_scale_factor, "
                                  f"seq_denominator; null = the preset's defaults ({_policy_default_text()}), "
                                  "false = no policy term")
    kl_loss: TermSpec = Field(None, description="coef, estimator, clamp, agg, unbiased_gradient, importance_weighted; "
                              "off unless given")
    value_loss: TermSpec = Field(None, description="coef, clip, agg; off unless given")
    entropy_bonus: TermSpec = Field(None, description="coef, agg; off unless given")
    rollout_correction: TermSpec = Field(None, description="level, mode, low, high, log_clamp, gating, weight; "
                                         "off unless given")
    num_tokens: float | None = Field(None, strict=True, description="global token count (token-mean) when this is "
                                     "a shard")
    num_sequences: float | None = Field(None, strict=True, description="global sequence count (seq-mean-*) when "
                                        "this is a shard")
    dtype: Literal["float32", "float64"] | None = None
    layout: Literal["padded", "packed"] | None = None
    tensors: dict[str, Any] = Field(
        description="nested lists [B,T]: logprobs, old_logprobs, advantages, response_mask, ref_logprobs, values, "
        "old_values, returns, entropy, rollout_logprobs")


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
    tensors: dict[str, list] = Field(description="grad_logprobs, grad_values, grad_entropy [B,T] (those that apply)")


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
    from .hints import field_hint  # where a misplaced top-level field (a parameter, a tensor) belongs

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


# --- tensors on the wire ------------------------------------------------------------------------



def _is_binary(headers) -> bool:
    return HEADER_LENGTH.lower() in headers or headers.get("content-type", "").lower().startswith(CONTENT_TYPE)


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


def decode_body(body: bytes, headers, model: type[BaseModel]) -> tuple[BaseModel, dict[str, Any]]:
    """(the request document validated by `model`, its tensors: torch views or nested lists)."""
    if _is_binary(headers):
        try:
            document, raw = framing.decode(body, headers.get(HEADER_LENGTH.lower()))
        except FramingError as exc:
            raise InvalidArgument(exc.message, field=exc.field) from None
        tensors = {name: raw_to_torch(name, t) if isinstance(t, RawTensor) else t for name, t in raw.items()}
        document["tensors"] = {}
    else:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidArgument(f"body is not valid JSON: {exc}", field="body") from None
        if not isinstance(document, dict):
            raise InvalidArgument("body must be a JSON object", field="body")
        tensors = document.get("tensors")
        if isinstance(tensors, dict):
            document = {**document, "tensors": {}}
    parsed = model.model_validate(document)
    return parsed, tensors


def encode_response(document: dict[str, Any], tensors: dict[str, torch.Tensor | None], binary: bool,
                    headers: dict[str, str]) -> Response:
    present = {name: t for name, t in tensors.items() if t is not None}
    if binary:
        header_length, chunks = framing.encode(document, {name: torch_to_raw(t) for name, t in present.items()},
                                               dumps=_orjson_dumps)
        headers[HEADER_LENGTH] = str(header_length)
        return Response(b"".join(chunks), media_type=CONTENT_TYPE, headers=headers)
    if not tensors:  # a document without a tensors part (POST /v1/analysis)
        return JSONResponse(document, headers=headers)
    numpy = {name: np.ascontiguousarray(to_host(t.detach()).numpy()) for name, t in present.items()}  # orjson: C order
    return JSONResponse({**document, "tensors": numpy}, headers=headers)


def advantages_document(result: AdvantageResult) -> tuple[Callable[[], dict[str, Any]], dict[str, torch.Tensor]]:
    """(a function building the JSON part, which computes the stats, and the result tensors)."""
    return (lambda: {"estimator": result.estimator, "preset": result.preset, "params": result.params,
                     "stats": result.stats},
            {"advantages": result.advantages, "returns": result.returns})


def losses_document(result: LossResult) -> tuple[Callable[[], dict[str, Any]], dict[str, torch.Tensor | None]]:
    return (lambda: {"preset": result.preset, "loss": result.loss, "components": result.components,
                     "metrics": result.metrics, "params": result.params},
            {"grad_logprobs": result.grad_logprobs, "grad_values": result.grad_values,
             "grad_entropy": result.grad_entropy})


def _batch_shape(prepared: Any) -> tuple[int, int] | None:
    """(B, T) of a prepared request, for the token and sequence counters."""
    batch = getattr(prepared, "batch", None)
    if batch is not None:
        return tuple(batch.mask.shape)
    mask = prepared.tensors.get("response_mask") if isinstance(getattr(prepared, "tensors", None), dict) else None
    shape = getattr(mask, "shape", None)
    return (int(shape[0]), int(shape[1])) if shape is not None and len(shape) == 2 else None


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

    The body (bytes, or a memoryview of one anonymous mapping for a large declared length: no copy,
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
        binary = HEADER_LENGTH.lower() in headers if oip else _is_binary(headers)
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
        mapped = mmap.mmap(-1, declared) if declared is not None and declared >= MAPPED_BODY_BYTES else None
        try:
            return await self._receive_into(receive, mapped, limit, kind, lease, deadline)
        except BaseException:
            if mapped is not None:
                mapped.close()  # at once: a traceback's frames would keep the pages until the garbage collector runs
            raise

    async def _receive_into(self, receive, mapped: mmap.mmap | None, limit: int, kind: str, lease: Lease,
                            deadline: Deadline) -> bytes | memoryview:
        chunks: list[bytes] = []
        seen = 0
        while True:
            wait = min(self.idle_timeout_s, deadline.remaining())
            if wait <= 0:
                raise _body_timeout(deadline.timeout_s, "--request-timeout-s", seen)
            try:
                message = await _within(receive(), wait)
            except asyncio.TimeoutError:
                idle = deadline.remaining() > 0
                raise _body_timeout(self.idle_timeout_s if idle else deadline.timeout_s,
                                    "--body-idle-timeout-s" if idle else "--request-timeout-s", seen) from None
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            if chunk:
                if seen + len(chunk) > limit:
                    raise PayloadTooLarge(f"request body exceeds the {kind} limit of {limit} bytes", field="body")
                lease.grow(len(chunk))
                if mapped is not None:
                    mapped[seen:seen + len(chunk)] = chunk
                else:
                    chunks.append(chunk)
                seen += len(chunk)
            if not message.get("more_body", False):
                break
        if mapped is not None:
            return memoryview(mapped)[:seen]
        # joined in one synchronous step on the event loop: at most one body's transient copy at a time
        # (a body under MAPPED_BODY_BYTES, or an upload without Content-Length)
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]


MAPPED_BODY_BYTES = 256 << 10  # a declared body at least this large is read into one anonymous mapping
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


def guarded_protocol(settings: Settings) -> type:
    """uvicorn's HTTP/1.1 (h11) protocol with two bounds uvicorn lacks. uvicorn arms no timer on a new
    connection, and any byte disarms its keep-alive timer, so a connection that never sends a request
    (or trickles its headers) stays open for ever: here a connection must complete its request line
    and headers within --header-timeout-s of opening or of its previous response, else it is closed
    (the body then has its own timeouts, AdmissionControl's). And at most --max-connections are open
    at once: past that, a new connection is answered 503 (Retry-After: 1) and closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    timeout_s, most = settings.header_timeout_s, settings.max_connections
    busy = orjson.dumps({"error": {"code": "overloaded", "message": f"more than {most} connections open; retry "
                                   "later", "field": None}})

    class GuardedH11Protocol(H11Protocol):
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

    return GuardedH11Protocol


# --- the application ----------------------------------------------------------------------------


def create_app(runtime: Runtime | None = None) -> FastAPI:
    """The FastAPI application over `runtime` (engine, compute thread, admission, metrics), which
    other transports may share; a new one from default Settings when None (owned by the app)."""
    owns_runtime = runtime is None
    runtime = runtime or Runtime.build(Settings())
    engine, scheduler = runtime.engine, runtime.scheduler

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if owns_runtime:
            runtime.close()

    app = FastAPI(
        lifespan=lifespan,
        title="advserve",
        version=__version__,
        description="Token advantages, policy losses and their gradients for RL on language models. "
        "Formulas: docs/semantics.md. Bodies are JSON, or binary-framed tensors (Content-Type: "
        "application/octet-stream, Inference-Header-Content-Length; docs/binary-framing.md). "
        "Errors: {\"error\": {\"code\", \"message\", \"field\"}}. With --auth-token, every path but "
        "/health/* and /v2/health/* needs 'Authorization: Bearer <token>'. The Open Inference Protocol "
        "(KServe v2 / Triton, for tritonclient and other v2 clients) is served under /v2 (tag oip; "
        "docs/oip.md), its errors as {\"error\": \"...\"}.",
    )
    app.state.runtime = runtime

    @app.exception_handler(AdvserveError)
    async def _domain_error(request: Request, exc: AdvserveError):
        return _error_response(exc)

    @app.exception_handler(ValidationError)
    async def _model_error(request: Request, exc: ValidationError):
        return _validation_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_error(request: Request, exc: RequestValidationError):
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _routing_error(request: Request, exc: StarletteHTTPException):
        """Starlette's own refusals (no such path, wrong method) in the API's error shape."""
        path = request.url.path
        if exc.status_code == 404:
            error: AdvserveError = NotFound(f"no such path {path!r}; see /docs for the API", field="path")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"{request.method} is not allowed on {path!r} (allowed: "
                                     f"{(exc.headers or {}).get('Allow', '?')})", field="method")
        else:
            error = InvalidArgument(str(exc.detail), field=None)
        response = (oip_error_response if is_oip_path(path) else _error_response)(error)
        response.status_code = exc.status_code
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        response, _, _ = _failure_response(exc, f"{request.method} {request.url.path}", "-",
                                           oip_error_response if is_oip_path(request.url.path) else _error_response)
        return response

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

                def decode():  # charged for its compute once its shapes are known, before it is validated
                    parsed, tensors = decode_body(body, headers, model)
                    return prepare(parsed, tensors, lambda request: charge_compute(lease, request))

                prepared = await deadline.off_loop(decode, len(body), lease)
                phases["decode"] = time.perf_counter() - started
                estimator = getattr(getattr(prepared, "estimator", None), "name", None)
                batch = _batch_shape(prepared)
                charge_compute(lease, prepared)  # as validated, before it is queued (503/413 at once)
                result, timing = await deadline.wait(compute(prepared), abandon=watch_disconnect(request))
                phases["queue"], phases["compute"] = timing.queue, timing.compute
                encode_started = time.perf_counter()
                document, tensors = document_of(result)

                def encode():
                    return encode_response(document(), tensors, _wants_binary(headers, _is_binary(headers)), {})

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
                                bytes_in=len(body), bytes_out=len(response.body), phases=phases, batch=batch,
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
            return engine.prepare_advantages(request)

        return await serve(request, AdvantagesBody, "advantages", prepare, scheduler.advantages, advantages_document)

    @app.post("/v1/losses", openapi_extra=body_schema(LossesBody),
              responses={200: {"model": LossesResponse, **binary_200}, **error_responses}, tags=["compute"])
    async def losses(request: Request):
        """Policy, KL, value and entropy loss terms with per-token gradients."""

        def prepare(body: LossesBody, tensors, charge):
            request = LossRequest(tensors=tensors, preset=body.preset, policy_loss=body.policy_loss,
                                  kl_loss=body.kl_loss, value_loss=body.value_loss, entropy_bonus=body.entropy_bonus,
                                  rollout_correction=body.rollout_correction, num_tokens=body.num_tokens,
                                  num_sequences=body.num_sequences, dtype=body.dtype, layout=body.layout)
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

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (AdvantagesBody, LossesBody, AnalysisBody):
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    add_oip_routes(app, runtime)
    app.openapi = openapi
    app.add_middleware(AdmissionControl, runtime=runtime)
    return app
