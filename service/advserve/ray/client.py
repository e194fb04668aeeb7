"""`RayClient`: `advserve_client.Client`'s methods over a Serve `DeploymentHandle`, from any Ray driver,
task or actor of the cluster (verl's or OpenRLHF's driver, say): numpy arrays or torch tensors in, the
same kind out, the same result types (`advserve_client.AdvantageResult`, `LossResult`) and typed errors
(`advserve_client.errors`), and `shards=k` to split one large batch across replicas with the one-call
result (`advserve.ray.sharding`).

    from advserve.ray import RayClient

    client = RayClient()                             # serve.get_app_handle("advserve")
    adv = client.compute_advantages("gae", preset="verl", rewards=r, values=v, response_mask=m)

Tensors travel through Ray's object store: numpy arrays as they are (the replica gets read-only views
and never writes into them), torch tensors as numpy views of their CPU copies (bfloat16 as a torch
tensor). Errors: a replica answers the engine's error as data (`deployment.error_envelope`) and this
client raises the `advserve_client.errors` class of its code, with its field; a replica that died or
could not be reached is `Unavailable` (retried on another replica, like every `Unavailable`, see
`RetryPolicy`), Serve's back-pressure (max_queued_requests) `Overloaded`, no answer within `timeout`
`DeadlineExceeded`. No Ray exception reaches the caller.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from advserve_client import _retry
from advserve_client._arrays import Outputs, is_torch
from advserve_client.client import (AdvantageResult, LossResult, RetryPolicy, TermSpec, _advantages_result,
                                    _check_group_ids, _document, _losses_result, _names)
from advserve_client.errors import AdvserveError, DeadlineExceeded, InternalError, Overloaded, Unavailable, error_from

from .deployment import APP

__all__ = ["RayClient"]


def _to_object_store(value: Any) -> Any:
    """A request tensor as it is sent: a torch tensor as a numpy view of its (detached, CPU) data, a
    bfloat16 one as the tensor (numpy has no bfloat16); anything else as given."""
    if not is_torch(value):
        return value
    import torch

    tensor = value.detach().cpu()
    return tensor if tensor.dtype == torch.bfloat16 else tensor.numpy()


def _ray_error(exc: BaseException, timeout: float | None) -> AdvserveError:
    """The typed error of a failed handle call (Ray's own exceptions; the replica's are envelopes)."""
    import ray.exceptions as rex
    from ray.serve import exceptions as sex

    name = type(exc).__name__
    if isinstance(exc, (TimeoutError, rex.GetTimeoutError)):
        return DeadlineExceeded(f"no answer within the client's timeout of {timeout} s ({name})")
    if isinstance(exc, sex.BackPressureError):
        return Overloaded(f"every replica's queue is full (max_queued_requests): {exc}",
                          retry_after=getattr(exc, "retry_after_s", None) or 1.0)
    if isinstance(exc, rex.RayTaskError):
        return InternalError(f"the replica failed outside the engine: {name}: {exc}")
    if isinstance(exc, (rex.RayError, sex.RayServeException, ConnectionError)):
        return Unavailable(f"replica unavailable: {name}: {exc}")
    return InternalError(f"{name}: {exc}")


def _raise_error(envelope: Mapping[str, Any]) -> None:
    error = envelope.get("error")
    if error is not None:
        raise error_from(error.get("code"), error.get("message") or "", field=error.get("field"),
                         retry_after=error.get("retry_after"))


class RayClient:
    """A synchronous client of the advserve Serve application (thread-safe).

    app_name: the Serve application (`serve.get_app_handle(app_name)`), or `handle`: a DeploymentHandle
    of the AdvServe deployment. shards: split each advantage or loss request into up to this many shards
    sent to the replicas at once (1: one call; `advserve.ray.sharding` says what is exact). timeout:
    seconds per call (None: wait forever). max_retries: retries of `Unavailable` / `Overloaded`,
    with `advserve_client`'s backoff (a replica killed mid-call is retried on another).
    """

    def __init__(self, app_name: str = APP, *, handle: Any = None, shards: int = 1, timeout: float | None = 300.0,
                 max_retries: int = 2):
        if shards < 1:
            raise ValueError("shards must be >= 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if handle is None:
            from ray import serve

            handle = serve.get_app_handle(app_name)
        self.handle = handle
        self.app_name = app_name
        self.shards = shards
        self.timeout = timeout
        self.retry = RetryPolicy(max_retries=max_retries)
        self._local = None  # an Engine on the CPU, for validating sharded requests here

    def __repr__(self) -> str:
        return f"RayClient({self.app_name!r}, shards={self.shards})"

    # --- calls --------------------------------------------------------------------------------

    def _submit(self, kind: str, document: Mapping[str, Any], tensors: Mapping[str, Any]) -> Any:
        """Send one request; the replica's deadline is this client's timeout (its --request-timeout-s if
        shorter), so work this client stopped waiting for is dropped there too."""
        if self.timeout is not None:
            document = {**document, "timeout_s": self.timeout}
        return self.handle.compute.remote(kind, dict(document), tensors)

    def _answer(self, response: Any) -> dict[str, Any]:
        try:
            envelope = response.result(timeout_s=self.timeout)
        except Exception as exc:  # noqa: BLE001 - Ray's exceptions, turned into the typed errors
            raise _ray_error(exc, self.timeout) from None
        _raise_error(envelope)
        return envelope

    def _with_retries(self, call: Callable[[], Any]) -> Any:
        attempt = 0
        while True:
            try:
                return call()
            except AdvserveError as error:
                if not self.retry.should_retry(error, attempt):
                    raise
                _retry.sleep(self.retry.delay(error, attempt))
                attempt += 1

    def _call(self, kind: str, document: Mapping[str, Any], tensors: Mapping[str, Any]) -> dict[str, Any]:
        """One request with retries: (envelope) of {"document", "tensors"}."""
        return self._with_retries(lambda: self._answer(self._submit(kind, document, tensors)))

    def _calls(self, kind: str, requests: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> list[dict]:
        """Several requests at once (the shards): all submitted, then each answered; a shard that fails
        with `Unavailable` is resubmitted alone, with the retry policy."""
        responses = [self._submit(kind, document, tensors) for document, tensors in requests]
        out = []
        for (document, tensors), response in zip(requests, responses):
            try:
                out.append(self._answer(response))
            except AdvserveError as error:
                if not self.retry.should_retry(error, 0):
                    raise
                _retry.sleep(self.retry.delay(error, 0))
                out.append(self._call(kind, document, tensors))
        return out

    @staticmethod
    def _wire(tensors: Mapping[str, Any]) -> dict[str, Any]:
        return {name: _to_object_store(value) for name, value in tensors.items() if value is not None}

    def _engine(self) -> Any:
        if self._local is None:
            from ..engine import Engine

            self._local = Engine("cpu", kernels="torch")
        return self._local

    # --- the methods of advserve_client.Client ------------------------------------------------------

    def compute_advantages(self, estimator: str, *, preset: str | None = None, params: Mapping[str, Any] | None = None,
                           dtype: str | None = None, layout: str | None = None, **tensors: Any) -> AdvantageResult:
        """Token advantages and returns of `estimator` (see `advserve_client.Client.compute_advantages`)."""
        _check_group_ids(tensors)
        document = _document(estimator=estimator, preset=preset, params=params, dtype=dtype, layout=layout)
        outputs = Outputs(tensors)
        if self.shards > 1:
            answer = self._sharded_advantages(document, tensors)
        else:
            answer = self._call("advantages", document, self._wire(tensors))
            answer["tensors"] = _own(answer["tensors"])
        return _advantages_result(answer["document"], answer["tensors"], outputs, estimator, preset)

    def compute_losses(self, *, preset: str | None = None, policy_loss: TermSpec = None, kl_loss: TermSpec = None,
                       value_loss: TermSpec = None, entropy_bonus: TermSpec = None,
                       rollout_correction: TermSpec = None, token_loss: TermSpec = None,
                       num_tokens: float | None = None, num_sequences: float | None = None,
                       dp_size: int | None = None, return_kl_values: bool | None = None, dtype: str | None = None,
                       layout: str | None = None, **tensors: Any) -> LossResult:
        """The loss, its components, metrics and gradients (see `advserve_client.Client.compute_losses`)."""
        document = _document(preset=preset, policy_loss=policy_loss, kl_loss=kl_loss, value_loss=value_loss,
                             entropy_bonus=entropy_bonus, rollout_correction=rollout_correction,
                             token_loss=token_loss, num_tokens=num_tokens, num_sequences=num_sequences,
                             dp_size=dp_size, return_kl_values=return_kl_values, dtype=dtype, layout=layout)
        outputs = Outputs(tensors)
        wire = self._wire(tensors)
        answer = self._sharded_losses(document, wire) if self.shards > 1 else None
        if answer is None:
            answer = self._call("losses", document, wire)
            answer["tensors"] = _own(answer["tensors"])
        return _losses_result(answer["document"], answer["tensors"], outputs, preset)

    def analyze(self, estimators: Sequence[str] | None = None, *, preset: str | None = None,
                params: Mapping[str, Mapping[str, Any]] | None = None, dtype: str | None = None,
                layout: str | None = None, **tensors: Any) -> dict[str, Any]:
        """What each estimator makes of this batch (see `advserve_client.Client.analyze`); one call."""
        _check_group_ids(tensors)
        document = _document(estimators=_names(estimators), preset=preset, params=params, dtype=dtype, layout=layout)
        return self._call("analysis", document, self._wire(tensors))["document"]

    def list_estimators(self) -> dict[str, Any]:
        """The catalog (GET /v1/estimators)."""
        def call() -> Any:
            try:
                return self.handle.catalog.remote().result(timeout_s=self.timeout)
            except Exception as exc:  # noqa: BLE001
                raise _ray_error(exc, self.timeout) from None
        return self._with_retries(call)

    def close(self) -> None:
        """Nothing to release (the handle belongs to Serve); for symmetry with `Client`."""

    def __enter__(self) -> "RayClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- sharding -----------------------------------------------------------------------------------

    def _sharded_advantages(self, document: Mapping[str, Any], tensors: Mapping[str, Any]) -> dict[str, Any]:
        """`sharding`'s plan: validated here, rows or two passes over the replicas, or the batch whole."""
        from ..engine import advantage_stats
        from ..errors import AdvserveError as EngineError
        from ..model import AdvantageRequest
        from . import sharding

        try:
            prepared = self._engine().prepare_advantages(AdvantageRequest(tensors=tensors, **document))
        except EngineError as exc:
            raise error_from(exc.code, exc.message, field=exc.field) from None
        plan = sharding.plan(prepared, self.shards)
        if plan.mode == "whole":
            answer = self._call("advantages", document, self._wire(tensors))
            return {**answer, "tensors": _own(answer["tensors"])}
        requests = [sharding.shard_request(prepared, rows, two_pass=plan.mode == "two_pass", statistics=plan.statistics)
                    for rows in plan.shards]
        parts = self._calls("advantages", [(_without_tensors(r), r["tensors"]) for r in requests])
        parts = [part["tensors"] for part in parts]
        advantages = sharding.assemble(prepared, plan.shards, parts, "advantages")
        returns = sharding.assemble(prepared, plan.shards, parts, "returns")
        if plan.mode == "two_pass":
            advantages, returns = sharding.second_pass(prepared, advantages, returns)
        batch = prepared.batch
        stats = advantage_stats(advantages, None, batch, prepared.dtype)
        return {"document": {"estimator": prepared.estimator.name, "preset": prepared.preset,
                             "params": prepared.params, "stats": stats},
                "tensors": {"advantages": batch.output(advantages).numpy(), "returns": batch.output(returns).numpy()}}

    def _sharded_losses(self, document: Mapping[str, Any], tensors: Mapping[str, Any]) -> dict[str, Any] | None:
        """Contiguous row shards with the global normalizers; None: send it whole (packed layout, a
        batch of one row, normalizers one number cannot express, or a request the engine refuses: the
        one call then answers its error)."""
        from ..errors import AdvserveError as EngineError
        from ..model import LossRequest
        from . import sharding

        mask = tensors.get("response_mask")
        if document.get("layout") == "packed" or mask is None or getattr(mask, "ndim", 0) != 2:
            return None
        lengths = np.asarray(mask).astype(bool).sum(axis=1)
        try:
            normalizers = sharding.loss_normalizers(LossRequest(tensors=tensors, **document), lengths)
        except EngineError:
            return None
        slices = sharding.loss_shards(lengths.shape[0], self.shards)
        if normalizers is None or len(slices) < 2:
            return None
        rows = lengths.shape[0]
        shard_document = {**document, **normalizers}

        def part(value: Any, cut: slice) -> Any:
            shape = getattr(value, "shape", None)
            return value[cut] if shape is not None and len(shape) >= 1 and shape[0] == rows else value

        requests = [(shard_document, {name: part(value, cut) for name, value in tensors.items()}) for cut in slices]
        try:
            parts = self._calls("losses", requests)
        except AdvserveError as error:
            if isinstance(error, Unavailable):
                raise
            return None  # refused: the one call answers the request's error, worded for the whole batch
        combined = sharding.combine_losses([p["document"] for p in parts],
                                           [int(lengths[cut].sum()) for cut in slices])
        names = parts[0]["tensors"].keys()
        out = {name: (None if parts[0]["tensors"][name] is None else
                      np.concatenate([p["tensors"][name] for p in parts])) for name in names}
        return {"document": combined, "tensors": out}


def _without_tensors(request: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in request.items() if key != "tensors"}


def _own(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Result arrays as the caller's own, writable memory (the object store's are read-only views)."""
    return {name: (None if value is None else np.array(value, copy=True)) for name, value in tensors.items()}

