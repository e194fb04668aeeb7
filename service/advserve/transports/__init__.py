"""The transports, side by side; each only converts between its wire and the domain model and delegates
to the runtime (engine, scheduler, admission). `advserve.server` assembles them.

    http_door     HTTP admission, auth, body limits, deadlines, connection guard, error shapes
    rest          the native API over HTTP (/v1, JSON or binary framing)
    oip_rest      the Open Inference Protocol over HTTP (/v2)
    grpc_door     gRPC auth, admission before the message is read, deadlines, error status
    native_grpc   the native API over gRPC (advserve.v1.Advserve)
    oip_grpc      the Open Inference Protocol over gRPC (inference.GRPCInferenceService)
"""
