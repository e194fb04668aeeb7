"""HTTP transport (httpx): binary-framed tensors (docs/binary-framing.md) or JSON.

A transport turns (REST document, wire tensors) into (response document, result tensors) and raises
the typed errors of `errors`; retries and array conversions are the client's business."""

from __future__ import annotations

import math
import ssl
from typing import Any, AsyncIterator, Iterator, Mapping, cast

import httpx
import numpy as np

from . import framing
from .errors import (AdvserveError, DeadlineExceeded, InternalError, InvalidArgument, Unavailable, error_from,
                     parse_retry_after, region_error)
from .framing import RawTensor, RegionRef

JSON = "application/json"


def base_url(address: str, tls: bool = False) -> str:
    """"host:port" -> "http://host:port" ("https://" with TLS); an address with a scheme is kept."""
    address = address.rstrip("/")
    return address if "://" in address else f"{'https' if tls else 'http'}://{address}"


def ssl_context(tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> ssl.SSLContext:
    """Server verification against `tls_ca` (default: the system's CAs) and, for mTLS, the client
    certificate `tls_cert` with its key `tls_key` (None: the key is in the certificate file)."""
    context = ssl.create_default_context(cafile=tls_ca)
    if tls_cert:
        context.load_cert_chain(tls_cert, tls_key)
    return context


def _encode(document: Mapping[str, Any], tensors: Mapping[str, RawTensor | RegionRef | list], binary: bool,
            ) -> tuple[dict[str, str], list[bytes | memoryview]]:
    """(headers, body chunks) of a request."""
    if binary:
        n, chunks = framing.encode(document, tensors)
        size = sum(memoryview(chunk).nbytes for chunk in chunks)
        return ({"content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(n), "content-length": str(size),
                 "accept": framing.CONTENT_TYPE}, chunks)
    _check_finite(document)
    inline = {name: _json_tensor(t.to_numpy()) if isinstance(t, RawTensor) else
              t.descriptor() if isinstance(t, RegionRef) else t for name, t in tensors.items()}
    body = framing.dumps({**document, "tensors": inline})
    return {"content-type": JSON, "accept": JSON}, [body]


def _json_tensor(array: np.ndarray) -> Any:
    """A tensor as JSON: NaN and ±Inf (JSON has none) as null, which the server reads as NaN (ignored at
    masked positions, refused at unmasked ones, as over every other transport)."""
    if array.dtype.kind != "f" or np.isfinite(array).all():
        return array
    values = array.astype(object)
    values[~np.isfinite(array)] = None
    return values.tolist()


def _check_finite(document: Mapping[str, Any], prefix: str = "") -> None:
    """JSON has no NaN or Inf: a non-finite parameter (`params.gamma`, `policy_loss.clip_high`,
    `num_tokens`) is refused here as the server refuses it over the other transports."""
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _check_finite(value, f"{name}.")
        elif isinstance(value, (float, np.floating)) and not math.isfinite(value):
            raise InvalidArgument(f"{name} must be finite, got {float(value)}", field=name)


def _error(response: httpx.Response) -> AdvserveError:
    """The typed error of a non-200 response (the body {"error": {"code", "message", "field"}})."""
    code = field = None
    message = ""
    try:
        detail = response.json()["error"]
        if isinstance(detail, str):  # the Open Inference Protocol's {"error": "message"} (/v2)
            detail = {"message": detail}
        code, message, field = detail.get("code"), detail.get("message") or "", detail.get("field")
    except Exception:  # noqa: BLE001 - not our error body (a proxy's page, say)
        message = response.text[:500]
    return error_from(code, message or f"HTTP {response.status_code} {response.reason_phrase}", field=field,
                      status=response.status_code, retry_after=parse_retry_after(response.headers.get("retry-after")))


def _decode(response: httpx.Response, dtype: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(document, tensors) of a 200 response, binary or JSON; tensors as RawTensor, numpy arrays, or
    RegionRef (outputs the server wrote into a shared-memory region)."""
    if response.status_code != 200:
        raise _error(response)
    header_length = response.headers.get(framing.HEADER_LENGTH)
    result_dtype = np.float64 if dtype == "float64" else np.float32
    try:
        if header_length is not None:
            return framing.decode(response.content, header_length)
        document = response.json()
        tensors = {name: framing.region_ref(name, value) if isinstance(value, dict) else
                   np.asarray(value, dtype=result_dtype) for name, value in (document.pop("tensors", None) or {}).items()}
    except (framing.FramingError, ValueError) as exc:
        raise InternalError(f"malformed response from the server: {exc}", status=response.status_code) from None
    return document, tensors


def _transport_error(exc: httpx.HTTPError, timeout: float | None) -> AdvserveError:
    if isinstance(exc, httpx.TimeoutException):
        return DeadlineExceeded(f"no answer within the client's timeout of {timeout} s ({type(exc).__name__})")
    return Unavailable(f"cannot reach the server: {type(exc).__name__}: {exc}")


class HttpTransport:
    """Synchronous HTTP transport over one pooled httpx.Client."""

    def __init__(self, address: str, *, timeout: float | None, binary: bool, headers: Mapping[str, str] | None,
                 tls: ssl.SSLContext | None = None):
        self.url = base_url(address, tls is not None)
        self.timeout = timeout
        self.binary = binary
        self._client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout), headers=dict(headers or {}),
                                    verify=tls if tls is not None else True)

    def compute(self, path: str, document: Mapping[str, Any], tensors: Mapping[str, RawTensor | list],
                ) -> tuple[dict[str, Any], dict[str, Any]]:
        headers, chunks = _encode(document, tensors, self.binary)
        try:
            # the buffers go out as they are (memoryviews of the arrays), not joined into one copy
            response = self._client.post(path, content=cast(Iterator[bytes], iter(chunks)), headers=headers)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.timeout) from None
        return _decode(response, document.get("dtype"))

    def catalog(self) -> dict[str, Any]:
        try:
            response = self._client.get("/v1/estimators", headers={"accept": JSON})
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.timeout) from None
        if response.status_code != 200:
            raise _error(response)
        return response.json()

    def register_region(self, name: str, key: str, byte_size: int) -> None:
        """Register the system shared-memory region `key` (all of its `byte_size` bytes) as `name`."""
        self._region_call(f"/v2/systemsharedmemory/region/{name}/register",
                          {"key": key, "offset": 0, "byte_size": byte_size}, f"registering {name!r} ({key})")

    def unregister_region(self, name: str) -> None:
        self._region_call(f"/v2/systemsharedmemory/region/{name}/unregister", None, f"unregistering {name!r}")

    def _region_call(self, path: str, body: dict[str, Any] | None, what: str) -> None:
        try:
            response = self._client.post(path, json=body, headers={"accept": JSON})
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.timeout) from None
        if response.status_code != 200:
            raise region_error(_error(response), what)

    def close(self) -> None:
        self._client.close()


class AsyncHttpTransport:
    """Asynchronous HTTP transport over one pooled httpx.AsyncClient."""

    def __init__(self, address: str, *, timeout: float | None, binary: bool, headers: Mapping[str, str] | None,
                 tls: ssl.SSLContext | None = None):
        self.url = base_url(address, tls is not None)
        self.timeout = timeout
        self.binary = binary
        self._client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(timeout),
                                         headers=dict(headers or {}), verify=tls if tls is not None else True)

    async def compute(self, path: str, document: Mapping[str, Any], tensors: Mapping[str, RawTensor | list],
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
        headers, chunks = _encode(document, tensors, self.binary)

        async def body() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield cast(bytes, chunk)  # a memoryview of the array: sent as is, not copied

        try:
            response = await self._client.post(path, content=body(), headers=headers)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.timeout) from None
        return _decode(response, document.get("dtype"))

    async def catalog(self) -> dict[str, Any]:
        try:
            response = await self._client.get("/v1/estimators", headers={"accept": JSON})
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.timeout) from None
        if response.status_code != 200:
            raise _error(response)
        return response.json()

    async def close(self) -> None:
        await self._client.aclose()
