"""A request costs at most one device synchronization, validation included (issue 14; issue 13 item 2
for the statistics alone).

Every number a response carries (advantage stats, loss value, components, metrics) is computed as a 0-d
tensor on the device, and every value check of the request (NaN, masks, group sizes) as a 0-d verdict
there; on a device all of them are brought to the host by one `device.fetch_scalars` copy, the verdicts
with the numbers (`Engine.prepare_advantages(defer_checks=True)`, as every transport asks; losses always).
A failed verdict raises the request's error then, worded on the host, the field the immediate read names.
On the CPU there is no device sync to observe, so these tests count what would be one on CUDA: every host
read of a tensor's value (`item`, `tolist`, `numpy`, `float()`, `int()`, `bool()`, `__index__`, a
data-dependent shape from `nonzero`, and a read inside an operator, as indexing by a 0-d tensor does:
torch's `_local_scalar_dense`, seen by a dispatch mode), with one `host_scalars` / `fetch_scalars` call counted once, from
the request until the response's numbers and tensors are on the host (`copy_to_host`, as the encoder
does). On CUDA the same runs under torch's own sync debug mode.

Read at once (`defer_checks=False`: the analysis, the Ray client's shards), validation alone
(`build_batch`, `Engine.prepare_advantages`) reads at most once too, padded or packed, whatever the
tensors' dtypes. Two inputs are needed on the host by their nature and are read there, before anything
goes to a device: group ids (factorized into labels) and cu_seqlens (the padded shape). Given in host
memory, as every transport gives them, reading them is no device sync; the counter leaves out reads of
exactly those tensors' own memory (`host_inputs`) and counts everything else, including any other read
of an input.

One read inside the estimators is not counted, for its stated reason (`NOT_DEVICE_READS`); every other
read fails the test, and so does a read of that one from anywhere else.

The CPU engines here take the torch path (`kernels="torch"`): it is the path a device runs. The numba
kernels (`advserve.kernels.cpu`) run on the CPU only, where a host read is no sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import linecache
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from advserve import batch as batch_module
from advserve import device as device_module
from advserve import engine as engine_module
from advserve.device import copy_to_host
from advserve.engine import Engine
from advserve.errors import InvalidArgument
from advserve.functional import masks
from advserve.loss_specs import TERM_TENSORS
from advserve.model import AdvantageRequest, LossRequest

B, T = 6, 7
READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "nonzero")


# (function, source line fragment) of reads that are not on the response path's device work
NOT_DEVICE_READS = {
    # the torch scans' choice of their copy-free path for right-padded masks (functional/scan.py,
    # Compactor); on CUDA the default kernels (triton) do not construct a Compactor
    ("is_right_padded", "as_bytes[:, 1:]"),
}


class Reads:
    """Counts host reads of tensor values while `active`; one `fetch_scalars` (`host_scalars`) is one read."""

    def __init__(self) -> None:
        self.count = 0
        self.where: list[str] = []
        self.active = False
        self._inside_fetch = False
        self.host_inputs: set[int] = set()  # storages of inputs read on the host by design (group ids, cu_seqlens)
        self.validation: int | None = None  # the count when validation ended (the last `Checks.settle`)
        self.in_method = False  # inside a counted Tensor method: its own operators' reads are that read

    @contextlib.contextmanager
    def fetching(self):
        """Reads inside one fetch are that fetch."""
        self._inside_fetch = True
        try:
            yield
        finally:
            self._inside_fetch = False

    def hit(self, what: str, tensor: torch.Tensor | None = None) -> None:
        if not self.active or self._inside_fetch:
            return
        if (tensor is not None and tensor.device.type == "cpu"
                and tensor.untyped_storage().data_ptr() in self.host_inputs):
            return
        frame = sys._getframe(2)  # the function that read the value (above the counting wrapper)
        while "/torch/" in frame.f_code.co_filename and frame.f_back is not None:  # a read inside an operator
            frame = frame.f_back
        line = _source_line(frame)
        if any(frame.f_code.co_name == name and fragment in line for name, fragment in NOT_DEVICE_READS):
            return
        self.count += 1
        self.where.append(f"{what} in {frame.f_code.co_name}: {line.strip()}")


def _source_line(frame) -> str:
    return linecache.getline(frame.f_code.co_filename, frame.f_lineno)


@pytest.fixture
def reads(monkeypatch):
    counter = Reads()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            counter.hit(_name, self)
            inside, counter.in_method = counter.in_method, True
            try:
                return _original(self, *args, **kwargs)
            finally:
                counter.in_method = inside

        monkeypatch.setattr(torch.Tensor, name, counted)
    original_nonzero = torch.nonzero

    def nonzero(*args, **kwargs):
        counter.hit("torch.nonzero", args[0] if args else None)
        return original_nonzero(*args, **kwargs)

    monkeypatch.setattr(torch, "nonzero", nonzero)
    original_fetch = device_module.fetch_scalars

    def fetch_scalars(*args, **kwargs):  # host_scalars is fetch_scalars(...).result()
        counter.hit("fetch_scalars")
        with counter.fetching():
            fetch = original_fetch(*args, **kwargs)
        original_result = fetch.result

        def result():
            with counter.fetching():
                return original_result()

        fetch.result = result
        return fetch

    for module in (device_module, engine_module):
        monkeypatch.setattr(module, "fetch_scalars", fetch_scalars)
    original_settle = batch_module.Checks.settle

    def settle(self, *args, **kwargs):  # validation ends with the last one
        original_settle(self, *args, **kwargs)
        counter.validation = counter.count

    monkeypatch.setattr(batch_module.Checks, "settle", settle)
    with OperatorReads(counter):
        yield counter


class OperatorReads(TorchDispatchMode):
    """Counts the reads operators make on the host (`_local_scalar_dense`: a tensor indexed by a 0-d
    tensor, `torch.equal`, ...), which no Tensor method sees; one inside a counted method is that method's."""

    def __init__(self, counter: Reads) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense" and not self.counter.in_method:
            self.counter.hit("an operator's read", args[0])
        return func(*args, **(kwargs or {}))


def as_on_a_gpu(monkeypatch) -> None:
    """Take the branches the engine takes where reading a value costs a device sync (a GPU): on the CPU
    it may read values to skip work; the GPU's branches are the ones whose reads are counted."""
    for module in (masks, engine_module):
        monkeypatch.setattr(module, "host_reads_are_free", lambda device: False, raising=False)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 5, 1, 7, 3, 6])
    mask = torch.arange(T) < lengths[:, None]
    mask[3, 2] = False  # an interior gap: masked statistics must skip it

    def tokens(scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(B, T, generator=g) * scale).masked_fill(~mask, 0.0)

    logprobs = -torch.rand(B, T, generator=g).masked_fill(~mask, 0.0)
    return {
        "response_mask": mask,
        "rewards": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.5]),
        "group_ids": torch.tensor([0, 0, 1, 1, 2, 2]),
        "values": tokens(),
        "greedy_rewards": torch.tensor([0.5, 0.5, 0.0, 1.0, 0.0, 0.5]),
        "logprobs": logprobs,
        "old_logprobs": (logprobs + tokens(0.1)).masked_fill(~mask, 0.0),
        "ref_logprobs": (logprobs + tokens(0.2)).masked_fill(~mask, 0.0),
        "rollout_logprobs": (logprobs + tokens(0.05)).masked_fill(~mask, 0.0),
        "advantages": tokens(),
        "old_values": tokens(),
        "returns": tokens(),
        "entropy": tokens().abs(),
    }


ADVANTAGE_CASES = [
    ("grpo", "verl", {}),
    ("grpo", "paper", {"kl_coef": 0.1}),
    ("rloo", "trl", {}),
    ("dr_grpo", "openrlhf", {}),
    ("gae", "verl", {}),
    ("gae", "paper", {"whiten": True}),
    ("reinforce_pp", "openrlhf", {}),
    ("reinforce_pp_baseline", "verl", {}),
    ("remax", "verl", {}),
    ("reinforce_rtg", "paper", {}),
]

LOSS_CASES = [
    {"policy_loss": {"mode": "ppo_clip", "dual_clip": 3.0}},
    {"policy_loss": {"mode": "gspo"}, "kl_loss": {"coef": 0.1}},
    {"policy_loss": {"mode": "cispo"}, "value_loss": {"coef": 0.5, "clip": 0.2}, "entropy_bonus": {"coef": 0.01}},
    {"policy_loss": {"mode": "reinforce"}, "rollout_correction": {}},
    {"policy_loss": False, "kl_loss": {"coef": 0.1, "agg": "seq-mean-token-mean"}},
    {"policy_loss": {"mode": "ppo_clip", "agg": "seq-mean-token-sum-norm"}, "entropy_bonus": {"coef": 0.01}},
]


def _advantage_tensors(estimator: str, engine: Engine, preset: str) -> dict[str, torch.Tensor]:
    """What the estimator requires, the outcome rewards and the KL tensors (for a preset's KL default)."""
    spec = engine.estimator(estimator, engine.preset(preset))
    names = set(spec.requires) | {"response_mask", "rewards"} | ({"old_logprobs", "ref_logprobs"} & spec.optional)
    return {name: t for name, t in _inputs().items() if name in names}


def _loss_tensors(terms: dict) -> dict[str, torch.Tensor]:
    """The tensors the loss terms read."""
    names = {"response_mask"}.union(*(TERM_TENSORS[term] for term, on in terms.items() if on is not False))
    if terms.get("policy_loss") is not False:
        names |= set(TERM_TENSORS["policy_loss"])
    return {name: t for name, t in _inputs().items() if name in names}


def _host_inputs(tensors: dict) -> set[int]:
    """The storages of the inputs read on the host by design (group ids, cu_seqlens)."""
    return {t.untyped_storage().data_ptr() for name, t in tensors.items()
            if name in ("group_ids", "cu_seqlens") and isinstance(t, torch.Tensor)}


@pytest.mark.parametrize("estimator,preset,params", ADVANTAGE_CASES, ids=lambda v: str(v))
def test_advantages_read_the_device_at_most_once(reads, monkeypatch, estimator, preset, params):
    """From the request to the response on the host: validation, compute, stats, copies: one read."""
    engine = Engine("cpu", kernels="torch")
    request = AdvantageRequest(estimator, _advantage_tensors(estimator, engine, preset), preset=preset,
                               params=params)
    alone = engine.compute_advantages(request)  # the CPU's branches; the GPU's give the same numbers
    expected = (alone.stats, alone.advantages, alone.returns)
    as_on_a_gpu(monkeypatch)
    reads.host_inputs = _host_inputs(request.tensors)
    reads.active = True
    prepared = engine.prepare_advantages(request, defer_checks=True)
    result = engine.run_advantages([prepared])[0]
    copy_to_host([result.advantages, result.returns])
    result.check()
    stats = result.stats
    reads.active = False
    assert prepared.checks is not None and result.deferred_checks  # the verdicts came with the stats
    assert reads.count <= 1, f"{reads.count} reads: {reads.where}"
    assert repr(stats) == repr(expected[0])  # the same numbers, of the same Python types (int counts, -0.0)
    assert torch.equal(result.advantages, expected[1]) and torch.equal(result.returns, expected[2])


@pytest.mark.parametrize("terms", LOSS_CASES, ids=lambda v: ",".join(f"{k}" for k in v))
def test_losses_read_the_device_at_most_once(reads, monkeypatch, terms):
    """Validation and the compute's numbers: one read, the verdicts with the loss."""
    engine = Engine("cpu", kernels="torch")
    request = LossRequest(_loss_tensors(terms), preset="verl", **terms)
    expected = engine.compute_losses(request)  # the CPU's branches; the GPU's give the same numbers
    as_on_a_gpu(monkeypatch)
    reads.active = True
    result = engine.compute_losses(request)
    copy_to_host([t for t in (result.grad_logprobs, result.grad_values, result.grad_entropy) if t is not None])
    numbers = (result.loss, dict(result.components), dict(result.metrics))
    reads.active = False
    assert reads.count <= 1, f"{reads.count} reads: {reads.where}"
    assert repr(numbers) == repr((expected.loss, expected.components, expected.metrics))  # same types and order
    for name in ("grad_logprobs", "grad_values", "grad_entropy"):
        got, want = getattr(result, name), getattr(expected, name)
        assert (got is None and want is None) or torch.equal(got, want), name


def _as_float(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A bool mask as 0/1 numbers, as trainers send it (float or integer)."""
    return mask.to(dtype)


def _packed(tensors: dict[str, torch.Tensor]) -> dict[str, object]:
    """Right-padded tensors packed (each row's first L_i tokens, L_i = the last valid position + 1), with
    cu_seqlens as numpy (as the transports give it); the mask travels along (it has an interior gap)."""
    mask = tensors["response_mask"]
    width = torch.where(mask, torch.arange(mask.shape[1]) + 1, 0).amax(dim=1)
    keep = torch.arange(mask.shape[1]) < width[:, None]
    out: dict[str, object] = {name: (t[keep] if t.ndim == 2 else t) for name, t in tensors.items()}
    out["cu_seqlens"] = np.concatenate([[0], np.cumsum(width.numpy())])
    return out


def _with(tensors: dict[str, torch.Tensor], **changes) -> dict[str, torch.Tensor]:
    return {**tensors, **changes}


# id -> (estimator, preset, params, how the inputs are changed, reads): NaN under the mask is allowed
# but makes the sum of the zeroed tensor NaN; which positions hold it is a closer look, one more read
VALIDATION_CASES = {
    "grpo, bool mask, tensor ids": ("grpo", "verl", {}, lambda x: x, 1),
    "grpo, float mask, string ids, token rewards kept as given": (
        "grpo", "verl", {}, lambda x: _with({k: v for k, v in x.items() if k != "rewards"},
                                            response_mask=_as_float(x["response_mask"]),
                                            token_rewards=torch.ones(B, T),
                                            group_ids=[f"g{int(i)}" for i in x["group_ids"]]), 1),
    "rloo, the singleton check (paper), int mask": (
        "rloo", "paper", {}, lambda x: _with(x, response_mask=_as_float(x["response_mask"], torch.int64)), 1),
    "gae, whitening with ddof 1, bf16 values, float64 mask": (
        "gae", "paper", {"whiten": True, "whiten_ddof": 1},
        lambda x: _with(x, values=x["values"].to(torch.bfloat16), response_mask=_as_float(x["response_mask"],
                                                                                           torch.float64)), 1),
    "reinforce_pp, KL tensors, masked NaN": (
        "reinforce_pp", "openrlhf", {}, lambda x: _with(x, values=None, ref_logprobs=x["ref_logprobs"].masked_fill(
            ~x["response_mask"], float("nan"))), 2),
    "remax, packed": ("remax", "verl", {}, _packed, 1),
    "grpo, packed, tensor ids": ("grpo", "verl", {}, _packed, 1),
    "grpo, packed, cu_seqlens a tensor": ("grpo", "verl", {}, lambda x: _with(
        _packed(x), cu_seqlens=torch.from_numpy(_packed(x)["cu_seqlens"])), 1),
}


@pytest.mark.parametrize("deferred", [False, True], ids=["read at once", "read with the results"])
@pytest.mark.parametrize("case", VALIDATION_CASES)
def test_advantage_validation_reads_the_device_at_most_once(reads, monkeypatch, case, deferred):
    """Every check of values (masks, finiteness, the estimator's own): read at once, prepare_advantages
    reads once; read with the results, the whole request (prepare, compute, stats) reads once."""
    estimator, preset, params, change, bound = VALIDATION_CASES[case]
    engine = Engine("cpu", kernels="torch")
    tensors = change(_advantage_tensors(estimator, engine, preset) | (
        {"ref_logprobs": _inputs()["ref_logprobs"]} if estimator == "reinforce_pp" else {}))
    tensors = {k: v for k, v in tensors.items() if v is not None}
    layout = "packed" if "cu_seqlens" in tensors else None
    request = AdvantageRequest(estimator, tensors, preset=preset, params=params, layout=layout)
    expected = engine.compute_advantages(request)
    as_on_a_gpu(monkeypatch)
    reads.host_inputs = _host_inputs(tensors)
    reads.active = True
    prepared = engine.prepare_advantages(request, defer_checks=deferred)
    if deferred:
        result = engine.run_advantages([prepared])[0]
        result.check()
        stats = result.stats
    reads.active = False
    assert (prepared.checks is not None) == deferred
    assert reads.count <= bound, f"{reads.count} reads: {reads.where}"
    if not deferred:
        result = engine.run_advantages([prepared])[0]
        stats = result.stats
    assert torch.equal(result.advantages, expected.advantages) and repr(stats) == repr(expected.stats)


LOSS_VALIDATION_CASES = {  # id -> (terms, how the inputs are changed)
    "ppo_clip, float mask, precomputed rollout_is_weights": (
        {"policy_loss": {"mode": "ppo_clip"}},
        lambda x: _with(x, response_mask=_as_float(x["response_mask"]), rollout_is_weights=_inputs()["entropy"] + 0.5)),
    "value loss and entropy, bf16 logprobs": (
        {"policy_loss": {"mode": "ppo_clip"}, "value_loss": {"coef": 0.5}, "entropy_bonus": {"coef": 0.01}},
        lambda x: _with(x, logprobs=x["logprobs"].to(torch.bfloat16))),
    "kl, packed": ({"policy_loss": False, "kl_loss": {"coef": 0.1}}, _packed),
}


@pytest.mark.parametrize("case", LOSS_VALIDATION_CASES)
def test_loss_validation_reads_the_device_at_most_once(reads, monkeypatch, case):
    """With the compute's numbers, one read in all."""
    terms, change = LOSS_VALIDATION_CASES[case]
    tensors = change(_loss_tensors(terms))
    layout = "packed" if "cu_seqlens" in tensors else None
    engine = Engine("cpu", kernels="torch")
    expected = engine.compute_losses(LossRequest(tensors, preset="verl", layout=layout, **terms))
    as_on_a_gpu(monkeypatch)
    reads.host_inputs = _host_inputs(tensors)
    reads.active = True
    result = engine.compute_losses(LossRequest(tensors, preset="verl", layout=layout, **terms))
    reads.active = False
    assert reads.count <= 1, f"{reads.count} reads: {reads.where}"
    assert result.loss == expected.loss and torch.equal(result.grad_logprobs, expected.grad_logprobs)


def _nan_on_a_valid_token(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return tensor.masked_fill(mask & (torch.arange(T) == 0), float("nan"))


INVALID = {  # id -> (estimator, preset, params, change, field named): each must fail as it does read at once
    "NaN on a valid token": ("gae", "verl", {}, lambda x: _with(x, values=_nan_on_a_valid_token(
        x["values"], x["response_mask"])), "tensors.values"),
    "mask not 0/1": ("gae", "verl", {}, lambda x: _with(x, response_mask=_as_float(x["response_mask"]) * 0.5),
                     "tensors.response_mask"),
    "singleton group": ("rloo", "paper", {}, lambda x: _with(x, group_ids=torch.arange(B)), "tensors.group_ids"),
    "NaN rewards of a group estimator": ("grpo", "verl", {}, lambda x: _with(
        x, rewards=x["rewards"].masked_fill(torch.arange(B) == 4, float("inf"))), "tensors.rewards"),
}


@pytest.mark.parametrize("case", INVALID)
def test_a_failed_check_is_worded_on_the_host(reads, monkeypatch, case):
    """The error path may read more; it names the field an immediate read would: at once, from
    prepare_advantages; read with the results, from the result's `check()` and `stats`, every time."""
    estimator, preset, params, change, field = INVALID[case]
    engine = Engine("cpu", kernels="torch")
    request = AdvantageRequest(estimator, change(_advantage_tensors(estimator, engine, preset)), preset=preset,
                               params=params)
    as_on_a_gpu(monkeypatch)
    with pytest.raises(InvalidArgument) as at_once:
        engine.prepare_advantages(request)
    assert at_once.value.field == field
    result = engine.run_advantages([engine.prepare_advantages(request, defer_checks=True)])[0]
    for read in (result.check, lambda: result.stats, result.check):
        with pytest.raises(InvalidArgument) as later:
            read()
        assert (later.value.field, str(later.value)) == (field, str(at_once.value))
    with pytest.raises(InvalidArgument) as in_process:  # the one-call API reads them before it returns
        engine.compute_advantages(request)
    assert in_process.value.field == field


def test_a_failed_loss_check_comes_before_the_losses_own_errors(monkeypatch):
    """Losses read their checks with their numbers on a device: a NaN is still the error named, also
    where the terms then fail on the host (bypass_mode refuses precomputed weights)."""
    x = _inputs()
    tensors = {"response_mask": x["response_mask"], "logprobs": x["logprobs"], "old_logprobs": x["old_logprobs"],
               "advantages": _nan_on_a_valid_token(x["advantages"], x["response_mask"]),
               "rollout_is_weights": x["entropy"]}
    engine = Engine("cpu", kernels="torch")
    request = LossRequest(tensors, preset="verl", policy_loss={"mode": "bypass_mode"})
    with pytest.raises(InvalidArgument) as at_once:
        engine.compute_losses(request)
    as_on_a_gpu(monkeypatch)
    with pytest.raises(InvalidArgument) as later:
        engine.compute_losses(request)
    assert at_once.value.field == later.value.field == "tensors.advantages"
    assert str(later.value) == str(at_once.value)


def test_errors_after_the_checks(monkeypatch):
    """A caller's own check between preparing and computing (an output region too small) comes after a
    failed value check, as with an immediate read; the server's state (overloaded) is raised as it is."""
    from advserve.errors import Overloaded

    engine = Engine("cpu", kernels="torch")
    x = _inputs()
    bad = AdvantageRequest("gae", {"response_mask": x["response_mask"], "rewards": x["rewards"],
                                   "values": _nan_on_a_valid_token(x["values"], x["response_mask"])}, preset="verl")
    as_on_a_gpu(monkeypatch)
    prepared = engine.prepare_advantages(bad, defer_checks=True)
    with pytest.raises(InvalidArgument) as caught:
        with prepared.errors_after_checks():
            raise InvalidArgument("the output region is too small", field="outputs.advantages")
    assert caught.value.field == "tensors.values"
    with pytest.raises(Overloaded):
        with prepared.errors_after_checks():
            raise Overloaded("busy")
    with pytest.raises(InvalidArgument) as shard:  # Engine.as_shard's own mistakes come after it too
        engine.as_shard(prepared, {"wrong": 1.0})
    assert shard.value.field == "tensors.values"


def test_a_bad_request_in_a_shared_batch_fails_alone(monkeypatch):
    """Requests coalesced on a device before their checks are read: the one with bad values gets its
    error, the others exactly what they get alone, directly and through the scheduler."""
    from advserve.scheduler import Scheduler

    engine = Engine("cpu", kernels="torch")
    x = _inputs()

    def request(rewards: torch.Tensor) -> AdvantageRequest:
        return AdvantageRequest("grpo", {"response_mask": x["response_mask"], "rewards": rewards,
                                         "group_ids": x["group_ids"]}, preset="verl")

    good = [request(x["rewards"]), request(x["rewards"] * 0.5)]
    bad = request(x["rewards"].masked_fill(torch.arange(B) == 1, float("nan")))
    alone = [engine.compute_advantages(r) for r in good]
    as_on_a_gpu(monkeypatch)
    prepared = [engine.prepare_advantages(r, defer_checks=True) for r in (good[0], bad, good[1])]
    assert len({p.coalescing_key for p in prepared}) == 1

    def same(result, expected) -> None:
        result.check()
        assert torch.equal(result.advantages, expected.advantages) and repr(result.stats) == repr(expected.stats)

    shared = engine.run_advantages(prepared)
    same(shared[0], alone[0])
    same(shared[2], alone[1])
    with pytest.raises(InvalidArgument, match="NaN or Inf") as caught:
        shared[1].check()
    assert caught.value.field == "tensors.rewards"

    scheduler = Scheduler(engine, max_wait_s=0.2)
    try:
        async def all_three():
            return await asyncio.gather(*(scheduler.advantages(p) for p in prepared))

        answers = asyncio.run(all_three())
    finally:
        scheduler.close()
    assert [timing.coalesced for _, timing in answers] == [3, 3, 3]
    same(answers[0][0], alone[0])
    same(answers[2][0], alone[1])
    with pytest.raises(InvalidArgument):
        answers[1][0].check()


def test_coalesced_and_packed_requests_read_once_each(reads, monkeypatch):
    """Requests sharing a device batch: one read per request; a packed request: one read."""
    engine = Engine("cpu", kernels="torch")
    x = _inputs()
    mask = x["response_mask"]
    requests = [AdvantageRequest("grpo", {"response_mask": mask, "rewards": x["rewards"] * scale,
                                          "group_ids": x["group_ids"]}, preset="verl") for scale in (1.0, 0.5)]
    lengths = mask.sum(dim=1)
    packed = AdvantageRequest("grpo", {"rewards": x["rewards"], "group_ids": x["group_ids"],
                                       "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])},
                              preset="verl", layout="packed")
    alone = [engine.compute_advantages(r).stats for r in (*requests, packed)]
    as_on_a_gpu(monkeypatch)
    prepared = [engine.prepare_advantages(r) for r in requests]
    assert prepared[0].coalescing_key is not None and prepared[0].coalescing_key == prepared[1].coalescing_key
    prepared_packed = engine.prepare_advantages(packed)
    reads.active = True
    shared = engine.run_advantages(prepared)
    stats = [result.stats for result in shared]
    assert reads.count <= 2, f"{reads.count} reads: {reads.where}"
    result = engine.run_advantages([prepared_packed])[0]
    copy_to_host(result.tensors())
    stats.append(result.stats)
    reads.active = False
    assert reads.count <= 3, f"{reads.count} reads: {reads.where}"
    assert [repr(s) for s in stats] == [repr(s) for s in alone]


def test_closer_looks_accept_what_an_immediate_read_accepted(reads):
    """A verdict that fails for data that is fine takes a closer look, not an error: finite values whose
    sum overflows (the product is kept, bit for bit), NaN under the mask (zeroed by `where`), -0.0 in a
    float mask (a 0). Each costs one more read; nothing else does."""
    mask = torch.tensor([[True, True, False], [True, False, False]])
    big = torch.tensor([[3e38, 3e38, -5.0], [-3e38, -2.0, 7.0]])
    nan_masked = torch.tensor([[1.0, -2.0, float("nan")], [-3.0, float("inf"), -4.0]])
    float_mask = mask.float()
    float_mask[1, 2] = -0.0

    def build(tensors):
        return batch_module.build_batch(tensors, allowed=set(tensors), required={"response_mask"},
                                        dtype=torch.float32, device=torch.device("cpu"), context="test")

    reads.active = True
    batch = build({"response_mask": mask, "values": big, "rewards": torch.tensor([3e38, 3e38])})
    assert reads.count == 2  # the verdicts, then the closer looks of both sums together
    assert torch.equal((big * mask).view(torch.int32), batch.tensors["values"].view(torch.int32))
    batch = build({"response_mask": mask, "values": nan_masked})
    assert reads.count == 4
    assert torch.equal(torch.where(mask, nan_masked, 0).view(torch.int32), batch.tensors["values"].view(torch.int32))
    batch = build({"response_mask": float_mask, "values": big})
    assert batch.lengths.tolist() == [2, 1] and torch.equal(batch.mask, mask)


def test_a_host_error_waits_for_an_earlier_value_check():
    """Tensors are checked in name order: Inf in old_logprobs is named before complex values, although
    the dtype is known on the host at once and the Inf only when the verdicts are read."""
    x = _inputs()
    old = x["old_logprobs"].clone()
    old[0, 0] = float("inf")
    tensors = {"response_mask": x["response_mask"], "rewards": x["rewards"], "old_logprobs": old,
               "ref_logprobs": x["ref_logprobs"], "values": torch.zeros(B, T, dtype=torch.complex64)}
    with pytest.raises(InvalidArgument) as caught:
        Engine("cpu", kernels="torch").prepare_advantages(AdvantageRequest("gae", tensors, preset="openrlhf"))
    assert caught.value.field == "tensors.old_logprobs"
    assert "NaN or Inf" in str(caught.value)


def test_counter_sees_reads(reads):
    """The counter is live: a plain read of a tensor is one."""
    reads.active = True
    float(torch.ones(()).sum())
    assert reads.count == 1 and reads.where[0].startswith("__float__ in test_counter_sees_reads")


def test_host_scalars_lists_and_numbers():
    """0-d tensors come back as numbers, 1-d ones as lists, each in its dtype's Python type; numbers pass."""
    values = {"mean": torch.tensor(0.1, dtype=torch.float32), "per_group": torch.tensor([0.5, 0.25, 1.0]),
              "sizes": torch.tensor([4, 4, 2]), "empty": torch.zeros(0), "given": None, "count": 3}
    out = device_module.host_scalars(values)
    assert out == {"mean": float(torch.tensor(0.1, dtype=torch.float32)), "per_group": [0.5, 0.25, 1.0],
                   "sizes": [4, 4, 2], "empty": [], "given": None, "count": 3}
    assert all(isinstance(n, int) for n in out["sizes"]) and list(out) == list(values)
    with pytest.raises(ValueError, match="dimensions"):
        device_module.host_scalars({"matrix": torch.zeros(2, 2)})


def test_numbers_are_packed_in_one_kernel_per_dtype():
    """What a device copies to the host (`device.packed_float64`): every value exact in float64, the names
    reordered with the values, and one concatenation and one conversion per dtype (not one per value)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    values = {"mean": torch.tensor(0.1, dtype=torch.float32), "sizes": torch.tensor([4, 4, 2]),
              "verdicts": torch.tensor([True, False]), "std": torch.tensor(0.3, dtype=torch.float32),
              "count": torch.tensor(2**52 + 1), "per_group": torch.tensor([0.25, 1e-300], dtype=torch.float64),
              "max": torch.tensor(3e38, dtype=torch.float32), "empty": torch.zeros(0),
              **{f"metric{i}": torch.tensor(i / 7, dtype=torch.float32) for i in range(6)},
              "tokens": torch.tensor(4096), "finite": torch.tensor(True)}

    class Kernels(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func not in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default):
                Kernels.count += 1
            return func(*args, **(kwargs or {}))

    with Kernels():
        names, tensors, flat = device_module.packed_float64(list(values), list(values.values()))
    assert sorted(names) == sorted(values) and [values[n] for n in names] == tensors
    assert flat.dtype == torch.float64 and flat.numel() == sum(t.numel() for t in values.values())
    start = 0
    for name, tensor in zip(names, tensors):
        got = flat[start:start + tensor.numel()]
        start += tensor.numel()
        assert torch.equal(got, tensor.reshape(-1).to(torch.float64)), name
    dtypes = {t.dtype for t in values.values()}
    # a cat and a conversion per dtype, one cat: fewer than one conversion per value and a cat
    assert Kernels.count <= 2 * len(dtypes) + 1 < len(values) + 1, Kernels.count


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: torch's sync debug mode and streams")
class TestOnCuda:
    """The same property through torch's own detector of synchronizing CUDA calls, and the copies of a
    job's results waiting for that job alone (later work on the stream still running)."""

    @staticmethod
    @contextlib.contextmanager
    def syncs():
        caught: list[str] = []
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as recorded:
            warnings.simplefilter("always")
            try:
                yield lambda: torch.cuda.set_sync_debug_mode("warn")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        caught.extend(str(w.message) for w in recorded if "synchroniz" in str(w.message))
        TestOnCuda.caught = caught

    @pytest.mark.parametrize("estimator,preset,params", ADVANTAGE_CASES, ids=lambda v: str(v))
    def test_advantages(self, estimator, preset, params):
        engine = Engine("cuda")
        cpu_tensors = _advantage_tensors(estimator, engine, preset)
        tensors = {k: v.cuda() if k != "group_ids" else v for k, v in cpu_tensors.items()}
        with self.syncs() as start:
            start()
            prepared = engine.prepare_advantages(AdvantageRequest(estimator, tensors, preset=preset, params=params),
                                                 defer_checks=True)
            result = engine.run_advantages([prepared])[0]
            result.check()
            stats = result.stats
        # the torch scans choose their path by a read of the mask (functional/scan.py Compactor)
        allowed = 1 if engine.kernels == "triton" else 2
        assert len(self.caught) <= allowed, self.caught
        cpu = Engine("cpu", kernels="torch").compute_advantages(AdvantageRequest(estimator, cpu_tensors, preset=preset, params=params))
        assert stats.keys() == cpu.stats.keys() and stats["tokens"] == cpu.stats["tokens"]
        assert stats["advantages"] == pytest.approx(cpu.stats["advantages"], rel=1e-5, abs=1e-6)

    @pytest.mark.parametrize("terms", LOSS_CASES, ids=lambda v: ",".join(f"{k}" for k in v))
    def test_losses(self, terms):
        engine = Engine("cuda")
        cpu_tensors = _loss_tensors(terms)
        request = LossRequest({k: v.cuda() for k, v in cpu_tensors.items()}, preset="verl", **terms)
        with self.syncs() as start:
            start()
            result = engine.compute_losses(request)  # validation included
        assert len(self.caught) <= 1, self.caught
        cpu = Engine("cpu", kernels="torch").compute_losses(LossRequest(cpu_tensors, preset="verl", **terms))
        assert result.loss == pytest.approx(cpu.loss, rel=1e-5, abs=1e-6)
        assert result.metrics.keys() == cpu.metrics.keys()

    @pytest.mark.parametrize("case", [c for c in VALIDATION_CASES if VALIDATION_CASES[c][4] == 1])
    def test_validation(self, case):
        """prepare_advantages with CUDA tensors (group ids and cu_seqlens as given: host memory)."""
        estimator, preset, params, change, _ = VALIDATION_CASES[case]
        engine = Engine("cuda")
        tensors = change(_advantage_tensors(estimator, engine, preset))
        on_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) and k not in ("group_ids", "cu_seqlens") else v
                  for k, v in tensors.items()}
        layout = "packed" if "cu_seqlens" in tensors else None
        request = AdvantageRequest(estimator, on_gpu, preset=preset, params=params, layout=layout)
        with self.syncs() as start:
            start()
            prepared = engine.prepare_advantages(request)
        assert len(self.caught) <= 1, self.caught
        with self.syncs() as start:  # left to be read with the results: none
            start()
            deferred = engine.prepare_advantages(request, defer_checks=True)
        assert not self.caught and deferred.checks is not None, self.caught
        assert prepared.batch.tensors.keys() >= {k for k in tensors if k not in ("group_ids", "cu_seqlens")} - {
            "response_mask"}

    def test_copies_wait_for_their_job_only(self):
        """A job's result copies (and its stats) land while later work queued on the stream still runs."""
        from advserve.scheduler import Scheduler

        engine = Engine("cuda")
        scheduler = Scheduler(engine)
        try:
            tensors = {k: v.cuda() for k, v in _advantage_tensors("grpo", engine, "verl").items()}
            prepared = engine.prepare_advantages(AdvantageRequest("grpo", tensors, preset="verl"))

            async def run():
                return await scheduler.advantages(prepared)

            result, _ = asyncio.run(run())
            assert all(getattr(t, "_advserve_ready", None) is not None for t in result.tensors())
            torch.cuda._sleep(4_000_000_000)  # later work on the stream: seconds of GPU time
            copies = copy_to_host(result.tensors())
            for copy in copies:
                copy.wait()
            stats = result.stats
            still_running = not torch.cuda.current_stream().query()
            torch.cuda.synchronize()
            assert still_running
            cpu = Engine("cpu", kernels="torch").compute_advantages(AdvantageRequest(
                "grpo", _advantage_tensors("grpo", engine, "verl"), preset="verl"))
            assert torch.allclose(copies[0].tensor, cpu.advantages, atol=1e-6) and stats["tokens"] == cpu.stats["tokens"]
        finally:
            scheduler.close()
