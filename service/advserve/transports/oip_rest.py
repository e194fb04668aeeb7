"""The Open Inference Protocol over HTTP (KServe v2 REST, with Triton's binary tensor extension),
mounted on the native FastAPI application: the same engine, compute thread, admission, auth,
limits and metrics (transport label "oip_http").

    GET  /v2                                        server metadata
    GET  /v2/health/live, /v2/health/ready          200, or 503 while draining (no auth, like /health/*)
    GET  /v2/models/{m}[/versions/1]                model metadata
    GET  /v2/models/{m}[/versions/1]/ready          200 (404 for an unknown model, 503 while draining)
    POST /v2/models/{m}[/versions/1]/infer          inference
    GET  /v2/systemsharedmemory[/region/{r}]/status  shared memory regions (Triton's extension; and
    POST /v2/systemsharedmemory/region/{r}/register  cudasharedmemory likewise: docs/shared-memory.md)
    POST /v2/systemsharedmemory[/region/{r}]/unregister

A request body is JSON, or with `Inference-Header-Content-Length: n` a JSON header of n bytes
followed by the binary inputs (those with parameters.binary_data_size) in the order of `inputs`.
Outputs are JSON `data` unless `binary_data_output` (request parameter) or an output's `binary_data`
asks for binary; a response with a binary output is framed the same way. gzip and deflate request
bodies are accepted (Content-Encoding), the decompressed size counted against the limits. Errors
are `{"error": "<field>: <message>"}` with the status of `errors.STATUS`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import mmap
import time
import zlib
from typing import Any, Callable

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from ..errors import AdvserveError, InvalidArgument, NotFound, PayloadTooLarge, Unavailable
from ..observability import REQUEST_ID_HEADER, error_body_message, request_id, server_timing
from ..oip.core import (SHM_PARAMETERS, InferInput, InferRequest, InferResponse, OipService, Prepared,
                        RequestedOutput, region_ref)
from ..oip.tensors import from_json, from_raw
from ..runtime import INLINE_LIMIT, JSON_DECODE_COST, Runtime, admitted, charge_compute, watch_disconnect
from ..shm import check_registrant
from .http_door import JSONResponse, _failure_response, oip_error_response

log = logging.getLogger("advserve.oip")
HEADER_LENGTH = "inference-header-content-length"
BINARY_CONTENT_TYPE = "application/octet-stream"
TRANSPORT = "oip_http"
REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})


# --- the wire -------------------------------------------------------------------------------------


def _header_length(value: str | None, body_length: int) -> int | None:
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or not 0 < int(value) <= body_length:
        raise InvalidArgument(f"Inference-Header-Content-Length must be an integer in [1, {body_length}] (the body "
                              f"length), got {value!r}", field="Inference-Header-Content-Length")
    return int(value)


def _object(value: Any, what: str, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object", field=where)
    return value


INFLATE_CHUNK = 1 << 20  # bytes inflated per step, each charged before it is kept


def decompress(body: bytes | memoryview, encoding: str | None, limit: int, *, max_ratio: int = 1024,
               charge: Callable[[int], None] | None = None) -> bytes | memoryview:
    """The body decoded per Content-Encoding (gzip, deflate or identity).

    Inflated INFLATE_CHUNK bytes at a time: each chunk is charged (`charge(n)`: the request's admission
    lease, which raises Overloaded or PayloadTooLarge when it cannot grow) before it is kept, and the
    inflated size may exceed neither `limit` nor `max_ratio` × the compressed size (413, field body:
    a compression bomb stops there, having cost at most that much). Every member of a multi-member gzip
    body (RFC 1952 §2.2, e.g. `cat a.gz b.gz`) is decoded; anything else after the end is a 400. The
    result is a view of one anonymous mapping (virtual until written: no final copy)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidArgument(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none",
                              field="Content-Encoding")
    size = memoryview(body).nbytes
    allowed = min(limit, max_ratio * size)
    if allowed == 0:
        raise InvalidArgument(f"the {encoding} body is empty", field="Content-Encoding")
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    out = mmap.mmap(-1, allowed)
    try:
        return memoryview(out)[:_inflate(body, encoding, wbits, out, limit, max_ratio, charge)]
    except BaseException:
        out.close()  # at once: a traceback's frames would keep the pages until the garbage collector runs
        raise


def _inflate(body: bytes | memoryview, encoding: str, wbits: int, out: mmap.mmap, limit: int, max_ratio: int,
             charge: Callable[[int], None] | None) -> int:
    """decompress's loop: inflate `body` into `out` (its length is the bytes allowed); returns the
    inflated length."""
    size, allowed = memoryview(body).nbytes, len(out)
    inflater, data, kept = zlib.decompressobj(wbits), body, 0
    try:
        while True:
            chunk = inflater.decompress(data, INFLATE_CHUNK)
            data = inflater.unconsumed_tail
            if chunk:
                if kept + len(chunk) > allowed:
                    if allowed < limit:
                        raise PayloadTooLarge(f"the {encoding} body inflates to more than {max_ratio} times its "
                                              f"{size} bytes (--max-inflate-ratio)", field="body")
                    raise PayloadTooLarge(f"the decompressed body exceeds the limit of {limit} bytes", field="body")
                if charge is not None:
                    charge(len(chunk))
                out[kept:kept + len(chunk)] = chunk
                kept += len(chunk)
            if inflater.eof:
                data = inflater.unused_data
                if not data:
                    break
                if encoding != "gzip":
                    raise InvalidArgument(f"{len(data)} bytes after the end of the deflate stream",
                                          field="Content-Encoding")
                inflater = zlib.decompressobj(wbits)  # the next gzip member
            elif not chunk and not data:
                raise InvalidArgument(f"the {encoding} body is truncated", field="Content-Encoding")
    except zlib.error as exc:
        raise InvalidArgument(f"the body is not valid {encoding} data: {exc}", field="Content-Encoding") from None
    return kept


def parse_request(body: bytes, header_length: str | None, model_name: str, version: str,
                  service: OipService, charge: Callable[[int], None] | None = None) -> InferRequest:
    """An HTTP inference body (JSON, or JSON header + binary inputs) -> an InferRequest with decoded
    inputs: binary ones are views of `body`, those in a shared memory region views of the region (or
    copies charged to `charge`: `OipService.read_region`)."""
    view = memoryview(body)
    n = _header_length(header_length, view.nbytes)
    try:
        document = orjson.loads(view[:n] if n is not None else view)
    except orjson.JSONDecodeError as exc:
        hint = "" if n is not None else " (a binary body needs the Inference-Header-Content-Length header)"
        raise InvalidArgument(f"the request is not valid JSON{hint}: {exc}", field="body") from None
    if not isinstance(document, dict):
        raise InvalidArgument("the request must be a JSON object", field="body")
    unknown = sorted(set(document) - REQUEST_KEYS)
    if unknown:
        raise InvalidArgument(f"unknown field {unknown[0]!r}; a request has id, parameters, inputs, outputs",
                              field=unknown[0])
    model = service.model(model_name, version)
    request_id_ = document.get("id", "")
    if not isinstance(request_id_, str):
        raise InvalidArgument("id must be a string", field="id")
    parameters = _object(document.get("parameters"), "parameters", "parameters")
    inputs = document.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument("inputs must be a JSON array of input tensors", field="inputs")
    offset, parsed = n if n is not None else view.nbytes, []
    for index, entry in enumerate(inputs):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidArgument(f"inputs[{index}] must be an object with a string name", field=f"inputs[{index}]")
        name = entry["name"]
        item = InferInput(name, entry.get("datatype"), entry.get("shape"))
        datatype = service.check_input(model, item)
        params = _object(entry.get("parameters"), f"inputs.{name}.parameters", f"inputs.{name}")
        extra = sorted(set(params) - {"binary_data_size", *SHM_PARAMETERS})
        if extra:
            raise InvalidArgument(f"input {name!r}: unknown parameter {extra[0]!r}", field=f"inputs.{name}")
        item.region = region_ref(params, f"inputs.{name}")
        if item.region is not None:
            if "data" in entry or "binary_data_size" in params:
                other = "data" if "data" in entry else "parameters.binary_data_size"
                raise InvalidArgument(f"input {name!r} is in shared memory region {item.region.name!r} and also has "
                                      f"{other}: give one", field=f"inputs.{name}.parameters.shared_memory_region")
            service.read_region(item, datatype, charge)
        elif "binary_data_size" in params:
            size = params["binary_data_size"]
            if "data" in entry:
                raise InvalidArgument(f"input {name!r} has both data and binary_data_size", field=f"inputs.{name}")
            if n is None:
                raise InvalidArgument(f"input {name!r} is binary (binary_data_size) but the request has no "
                                      "Inference-Header-Content-Length header", field=f"inputs.{name}")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidArgument(f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}",
                                      field=f"inputs.{name}")
            if datatype.itemsize is not None and size != math.prod(item.shape) * datatype.itemsize:
                raise InvalidArgument(f"input {name!r}: binary_data_size is {size} but shape {list(item.shape)} of "
                                      f"{datatype.name} needs {math.prod(item.shape) * datatype.itemsize} bytes",
                                      field=f"inputs.{name}")
            if offset + size > view.nbytes:
                raise InvalidArgument(f"input {name!r}: its {size} bytes run past the end of the body "
                                      f"({view.nbytes - offset} left)", field=f"inputs.{name}")
            item.data = from_raw(name, datatype, item.shape, view[offset:offset + size])
            offset += size
        elif "data" in entry:
            item.data = from_json(name, datatype, item.shape, entry["data"])
        else:
            raise InvalidArgument(f"input {name!r} has neither data nor parameters.binary_data_size",
                                  field=f"inputs.{name}")
        parsed.append(item)
    if offset != view.nbytes:
        raise InvalidArgument(f"{view.nbytes - offset} bytes after the last binary input: the binary_data_size values "
                              "must add up to the body length minus Inference-Header-Content-Length", field="body")
    return InferRequest(model_name, version, request_id_, parameters, parsed, _outputs(document.get("outputs")))


def _outputs(value: Any) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidArgument("outputs must be a JSON array", field="outputs")
    outputs = []
    for index, entry in enumerate(value):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidArgument(f"outputs[{index}] must be an object with a string name", field=f"outputs[{index}]")
        name = entry["name"]
        params = _object(entry.get("parameters"), f"outputs.{name}.parameters", f"outputs.{name}")
        extra = sorted(set(params) - {"binary_data", *SHM_PARAMETERS})
        if extra:
            raise InvalidArgument(f"output {name!r}: parameter {extra[0]!r} is not supported (binary_data and the "
                                  "shared_memory_* ones are)", field=f"outputs.{name}")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidArgument(f"output {name!r}: binary_data must be true or false", field=f"outputs.{name}")
        region = region_ref(params, f"outputs.{name}")
        if region is not None and binary:
            raise InvalidArgument(f"output {name!r} goes to shared memory region {region.name!r}: binary_data must "
                                  "not be true", field=f"outputs.{name}.parameters.binary_data")
        outputs.append(RequestedOutput(name, binary, region))
    return outputs


def encode_response(response: InferResponse, prepared: Prepared, headers: dict[str, str]) -> Response:
    """JSON, or when an output is binary the JSON header + the binary outputs in order."""
    binary_default = prepared.request.parameters.get("binary_data_output") is True
    outputs, buffers = [], []
    for out, wanted in zip(response.outputs, prepared.outputs):
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if out.array is None:  # written into a shared memory region
            entry["parameters"] = out.parameters
        elif wanted.binary if wanted.binary is not None else binary_default:
            data = memoryview(out.array.reshape(-1)).cast("B")
            entry["parameters"] = {"binary_data_size": data.nbytes}
            buffers.append(data)
        else:
            entry["data"] = out.array.reshape(-1)
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model, "model_version": response.version}
    if response.id:
        document["id"] = response.id
    document.update(parameters=response.parameters, outputs=outputs)
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not buffers:
        return Response(header, media_type="application/json", headers=headers)
    headers["Inference-Header-Content-Length"] = str(len(header))
    return Response(b"".join([header, *buffers]), media_type=BINARY_CONTENT_TYPE, headers=headers)


# --- the routes -------------------------------------------------------------------------------------

_ERRORS = {code: {"description": "an error", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}}}
    for code in (400, 401, 404, 408, 413, 503, 504)}
_OBJECT = {"application/json": {"schema": {"type": "object"}}}
_TENSOR = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
    "name": {"type": "string"}, "datatype": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
    "parameters": {"type": "object"}, "data": {"description": "elements, flat or nested row-major"}}}
_INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": _TENSOR},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "parameters": {"type": "object"}}}}}}},
    BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary", "description":
                          "JSON header (Inference-Header-Content-Length bytes) + binary inputs (docs/oip.md)"}}}}}
_INFER_200 = {200: {"description": "the outputs", "content": {
    "application/json": {"schema": {"type": "object", "required": ["model_name", "outputs"], "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
        "parameters": {"type": "object"}, "outputs": {"type": "array", "items": _TENSOR}}}},
    BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}}}}


def add_routes(app: FastAPI, runtime: Runtime) -> None:
    """Mount the /v2 routes on `app` over `runtime`."""
    service = OipService(runtime.engine, runtime.scheduler, runtime.regions)
    settings = runtime.settings
    tags = ["oip"]

    @app.get("/v2", tags=tags, responses={200: {"content": _OBJECT}, **_ERRORS}, response_class=JSONResponse)
    async def server_metadata():
        """Server metadata (Open Inference Protocol): name, version, extensions."""
        return JSONResponse(service.server_metadata())

    @app.get("/v2/health/live", tags=tags, responses={200: {"content": _OBJECT}}, response_class=JSONResponse)
    async def server_live():
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready", tags=tags, responses={200: {"content": _OBJECT}, 503: _ERRORS[503]},
             response_class=JSONResponse)
    async def server_ready():
        if not runtime.ready:
            return oip_error_response(Unavailable("the server is shutting down"))
        return JSONResponse({"ready": True})

    def metadata(model_name: str, version: str) -> Response:
        try:
            return JSONResponse(service.model(model_name, version).metadata())
        except AdvserveError as exc:
            return oip_error_response(exc)

    def ready(model_name: str, version: str) -> Response:
        try:
            service.model(model_name, version)
            if not runtime.ready:
                raise Unavailable("the server is shutting down")
        except AdvserveError as exc:
            return oip_error_response(exc)
        return JSONResponse({"name": model_name, "ready": True})

    documented = {"tags": tags, "responses": {200: {"content": _OBJECT}, **_ERRORS}, "response_class": JSONResponse}
    versioned = {**documented, "include_in_schema": False}  # the same operations with /versions/1

    @app.get("/v2/models/{model_name}", summary="Model metadata", **documented)
    async def model_metadata(model_name: str):
        return metadata(model_name, "")

    @app.get("/v2/models/{model_name}/versions/{version}", **versioned)
    async def model_version_metadata(model_name: str, version: str):
        return metadata(model_name, version)

    @app.get("/v2/models/{model_name}/ready", summary="Model readiness", **documented)
    async def model_ready(model_name: str):
        return ready(model_name, "")

    @app.get("/v2/models/{model_name}/versions/{version}/ready", **versioned)
    async def model_version_ready(model_name: str, version: str):
        return ready(model_name, version)

    infer_doc = {"tags": tags, "response_class": Response, "openapi_extra": _INFER_BODY,
                 "responses": {**_INFER_200, **_ERRORS}}

    @app.post("/v2/models/{model_name}/infer", summary="Inference", **infer_doc)
    async def infer(request: Request, model_name: str):
        return await serve_infer(request, model_name, "")

    @app.post("/v2/models/{model_name}/versions/{version}/infer", include_in_schema=False, **infer_doc)
    async def infer_version(request: Request, model_name: str, version: str):
        return await serve_infer(request, model_name, version)

    add_shared_memory_routes(app, runtime, tags)

    @app.api_route("/v2/{path:path}", methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False)
    async def unknown(path: str):
        return oip_error_response(NotFound(f"advserve does not serve /v2/{path}: the Open Inference Protocol's "
                                           "health, metadata, inference and shared memory endpoints only (docs/oip.md)", field="path"))

    async def serve_infer(request: Request, model_name: str, version: str) -> Response:

        arrived = time.perf_counter()
        rid = request_id(request.headers.get(REQUEST_ID_HEADER))
        phases: dict[str, float] = {}
        body, status, error, prepared = b"", "200", None, None
        model = service.models.get(model_name)
        try:
            with runtime.serving():
                body, deadline, lease = await admitted(request, runtime)  # read by AdmissionControl
                started = time.perf_counter()
                headers = request.headers
                binary = HEADER_LENGTH in headers
                limit = settings.max_body_bytes if binary else settings.max_json_bytes

                def decode():
                    raw = decompress(body, headers.get("content-encoding"), limit, max_ratio=settings.max_inflate_ratio,
                                     charge=lease.grow if lease is not None else None)
                    if raw is not body and not binary and lease is not None:  # parsing the inflated JSON
                        lease.grow((JSON_DECODE_COST - 1) * len(raw))
                    request = parse_request(raw, headers.get(HEADER_LENGTH), model_name, version, service,
                                            lease.grow if lease is not None else None)
                    charge_compute(lease, request)  # its shapes known: charged before it is validated
                    return service.prepare(request)

                inflating = headers.get("content-encoding", "identity").strip().lower() != "identity"
                prepared = await deadline.off_loop(decode, max(len(body), INLINE_LIMIT if inflating else 0), lease)
                phases["decode"] = time.perf_counter() - started
                deadline = deadline.within(prepared.timeout_s)
                with service.checks_first(prepared):
                    charge_compute(lease, prepared)  # as validated, before it is queued (503/413 at once)
                result, timing = await deadline.wait(service.compute(prepared), abandon=watch_disconnect(request))
                phases["queue"], phases["compute"] = timing.queue, timing.compute
                encode_started = time.perf_counter()

                def encode():
                    return encode_response(service.respond(prepared, result), prepared, {})

                output_size = sum(t.numel() * t.element_size() for t in _result_tensors(result))
                response = await deadline.off_loop(encode, output_size, lease)
                phases["encode"] = time.perf_counter() - encode_started
                response.headers["Server-Timing"] = server_timing(**phases)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes an answer (or none, if the caller left)
            if isinstance(exc, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                raise
            response, status, error = _failure_response(exc, f"OIP infer of {model_name!r}", rid, oip_error_response)
        response.headers[REQUEST_ID_HEADER] = rid
        runtime.metrics.observe(
            transport=TRANSPORT, endpoint=model.kind if model else "infer",
            estimator=model.name if model and model.kind == "advantages" else None, status=status,
            bytes_in=len(body), bytes_out=len(response.body), phases=phases,
            batch=prepared.batch if prepared else None, request_id=rid, started=arrived, error=error,
            message=error_body_message(response.body) if error else None)
        return response


# --- shared memory (Triton's extensions: docs/shared-memory.md) ----------------------------------------

_SHM_KINDS = {"systemsharedmemory": "system", "cudasharedmemory": "cuda"}
_REGISTER_SCHEMAS = {
    "system": {"type": "object", "required": ["key", "byte_size"], "properties": {
        "key": {"type": "string", "description": "the POSIX shared memory object, '/name'"},
        "offset": {"type": "integer", "minimum": 0}, "byte_size": {"type": "integer", "minimum": 1}}},
    "cuda": {"type": "object", "required": ["raw_handle", "device_id", "byte_size"], "properties": {
        "raw_handle": {"type": "object", "required": ["b64"], "properties": {"b64": {
            "type": "string", "description": "base64 of the cudaIpcMemHandle_t (64 bytes)"}}},
        "device_id": {"type": "integer", "minimum": 0}, "byte_size": {"type": "integer", "minimum": 1}}}}
_REGISTER_KEYS = {"system": ("key", "offset", "byte_size"), "cuda": ("raw_handle", "device_id", "byte_size")}


def register_body(kind: str, body: bytes | memoryview) -> dict[str, Any]:
    """The arguments of `Regions.register_<kind>` from a register request's JSON body: system
    {"key", "offset", "byte_size"}, cuda {"raw_handle": {"b64": ...}, "device_id", "byte_size"}."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"the request is not valid JSON: {exc}", field="body") from None
    if not isinstance(document, dict):
        raise InvalidArgument("the request must be a JSON object", field="body")
    keys = _REGISTER_KEYS[kind]
    unknown = sorted(set(document) - set(keys))
    if unknown:
        raise InvalidArgument(f"unknown field {unknown[0]!r}; a {kind} register request has {', '.join(keys)}",
                              field=unknown[0])
    missing = [key for key in keys if key not in document and not (kind == "system" and key == "offset")]
    if missing:
        raise InvalidArgument(f"{missing[0]} is required", field=missing[0])
    arguments = {key: document.get(key, 0) for key in keys}
    if kind == "cuda":
        handle = document["raw_handle"]
        if not isinstance(handle, dict) or not isinstance(handle.get("b64"), str):
            raise InvalidArgument('raw_handle must be {"b64": "<base64 of the cudaIpcMemHandle_t>"}', field="raw_handle")
        try:
            arguments["raw_handle"] = base64.b64decode(handle["b64"], validate=True)
        except ValueError:
            raise InvalidArgument("raw_handle.b64 is not valid base64", field="raw_handle") from None
    return arguments


def add_shared_memory_routes(app: FastAPI, runtime: Runtime, tags: list[str]) -> None:
    """/v2/{systemsharedmemory,cudasharedmemory}[/region/{name}]/{status,register,unregister}: Triton's
    shared memory endpoints over `runtime.regions` (POSTs pass the door like every POST /v2)."""
    regions = runtime.regions
    documented = {"tags": tags, "responses": {200: {"content": _OBJECT}, **_ERRORS}, "response_class": JSONResponse}

    async def answer(fn: Callable[[], Any]) -> Response:
        try:
            return JSONResponse(await asyncio.to_thread(fn))
        except AdvserveError as exc:
            return oip_error_response(exc)

    def routes(extension: str, kind: str) -> None:
        base, what = f"/v2/{extension}", "System" if kind == "system" else "CUDA"
        fields = ("name", "key", "offset", "byte_size") if kind == "system" else ("name", "device_id", "byte_size")
        listed = {**documented, "responses": {**_ERRORS, 200: {"content": {"application/json": {"schema": {
            "type": "array", "items": {"type": "object", "required": list(fields), "properties": {
                field: {"type": "string" if field in ("name", "key") else "integer"} for field in fields}}}}}}}}

        @app.get(f"{base}/status", summary=f"{what} shared memory: every region", **listed)
        async def status_all():
            return await answer(lambda: regions.status(kind))

        @app.get(f"{base}/region/{{name}}/status", summary=f"{what} shared memory: one region", **listed)
        async def status_one(name: str):
            return await answer(lambda: regions.status(kind, name))

        @app.post(f"{base}/region/{{name}}/register", summary=f"{what} shared memory: register a region",
                  openapi_extra={"requestBody": {"required": True, "content": {
                      "application/json": {"schema": _REGISTER_SCHEMAS[kind]}}}}, **documented)
        async def register(request: Request, name: str):
            try:
                check_registrant(runtime.settings.shared_memory, request.client.host if request.client else None)
                body, _, _ = await admitted(request, runtime)
                arguments = register_body(kind, body)
            except AdvserveError as exc:
                return oip_error_response(exc)
            register_fn = regions.register_system if kind == "system" else regions.register_cuda
            return await answer(lambda: register_fn(name, **arguments) or {})

        @app.post(f"{base}/region/{{name}}/unregister", summary=f"{what} shared memory: unregister a region",
                  **documented)
        async def unregister_one(name: str):
            return await answer(lambda: regions.unregister(kind, name) or {})

        @app.post(f"{base}/unregister", summary=f"{what} shared memory: unregister every region", **documented)
        async def unregister_all():
            return await answer(lambda: regions.unregister(kind) or {})

    for extension, kind in _SHM_KINDS.items():
        routes(extension, kind)


def _result_tensors(result: Any) -> list:
    names = ("advantages", "returns", "grad_logprobs", "grad_values", "grad_entropy", "grad_token_losses", "kl_values")
    return [t for t in (getattr(result, name, None) for name in names) if t is not None]


__all__ = ["add_routes"]
