"""Command line: `advserve serve`."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import sys

from . import __version__

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


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"advserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the REST server",
                                description="Serve the REST API (POST /v1/advantages, POST /v1/losses, "
                                "GET /v1/estimators, /health/live, /health/ready, OpenAPI at /docs).")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--http-port", type=_port, default=8000, help="REST port (default 8000)")
    serve.add_argument("--grpc-port", type=_port, default=8001,
                       help="gRPC port (default 8001; reserved: the gRPC API is not served yet)")
    serve.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'")
    serve.add_argument("--max-json-bytes", type=int, default=64 * 1024 * 1024,
                       help="largest accepted request body in bytes (default 64 MiB)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from .engine import Engine
    from .errors import AdvserveError
    from .rest import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_allocator()
    try:
        engine = Engine(args.device)
    except AdvserveError as exc:
        sys.exit(f"advserve: {exc.message}")
    logging.getLogger("advserve").info("engine on %s; gRPC port %d reserved (not served yet)", engine.device,
                                       args.grpc_port)
    app = create_app(engine, max_json_bytes=args.max_json_bytes)
    uvicorn.run(app, host=args.host, port=args.http_port, log_level=args.log_level, access_log=False)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        serve(args)


if __name__ == "__main__":
    main()
