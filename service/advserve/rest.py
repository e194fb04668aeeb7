"""REST transport: JSON over HTTP. Converts the wire to the domain model and back; the engine does
the rest. Errors of every kind leave as `{"error": {"code", "message", "field"}}` with the status of
`errors.STATUS`; an unexpected exception is logged and answered 500 without details."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Literal, Union

import numpy as np
import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import __version__
from .engine import Engine
from .errors import STATUS, AdvserveError, InvalidArgument, PayloadTooLarge
from .model import AdvantageRequest, AdvantageResult, LossRequest, LossResult

log = logging.getLogger("advserve")

DEFAULT_MAX_JSON_BYTES = 64 * 1024 * 1024

TensorValue = Union[list, None]
TermSpec = Union[dict[str, Any], bool, None]


class AdvantagesBody(BaseModel):
    """Request of POST /v1/advantages."""

    model_config = ConfigDict(extra="forbid")
    estimator: str = Field(description="estimator name, see GET /v1/estimators", examples=["grpo"])
    preset: str | None = Field(None, description="'paper' (default) or 'verl'")
    params: dict[str, Any] | None = Field(None, description="overrides of the preset's parameters")
    dtype: Literal["float32", "float64"] | None = Field(None, description="compute dtype (default float32)")
    tensors: dict[str, TensorValue] = Field(
        description="nested lists: rewards [B] or token_rewards [B,T], response_mask [B,T], group_ids [B] "
        "(ints or strings), values, old_logprobs, ref_logprobs [B,T], greedy_rewards [B]")


class LossesBody(BaseModel):
    """Request of POST /v1/losses."""

    model_config = ConfigDict(extra="forbid")
    preset: str | None = None
    policy_loss: TermSpec = Field(None, description="mode, clip_low, clip_high, dual_clip, ratio_clamp, agg, "
                                  "loss_scale_factor; null = preset defaults, false = no policy term")
    kl_loss: TermSpec = Field(None, description="coef, estimator, clamp; off unless given")
    value_loss: TermSpec = Field(None, description="coef, clip; off unless given")
    entropy_bonus: TermSpec = Field(None, description="coef; off unless given")
    rollout_correction: TermSpec = Field(None, description="level, mode, low, high; off unless given")
    num_tokens: float | None = Field(None, description="global token count (token-mean) when this is a shard")
    num_sequences: float | None = Field(None, description="global sequence count (seq-mean-*) when this is a shard")
    dtype: Literal["float32", "float64"] | None = None
    tensors: dict[str, TensorValue] = Field(
        description="nested lists [B,T]: logprobs, old_logprobs, advantages, response_mask, ref_logprobs, values, "
        "old_values, returns, entropy, rollout_logprobs")


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


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _error_response(error: AdvserveError) -> JSONResponse:
    return JSONResponse({"error": error.to_dict()}, status_code=STATUS.get(error.code, 500))


def _validation_error(exc: ValidationError | RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(location) or None
    message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
    return _error_response(InvalidArgument(message, field=field))


def _numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().cpu().numpy()


def _with_stats(result: AdvantageResult) -> AdvantageResult:
    result.stats  # computed here, in the compute thread, not on the event loop
    return result


def advantages_to_json(result: AdvantageResult) -> dict[str, Any]:
    return {
        "estimator": result.estimator,
        "preset": result.preset,
        "params": result.params,
        "tensors": {"advantages": _numpy(result.advantages), "returns": _numpy(result.returns)},
        "stats": result.stats,
    }


def losses_to_json(result: LossResult) -> dict[str, Any]:
    grads = {"grad_logprobs": result.grad_logprobs, "grad_values": result.grad_values,
             "grad_entropy": result.grad_entropy}
    return {
        "preset": result.preset,
        "loss": result.loss,
        "components": result.components,
        "metrics": result.metrics,
        "params": result.params,
        "tensors": {name: _numpy(t) for name, t in grads.items() if t is not None},
    }


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes`, declared (rejected before it is read)
    or streamed (the read stops at the limit)."""

    def __init__(self, app: Callable, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes", field="body")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = _error_response(self._error())
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error()  # answered 413 by the AdvserveError handler
            return message

        await self.app(scope, limited_receive, send)


def create_app(engine: Engine | None = None, *, max_json_bytes: int = DEFAULT_MAX_JSON_BYTES) -> FastAPI:
    """The FastAPI application over `engine` (a new CPU/CUDA engine when None)."""
    engine = engine or Engine()
    compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="advserve-compute")  # owns the device
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        compute.shutdown(wait=True)

    app = FastAPI(
        lifespan=lifespan,
        title="advserve",
        version=__version__,
        description="Token advantages, policy losses and their gradients for RL on language models. "
        "Formulas: docs/semantics.md. Errors: {\"error\": {\"code\", \"message\", \"field\"}}.",
    )
    app.state.engine = engine

    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(compute, fn, *args)

    async def parse(request: Request, model: type[BaseModel]) -> BaseModel:
        body = await request.body()
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidArgument(f"body is not valid JSON: {exc}", field="body") from None
        return model.model_validate(document)

    @app.exception_handler(AdvserveError)
    async def _domain_error(request: Request, exc: AdvserveError):
        return _error_response(exc)

    @app.exception_handler(ValidationError)
    async def _model_error(request: Request, exc: ValidationError):
        return _validation_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_error(request: Request, exc: RequestValidationError):
        return _validation_error(exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error_response(AdvserveError("internal error"))

    def body_schema(model: type[BaseModel]) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}

    error_responses = {400: {"model": ErrorBody}, 404: {"model": ErrorBody}, 413: {"model": ErrorBody}}

    @app.post("/v1/advantages", response_class=JSONResponse, openapi_extra=body_schema(AdvantagesBody),
              responses={200: {"model": AdvantagesResponse}, **error_responses}, tags=["compute"])
    async def advantages(request: Request):
        """Token advantages and returns of one estimator for a batch."""
        body = await parse(request, AdvantagesBody)
        domain = AdvantageRequest(estimator=body.estimator, tensors=body.tensors, preset=body.preset,
                                  params=body.params, dtype=body.dtype)
        result = await run(lambda: _with_stats(engine.compute_advantages(domain)))
        return JSONResponse(advantages_to_json(result))

    @app.post("/v1/losses", response_class=JSONResponse, openapi_extra=body_schema(LossesBody),
              responses={200: {"model": LossesResponse}, **error_responses}, tags=["compute"])
    async def losses(request: Request):
        """Policy, KL, value and entropy loss terms with per-token gradients."""
        body = await parse(request, LossesBody)
        domain = LossRequest(tensors=body.tensors, preset=body.preset, policy_loss=body.policy_loss,
                             kl_loss=body.kl_loss, value_loss=body.value_loss, entropy_bonus=body.entropy_bonus,
                             rollout_correction=body.rollout_correction, num_tokens=body.num_tokens,
                             num_sequences=body.num_sequences, dtype=body.dtype)
        result = await run(engine.compute_losses, domain)
        return JSONResponse(losses_to_json(result))

    @app.get("/v1/estimators", response_class=JSONResponse, tags=["catalog"])
    async def estimators():
        """Every estimator with its tensors, parameters and per-preset defaults; the loss terms."""
        return JSONResponse(engine.catalog())

    @app.get("/health/live", response_class=JSONResponse, tags=["health"])
    async def live():
        return JSONResponse({"status": "live"})

    @app.get("/health/ready", response_class=JSONResponse, tags=["health"])
    async def ready():
        return JSONResponse({"status": "ready", "device": str(engine.device)})

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (AdvantagesBody, LossesBody):
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(BodyLimit, max_bytes=max_json_bytes)
    return app
