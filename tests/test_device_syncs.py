"""Statistics cost at most one device synchronization per request (issue 13, item 2).

Every number a response carries (advantage stats, loss value, components, metrics) is computed as a 0-d
tensor on the device and brought to the host by one `device.host_scalars` call. On the CPU there is no
device sync to observe, so these tests count what would be one on CUDA: every host read of a tensor's
value (`item`, `tolist`, `numpy`, `float()`, `int()`, `bool()`, `__index__`, a data-dependent shape
from `nonzero`), with one `host_scalars` / `fetch_scalars` call counted once, from the moment the compute starts (after
validation) until the response's numbers and tensors are on the host (`copy_to_host`, as the encoder
does). On CUDA the same runs under torch's own sync debug mode.

Two reads inside the estimators are not counted, each for its stated reason (`NOT_DEVICE_READS`); every
other read fails the test, and so does a read of those two from anywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import linecache
import sys
import warnings

import pytest
import torch

from advserve import device as device_module
from advserve import engine as engine_module
from advserve.device import copy_to_host
from advserve.engine import Engine
from advserve.functional import masks
from advserve.loss_specs import TERM_TENSORS
from advserve.model import AdvantageRequest, LossRequest

B, T = 6, 7
READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "nonzero")


# (function, source line fragment) of reads that are not on the response path's device work
NOT_DEVICE_READS = {
    # a constant built on the CPU (verl's torch.tensor(1.0) + eps rounded to float32): no device involved
    ("group_normalized_advantages", "torch.tensor(1.0, dtype=torch.float32)"),
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

    @contextlib.contextmanager
    def fetching(self):
        """Reads inside one fetch are that fetch."""
        self._inside_fetch = True
        try:
            yield
        finally:
            self._inside_fetch = False

    def hit(self, what: str) -> None:
        if not self.active or self._inside_fetch:
            return
        frame = sys._getframe(2)  # the function that read the value (above the counting wrapper)
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
            counter.hit(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    original_nonzero = torch.nonzero

    def nonzero(*args, **kwargs):
        counter.hit("torch.nonzero")
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
    return counter


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


@pytest.mark.parametrize("estimator,preset,params", ADVANTAGE_CASES, ids=lambda v: str(v))
def test_advantages_read_the_device_at_most_once(reads, monkeypatch, estimator, preset, params):
    engine = Engine("cpu")
    request = AdvantageRequest(estimator, _advantage_tensors(estimator, engine, preset), preset=preset,
                               params=params)
    alone = engine.compute_advantages(request)  # the CPU's branches; the GPU's give the same numbers
    expected = (alone.stats, alone.advantages, alone.returns)
    as_on_a_gpu(monkeypatch)
    prepared = engine.prepare_advantages(request)
    reads.active = True
    result = engine.run_advantages([prepared])[0]
    copy_to_host([result.advantages, result.returns])
    stats = result.stats
    reads.active = False
    assert reads.count <= 1, f"{reads.count} reads: {reads.where}"
    assert repr(stats) == repr(expected[0])  # the same numbers, of the same Python types (int counts, -0.0)
    assert torch.equal(result.advantages, expected[1]) and torch.equal(result.returns, expected[2])


@pytest.mark.parametrize("terms", LOSS_CASES, ids=lambda v: ",".join(f"{k}" for k in v))
def test_losses_read_the_device_at_most_once(reads, monkeypatch, terms):
    engine = Engine("cpu")
    request = LossRequest(_loss_tensors(terms), preset="verl", **terms)
    expected = engine.compute_losses(request)  # the CPU's branches; the GPU's give the same numbers
    as_on_a_gpu(monkeypatch)
    original_build = engine_module.build_batch

    def build_batch(*args, **kwargs):  # the compute starts once the batch is validated
        batch = original_build(*args, **kwargs)
        reads.active = True
        return batch

    monkeypatch.setattr(engine_module, "build_batch", build_batch)
    result = engine.compute_losses(request)
    copy_to_host([t for t in (result.grad_logprobs, result.grad_values, result.grad_entropy) if t is not None])
    numbers = (result.loss, dict(result.components), dict(result.metrics))
    reads.active = False
    assert reads.count <= 1, f"{reads.count} reads: {reads.where}"
    assert repr(numbers) == repr((expected.loss, expected.components, expected.metrics))  # same types and order
    for name in ("grad_logprobs", "grad_values", "grad_entropy"):
        got, want = getattr(result, name), getattr(expected, name)
        assert (got is None and want is None) or torch.equal(got, want), name


def test_coalesced_and_packed_requests_read_once_each(reads, monkeypatch):
    """Requests sharing a device batch: one read per request; a packed request: one read."""
    engine = Engine("cpu")
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
        tensors = {k: v.cuda() for k, v in cpu_tensors.items()}
        prepared = engine.prepare_advantages(AdvantageRequest(estimator, tensors, preset=preset, params=params))
        with self.syncs() as start:
            start()
            result = engine.run_advantages([prepared])[0]
            stats = result.stats
        # the torch scans choose their path by a read of the mask (functional/scan.py Compactor)
        allowed = 1 if engine.kernels == "triton" else 2
        assert len(self.caught) <= allowed, self.caught
        cpu = Engine("cpu").compute_advantages(AdvantageRequest(estimator, cpu_tensors, preset=preset, params=params))
        assert stats.keys() == cpu.stats.keys() and stats["tokens"] == cpu.stats["tokens"]
        assert stats["advantages"] == pytest.approx(cpu.stats["advantages"], rel=1e-5, abs=1e-6)

    @pytest.mark.parametrize("terms", LOSS_CASES, ids=lambda v: ",".join(f"{k}" for k in v))
    def test_losses(self, monkeypatch, terms):
        engine = Engine("cuda")
        cpu_tensors = _loss_tensors(terms)
        request = LossRequest({k: v.cuda() for k, v in cpu_tensors.items()}, preset="verl", **terms)
        original_build = engine_module.build_batch
        with self.syncs() as start:
            def build_batch(*args, **kwargs):  # counted once the batch is validated
                batch = original_build(*args, **kwargs)
                start()
                return batch

            monkeypatch.setattr(engine_module, "build_batch", build_batch)
            result = engine.compute_losses(request)
        assert len(self.caught) <= 1, self.caught
        cpu = Engine("cpu").compute_losses(LossRequest(cpu_tensors, preset="verl", **terms))
        assert result.loss == pytest.approx(cpu.loss, rel=1e-5, abs=1e-6)
        assert result.metrics.keys() == cpu.metrics.keys()

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
            cpu = Engine("cpu").compute_advantages(AdvantageRequest(
                "grpo", _advantage_tensors("grpo", engine, "verl"), preset="verl"))
            assert torch.allclose(copies[0].tensor, cpu.advantages, atol=1e-6) and stats["tokens"] == cpu.stats["tokens"]
        finally:
            scheduler.close()
