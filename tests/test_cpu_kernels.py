"""The fused CPU scan (advserve.kernels.cpu.scan, numba) against per-token loops, the torch path and itself.

`scan` replaces several torch passes (validation, zeroed copies, the chunked GEMM scans) by one
compiled pass over the caller's raw tensors, so what it must get right is tested here directly:

* **Bits** (`test_scan_is_the_token_loop_bit_for_bit`): its recurrence is documented as verl's
  (gaps="skip") and OpenRLHF's (gaps="step") loops operation for operation in the compute dtype, so
  it is compared *exactly* with those loops written out below (`loop_gae`, `loop_reward_to_go`),
  over masks that are right-padded (the kernel's four-rows-at-a-time walk, sorted by length, and
  the rows left over), left-padded, gapped (the one-row-at-a-time walk), empty and one token long;
  token and outcome rewards, with and without values, float32 and float64, γ and λ at 0 and 1 and
  between, garbage (NaN, ±inf, huge) at masked positions. Comparisons use `torch.equal` on the valid
  positions (it compares values: ±0 are equal, which is the only difference verl's `v·m + (1−m)·x`
  blend can make) and require exact zeros at masked positions.
* **Threads** (`test_threads_do_not_change_the_bits`): a batch large enough to be split over
  threads (`TOKENS_PER_THREAD`) gives the same bits on one thread and on two, and the split really
  happens (the row pass is observed running once on each of four parts of the rows).
* **The torch path** (`test_scan_agrees_with_the_torch_path`): advserve.functional.scan's `gae` and
  `reward_to_go` (chunked GEMMs: another summation order) agree to rounding.
* **Verdicts** (`test_*_gives_none`, `test_*_masked_*`): `scan` returns None exactly when the torch
  validation would refuse the inputs (mask values other than 0/1, non-finite rewards or values at valid
  positions, a non-finite outcome reward of any row), never modifies its inputs, and returns the
  caller's tensor itself when it is already 0 at masked positions.
* **Mask outputs**: `Scan.mask` is `mask != 0` (so −0.0 is masked) and `Scan.lengths` its row sums.
* **Whitening** (`test_whitening_*`): `scan(..., whiten=form)` is `functional.masks.whiten` of the
  scan's advantages to rounding in every form, and the same bits on one thread and on two.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from advserve.functional import masks
from advserve.functional.kl import kl_and_grad
from advserve.functional.masks import Whitening
from advserve.functional.scan import gae as torch_gae
from advserve.functional.scan import use_kernels
from advserve.functional.scan import reward_to_go as torch_reward_to_go
from advserve.engine import Engine
from advserve.errors import AdvserveError
from advserve.kernels import cpu
from advserve.model import AdvantageRequest
from advserve.presets import PRESETS

PROPERTY = settings(max_examples=80, deadline=None)
GARBAGE = (math.nan, math.inf, -math.inf, 1e30, -1e30, -0.0, 7.5)
ROW_KINDS = ("right", "left", "gaps", "empty", "single", "full")
MASK_DTYPES = (torch.bool, torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8, torch.float16)
NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


# --- the per-token reference loops ---------------------------------------------------------------

def loop_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
             gaps: str) -> tuple[torch.Tensor, torch.Tensor]:
    """verl 0.9.1 `compute_gae_advantage_return` ("skip") or OpenRLHF `get_advantages_and_returns`
    ("step"), without whitening, one column at a time in the inputs' dtype. rewards and values must
    be 0 at masked positions; mask bool. Returns (advantages, returns) as the libraries compute them
    (their masked positions are not meaningful)."""
    m = mask.to(rewards.dtype)
    length = rewards.shape[1]
    columns = []
    if gaps == "skip":
        nextvalues, lastgaelam = 0, 0
        for t in reversed(range(length)):
            delta = rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            nextvalues = values[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
            lastgaelam = lastgaelam_ * m[:, t] + (1 - m[:, t]) * lastgaelam
            columns.append(lastgaelam)
    else:
        values, rewards = m * values, m * rewards
        lastgaelam = 0
        for t in reversed(range(length)):
            nextvalues = values[:, t + 1] if t < length - 1 else 0.0
            delta = rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam = delta + gamma * lam * lastgaelam
            columns.append(lastgaelam)
    advantages = torch.stack(columns[::-1], dim=1)
    return advantages, advantages + values


def loop_reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float, gaps: str) -> torch.Tensor:
    """G_t = r_t + γ·G_next, one column at a time: "skip" carries G unchanged over masked positions,
    "step" discounts there (G_t = γ·G_{t+1}). rewards must be 0 at masked positions; mask bool."""
    length = rewards.shape[1]
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    out = torch.empty_like(rewards)
    for t in reversed(range(length)):
        step = rewards[:, t] + gamma * running
        running = torch.where(mask[:, t], step, running) if gaps == "skip" else step
        out[:, t] = running
    return out


# --- inputs --------------------------------------------------------------------------------------

def row_mask(kind: str, width: int, rng: np.random.Generator) -> np.ndarray:
    """One row's 0/1 mask of the given kind."""
    row = np.zeros(width, dtype=bool)
    n = int(rng.integers(0, width + 1))
    if kind == "right":
        row[:n] = True
    elif kind == "left":
        row[width - n:] = True
    elif kind == "gaps":
        row = rng.random(width) < rng.uniform(0.2, 0.9)
    elif kind == "single":
        row[int(rng.integers(0, width))] = True
    elif kind == "full":
        row[:] = True
    return row


def build_mask(rows: np.ndarray, dtype: torch.dtype, negative_zero: bool) -> torch.Tensor:
    """The bool mask as a tensor of `dtype`; float masks hold −0.0 at masked positions if asked."""
    mask = torch.from_numpy(rows.copy()).to(dtype)
    if negative_zero and dtype.is_floating_point:
        mask = torch.where(mask != 0, mask, torch.tensor(-0.0, dtype=dtype))
    return mask


def with_garbage(clean: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator, rate: float) -> torch.Tensor:
    """`clean` (0 at masked positions) with a fraction `rate` of its masked positions overwritten by
    garbage (NaN, ±inf, huge, −0.0, a number)."""
    noisy = clean.clone()
    hidden = ~mask & torch.from_numpy(rng.random(tuple(mask.shape)) < rate)
    picks = torch.tensor(rng.choice(np.array(GARBAGE), size=tuple(mask.shape)), dtype=clean.dtype)
    noisy[hidden] = picks[hidden]
    return noisy


def bits(x: torch.Tensor) -> torch.Tensor:
    """x's bit patterns (NaN-safe and sign-of-zero-exact comparisons)."""
    return x.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[x.element_size()])


def finite_values(rng: np.random.Generator, shape, dtype) -> torch.Tensor:
    """Normal numbers with varied scales, some exact zeros."""
    x = rng.standard_normal(shape) * rng.choice([0.01, 1.0, 100.0], size=shape)
    x[rng.random(shape) < 0.1] = 0.0
    return torch.from_numpy(x.astype(NUMPY_DTYPE[dtype]))


unit = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))


@st.composite
def cases(draw, max_batch=9, max_width=70):
    """A random batch: row kinds, dtypes, γ, λ, gaps, reward kind, values or not, garbage rate."""
    batch = draw(st.integers(1, max_batch))
    width = draw(st.integers(1, max_width))
    kinds = draw(st.lists(st.sampled_from(ROW_KINDS), min_size=batch, max_size=batch))
    return dict(
        batch=batch, width=width, kinds=kinds,
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        mask_dtype=draw(st.sampled_from(MASK_DTYPES)),
        negative_zero=draw(st.booleans()),
        gamma=draw(unit), lam=draw(unit),
        gaps=draw(st.sampled_from(["skip", "step"])),
        outcome=draw(st.booleans()), with_values=draw(st.booleans()),
        garbage=draw(st.sampled_from([0.0, 0.3, 1.0])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def make_inputs(case: dict):
    """(raw inputs for `scan`, clean token rewards, clean values or None, bool mask) for a case; the
    clean tensors are 0 at masked positions (outcome rewards placed on each row's last valid token)."""
    rng = np.random.default_rng(case["seed"])
    rows = np.stack([row_mask(kind, case["width"], rng) for kind in case["kinds"]])
    valid = torch.from_numpy(rows)
    mask = build_mask(rows, case["mask_dtype"], case["negative_zero"])
    dtype, shape = case["dtype"], rows.shape
    values = finite_values(rng, shape, dtype) * valid if case["with_values"] else None
    if case["outcome"]:
        outcome = finite_values(rng, (shape[0],), dtype)
        rewards = torch.zeros(shape, dtype=dtype)
        for b in range(shape[0]):
            positions = valid[b].nonzero()
            if len(positions):
                rewards[b, positions[-1, 0]] = outcome[b]
        raw_rewards = None
    else:
        outcome = None
        rewards = finite_values(rng, shape, dtype) * valid
        raw_rewards = with_garbage(rewards, valid, rng, case["garbage"])
    raw_values = None if values is None else with_garbage(values, valid, rng, case["garbage"])
    raw = dict(rewards=raw_rewards, values=raw_values, mask=mask, outcome=outcome)
    return raw, rewards, values, valid


def run_scan(raw: dict, case: dict):
    return cpu.scan(raw["rewards"], raw["values"], raw["mask"], case["gamma"], case["lam"], case["gaps"],
                    outcome=raw["outcome"])


def assert_exact_where_valid(got: torch.Tensor, want: torch.Tensor, valid: torch.Tensor) -> None:
    """Equal values at valid positions, exactly 0 at masked ones."""
    assert got.dtype == want.dtype
    assert torch.equal(got[valid], want[valid]), (got[valid] - want[valid]).abs().max()
    assert bool((got[~valid] == 0).all())


def assert_is_the_loop(result, rewards: torch.Tensor, values: torch.Tensor | None, valid: torch.Tensor,
                       gamma: float, lam: float, gaps: str) -> None:
    """The scan's advantages and returns are the loop's (`loop_gae`, or `loop_reward_to_go` without
    values) over these clean rewards and values, bit for bit at valid positions, 0 at masked ones."""
    if values is None:
        advantages = returns = loop_reward_to_go(rewards, valid, gamma, gaps)
    else:
        advantages, returns = loop_gae(rewards, values, valid, gamma, lam, gaps)
    assert_exact_where_valid(result.advantages, advantages, valid)
    assert_exact_where_valid(result.returns, returns, valid)


# --- 1. bit for bit with the loops (and 5. the mask outputs) --------------------------------------

@PROPERTY
@given(cases())
def test_scan_is_the_token_loop_bit_for_bit(case):
    """Advantages and returns equal verl's / OpenRLHF's loop (GAE) or the reward-to-go loop exactly;
    the mask, lengths and zeroed copies are as documented; the inputs are untouched."""
    raw, rewards, values, valid = make_inputs(case)
    before = {name: t.clone() for name, t in raw.items() if t is not None}
    result = run_scan(raw, case)
    assert result is not None
    for name, t in before.items():
        assert torch.equal(bits(raw[name]) if t.is_floating_point() else raw[name],
                           bits(t) if t.is_floating_point() else t), f"{name} modified"

    assert_is_the_loop(result, rewards, values, valid, case["gamma"], case["lam"], case["gaps"])

    # 5. the mask and the lengths
    assert result.mask.dtype == torch.bool and torch.equal(result.mask, raw["mask"] != 0)
    assert result.lengths.dtype == torch.int32
    assert torch.equal(result.lengths, valid.sum(dim=1, dtype=torch.int32))

    # the rewards' zeroed copy: 0 at masked positions, the input itself when it already was (the values
    # are consumed by the scan, not kept)
    if case["outcome"]:
        assert result.rewards is None
    else:
        assert torch.equal(result.rewards, rewards)
        assert (result.rewards is raw["rewards"]) == bool((raw["rewards"][~valid] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gaps", ["skip", "step"])
def test_right_padded_rows_of_every_length_bit_for_bit(dtype, gaps):
    """Right-padded rows of lengths 0..T in shuffled order (quads of sorted lengths, each quad's
    shortest row ending the joint walk, three rows left over) against the loop."""
    rng = np.random.default_rng(7)
    width = 23
    lengths = rng.permutation(np.arange(width + 1))  # 24 rows: 6 quads
    lengths = np.concatenate([lengths, [5, 5, 17]])  # and 3 left over
    rows = np.arange(width)[None, :] < lengths[:, None]
    valid = torch.from_numpy(rows)
    rewards = finite_values(rng, rows.shape, dtype) * valid
    values = finite_values(rng, rows.shape, dtype) * valid
    result = cpu.scan(rewards, values, valid, 0.97, 0.9, gaps)
    advantages, returns = loop_gae(rewards, values, valid, 0.97, 0.9, gaps)
    assert_exact_where_valid(result.advantages, advantages, valid)
    assert_exact_where_valid(result.returns, returns, valid)
    result = cpu.scan(rewards, None, valid, 0.97, 0.9, gaps)
    assert_exact_where_valid(result.advantages, loop_reward_to_go(rewards, valid, 0.97, gaps), valid)


# --- 2. threads ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_values", [True, False])
@pytest.mark.parametrize("outcome", [False, True])
def test_threads_do_not_change_the_bits(monkeypatch, dtype, with_values, outcome):
    """[64, 2048] (2^17 tokens; TOKENS_PER_THREAD lowered to 2^16, two threads' worth) gives the same
    bits on two threads as on one, the two-thread call really splits the rows (the compiled row pass is
    observed being called once on each quarter), and the result is the loop's."""
    monkeypatch.setattr(cpu, "TOKENS_PER_THREAD", 1 << 16)
    batch, width = 64, 2048
    case = dict(batch=batch, width=width, kinds=[ROW_KINDS[i % len(ROW_KINDS)] for i in range(batch)],
                dtype=dtype, mask_dtype=torch.bool, negative_zero=False, gamma=0.99, lam=0.95, gaps="skip",
                outcome=outcome, with_values=with_values, garbage=0.3, seed=11)
    raw, rewards, values, valid = make_inputs(case)
    calls = []  # (start, stop, thread) of each call of the row pass
    rows = cpu._rows

    def spy(*args):
        calls.append((args[-2], args[-1], threading.get_ident()))
        return rows(*args)

    monkeypatch.setattr(cpu, "_rows", spy)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = run_scan(raw, case)
        assert [call[:2] for call in calls] == [(0, batch)]
        calls.clear()
        torch.set_num_threads(2)
        threaded = run_scan(raw, case)
    finally:
        torch.set_num_threads(threads)
    assert batch * width // cpu.TOKENS_PER_THREAD >= 2
    # two threads: four parts of the rows (twice the threads), each run once, on this thread or the
    # pool's (a part the pool has not started when this thread is free is run here: which runs where is
    # a race, the parts are not)
    assert sorted(call[:2] for call in calls) == [(0, 16), (16, 32), (32, 48), (48, 64)]
    pool_threads = {thread.ident for thread in threading.enumerate() if thread.name.startswith("advserve-scan")}
    assert {call[2] for call in calls} <= pool_threads | {threading.get_ident()}
    for name in ("advantages", "returns", "rewards"):
        if getattr(serial, name) is None:
            assert getattr(threaded, name) is None
        else:
            assert torch.equal(bits(getattr(serial, name)), bits(getattr(threaded, name))), name
    assert torch.equal(serial.mask, threaded.mask) and torch.equal(serial.lengths, threaded.lengths)
    assert_is_the_loop(threaded, rewards, values, valid, 0.99, 0.95, "skip")
    if not outcome:
        assert torch.equal(threaded.rewards, rewards)


@pytest.mark.parametrize("poisoned_row", [0, 40, 63])
def test_a_bad_row_in_any_thread_part_gives_none(monkeypatch, poisoned_row):
    """The parts' verdicts are combined: a NaN reward at a valid position in either part's rows -> None."""
    monkeypatch.setattr(cpu, "TOKENS_PER_THREAD", 1 << 16)
    batch, width = 64, 2048
    rewards = torch.randn(batch, width, dtype=torch.float64)
    values = torch.randn(batch, width, dtype=torch.float64)
    mask = torch.ones(batch, width, dtype=torch.bool)
    mask[::3, 1000:] = False
    rewards[poisoned_row, 5] = math.nan
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu.scan(rewards, values, mask, 0.99, 0.95) is None
        rewards[poisoned_row, 5] = 0.0
        assert cpu.scan(rewards, values, mask, 0.99, 0.95) is not None
    finally:
        torch.set_num_threads(threads)


# --- 3. the torch path ---------------------------------------------------------------------------

@PROPERTY
@given(cases(max_width=120))
def test_scan_agrees_with_the_torch_path(case):
    """advserve.functional.scan (chunked GEMMs over the zeroed inputs) agrees to rounding: float64
    within 1e-12 and float32 within 1e-5 of the largest |output|, |reward| or |value|."""
    raw, rewards, values, valid = make_inputs(case)
    result = run_scan(raw, case)
    assert result is not None
    if values is None:
        want = {"advantages": torch_reward_to_go(rewards, valid, case["gamma"], case["gaps"])}
    else:
        advantages, returns = torch_gae(rewards, values, valid, case["gamma"], case["lam"], case["gaps"])
        want = {"advantages": advantages, "returns": returns}
    tolerance = 1e-12 if case["dtype"] == torch.float64 else 1e-5
    # relative to the largest magnitude in play: returns = A + V cancels (|returns| << |V| when A ≈ −V),
    # and so do the advantages' sums of δ_t = r_t + γV_{t+1} − V_t, so |ref| alone can be far smaller
    # than the terms whose rounding the two summation orders differ by
    scale = max(float(t.abs().max()) for t in [rewards, *want.values()] + ([] if values is None else [values]))
    for name, ref in want.items():
        got = getattr(result, name)
        error = float((got - ref).abs().max())
        assert error <= tolerance * scale, (name, error, scale, case)
        assert bool((got[~valid] == 0).all())


# --- 4. verdicts ---------------------------------------------------------------------------------

@PROPERTY
@given(cases(), st.sampled_from([0.5, 2.0, -1.0, math.nan, math.inf]), st.integers(0, 10**6))
def test_a_mask_value_other_than_0_or_1_gives_none(case, bad, where):
    """One mask value that is not 0/1, anywhere (valid or masked rows, any row kind) -> None."""
    case = dict(case, mask_dtype=torch.float64 if case["dtype"] == torch.float64 else torch.float32)
    raw, *_ = make_inputs(case)
    mask = raw["mask"].clone()
    mask.view(-1)[where % mask.numel()] = bad
    assert cpu.scan(raw["rewards"], raw["values"], mask, case["gamma"], case["lam"], case["gaps"],
                    outcome=raw["outcome"]) is None


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.int8])
@pytest.mark.parametrize("bad", [2, 255])
def test_an_integer_mask_value_other_than_0_or_1_gives_none(dtype, bad):
    """Integer masks are widened before the check: 2 (or 255, or −1 for int8) is still refused."""
    mask = torch.ones(3, 5, dtype=dtype)
    mask[1, 2] = bad if dtype != torch.int8 or bad < 128 else -1
    assert cpu.scan(torch.zeros(3, 5), torch.zeros(3, 5), mask, 0.9, 0.9) is None


@PROPERTY
@given(cases(), st.sampled_from([math.nan, math.inf, -math.inf]), st.integers(0, 10**6), st.booleans())
def test_a_non_finite_input_at_a_valid_position_gives_none(case, poison, where, in_values):
    """NaN or ±inf in the rewards or the values at any valid position -> None, whatever γ and λ
    (γλ = 0 included: the scan's finiteness test relies on 0·NaN = NaN)."""
    case = dict(case, outcome=False, with_values=case["with_values"] or in_values,
                kinds=case["kinds"][:-1] + ["full"])  # at least one valid token
    raw, _, _, valid = make_inputs(case)
    positions = valid.nonzero()
    b, t = positions[where % len(positions)].tolist()
    target = raw["values"] if in_values else raw["rewards"]
    target[b, t] = poison
    assert run_scan(raw, case) is None


@PROPERTY
@given(cases(), st.sampled_from([math.nan, math.inf, -math.inf]), st.integers(0, 10**6))
def test_a_non_finite_outcome_reward_of_any_row_gives_none(case, poison, row):
    """A non-finite outcome reward -> None, also for a row with no valid token (nothing reads it)."""
    case = dict(case, outcome=True)
    raw, *_ = make_inputs(case)
    row %= case["batch"]
    raw["outcome"][row] = poison
    assert run_scan(raw, case) is None


def test_non_finite_outcome_of_an_empty_row_gives_none():
    """The smallest case of the above: the empty row's reward is never placed, yet it is refused."""
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    outcome = torch.tensor([1.0, math.nan])
    assert cpu.scan(None, None, mask, 1.0, 1.0, outcome=outcome) is None
    assert cpu.scan(None, torch.zeros(2, 3), mask, 1.0, 1.0, outcome=outcome) is None
    assert cpu.scan(None, None, mask, 1.0, 1.0, outcome=torch.tensor([1.0, 0.0])) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gaps", ["skip", "step"])
def test_non_finite_inputs_at_masked_positions_are_zeroed_in_copies(dtype, gaps):
    """NaN and ±inf only at masked positions: a result, a zeroed copy of the rewards, the caller's
    tensors untouched, and the advantages those of the zeroed inputs."""
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1], [1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    rewards = torch.arange(20, dtype=dtype).view(5, 4) / 7
    values = torch.arange(20, dtype=dtype).view(5, 4).flip(1) / 3
    rewards[~mask] = torch.tensor([math.nan, math.inf, -math.inf, 0.0, 5.0, math.nan, -0.0, 1.0, math.inf],
                                  dtype=dtype)
    values[~mask] = torch.tensor([math.inf, math.nan, 3.0, -math.inf, 0.0, 2.0, math.nan, -0.0, 1.0], dtype=dtype)
    rewards_before, values_before = rewards.clone(), values.clone()
    result = cpu.scan(rewards, values, mask, 0.9, 0.8, gaps)
    assert result is not None
    assert torch.equal(bits(rewards), bits(rewards_before)) and torch.equal(bits(values), bits(values_before))
    assert result.rewards is not rewards
    clean_rewards = torch.where(mask, rewards, 0)
    clean_values = torch.where(mask, values, 0)
    assert torch.equal(result.rewards, clean_rewards)
    advantages, returns = loop_gae(clean_rewards, clean_values, mask, 0.9, 0.8, gaps)
    assert_exact_where_valid(result.advantages, advantages, mask)
    assert_exact_where_valid(result.returns, returns, mask)
    assert bool(torch.isfinite(result.advantages).all() and torch.isfinite(result.returns).all())


@pytest.mark.parametrize("with_values", [True, False])
def test_inputs_already_zero_at_masked_positions_are_not_copied(with_values):
    """Clean rewards (−0.0 counts as 0) come back as the very same tensor."""
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    rewards = torch.randn(3, 3) * mask
    rewards[0, 2] = -0.0
    values = torch.randn(3, 3) * mask if with_values else None
    result = cpu.scan(rewards, values, mask, 0.9, 0.8)
    assert result.rewards is rewards
    if not with_values:
        assert result.returns is result.advantages


@pytest.mark.parametrize("compute", [torch.float32, torch.float64])
def test_mask_dtypes_give_the_same_bits(compute):
    """bool, int64/int32/uint8/int8, float16/bfloat16/float32/float64 masks (float ones with −0.0 for
    masked positions) give the same results as the bool mask."""
    rng = np.random.default_rng(3)
    rows = np.stack([row_mask(kind, 13, rng) for kind in ROW_KINDS * 2])
    valid = torch.from_numpy(rows)
    rewards = finite_values(rng, rows.shape, compute)
    values = finite_values(rng, rows.shape, compute)
    want = cpu.scan(rewards, values, valid, 0.95, 0.7, "skip")
    for dtype in (torch.int64, torch.int32, torch.uint8, torch.int8, torch.float16, torch.bfloat16,
                  torch.float32, torch.float64):
        for negative_zero in (False, True):
            got = cpu.scan(rewards, values, build_mask(rows, dtype, negative_zero), 0.95, 0.7, "skip")
            assert got is not None, dtype
            assert torch.equal(got.mask, valid) and torch.equal(got.lengths, want.lengths)
            for name in ("advantages", "returns", "rewards"):
                assert torch.equal(bits(getattr(got, name)), bits(getattr(want, name))), (dtype, name)


def test_negative_zero_in_a_float_mask_is_masked():
    """−0.0 is a masked position (not a 0/1 violation), exactly like +0.0."""
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    values = torch.tensor([[0.5, 0.25, 0.125, 0.0625]])
    plus = cpu.scan(rewards, values, torch.tensor([[1.0, 0.0, 1.0, 0.0]]), 0.9, 0.8)
    minus = cpu.scan(rewards, values, torch.tensor([[1.0, -0.0, 1.0, -0.0]]), 0.9, 0.8)
    assert minus is not None
    assert torch.equal(minus.mask, torch.tensor([[True, False, True, False]]))
    assert torch.equal(minus.lengths, torch.tensor([2], dtype=torch.int32))
    assert torch.equal(bits(minus.advantages), bits(plus.advantages))
    assert torch.equal(bits(minus.returns), bits(plus.returns))


@PROPERTY
@given(cases(), st.sampled_from(["k1", "k2", "abs"]), st.sampled_from([None, 0.5]),
       st.sampled_from([(None, None), (-0.5, 0.25), (0.1, None)]))
def test_shaped_rewards_with_garbage_at_masked_positions_bit_for_bit(case, estimator, clamp, clip):
    """With a reward clip and a KL penalty, garbage (NaN, ±inf) at masked positions of the rewards,
    values and both log-probs is still no reason for None, in rows of every kind (gaps included): the
    result is the loop's over the shaped rewards clamp(r, low, high) − β·kl(old, ref) computed by torch
    (functional.kl), bit for bit at valid positions."""
    case = dict(case, outcome=False, garbage=max(case["garbage"], 0.3))
    raw, rewards, values, valid = make_inputs(case)
    rng = np.random.default_rng(case["seed"] + 2)
    old, ref = (-finite_values(rng, valid.shape, case["dtype"]).abs() * valid for _ in range(2))
    beta = 0.05
    result = cpu.scan(raw["rewards"], raw["values"], raw["mask"], case["gamma"], case["lam"], case["gaps"],
                      old_logprobs=with_garbage(old, valid, rng, 1.0), ref_logprobs=with_garbage(ref, valid, rng, 1.0),
                      kl_coef=beta, kl_estimator=estimator, kl_clamp=clamp, clip=clip)
    assert result is not None
    kl, _ = kl_and_grad(old, ref, estimator, clamp)
    clipped = rewards if clip == (None, None) else rewards.clamp(*clip)
    shaped = (clipped - beta * kl) * valid
    assert_is_the_loop(result, shaped, values, valid, case["gamma"], case["lam"], case["gaps"])


# --- 6. whitening --------------------------------------------------------------------------------

WHITENINGS = (Whitening(1, 1e-8, "inside"), Whitening(0, 1e-8, "floor"), Whitening(0, 1e-8, "floor", use_std=False),
              Whitening(1, 1e-5, "outside"), Whitening(0, 0.0, "inside"), Whitening(1, 0.0, "outside"))


@PROPERTY
@given(cases(max_width=120), st.sampled_from(WHITENINGS))
def test_whitening_in_the_scan_is_whiten_of_the_scan(case, form):
    """scan(..., whiten=form) gives functional.masks.whiten(advantages, valid, form) of the scan without
    it, to rounding (float64 1e-12, float32 1e-5, of max|A|/d + 1: the whitened value's rounding is
    that of A − μ, divided by the scale d), exact zeros at masked positions; the returns are the scan's, bit for bit (without values:
    the reward-to-go before whitening)."""
    raw, _, _, valid = make_inputs(case)
    plain = run_scan(raw, case)
    whitened = cpu.scan(raw["rewards"], raw["values"], raw["mask"], case["gamma"], case["lam"], case["gaps"],
                        outcome=raw["outcome"], whiten=form)
    weights = valid.to(case["dtype"])
    want = masks.whiten(plain.advantages, weights, **vars(form))
    assert torch.equal(bits(whitened.returns), bits(plain.returns))
    assert whitened.advantages is not whitened.returns
    _, denom = masks.whitening_statistics(plain.advantages, weights, **vars(form))
    d = 1.0 if denom is None else float(denom)
    if d > 0:
        tolerance = 1e-12 if case["dtype"] == torch.float64 else 1e-5
        scale = float(plain.advantages.abs().max()) / d + 1.0
        error = float((whitened.advantages - want).abs().max())
        assert error <= tolerance * scale, (error, scale, form)
    # (d = 0: every valid A equal and eps 0, where whiten gives zeros; the kernel's float64 moments may
    # see a variance of rounding size there and divide by it: ill-conditioned, as the torch path is)
    assert bool((whitened.advantages[~valid] == 0).all())


@PROPERTY
@given(cases(max_width=120), st.sampled_from(WHITENINGS))
def test_whitening_afterwards_is_the_scans_own_whitening_bit_for_bit(case, form):
    """cpu.whiten of a scan's advantages (what a sharded batch's second pass and the estimators' own
    whitening under the numba kernels run) gives the bits of scan(..., whiten=form): the same row
    moments over the same ranges, merged in the same order."""
    raw, _, _, valid = make_inputs(case)
    plain = run_scan(raw, case)
    whitened = cpu.scan(raw["rewards"], raw["values"], raw["mask"], case["gamma"], case["lam"], case["gaps"],
                        outcome=raw["outcome"], whiten=form)
    assert torch.equal(bits(cpu.whiten(plain.advantages, plain.mask, form)), bits(whitened.advantages))
    with use_kernels("numba"):
        through_masks = masks.whiten(plain.advantages, valid.to(case["dtype"]), **vars(form))
    assert torch.equal(bits(through_masks), bits(whitened.advantages))


@pytest.mark.parametrize("with_values", [True, False])
def test_whitening_gives_the_same_bits_on_any_threads(monkeypatch, with_values):
    """The moments are taken per row and merged in row order, so two threads (both passes split) give
    one thread's bits."""
    monkeypatch.setattr(cpu, "TOKENS_PER_THREAD", 1 << 16)
    monkeypatch.setattr(cpu, "WHITENED_PER_THREAD", 1 << 16)
    case = dict(batch=64, width=2048, kinds=[ROW_KINDS[i % len(ROW_KINDS)] for i in range(64)],
                dtype=torch.float32, mask_dtype=torch.float32, negative_zero=False, gamma=1.0, lam=0.95, gaps="skip",
                outcome=False, with_values=with_values, garbage=0.3, seed=5)
    raw, _, _, _ = make_inputs(case)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(cpu.scan(raw["rewards"], raw["values"], raw["mask"], 1.0, 0.95, whiten=WHITENINGS[0]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(bits(results[0].advantages), bits(results[1].advantages))
    assert torch.equal(bits(results[0].returns), bits(results[1].returns))


# --- the engine with the kernel against the engine without it ------------------------------------

NUMBA_ENGINE = Engine("cpu", kernels="numba")
TORCH_ENGINE = Engine("cpu", kernels="torch")
SCANNED = ("gae", "orz", "reinforce_rtg", "reinforce_pp")


@st.composite
def engine_requests(draw):
    """A request for an estimator that starts from a scan, as a client sends it: raw tensors (garbage
    at masked positions), a preset that has the estimator, its parameters (γ, λ, gaps, whitening, a KL
    penalty of each estimator, clamped or not, a reward clip on either side), and sometimes a mistake:
    a mask value that is not 0/1, or NaN at a valid position (of any tensor, the log-probs included)."""
    case = draw(cases(max_width=40))
    estimator = draw(st.sampled_from(SCANNED))
    preset = draw(st.sampled_from([name for name, p in PRESETS.items() if estimator in p.estimators]))
    params = {}
    if estimator in ("gae", "reinforce_rtg", "reinforce_pp"):
        params |= {"gamma": case["gamma"], "mask_gaps": case["gaps"],
                   "kl_coef": draw(st.sampled_from([0.0, 0.0, 0.05, 1.0])),
                   "kl_estimator": draw(st.sampled_from(["k1", "k2", "k3", "abs"])),
                   "kl_clamp": draw(st.sampled_from([None, 0.5, 10.0]))}
    if estimator == "gae":
        params["lam"] = case["lam"]
    if estimator in ("gae", "reinforce_pp"):
        params |= draw(st.sampled_from([{}, {"reward_clip_low": None, "reward_clip_high": None},
                                        {"reward_clip_low": -0.5, "reward_clip_high": 0.25},
                                        {"reward_clip_low": 0.1}, {"reward_clip_high": -0.1}]))
    if estimator != "reinforce_rtg":
        params["whiten"] = draw(st.sampled_from([True, False]))
    case |= {"with_values": estimator in ("gae", "orz")}
    raw, _, _, valid = make_inputs(case)
    tensors = {"response_mask": raw["mask"]}
    if raw["outcome"] is not None:
        tensors["rewards"] = raw["outcome"]
    else:
        tensors["token_rewards"] = raw["rewards"]
    if raw["values"] is not None:
        tensors["values"] = raw["values"]
    if params.get("kl_coef", 0) > 0:  # log-probs around −1, garbage at masked positions too
        rng = np.random.default_rng(case["seed"] + 1)
        for name in ("old_logprobs", "ref_logprobs"):
            logprobs = -finite_values(rng, valid.shape, case["dtype"]).abs() * valid
            tensors[name] = with_garbage(logprobs, valid, rng, case["garbage"])
    mistake = draw(st.sampled_from([None, None, None, None, "mask", "nan"]))
    if mistake == "mask":
        tensors["response_mask"] = raw["mask"].to(torch.float64).flatten().index_fill(
            0, torch.tensor([draw(st.integers(0, valid.numel() - 1))]), 0.5).view(valid.shape)
    elif mistake == "nan" and bool(valid.any()):
        name = draw(st.sampled_from([n for n in tensors if n not in ("response_mask", "rewards")] or ["rewards"]))
        poisoned = tensors[name].clone()
        if poisoned.ndim == 2:
            poisoned[valid.nonzero()[draw(st.integers(0, int(valid.sum()) - 1))].unbind()] = math.nan
        else:
            poisoned[draw(st.integers(0, poisoned.numel() - 1))] = math.nan
        tensors[name] = poisoned
    dtype = "float64" if case["dtype"] == torch.float64 else "float32"
    return AdvantageRequest(estimator, tensors, preset=preset, params=params, dtype=dtype)


@settings(max_examples=150, deadline=None)
@given(engine_requests())
def test_the_engine_with_the_kernel_is_the_engine_without_it(request):
    """On any such request the numba engine gives the torch engine's advantages and returns to rounding
    (float64 1e-12, float32 1e-5 of the largest input or output), the same statistics to rounding, and
    the same error (class, field, message) for the same mistake."""
    try:
        want = TORCH_ENGINE.compute_advantages(request)
    except AdvserveError as error:
        with pytest.raises(type(error)) as got:
            NUMBA_ENGINE.compute_advantages(request)
        assert (got.value.field, str(got.value)) == (error.field, str(error))
        return
    got = NUMBA_ENGINE.compute_advantages(request)
    assert got.params == want.params
    tolerance = 1e-12 if request.dtype == "float64" else 1e-5
    scale = max([1.0] + [float(t[torch.isfinite(t)].abs().max()) for t in request.tensors.values()
                          if t.is_floating_point() and bool(torch.isfinite(t).any())]
                + [float(torch.where(torch.isfinite(t), t, 0).abs().max()) for t in (want.advantages, want.returns)])
    for name in ("advantages", "returns"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape
        finite = torch.isfinite(b)  # an overflow (k3 without a clamp) is the same inf or NaN on both paths
        assert torch.equal(torch.isfinite(a), finite) and torch.equal(a[~finite].isnan(), b[~finite].isnan())
        assert torch.equal(a[~finite & ~b.isnan()], b[~finite & ~b.isnan()]), name
        assert float(torch.where(finite, a - b, 0).abs().max()) <= tolerance * scale, name
    assert got.stats["tokens"] == want.stats["tokens"] and got.stats["sequences"] == want.stats["sequences"]
    for key in ("mean", "std", "min", "max"):
        assert got.stats["advantages"][key] == pytest.approx(want.stats["advantages"][key], rel=1e-4, abs=1e-4 * scale,
                                                             nan_ok=True)
    assert got.stats["rewards"] == pytest.approx(want.stats["rewards"], rel=1e-9, abs=1e-9)


def test_a_scanned_request_run_with_other_parameters_is_refused():
    """The kernel scans (and whitens) while validating, and consumes the values: a prepared request run
    with other parameters than it was prepared with is refused, not answered with the old scan."""
    import dataclasses

    mask = torch.ones(2, 5)
    request = AdvantageRequest("gae", {"token_rewards": torch.randn(2, 5), "values": torch.randn(2, 5),
                                       "response_mask": mask}, preset="verl")
    prepared = NUMBA_ENGINE.prepare_advantages(request)
    assert prepared.batch.scan is not None
    NUMBA_ENGINE.run_advantages([prepared])
    for change in ({"whiten": False}, {"lam": 0.5}):
        with pytest.raises(RuntimeError, match="prepared .* with other parameters"):
            NUMBA_ENGINE.run_advantages([dataclasses.replace(prepared, params={**prepared.params, **change})])


@pytest.mark.parametrize("engine", [NUMBA_ENGINE, TORCH_ENGINE], ids=["numba", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("preset", ["paper", "verl"])  # whitening without ε, and with 1e-8 inside the root
def test_an_all_equal_batch_whitens_to_exactly_zero(engine, dtype, preset):
    """REINFORCE++ over rows whose reward-to-go is 0.1 everywhere: every valid advantage is equal, so the
    whitened advantages are exactly 0 on both paths (a one-pass mean of 0.1s is off by an ulp in
    float64, and dividing that by σ ≈ ulp, or by sqrt(1e-8), made ±1 or ±1e-9 of it)."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    rewards = torch.zeros(3, 4, dtype=torch.float64)
    rewards[0, 2] = rewards[1, 1] = rewards[2, 3] = 0.1  # on each row's last valid token: G_t = 0.1
    request = AdvantageRequest("reinforce_pp", {"token_rewards": rewards, "response_mask": mask}, preset=preset,
                               params={"gamma": 1.0, "whiten": True}, dtype=dtype)
    result = engine.compute_advantages(request)
    assert torch.equal(result.advantages, torch.zeros(3, 4, dtype=result.advantages.dtype))
