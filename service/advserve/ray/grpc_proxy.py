"""What Serve's gRPC proxy registers for the Open Inference Protocol: `grpc_options.grpc_servicer_functions:
["advserve.ray.grpc_proxy.add_GRPCInferenceServiceServicer_to_server"]` (`advserve.ray.GRPC_SERVICER`).

The proxy pickles each request message to a replica, and pickle finds a class by its `__module__`,
which for the generated stubs (`advserve._oip_pb`, generated from proto/inference/grpc_service.proto)
is "inference.grpc_service_pb2", a module that does not exist under that name. Importing this module
(the proxy does, to register the servicer; every replica does, through `advserve.ray.deployment`)
makes that name an alias of the stubs, unless a module of that name is already loaded.
"""

from __future__ import annotations

import sys
import types

from .._oip_pb import grpc_service_pb2
from .._oip_pb.grpc_service_pb2_grpc import add_GRPCInferenceServiceServicer_to_server

MODULE = grpc_service_pb2.ServerLiveRequest.__module__  # "inference.grpc_service_pb2"


def install_alias() -> None:
    """Make `MODULE` (and its package) importable as the generated stubs, if nothing else has the name."""
    package, _, _ = MODULE.rpartition(".")
    if package and package not in sys.modules:
        alias = types.ModuleType(package)
        alias.__path__ = []  # a namespace-like package: its one submodule is set below
        sys.modules[package] = alias
    sys.modules.setdefault(MODULE, grpc_service_pb2)


install_alias()

__all__ = ["add_GRPCInferenceServiceServicer_to_server", "install_alias", "MODULE"]
