"""Command line: `advserve serve` (the server) and `advserve analyze` (the estimator study)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .config import Settings, env_name, parse_value, setting_fields, worker_count

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
        "the gRPC port, with Triton's system and CUDA shared-memory extensions; docs/oip.md, "
        "docs/shared-memory.md), from --workers processes on the same ports (docs/workers.md). Every flag can also "
        "be set by the environment variable shown.",
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


def configure_logging(settings: Settings, pid: bool = False) -> None:
    """Log records to stderr as text or JSON lines; `pid`: each names its process (--workers)."""
    from .observability import JsonFormatter

    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(pid=pid))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s" + ("[%(process)d]" if pid else "")
                                               + ": %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)


def serve(settings: Settings) -> None:
    """One process (--workers 1), or a supervisor and its workers (advserve.workers; docs/workers.md)."""
    if worker_count(settings) > 1:
        from .workers import supervise  # never imports torch or grpc: it forks the workers

        sys.exit(supervise(settings, lambda: configure_logging(settings, pid=True)))
    from .server import serve as serve_forever  # torch, FastAPI and grpc load only for `serve`

    configure_logging(settings)
    serve_forever(settings)


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
