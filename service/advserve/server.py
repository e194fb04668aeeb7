"""The composition root: the one place that assembles the transports (`advserve.transports`) over
one runtime (engine, compute thread, admission, metrics) and serves them.

    create_app(runtime)          the FastAPI application: the native REST API and the Open Inference
                                 Protocol's, behind the HTTP door (transports.http_door)
    start_grpc_server(runtime)   grpc.aio: the native service, the Open Inference Protocol's, health
                                 and reflection, behind the gRPC door (transports.grpc_door)
    serve(settings)              both on one event loop until SIGTERM, then a graceful drain
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import sys
import threading

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .config import Settings
from .errors import AdvserveError, InvalidArgument, MethodNotAllowed, NotFound
from .kernels.outputs import OUTPUTS
from .runtime import Runtime, tune_allocator
from .transports import oip_grpc, oip_rest, rest
from .transports.grpc_door import HEALTH_NAMES, SERVICE, AuthGate, Door, grpc_options
from .transports.http_door import (AdmissionControl, _error_response, _failure_response, _validation_error,
                                   guarded_protocol, is_oip_path, oip_error_response)
from .transports.native_grpc import AdvserveServicer
from .workers import Worker, listen_socket

log = logging.getLogger("advserve")


def create_app(runtime: Runtime | None = None) -> FastAPI:
    """The FastAPI application over `runtime` (engine, compute thread, admission, metrics), which
    other transports may share; a new one from default Settings when None (owned by the app)."""
    owns_runtime = runtime is None
    runtime = runtime or Runtime.build(Settings())

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

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(rest.openapi_components())
            app.openapi_schema = schema
        return app.openapi_schema

    rest.add_routes(app, runtime)
    oip_rest.add_routes(app, runtime)
    app.openapi = openapi
    app.add_middleware(AdmissionControl, runtime=runtime)
    return app


async def start_grpc_server(runtime: Runtime) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """Start the gRPC server on settings.host:settings.grpc_port (TLS and mTLS as configured), every
    method behind the door (`transports.grpc_door`); returns (server, health servicer, bound port). A port
    in use raises OSError."""
    settings = runtime.settings
    door = Door(runtime)
    server = grpc.aio.server(
        interceptors=[AuthGate(door)],
        options=grpc_options(settings.grpc_max_message_bytes, door.max_receive, settings.grpc_max_concurrent_streams,
                             reuseport=runtime.worker is not None),
        maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        SERVICE, AdvserveServicer(runtime).handlers(door))])
    oip_grpc.add_servicer(runtime, server, door)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.grpc_port}"
    if settings.tls_cert:
        with open(settings.tls_cert, "rb") as cert, open(settings.tls_key, "rb") as key:
            pair = (key.read(), cert.read())
        client_ca = open(settings.tls_client_ca, "rb").read() if settings.tls_client_ca else None
        credentials = grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                                  require_client_auth=client_ca is not None)
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC to {settings.host}:{settings.grpc_port}")
    await server.start()
    for name in HEALTH_NAMES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer, port


def serve(settings: Settings, worker: Worker | None = None) -> None:
    """REST (uvicorn) and gRPC (grpc.aio) on one event loop over one runtime (engine, compute thread,
    admission, metrics). SIGTERM or SIGINT: readiness turns false (503 on /health/ready, NOT_SERVING on
    gRPC health), new work is refused, every accepted request is completed and answered (at most
    --shutdown-grace-s), then both servers stop. `worker`: this process is one of --workers (forked by
    advserve.workers): its own SO_REUSEPORT sockets on the server's ports, torch threads its share of
    the cores, admission and metrics shared through the supervisor's board."""
    tune_allocator()
    # the allocator keeps freed memory now, so the CPU kernel's output pool would save no page faults;
    # off, every byte a request uses is its own (admission's account) and freed with its response
    OUTPUTS.enabled = False
    if worker is not None:
        import torch

        torch.set_num_threads(worker.intra_op_threads)
    try:
        runtime = Runtime.build(settings, worker=worker)
    except AdvserveError as exc:
        sys.exit(f"advserve: {exc.message}")
    app = create_app(runtime)
    if runtime.engine.kernels == "numba":  # no request waits for a compile (kernels.cpu.warm)
        from .kernels import cpu

        threading.Thread(target=cpu.warm, kwargs={"until_cached": True}, name="advserve-warm", daemon=True).start()

    class Server(uvicorn.Server):
        """uvicorn whose first exit signal drains instead of stopping at once."""

        drain_requested: asyncio.Event

        def handle_exit(self, sig, frame) -> None:
            if self.drain_requested.is_set():  # a second signal: stop now
                super().handle_exit(sig, frame)
            else:
                self.loop.call_soon_threadsafe(self.drain_requested.set)

    async def run() -> None:
        try:
            grpc_server, health, grpc_port = await start_grpc_server(runtime)
        except (OSError, RuntimeError) as exc:
            sys.exit(f"advserve: cannot start gRPC on {settings.host}:{settings.grpc_port}: {exc}")
        if settings.metrics_port:  # plain HTTP without auth: loopback only, whatever --host says
            try:
                serve_metrics(runtime, settings.metrics_port)
            except OSError as exc:
                sys.exit(f"advserve: cannot serve metrics on 127.0.0.1:{settings.metrics_port}: {exc}")
        sockets = None
        if worker is not None:
            try:
                sockets = [listen_socket(settings.host, settings.http_port)]
            except OSError as exc:
                sys.exit(f"advserve: cannot bind {settings.host}:{settings.http_port}: {exc}")
        tls = {}
        if settings.tls_cert:
            tls = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
            if settings.tls_client_ca:
                tls.update(ssl_ca_certs=settings.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(app, host=settings.host, port=settings.http_port, log_level=settings.log_level,
                                access_log=False, log_config=None, timeout_graceful_shutdown=5,
                                http=guarded_protocol(settings), **tls)
        server = Server(config)
        server.loop = asyncio.get_running_loop()
        server.drain_requested = asyncio.Event()

        async def drain_on_signal() -> None:
            await server.drain_requested.wait()
            log.info("shutting down: readiness off, finishing accepted requests (up to %.0f s)",
                     settings.shutdown_grace_s)
            for name in HEALTH_NAMES:
                await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            finished = await runtime.drain(settings.shutdown_grace_s)
            log.info("drained: %s", "every accepted request answered" if finished else "grace period over")
            server.should_exit = True

        drainer = asyncio.create_task(drain_on_signal())
        trimmer = (asyncio.create_task(runtime.trim_memory_when_idle(settings.memory_trim_idle_s))
                   if settings.memory_trim_idle_s > 0 else None)
        scheme = "https" if settings.tls_cert else "http"
        log.info("%sengine on %s (kernels: %s, loop: %s); REST on %s://%s:%d; gRPC on %s:%d%s; admission %d bytes; auth %s",
                 "" if worker is None else f"worker {worker.slot} of {worker.count}, "
                 f"{worker.intra_op_threads} torch threads: ",
                 runtime.engine.device, runtime.engine.kernels, type(asyncio.get_running_loop()).__module__,
                 scheme, settings.host, settings.http_port, settings.host, grpc_port,
                 " (TLS)" if settings.tls_cert else "", settings.admission_bytes,
                 "on" if settings.auth_token else "off")
        publisher = asyncio.create_task(publish_while_busy(runtime)) if worker is not None else None
        bounder = asyncio.create_task(runtime.trim_memory_over_budget())
        serving = asyncio.create_task(server.serve(sockets=sockets))
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        runtime.mark_ready()
        try:
            await serving
        finally:
            for task in (publisher, bounder):
                if task is not None:
                    task.cancel()
            drainer.cancel()
            if trimmer is not None:
                trimmer.cancel()
            await grpc_server.stop(grace=5)
            runtime.close()

    run_event_loop(run())


def run_event_loop(main) -> None:
    """Run the coroutine `main` on uvloop where it is installed (Linux: REST and gRPC both run on it;
    bench/bench_http.py and bench/bench_serving.py measure the gain), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


async def publish_while_busy(runtime: Runtime, every_s: float = 0.05) -> None:
    """A worker, forever: its queue depth and requests in progress into the board every `every_s` while
    it is busy (they are published at each request's start and end too), for the workers' /metrics."""
    while True:
        await asyncio.sleep(every_s)
        if runtime.active or runtime.scheduler.depth:
            runtime.publish()


def serve_metrics(runtime: Runtime, port: int) -> None:
    """Prometheus on 127.0.0.1:`port` in a thread (--metrics-port). Every worker of --workers serves it
    (SO_REUSEPORT: the supervisor reserved the port), each showing the server's sums."""
    from wsgiref.simple_server import make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

    class Server(ThreadingWSGIServer):
        allow_reuse_port = runtime.worker is not None

    httpd = make_server("127.0.0.1", port, make_wsgi_app(runtime.metrics.registry), Server, handler_class=_SilentHandler)
    threading.Thread(target=httpd.serve_forever, name="advserve-metrics", daemon=True).start()
