"""Generated gRPC stubs of proto/advserve/v1/advserve.proto (scripts/gen_proto.py)."""
