"""What Serve's gRPC proxy registers for the Open Inference Protocol: `grpc_options.grpc_servicer_functions:
["advserve.ray.grpc_proxy.add_GRPCInferenceServiceServicer_to_server"]` (`advserve.ray.GRPC_SERVICER`).

The generated function registers each method twice: as a generic handler and, since grpcio 1.63, as a
"registered method" handler, which the server prefers. Serve's proxy server replaces the handlers'
functions with its own (the call goes to a replica) in `add_generic_rpc_handlers`, and from Ray 2.60
on in `add_registered_method_handlers` too. Before 2.60 the registered handlers call the proxy's dummy
servicer and every call fails ("'NoneType' object is not callable" on Ray 2.41). On such a server
this module's function registers the generic handlers only (grpcio's path before 1.63).

The proxy pickles each request message to a replica, and pickle finds a class by its `__module__`,
which for the generated stubs (`advserve._oip_pb`, generated from proto/inference/grpc_service.proto)
is "inference.grpc_service_pb2", a module that does not exist under that name. Importing this module
(the proxy does, to register the servicer; every replica does, through `advserve.ray.deployment`)
makes that name an alias of the stubs, unless a module of that name is already loaded.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .._oip_pb import grpc_service_pb2
from .._oip_pb import grpc_service_pb2_grpc

MODULE = grpc_service_pb2.ServerLiveRequest.__module__  # "inference.grpc_service_pb2"


def install_alias() -> None:
    """Make `MODULE` (and its package) importable as the generated stubs, if nothing else has the name."""
    package, _, _ = MODULE.rpartition(".")
    if package and package not in sys.modules:
        alias = types.ModuleType(package)
        alias.__path__ = []  # a namespace-like package: its one submodule is set below
        sys.modules[package] = alias
    sys.modules.setdefault(MODULE, grpc_service_pb2)


class _GenericHandlersOnly:
    """A server as the generated registration function sees it, registering generic handlers only."""

    def __init__(self, server: Any):
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        """Not registered: the server would call these functions as they are, not through Serve."""


def add_GRPCInferenceServiceServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 - grpc's name
    """The generated registration of the OIP servicer; on a server whose class overrides
    `add_generic_rpc_handlers` but not `add_registered_method_handlers` (Serve's proxy before Ray
    2.60), the generic handlers only."""
    routes_registered = ("add_registered_method_handlers" in vars(type(server))
                         or "add_generic_rpc_handlers" not in vars(type(server)))
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        servicer, server if routes_registered else _GenericHandlersOnly(server))


install_alias()

__all__ = ["add_GRPCInferenceServiceServicer_to_server", "install_alias", "MODULE"]
