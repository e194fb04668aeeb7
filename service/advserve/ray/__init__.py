"""advserve on Ray Serve (`pip install advserve[ray]`): replicas that run the engine, a handle client
with `advserve_client.Client`'s methods, sharding of one batch across replicas, and Serve's HTTP (the
REST API) and gRPC (the Open Inference Protocol) ingress. docs/deploy.md is the guide.

    serve run deploy/ray/serve_config.yaml             # or, with the defaults: serve run advserve.ray:app

    from advserve.ray import RayClient                 # any driver, task or actor of the cluster
    client = RayClient(shards=2)
    adv = client.compute_advantages("gae", preset="verl", rewards=r, values=v, response_mask=m)

`import advserve` never imports Ray; this package does (ray[serve] must be installed).
"""

from __future__ import annotations

from typing import Any

from .client import RayClient
from .deployment import APP, DEPLOYMENT, GRPC_SERVICER, AdvServe, Options, build_app, deployment

__all__ = ["RayClient", "AdvServe", "Options", "build_app", "deployment", "APP", "DEPLOYMENT", "GRPC_SERVICER",
           "app"]


def __getattr__(name: str) -> Any:
    """`app`: the application with the default options and settings (`serve run advserve.ray:app`),
    built on first use."""
    if name == "app":
        value = build_app({})
        globals()["app"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
