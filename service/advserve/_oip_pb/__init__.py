"""Generated gRPC stubs of proto/inference/grpc_service.proto, the Open Inference Protocol (scripts/gen_proto.py)."""
