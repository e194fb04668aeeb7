"""Command line: `advserve serve` (the server) and `advserve analyze` (the estimator study)."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import dataclasses
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .config import Settings, env_name, parse_value, setting_fields

# glibc mallopt parameters: keep large tensors' memory instead of mmap/munmap on every call, which
# costs page faults worth several times the compute at [256, 4096] (design/anchors-performance.md A.3).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where that is not glibc."""
    path = ctypes.util.find_library("c")
    if not path:
        return False
    try:
        libc = ctypes.CDLL(path)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advserve", description="advserve: advantages, losses and their gradients "
                                     "for RL on language models.")
    parser.add_argument("--version", action="version", version=f"advserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="start the REST and gRPC server",
        description="Serve the REST API (POST /v1/advantages, POST /v1/losses, POST /v1/analysis, GET /v1/estimators, "
        "/health/live, /health/ready, /metrics, OpenAPI at /docs) and the gRPC API (advserve.v1.Advserve, grpc.health.v1, reflection), "
        "and the Open Inference Protocol (KServe v2 / Triton: /v2 over HTTP, inference.GRPCInferenceService on "
        "the gRPC port; docs/oip.md). Every flag can also be set by the environment variable shown.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in setting_fields():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        env = env_name(f.name)
        if env in os.environ:
            try:
                default = parse_value(f.type, os.environ[env])
            except ValueError as exc:
                parser.error(f"{env}: {exc}")
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [{env}]"
        if f.metadata.get("secret"):  # its value (perhaps from the environment) never appears in --help
            serve.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text, metavar="TOKEN")
            continue
        if f.type == "bool":
            serve.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            serve.add_argument(flag, dest=f.name, default=default, type=lambda text, kind=f.type: parse_value(kind, text),
                               choices=f.metadata.get("choices"), help=help_text, metavar=f.type.upper())
    add_analyze_parser(commands)
    return parser


def add_analyze_parser(commands) -> None:
    """`advserve analyze`: the exact-gradient study of the estimators (advserve.analysis.report)."""
    analyze = commands.add_parser(
        "analyze", help="what each estimator optimizes: Monte Carlo against an exact policy gradient",
        description="Sample a small tabular softmax policy whose objective J and gradient ∇J are exact "
        "(enumeration), compute every outcome-reward estimator's policy-loss gradient through the engine "
        "as a trainer would, and compare its mean with ∇J and with the closed forms of the seed's bias "
        "table: cosine, relative scale and per-prompt implied weights with 95% intervals. Prints the "
        "tables (a progress bar on a terminal while sampling) and writes OUT/study.json (every number) "
        "and the plots OUT/weights.png and OUT/group_size.png. Deterministic under --seed. "
        "See docs/analysis.md.")
    mode = analyze.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="CI size: M in {4, 8}, 600 batches per M (seconds); the default")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="docs size: M in {2, 4, 8, 16, 32}, 8000 batches per M (minutes)")
    analyze.set_defaults(mode="quick")
    analyze.add_argument("--seed", type=int, default=0, help="seed of every random draw (torch.Generator); default: 0")
    analyze.add_argument("--out", type=Path, default=Path("advserve-analysis"),
                         help="directory for study.json and the PNG plots; default: advserve-analysis")
    analyze.add_argument("--group-sizes", type=int, nargs="+", metavar="M",
                         help="group sizes M (>= 2) instead of the mode's")
    analyze.add_argument("--replicates", type=int, metavar="N",
                         help="sampled batches per M instead of the mode's (a multiple of --blocks)")
    analyze.add_argument("--blocks", type=int, metavar="G",
                         help="jackknife blocks instead of the mode's (the batches are split into G blocks)")
    analyze.add_argument("--estimators", nargs="+", metavar="NAME",
                         help="a subset of: reinforce reinforce_rtg rloo remax gae orz reinforce_pp "
                         "reinforce_pp_baseline dr_grpo grpo grpo_original dapo (default: all)")
    analyze.add_argument("--no-plots", dest="plots", action="store_false",
                         help="write study.json only (no matplotlib needed) and remove the plots of an earlier run from OUT; "
                         "default: the plots are written")


def analyze(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .analysis import report

    try:
        config = report.study_config(args.mode, seed=args.seed, group_sizes=args.group_sizes,
                                     replicates=args.replicates, blocks=args.blocks, estimators=args.estimators)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        report.run(config, args.out, plots=args.plots, mode=args.mode)
    except report.MissingDependency as exc:
        sys.exit(f"advserve analyze: {exc}")


def configure_logging(settings: Settings) -> None:
    from .observability import JsonFormatter

    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)


def serve(settings: Settings) -> None:
    """REST (uvicorn) and gRPC (grpc.aio) on one event loop over one runtime (engine, compute thread,
    admission, metrics). SIGTERM or SIGINT: readiness turns false (503 on /health/ready, NOT_SERVING on
    gRPC health), new work is refused, every accepted request is completed and answered (at most
    --shutdown-grace-s), then both servers stop."""
    import ssl

    import uvicorn
    from grpc_health.v1 import health_pb2

    from .errors import AdvserveError
    from .grpc_server import HEALTH_NAMES, start_grpc_server
    from .rest import create_app, guarded_protocol
    from .runtime import Runtime

    configure_logging(settings)
    log = logging.getLogger("advserve")
    tune_allocator()
    try:
        runtime = Runtime.build(settings)
    except AdvserveError as exc:
        sys.exit(f"advserve: {exc.message}")
    app = create_app(runtime)

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
            from prometheus_client import start_http_server

            try:
                start_http_server(settings.metrics_port, addr="127.0.0.1", registry=runtime.metrics.registry)
            except OSError as exc:
                sys.exit(f"advserve: cannot serve metrics on 127.0.0.1:{settings.metrics_port}: {exc}")
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
        log.info("engine on %s; REST on %s://%s:%d; gRPC on %s:%d%s; admission %d bytes; auth %s",
                 runtime.engine.device, scheme, settings.host, settings.http_port, settings.host, grpc_port,
                 " (TLS)" if settings.tls_cert else "", settings.admission_bytes,
                 "on" if settings.auth_token else "off")
        try:
            await server.serve()
        finally:
            drainer.cancel()
            if trimmer is not None:
                trimmer.cancel()
            await grpc_server.stop(grace=5)
            runtime.close()

    asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        values = {f.name: getattr(args, f.name) for f in setting_fields() if hasattr(args, f.name)}
        if "auth_token" not in values:
            values["auth_token"] = os.environ.get(env_name("auth_token"), "")
        try:
            settings = Settings(**values).validate()
        except ValueError as exc:
            parser.error(str(exc))
        serve(settings)
    elif args.command == "analyze":
        analyze(args, parser)


if __name__ == "__main__":
    main()
