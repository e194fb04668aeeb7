"""The Ray Serve application: replicas that run the engine in their own process (no HTTP between a
caller's handle and the engine), each also the REST ingress (the FastAPI app of `advserve serve`) and
the Open Inference Protocol's gRPC servicer for Serve's proxies.

    serve run deploy/ray/serve_config.yaml          # or: serve run advserve.ray:app
    from advserve.ray import RayClient               # in the cluster: RayClient().compute_advantages(...)

`build_app(args)` is the application builder a Serve config names (`import_path: advserve.ray:build_app`);
its `args` are documented there. A replica's methods answer envelopes, never raise: {"document": ...,
"tensors": {name: numpy}} or {"error": {"code", "message", "field", "retry_after"}}, so a caller sees the
engine's typed error, not a RayTaskError (`RayClient` turns it into `advserve_client.errors`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Mapping

import numpy as np
from ray import serve
from starlette.applications import Starlette

from .._oip_pb import grpc_service_pb2 as pb
from ..analysis.batch import AnalysisRequest, prepare_analysis, run_analysis
from ..config import Settings
from ..device import to_host
from ..errors import STATUS, AdvserveError, InvalidArgument, NotFound, Unavailable, error_message
from ..model import AdvantageRequest, LossRequest
from ..oip.core import OipService
from ..runtime import Runtime, compute_bytes
from ..transports import oip_grpc
from . import grpc_proxy  # noqa: F401 - the stubs' pickle name, for requests from Serve's gRPC proxy

log = logging.getLogger("advserve.ray")
DEPLOYMENT = "AdvServe"
APP = "advserve"
GRPC_SERVICER = "advserve.ray.grpc_proxy.add_GRPCInferenceServiceServicer_to_server"
"""What Serve's gRPC proxy registers (grpc_options.grpc_servicer_functions): the Open Inference Protocol."""

KINDS = ("advantages", "losses", "analysis")


def _numpy(tensor: Any) -> np.ndarray | None:
    """A result tensor as a host numpy array (what goes through the object store)."""
    if tensor is None:
        return None
    return to_host(tensor.detach()).numpy()


def error_envelope(error: BaseException) -> dict[str, Any]:
    """The envelope of an error: an AdvserveError's code, message and field; anything else "internal"."""
    if isinstance(error, AdvserveError):
        retry_after = getattr(error, "retry_after_s", None)
        return {"error": {"code": error.code, "message": error.message, "field": error.field,
                          "retry_after": retry_after}}
    log.exception("advserve replica: unexpected error", exc_info=error)
    return {"error": {"code": "internal", "message": f"{type(error).__name__}: {error}", "field": None,
                      "retry_after": None}}


class PicklableBodies:
    """ASGI middleware: response body chunks as bytes. The REST app sends binary tensors as memoryviews
    of the result arrays (no copy under uvicorn); a Serve replica pickles every ASGI message to the
    proxy, and a memoryview does not pickle."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def send_bytes(message: Any) -> None:
            body = message.get("body")
            if body is not None and not isinstance(body, bytes):
                message = {**message, "body": bytes(body)}
            await send(message)

        await self.app(scope, receive, send_bytes)


class AdvServe:
    """One replica: the runtime of `advserve serve` (engine, compute thread, admission, limits, auth)
    built from `settings` (Settings field names: device, kernels, max_tokens, admission_bytes,
    request_timeout_s, auth_token, ...; the ports and TLS do not apply: Serve's proxies listen)."""

    def __init__(self, settings: Mapping[str, Any] | None = None):
        try:
            self.settings = Settings(**dict(settings or {})).validate()
        except TypeError as exc:  # an unknown name
            raise ValueError(f"advserve.ray: settings: {exc}") from None
        self.runtime = Runtime.build(self.settings)
        self.oip = OipService(self.runtime.engine, self.runtime.scheduler, None)
        log.info("advserve replica: engine on %s (kernels %s)", self.runtime.engine.device,
                 self.runtime.engine.kernels)

    def __serve_build_asgi_app__(self):
        """The REST ingress: the FastAPI application of `advserve serve` over this replica's runtime."""
        from ..server import create_app

        app = create_app(self.runtime)
        app.add_middleware(PicklableBodies)
        return app

    # --- the handle API (RayClient) -----------------------------------------------------------

    async def compute(self, kind: str, document: Mapping[str, Any], tensors: Mapping[str, Any]) -> dict[str, Any]:
        """One request of `kind` ("advantages", "losses", "analysis"): `document` the fields of the
        native REST body but "tensors", `tensors` numpy arrays (read-only views of the object store:
        the engine copies what it converts and writes nothing) or lists. An envelope."""
        try:
            return await self._compute(kind, document, tensors)
        except Exception as exc:  # noqa: BLE001 - every error is the caller's answer
            return error_envelope(exc)

    async def _compute(self, kind: str, document: Mapping[str, Any], tensors: Mapping[str, Any]) -> dict[str, Any]:
        runtime, engine = self.runtime, self.runtime.engine
        if kind not in KINDS:
            raise NotFound(f"unknown request kind {kind!r}; valid: {', '.join(KINDS)}", field="kind")
        if not isinstance(document, Mapping):
            raise InvalidArgument("the request document must be a mapping", field="body")
        statistics = document.get("batch_statistics") if kind == "advantages" else None
        request = _request(kind, {k: v for k, v in document.items() if k != "batch_statistics"}, tensors)
        with runtime.serving(), runtime.admission.held(compute_bytes(request, runtime.settings.max_tokens)):
            deadline = runtime.deadline(document.get("timeout_s"))
            if kind == "advantages":
                prepared = await asyncio.to_thread(engine.prepare_advantages, request, defer_checks=True)
                if statistics is not None:  # a shard of a larger batch (RayClient(shards=k))
                    prepared = await asyncio.to_thread(engine.as_shard, prepared, statistics)
                result, _ = await deadline.wait(runtime.scheduler.advantages(prepared))
                stats = await asyncio.to_thread(lambda: result.stats)  # and the value checks, if deferred
                return {"document": {"estimator": result.estimator, "preset": result.preset, "params": result.params,
                                     "stats": stats},
                        "tensors": {"advantages": _numpy(result.advantages), "returns": _numpy(result.returns)}}
            if kind == "losses":
                result, _ = await deadline.wait(runtime.scheduler.call(lambda: engine.compute_losses(request)))
                return {"document": {"preset": result.preset, "loss": result.loss, "components": result.components,
                                     "metrics": result.metrics, "params": result.params},
                        "tensors": {name: _numpy(t) for name, t in result.output_tensors().items()}}
            prepared = await asyncio.to_thread(prepare_analysis, engine, request)
            answer, _ = await deadline.wait(runtime.scheduler.call(lambda: run_analysis(engine, prepared)))
            return {"document": answer, "tensors": {}}

    async def catalog(self) -> dict[str, Any]:
        """The catalog (GET /v1/estimators)."""
        return self.runtime.engine.catalog()

    async def pid(self) -> int:
        """This replica's process id (tests: which replica answered)."""
        import os

        return os.getpid()

    # --- the Open Inference Protocol over Serve's gRPC proxy (methods named after the RPCs) -----------

    def _authenticate(self, grpc_context: Any) -> None:
        metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
        self.runtime.authenticate(metadata.get("authorization"))

    @staticmethod
    def _fail(grpc_context: Any, error: BaseException, empty: Any) -> Any:
        """End the call with the status of `errors.STATUS` and the message "<field>: <message>", as the
        OIP servicer of `advserve serve` does; `empty`: the response message returned with it."""
        if not isinstance(error, AdvserveError):
            log.exception("advserve replica: unexpected gRPC error", exc_info=error)
            error = AdvserveError(f"{type(error).__name__}: {error}")
        import grpc

        _, code_name = STATUS.get(error.code, STATUS[AdvserveError.code])
        if grpc_context is not None:
            grpc_context.set_code(grpc.StatusCode[code_name])
            grpc_context.set_details(error_message(error))
            metadata = [("advserve-error-code", error.code)]
            if error.field:
                metadata.append(("advserve-error-field", error.field))
            grpc_context.set_trailing_metadata(metadata)
        return empty

    async def ServerLive(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 - the RPC's name
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.runtime.ready)

    async def ServerMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        try:
            self._authenticate(grpc_context)
            return pb.ServerMetadataResponse(**{**self.oip.server_metadata(), "extensions": ["binary_tensor_data",
                                                                                               "parameters"]})
        except Exception as exc:  # noqa: BLE001
            return self._fail(grpc_context, exc, pb.ServerMetadataResponse())

    async def ModelReady(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        try:
            self._authenticate(grpc_context)
            self.oip.model(request.name, request.version)
            return pb.ModelReadyResponse(ready=self.runtime.ready)
        except Exception as exc:  # noqa: BLE001
            return self._fail(grpc_context, exc, pb.ModelReadyResponse())

    async def ModelMetadata(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        try:
            self._authenticate(grpc_context)
            return oip_grpc.model_metadata_response(self.oip, request)
        except Exception as exc:  # noqa: BLE001
            return self._fail(grpc_context, exc, pb.ModelMetadataResponse())

    async def ModelInfer(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        """inference.GRPCInferenceService/ModelInfer: the same decoding, parameters, outputs and errors
        as `advserve serve`'s OIP servicer (transports.oip_grpc); shared memory is refused (a Serve
        replica may sit on another host than the caller)."""
        runtime = self.runtime
        try:
            self._authenticate(grpc_context)
            decoded = await asyncio.to_thread(oip_grpc.request_from_pb, request, self.oip)
            with runtime.serving(), runtime.admission.held(compute_bytes(decoded, runtime.settings.max_tokens)):
                prepared = await asyncio.to_thread(self.oip.prepare, decoded)
                deadline = runtime.deadline(prepared.timeout_s)
                result, _ = await deadline.wait(self.oip.compute(prepared))
                return await asyncio.to_thread(lambda: oip_grpc.response_to_pb(self.oip.respond(prepared, result)))
        except Exception as exc:  # noqa: BLE001
            return self._fail(grpc_context, exc, pb.ModelInferResponse())


def _request(kind: str, document: Mapping[str, Any], tensors: Mapping[str, Any]) -> Any:
    """The domain request of a handle call (unknown fields named, as the REST body does)."""
    fields = {"advantages": AdvantageRequest, "losses": LossRequest, "analysis": AnalysisRequest}[kind]
    known = {f.name for f in dataclasses.fields(fields)} - {"tensors"}
    for name in document:
        if name not in known and name != "timeout_s":
            raise InvalidArgument(f"unknown field {name!r}; valid: {', '.join(sorted(known))}", field=name)
    given = {name: value for name, value in document.items() if name != "timeout_s"}
    return fields(tensors=dict(tensors), **given)


@dataclasses.dataclass(frozen=True)
class Options:
    """The application's deployment options (`build_app` args besides "settings").

    num_replicas: replicas (an integer, or "auto" with `autoscaling`); num_gpus, num_cpus: per replica
    (ray_actor_options); autoscaling: Serve's autoscaling_config (min_replicas, max_replicas,
    target_ongoing_requests, upscale_delay_s, ...), on requests in flight per replica;
    max_ongoing_requests: requests a replica takes at once (its compute thread runs one at a time: 2
    keeps it busy while the next decodes); max_queued_requests: past it callers get Overloaded (-1:
    no bound)."""

    num_replicas: int | str = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    autoscaling: Mapping[str, Any] | None = None
    max_ongoing_requests: int = 2
    max_queued_requests: int = -1


def deployment(options: Options = Options()):
    """The Serve deployment of AdvServe with `options` (the ingress: REST over Serve's HTTP proxy)."""
    config: dict[str, Any] = {"name": DEPLOYMENT, "max_ongoing_requests": options.max_ongoing_requests,
                              "max_queued_requests": options.max_queued_requests,
                              "ray_actor_options": {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus}}
    if options.autoscaling is not None:
        config["autoscaling_config"] = dict(options.autoscaling)
        if options.num_replicas != 1:
            config["num_replicas"] = options.num_replicas
    else:
        config["num_replicas"] = options.num_replicas
    return serve.deployment(**config)(ingress(AdvServe))


class ReplicaApp(Starlette):
    """The ASGI app given to `serve.ingress` on a Ray whose `serve.ingress()` cannot defer the app to
    the replica (before Ray 2.56, which calls `__serve_build_asgi_app__` itself): it answers the
    lifespan itself and hands every HTTP request to the app its replica builds on the first one
    (`serve.get_replica_context().servable_object.__serve_build_asgi_app__()`), with the exception
    handlers Serve added to this one."""

    def __init__(self) -> None:
        super().__init__()
        self.replica_app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await super().__call__(scope, receive, send)
            return
        if self.replica_app is None:
            app = serve.get_replica_context().servable_object.__serve_build_asgi_app__()
            for exc, handler in self.exception_handlers.items():
                app.add_exception_handler(exc, handler)
            self.replica_app = app
        await self.replica_app(scope, receive, send)


def ingress(cls: type) -> type:
    """`cls` as Serve's HTTP ingress, its ASGI app built in each replica by `__serve_build_asgi_app__`:
    by Serve itself where `serve.ingress()` takes no app (Ray 2.56 on), through `ReplicaApp` before."""
    try:
        return serve.ingress()(cls)
    except TypeError:  # serve.ingress() missing its app argument
        return serve.ingress(ReplicaApp())(cls)


def build_app(args: Mapping[str, Any] | None = None):
    """The application a Serve config names (`import_path: advserve.ray:build_app`), from its `args`:
    "settings" (the replicas' Settings, as for `advserve serve`: device, kernels, max_tokens,
    admission_bytes, request_timeout_s, auth_token or auth_token_file, ...) and the `Options` fields
    (num_replicas, num_gpus, num_cpus, autoscaling, max_ongoing_requests, max_queued_requests). A
    config's `deployments:` entry for AdvServe overrides these options as Serve documents."""
    args = dict(args or {})
    settings = args.pop("settings", None) or {}
    unknown = set(args) - {f.name for f in dataclasses.fields(Options)}
    if unknown:
        raise ValueError(f"advserve.ray.build_app: unknown args {sorted(unknown)}; valid: settings, "
                         f"{', '.join(f.name for f in dataclasses.fields(Options))}")
    Settings(**settings).validate()  # a bad setting fails here, in `serve run`, not in every replica
    return deployment(Options(**args)).bind(dict(settings))


__all__ = ["AdvServe", "Options", "build_app", "deployment", "DEPLOYMENT", "APP", "GRPC_SERVICER", "Unavailable"]
