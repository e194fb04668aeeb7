"""`Client` and `AsyncClient`: advserve over HTTP (binary framing or JSON) or gRPC, with the method
names and arguments of the in-process API (`advserve.compute_advantages`, `advserve.compute_losses`, `advserve.analyze`,
`advserve.catalog` as `list_estimators`).

    from advserve_client import Client

    with Client("127.0.0.1:8000") as client:                      # or Client("127.0.0.1:8001", transport="grpc")
        adv = client.compute_advantages("grpo", rewards=r, response_mask=mask, group_ids=uids)
        out = client.compute_losses(preset="verl", logprobs=lp, old_logprobs=old,
                                    advantages=adv.advantages, response_mask=mask)

Arrays: numpy arrays, nested lists, or torch tensors (torch is imported only when one is passed);
results are numpy arrays, or torch tensors on the first torch input's device when any input was one.
Errors: the typed errors of `advserve_client.errors`, the same over both transports; `Unavailable`
and `Overloaded` are retried (see `RetryPolicy`), nothing else is.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from . import _grpc, _http, _retry
from ._arrays import Outputs, wire_tensors
from ._shm import RegionPool, layout
from ._grpc import ADVANTAGES, ANALYSIS, LOSSES, AsyncGrpcTransport, GrpcTransport
from ._http import AsyncHttpTransport, HttpTransport
from ._retry import RetryPolicy
from .errors import InvalidArgument, Unavailable

Transport = Literal["http", "grpc"]
TermSpec = Mapping[str, Any] | bool | None

__all__ = ["Client", "AsyncClient", "AdvantageResult", "LossResult", "RetryPolicy"]


@dataclass
class AdvantageResult:
    """advantages, returns: [B, T] ([N] packed), 0 at masked positions, in the compute dtype.
    stats: what a trainer logs (sequences, tokens, advantage and reward moments, and for group
    estimators `groups`: count, sizes, zero_variance_fraction, ids, reward_mean); the same keys over
    both transports, but over gRPC the group `ids` come back as strings. params: every parameter as
    resolved (preset defaults plus overrides)."""

    estimator: str
    preset: str
    advantages: Any
    returns: Any
    stats: dict[str, Any]
    params: dict[str, Any]

    def __repr__(self) -> str:
        return f"AdvantageResult(estimator={self.estimator!r}, preset={self.preset!r}, params={self.params!r})"


@dataclass
class LossResult:
    """loss = policy + kl.coef·kl + value.coef·value − entropy.coef·entropy + token_loss.coef·token_loss;
    components: the terms before their coefficients (None when off); metrics: clip fractions, approx KL,
    ratio statistics; grad_logprobs / grad_values / grad_entropy / grad_token_losses: ∂loss/∂input [B, T]
    ([N] packed), None when the term is off; params: the resolved parameters of each term that was on;
    kl_values: the KL term's per-token estimate [B, T] when return_kl_values was true, else None."""

    preset: str
    loss: float
    components: dict[str, float | None]
    metrics: dict[str, float]
    grad_logprobs: Any
    grad_values: Any
    grad_entropy: Any
    params: dict[str, Any] = field(default_factory=dict)
    grad_token_losses: Any = None
    kl_values: Any = None

    def __repr__(self) -> str:
        return f"LossResult(preset={self.preset!r}, loss={self.loss!r}, components={self.components!r})"


def _document(**entries: Any) -> dict[str, Any]:
    return {key: value for key, value in entries.items() if value is not None}


_ID_KINDS = ((bool, None), (np.bool_, None), (int, "integers"), (np.integer, "integers"), (str, "strings"),
             (bytes, "strings"), (float, None), (np.floating, None), (type(None), None))


def _id_kind(kind: type) -> str | None:
    return next((name for base, name in _ID_KINDS if issubclass(kind, base)), None)


def _check_group_ids(tensors: Mapping[str, Any]) -> None:
    """Group ids given as Python objects (a list, or an object array) must be all integers or all strings,
    as the server requires: the wire has one kind per tensor, and numpy would quietly turn [1, "1"] or
    [1, None] into strings. A set of the ids' types, not a loop per row."""
    ids = tensors.get("group_ids")
    if isinstance(ids, np.ndarray) and ids.dtype == object:
        ids = ids.reshape(-1).tolist()
    if not isinstance(ids, (list, tuple)):
        return
    types = set(map(type, ids))
    if types & {list, tuple}:
        return  # nested: the server names the shape
    kinds = {_id_kind(t) for t in types}
    if None in kinds:
        bad = next(t for t in types if _id_kind(t) is None)
        what = {type(None): "null", float: "floats", bool: "booleans"}.get(bad, bad.__name__)
        raise InvalidArgument(f"group_ids must be integers or strings, got {what}", field="tensors.group_ids")
    if len(kinds) > 1:
        raise InvalidArgument('group_ids mix integers and strings (is 1 the group of "1"?): give every id as one '
                              "kind", field="tensors.group_ids")


def _names(estimators: Sequence[str] | None) -> Any:
    """A list of estimator names as the wire wants it (a tuple becomes a list; anything else is left
    for the server to reject, naming the field)."""
    return list(estimators) if isinstance(estimators, tuple) else estimators


def _advantages_result(document: Mapping[str, Any], raw: Mapping[str, Any], outputs: Outputs,
                       estimator: str, preset: str | None) -> AdvantageResult:
    return AdvantageResult(estimator=document.get("estimator") or estimator,
                           preset=document.get("preset") or preset or "paper",
                           advantages=outputs(raw.get("advantages")), returns=outputs(raw.get("returns")),
                           stats=document.get("stats") or {}, params=document.get("params") or {})


def _losses_result(document: Mapping[str, Any], raw: Mapping[str, Any], outputs: Outputs,
                   preset: str | None) -> LossResult:
    return LossResult(preset=document.get("preset") or preset or "paper", loss=float(document["loss"]),
                      components=dict(document.get("components") or {}), metrics=dict(document.get("metrics") or {}),
                      grad_logprobs=outputs(raw.get("grad_logprobs")), grad_values=outputs(raw.get("grad_values")),
                      grad_entropy=outputs(raw.get("grad_entropy")), params=dict(document.get("params") or {}),
                      grad_token_losses=outputs(raw.get("grad_token_losses")), kl_values=outputs(raw.get("kl_values")))


def _addresses(address: str | Sequence[str]) -> list[str]:
    """The server addresses of a client: one, several comma-separated in one string, or a list."""
    items = address.split(",") if isinstance(address, str) else list(address)
    if not items or not all(isinstance(a, str) and a.strip() for a in items):
        raise ValueError(f"address must be 'host:port', several comma-separated, or a list of them; got {address!r}")
    return [a.strip() for a in items]


class _Base:
    _asynchronous = False  # AsyncClient: True

    def __init__(self, address: str | Sequence[str] = "127.0.0.1:8000", *, transport: Transport = "http",
                 timeout: float | None = 300.0,
                 max_retries: int = 2, binary: bool = True, headers: Mapping[str, str] | None = None,
                 max_message_bytes: int = 1 << 30, tls: bool = False, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, shared_memory: bool = False):
        if transport not in ("http", "grpc"):
            raise ValueError(f"transport must be 'http' or 'grpc', got {transport!r}")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.addresses = _addresses(address)
        if shared_memory and len(self.addresses) > 1:
            raise ValueError("shared_memory=True needs one address: a region is registered with one server")
        self.address = ",".join(self.addresses)
        self.transport = transport
        self.timeout = timeout
        self.binary = binary
        self.headers = dict(headers or {})
        self.max_message_bytes = max_message_bytes
        self.tls = bool(tls or tls_ca or tls_cert or any(a.startswith(("https://", "grpcs://")) for a in self.addresses))
        self._tls_files = (tls_ca, tls_cert, tls_key)
        self.retry = RetryPolicy(max_retries=max_retries)
        self._transports = [self._make_transport(self._asynchronous, a) for a in self.addresses]
        self._transport = self._transports[0]
        self._balancer = _retry.Balancer(len(self._transports))
        self.shared_memory = shared_memory
        self._regions: RegionPool | None = None
        if shared_memory:  # regions are registered over a synchronous transport (AsyncClient: from a thread)
            self._registrar = self._make_transport(False, self.address) if self._asynchronous else self._transport
            self._regions = RegionPool(self._registrar.register_region, self._registrar.unregister_region)

    def _make_transport(self, asynchronous: bool, address: str) -> Any:
        if self.transport == "http":
            context = _http.ssl_context(*self._tls_files) if self.tls else None
            http = AsyncHttpTransport if asynchronous else HttpTransport
            return http(address, timeout=self.timeout, binary=self.binary, headers=self.headers, tls=context)
        credentials = _grpc.credentials(*self._tls_files) if self.tls else None
        rpc = AsyncGrpcTransport if asynchronous else GrpcTransport
        return rpc(address, timeout=self.timeout, headers=self.headers, max_message_bytes=self.max_message_bytes,
                   tls=credentials)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r}, transport={self.transport!r})"


class Client(_Base):
    """A synchronous advserve client (thread-safe: one connection pool or channel, shared).

    address: "host:port" of the REST port (transport="http"; "http://..." or "https://..." URLs work
    too) or of the gRPC port (transport="grpc"); or several servers, as a list or comma-separated: each
    request goes to the next in turn (round robin), and one that answers `Unavailable` (down, draining,
    overloaded) is skipped for 5 s while the request goes to the next at once (`_retry.Balancer`). A
    gRPC target that resolves to several servers itself ("dns:///name:port", a Kubernetes headless
    Service) is balanced per call by gRPC's round_robin policy. timeout: seconds; over HTTP each connect, write and
    read must finish within it, over gRPC it is the call's deadline; None waits forever. max_retries:
    retries of `Unavailable` / `Overloaded` errors. binary: HTTP only, binary-framed tensors (default)
    or JSON (False). headers: extra HTTP headers or gRPC metadata (e.g. {"authorization": "Bearer ..."}).
    max_message_bytes: gRPC only, the largest message sent or received. tls: connect over TLS (implied by
    an "https://" or "grpcs://" address or any tls_* file); tls_ca: PEM file of the CA that signed the
    server's certificate (default: the system's / gRPC's roots); tls_cert, tls_key: PEM files of the
    client certificate and its key for mTLS (tls_key None: the key is in tls_cert's file).
    shared_memory: for a client on the server's host: tensors travel through system shared-memory
    regions this client creates and registers with the server (unique names, grown when a batch needs
    more, unregistered and unlinked by close()) instead of in the request and response; results are
    the same numpy arrays (copies out of the region). A server on another host cannot open the region:
    the registration's refusal is raised on the first call (AsyncClient: the same).
    """

    _transport: HttpTransport | GrpcTransport

    def _with_retries(self, method: str, *args: Any) -> Any:
        """transport.`method`(*args) on the addresses in turn (`_retry.Balancer`): an `Unavailable` one is
        skipped for the next at once; when every address failed, the retry policy's backoff, then
        another round."""
        attempt = 0
        while True:
            for index in self._balancer.order():
                try:
                    result = getattr(self._transports[index], method)(*args)
                except Unavailable as error:
                    self._balancer.down(index)
                    failure = error
                    continue
                self._balancer.up(index)
                return result
            if not self.retry.should_retry(failure, attempt):
                raise failure
            _retry.sleep(self.retry.delay(failure, attempt))
            attempt += 1

    def _compute(self, path: str, document: Mapping[str, Any], tensors: Mapping[str, Any],
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One call with retries: the tensors in the body, or (shared_memory) through one of the client's
        regions, held for the call and its results copied out before it is released."""
        wire = wire_tensors(tensors)
        if self._regions is None:
            return self._with_retries("compute", path, document, wire)
        region = self._regions.acquire(layout(path, document, wire)[2])
        try:
            placed_document, placed = region.place(path, document, wire)
            answer, raw = self._with_retries("compute", path, placed_document, placed)
            return answer, region.results(raw)
        finally:
            self._regions.release(region)

    def compute_advantages(self, estimator: str, *, preset: str | None = None, params: Mapping[str, Any] | None = None,
                           dtype: str | None = None, layout: str | None = None, **tensors: Any) -> AdvantageResult:
        """Token advantages and returns of `estimator` (see `list_estimators()` and docs/semantics.md).

        tensors: rewards [B] or token_rewards [B, T], response_mask [B, T], and what the estimator
        needs: group_ids [B] (ints or strings), values [B, T], greedy_rewards [B], old_logprobs and
        ref_logprobs [B, T] (when kl_coef > 0). layout="packed": token tensors flat [N] with
        cu_seqlens [B + 1]. Returns an `AdvantageResult` (.advantages, .returns, .stats, .params).
        """
        _check_group_ids(tensors)
        document = _document(estimator=estimator, preset=preset, params=params, dtype=dtype, layout=layout)
        outputs = Outputs(tensors)
        answer, raw = self._compute(ADVANTAGES, document, tensors)
        return _advantages_result(answer, raw, outputs, estimator, preset)

    def compute_losses(self, *, preset: str | None = None, policy_loss: TermSpec = None, kl_loss: TermSpec = None,
                       value_loss: TermSpec = None, entropy_bonus: TermSpec = None,
                       rollout_correction: TermSpec = None, token_loss: TermSpec = None,
                       num_tokens: float | None = None, num_sequences: float | None = None,
                       dp_size: int | None = None, return_kl_values: bool | None = None, dtype: str | None = None,
                       layout: str | None = None, **tensors: Any) -> LossResult:
        """The loss, its components and metrics, and its gradients with respect to the inputs.

        policy_loss: None for the preset's defaults, a dict of overrides, or False for no policy term.
        kl_loss, value_loss, entropy_bonus, rollout_correction, token_loss: off unless given (a dict,
        {} = defaults). num_tokens, num_sequences: global normalizers when this call is one micro-batch
        or shard (each only with an aggregation that reads it); dp_size: verl's data-parallel size;
        return_kl_values: also return the KL term's per-token estimate.
        tensors: logprobs, old_logprobs, advantages, response_mask [B, T]; ref_logprobs (kl_loss);
        values, old_values, returns (value_loss); entropy (entropy_bonus); token_losses (token_loss);
        rollout_logprobs (rollout_correction) or rollout_is_weights (precomputed weights >= 0).
        Returns a `LossResult`; feed `.grad_logprobs` to `logp.backward(...)`.
        """
        document = _document(preset=preset, policy_loss=policy_loss, kl_loss=kl_loss, value_loss=value_loss,
                             entropy_bonus=entropy_bonus, rollout_correction=rollout_correction,
                             token_loss=token_loss, num_tokens=num_tokens, num_sequences=num_sequences,
                             dp_size=dp_size, return_kl_values=return_kl_values, dtype=dtype, layout=layout)
        outputs = Outputs(tensors)
        answer, raw = self._compute(LOSSES, document, tensors)
        return _losses_result(answer, raw, outputs, preset)

    def analyze(self, estimators: Sequence[str] | None = None, *, preset: str | None = None,
                params: Mapping[str, Mapping[str, Any]] | None = None, dtype: str | None = None,
                layout: str | None = None, **tensors: Any) -> dict[str, Any]:
        """What each estimator makes of this batch (POST /v1/analysis, docs/analysis.md): per group, the
        implied weight of its prompt relative to the unbiased policy gradient; per pair of estimators,
        the share of tokens whose advantage signs disagree.

        tensors: as for `compute_advantages`, group_ids [B] required (groups of at least 2).
        estimators: the names to analyse (None: every estimator of the preset the tensors allow);
        params: per-estimator overrides, {"grpo": {"std_eps": 1e-6}}. Returns the analysis document
        (the same over both transports; group ids as strings).
        """
        _check_group_ids(tensors)
        document = _document(estimators=_names(estimators), preset=preset, params=params, dtype=dtype, layout=layout)
        answer, _ = self._compute(ANALYSIS, document, tensors)
        return answer

    def list_estimators(self) -> dict[str, Any]:
        """The catalog (GET /v1/estimators): every estimator's formula, tensors, parameters and defaults
        per preset, and the loss terms."""
        return self._with_retries("catalog")

    def close(self) -> None:
        if self._regions is not None:
            self._regions.close()  # unregistered while the transport is still open
        for transport in self._transports:
            transport.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio twin of `Client` (same arguments, same methods, awaited). Use it within one event loop."""

    _asynchronous = True
    _transport: AsyncHttpTransport | AsyncGrpcTransport

    async def _with_retries(self, method: str, *args: Any) -> Any:
        """See `Client._with_retries`."""
        attempt = 0
        while True:
            for index in self._balancer.order():
                try:
                    result = await getattr(self._transports[index], method)(*args)
                except Unavailable as error:
                    self._balancer.down(index)
                    failure = error
                    continue
                self._balancer.up(index)
                return result
            if not self.retry.should_retry(failure, attempt):
                raise failure
            await _retry.async_sleep(self.retry.delay(failure, attempt))
            attempt += 1

    async def _compute(self, path: str, document: Mapping[str, Any], tensors: Mapping[str, Any],
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
        """See `Client._compute` (a region is created and registered in a thread, off the event loop)."""
        wire = wire_tensors(tensors)
        if self._regions is None:
            return await self._with_retries("compute", path, document, wire)
        region = await asyncio.to_thread(self._regions.acquire, layout(path, document, wire)[2])
        try:
            placed_document, placed = region.place(path, document, wire)
            answer, raw = await self._with_retries("compute", path, placed_document, placed)
            return answer, region.results(raw)
        finally:
            self._regions.release(region)

    async def compute_advantages(self, estimator: str, *, preset: str | None = None,
                                 params: Mapping[str, Any] | None = None, dtype: str | None = None,
                                 layout: str | None = None, **tensors: Any) -> AdvantageResult:
        """See `Client.compute_advantages`."""
        _check_group_ids(tensors)
        document = _document(estimator=estimator, preset=preset, params=params, dtype=dtype, layout=layout)
        outputs = Outputs(tensors)
        answer, raw = await self._compute(ADVANTAGES, document, tensors)
        return _advantages_result(answer, raw, outputs, estimator, preset)

    async def compute_losses(self, *, preset: str | None = None, policy_loss: TermSpec = None,
                             kl_loss: TermSpec = None, value_loss: TermSpec = None, entropy_bonus: TermSpec = None,
                             rollout_correction: TermSpec = None, token_loss: TermSpec = None,
                             num_tokens: float | None = None, num_sequences: float | None = None,
                             dp_size: int | None = None, return_kl_values: bool | None = None,
                             dtype: str | None = None, layout: str | None = None, **tensors: Any) -> LossResult:
        """See `Client.compute_losses`."""
        document = _document(preset=preset, policy_loss=policy_loss, kl_loss=kl_loss, value_loss=value_loss,
                             entropy_bonus=entropy_bonus, rollout_correction=rollout_correction,
                             token_loss=token_loss, num_tokens=num_tokens, num_sequences=num_sequences,
                             dp_size=dp_size, return_kl_values=return_kl_values, dtype=dtype, layout=layout)
        outputs = Outputs(tensors)
        answer, raw = await self._compute(LOSSES, document, tensors)
        return _losses_result(answer, raw, outputs, preset)

    async def analyze(self, estimators: Sequence[str] | None = None, *, preset: str | None = None,
                      params: Mapping[str, Mapping[str, Any]] | None = None, dtype: str | None = None,
                      layout: str | None = None, **tensors: Any) -> dict[str, Any]:
        """See `Client.analyze`."""
        _check_group_ids(tensors)
        document = _document(estimators=_names(estimators), preset=preset, params=params, dtype=dtype, layout=layout)
        answer, _ = await self._compute(ANALYSIS, document, tensors)
        return answer

    async def list_estimators(self) -> dict[str, Any]:
        """See `Client.list_estimators`."""
        return await self._with_retries("catalog")

    async def close(self) -> None:
        if self._regions is not None:
            await asyncio.to_thread(self._regions.close)
            self._registrar.close()
        for transport in self._transports:
            await transport.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()
