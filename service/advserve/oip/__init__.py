"""The Open Inference Protocol (KServe v2 / Triton) front of advserve: `core` (models, parameters,
requests and responses, transport-independent), `tensors` (datatypes and their wire forms), `rest`
(HTTP /v2, with Triton's binary extension) and `grpc_server` (inference.GRPCInferenceService).
docs/oip.md is the reference."""
