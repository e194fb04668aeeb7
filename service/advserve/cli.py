"""Command line: `advserve serve`."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import dataclasses
import logging
import os
import sys

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
        description="Serve the REST API (POST /v1/advantages, POST /v1/losses, GET /v1/estimators, /health/live, "
        "/health/ready, OpenAPI at /docs) and the gRPC API (advserve.v1.Advserve, grpc.health.v1, reflection). "
        "Every flag can also be set by the environment variable shown.",
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
        if f.type == "bool":
            serve.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            serve.add_argument(flag, dest=f.name, default=default, type=lambda text, kind=f.type: parse_value(kind, text),
                               choices=f.metadata.get("choices"), help=help_text, metavar=f.type.upper())
    return parser


def serve(settings: Settings) -> None:
    """REST (uvicorn) and gRPC (grpc.aio) on one event loop, over one engine, compute thread and admission."""
    import uvicorn

    from .engine import Engine
    from .errors import AdvserveError
    from .grpc_server import start_grpc_server
    from .rest import Admission, create_app
    from .scheduler import Scheduler

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("advserve")
    tune_allocator()
    try:
        engine = Engine(settings.device, max_tokens=settings.max_tokens)
    except AdvserveError as exc:
        sys.exit(f"advserve: {exc.message}")
    scheduler = Scheduler(engine, max_wait_s=settings.max_wait_ms / 1e3, max_batch_tokens=settings.max_batch_tokens,
                          coalesce=settings.coalesce)
    admission = Admission(settings.admission_bytes)
    app = create_app(engine, settings, scheduler=scheduler, admission=admission)

    async def run() -> None:
        try:
            grpc_server, _, grpc_port = await start_grpc_server(engine, scheduler, admission, settings)
        except (OSError, RuntimeError) as exc:
            sys.exit(f"advserve: cannot start gRPC on {settings.host}:{settings.grpc_port}: {exc}")
        log.info("engine on %s; REST on %s:%d; gRPC on %s:%d; admission %d bytes", engine.device, settings.host,
                 settings.http_port, settings.host, grpc_port, settings.admission_bytes)
        config = uvicorn.Config(app, host=settings.host, port=settings.http_port, log_level=settings.log_level,
                                access_log=False)
        try:
            await uvicorn.Server(config).serve()
        finally:
            await grpc_server.stop(grace=5)
            scheduler.close()

    asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        values = {f.name: getattr(args, f.name) for f in setting_fields()}
        try:
            settings = Settings(**values).validate()
        except ValueError as exc:
            parser.error(str(exc))
        serve(settings)


if __name__ == "__main__":
    main()
