"""The Open Inference Protocol (KServe v2 / Triton) as advserve speaks it, independent of any transport:
`core` (models, parameters, requests and responses) and `tensors` (datatypes and their wire forms).
Its transports are `advserve.transports.oip_rest` (HTTP /v2, with Triton's binary extension) and
`advserve.transports.oip_grpc` (inference.GRPCInferenceService). docs/oip.md is the reference."""
