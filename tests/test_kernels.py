"""The Triton kernels (advserve.kernels: scans, group baselines, whitening, the fused loss terms) against
the torch path (advserve.functional and Engine.compute_losses with kernels="torch"), without a GPU; and
the torch scans against a token loop.

* `TestUnderTheInterpreter`: the kernels run under Triton's interpreter (TRITON_INTERPRET=1) on CPU
  tensors. Triton reads that variable when a function is decorated (its own standard library at
  `import triton`, our kernels at `import advserve.kernels.scan`), so an interpreted import would stay
  in the process for every later test module: `test_the_kernels_under_the_interpreter` runs the
  class in a child pytest process with the variable set; it is collected only there (`__test__`).
* `TestCompiledForTheGpu`: the kernels compiled for sm_90 in another child (no GPU needed).
* `TestOnTheGpu`: collected only where CUDA and triton are: the compiled kernels on CUDA tensors.

Tolerances (|kernel − torch| <= atol + rtol·|torch|, elementwise): float64 rtol = atol = 1e-12
(rounding: the two sum in different orders); float32 rtol = atol = 2e-5 (T <= 150 here; a float32
scan's error grows with T·eps·Σ|terms|; on the GPU, at T up to 5000, 1e-5 of the largest output).
docs/kernels.md states them.

Without triton the two child tests skip, unless ADVSERVE_REQUIRE_TRITON is set (CI sets it: there a
missing triton fails). The interpreter runs a scan element by element, in order: it checks the
kernels' arithmetic, not that their combine step is associative, which the GPU's parallel scan
relies on; `test_first_order_combine_is_associative` checks that.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import advserve
import advserve.kernels
from advserve import loss_specs
from advserve.engine import Engine
from advserve.errors import InvalidArgument
from advserve.estimators import ESTIMATORS
from advserve.functional import groups as functional_groups
from advserve.functional import losses as functional_losses
from advserve.functional import masks
from advserve.functional import scan as reference
from advserve.kernels import resolve_kernels
from advserve.model import AdvantageRequest, LossRequest
from advserve.presets import PRESETS

TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}
HAVE_TRITON = importlib.util.find_spec("triton") is not None
REQUIRED = os.environ.get("ADVSERVE_REQUIRE_TRITON", "").strip().lower() in ("1", "true", "yes", "on")  # CI


ROOT = Path(__file__).resolve().parents[1]
CHILD = os.environ.get("ADVSERVE_KERNEL_TESTS_CHILD", "")  # "interpreter" or "compiler" in a child process


def _run_child(kind: str, test_class: str, env: dict) -> None:
    """Run `test_class` of this file in a child pytest process; every one of its tests must pass."""
    if not HAVE_TRITON:
        if REQUIRED:
            pytest.fail("ADVSERVE_REQUIRE_TRITON is set but triton is not installed (pip install 'advserve[kernels]')")
        pytest.skip("triton is not installed (set ADVSERVE_REQUIRE_TRITON to make this a failure)")
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{test_class}"],
        env={**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **env,
             "ADVSERVE_KERNEL_TESTS_CHILD": kind}, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
    summary = child.stdout.strip().splitlines()[-1]
    # all ran: no skip, no deselection
    assert re.fullmatch(r"\d+ passed(, \d+ warnings?)? in [\d.]+s( \([\d:]+\))?", summary), summary


def test_the_kernels_under_the_interpreter():
    _run_child("interpreter", "TestUnderTheInterpreter", {"TRITON_INTERPRET": "1"})


def test_the_kernels_compile_for_the_gpu(tmp_path):
    _run_child("compiler", "TestCompiledForTheGpu", {"TRITON_CACHE_DIR": str(tmp_path)})


@pytest.fixture(scope="module")
def fused():
    """`advserve.kernels.scan`, interpreted: this is the child, TRITON_INTERPRET=1 from the start."""
    assert CHILD == "interpreter" and os.environ.get("TRITON_INTERPRET") == "1"
    return importlib.import_module("advserve.kernels.scan")


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tol = TOLERANCE[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def _batch(lengths: list[int], width: int, gap_rate: float, dtype: torch.dtype, seed: int):
    """rewards, values [B, width] (0 where masked) and the mask: row i has its valid tokens in
    [0, lengths[i]), each interior token but the first and last masked with probability gap_rate."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
        for t in range(1, n - 1):
            if rng.random() < gap_rate:
                mask[i, t] = False
    rewards = torch.randn(mask.shape, generator=gen, dtype=dtype) * mask
    values = torch.randn(mask.shape, generator=gen, dtype=dtype) * mask
    return rewards, values, mask


# ragged rows, a length-1 row, an empty row, a full row; interior gaps; T = 53 is 4 blocks of 16, the last partial
LENGTHS = [53, 1, 0, 30, 17, 2]
COEFFICIENTS = [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.0, 0.5)]

# the policy modes the fused loss kernel covers, and term sets it does not (the torch path runs under
# kernels="triton" too)
COVERED_POLICY_MODES = ["ppo_clip", "gspo", "reinforce", "cispo", "gpg", "dro", "sapo", "dppo_tv", "dppo_kl",
                        "bypass_mode"]
COVERED_POLICIES = [
    {"mode": "ppo_clip", "dual_clip": 3.0, "ratio_clamp": 0.1, "ratio_cap": 1.5}, {"mode": "ppo_clip"},
    {"mode": "gspo", "dual_clip": 3.0}, {"mode": "gspo", "sequence_ratio_gradient": "through_mean"},
    {"mode": "cispo", "cispo_cap": 1.1}, {"mode": "cispo", "cispo_level": "sequence"},
    {"mode": "cispo", "cispo_level": "sequence", "sequence_ratio_gradient": "through_mean"},
    {"mode": "reinforce"}, {"mode": "gpg"}, {"mode": "dro", "dro_beta": 2.0}, {"mode": "sapo", "tau_pos": 3.0},
    {"mode": "dppo_tv", "clip_low": 0.02, "clip_high": 0.02}, {"mode": "dppo_kl", "clip_low": 0.02, "clip_high": 0.02},
    {"mode": "bypass_mode", "dual_clip": 3.0}, {"mode": "bypass_mode", "bypass_loss": "reinforce"},
    {"mode": "bypass_mode", "bypass_loss": "reinforce", "bypass_is": "token", "bypass_is_low": 0.5},
]
UNCOVERED_LOSS_OPTIONS = [
    {"policy_loss": {"mode": "geo_mean"}, "value_loss": {"clip": 0.2}, "kl_loss": {"estimator": "k3"}},
    {"policy_loss": {"mode": "clip_cov"}},
    {"policy_loss": {"mode": "kl_cov"}, "entropy_bonus": {"coef": 0.01}},
    {"policy_loss": {"mode": "geo_mean"}, "rollout_is_weights": True},
]
# rollout_correction forms: each level, truncate and mask, a divergence gate, the token weight
ROLLOUT_CORRECTIONS = [{"level": "token", "mode": "truncate", "high": 2.0},
                       {"level": "sequence", "mode": "mask", "low": 0.5, "high": 2.0},
                       {"level": "sequence_mean", "mode": "truncate", "low": 0.98, "high": 1.02},
                       {"level": "token", "mode": "mask", "gating": "binary_kl", "low": None, "high": 0.001,
                        "weight": "token"},
                       {"level": "sequence", "mode": "mask", "weight": "token", "high": 3.0}]


class TestUnderTheInterpreter:
    """Run only in the child process of `test_the_kernels_under_the_interpreter`."""

    __test__ = CHILD == "interpreter"

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
    @pytest.mark.parametrize("gaps", ["skip", "step"])
    def test_scans_match_the_torch_path(self, fused, dtype, gaps):
        rewards, values, mask = _batch(LENGTHS, 53, 0.2, dtype, seed=7)
        assert bool((mask[:, 1:] & ~mask[:, :-1]).any())  # a masked token before a valid one: interior gaps
        for gamma, lam in COEFFICIENTS:
            for block in (16, None):  # several blocks per row, and one block for the whole row
                _close(fused.reward_to_go(rewards, mask, gamma, gaps, block=block),
                       reference.reward_to_go(rewards, mask, gamma, gaps))
                adv, ret = fused.gae(rewards, values, mask, gamma, lam, gaps, block=block)
                ref_adv, ref_ret = reference.gae(rewards, values, mask, gamma, lam, gaps)
                _close(adv, ref_adv)
                _close(ret, ref_ret)

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        lengths=st.lists(st.integers(0, 40), min_size=1, max_size=4),
        extra=st.integers(0, 9),
        gap_rate=st.sampled_from([0.0, 0.3]),
        gamma=st.floats(0.0, 1.0),
        lam=st.floats(0.0, 1.0),
        gaps=st.sampled_from(["skip", "step"]),
        dtype=st.sampled_from([torch.float64, torch.float32]),
        seed=st.integers(0, 2**16),
    )
    def test_scans_match_on_random_batches(self, fused, lengths, extra, gap_rate, gamma, lam, gaps, dtype, seed):
        width = max(lengths) + extra or 1
        rewards, values, mask = _batch(lengths, width, gap_rate, dtype, seed)
        _close(fused.reward_to_go(rewards, mask, gamma, gaps, block=16),
               reference.reward_to_go(rewards, mask, gamma, gaps))
        adv, ret = fused.gae(rewards, values, mask, gamma, lam, gaps, block=16)
        ref_adv, ref_ret = reference.gae(rewards, values, mask, gamma, lam, gaps)
        _close(adv, ref_adv)
        _close(ret, ref_ret)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(lengths=st.lists(st.integers(0, 70), min_size=1, max_size=40), extra=st.integers(0, 9),
           gap_rate=st.sampled_from([0.0, 0.4]), dtype=st.sampled_from([torch.float64, torch.float32]),
           block=st.sampled_from([16, None]), seed=st.integers(0, 2**16))
    def test_rewards_placed_on_the_last_token_as_the_torch_path(self, fused, lengths, extra, gap_rate, dtype, block,
                                                                 seed):
        """`place_on_last_token` (one launch) gives the torch path's token rewards bit for bit: each row's
        reward on its last valid token, whatever the gaps before it, over several blocks (block 16, a
        row per program) or in tiles of many short rows (None); an empty row all 0; a row-strided mask (a
        coalesced request's rows)."""
        rewards, _, mask = _batch(lengths, max(lengths) + extra or 1, gap_rate, dtype, seed)
        outcome = rewards.sum(dim=1) + 0.5
        want = masks.place_on_last_token(outcome, mask)
        got = fused.place_on_last_token(outcome, mask, block=block)
        assert got.dtype == dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        wide = torch.zeros(mask.shape[0], mask.shape[1] + 5, dtype=torch.bool)
        wide[:, :mask.shape[1]] = mask
        assert torch.equal(fused.place_on_last_token(outcome, wide[:, :mask.shape[1]], block=block), want)

    def test_strided_rows_and_inputs_left_unchanged(self, fused):
        rewards, values, mask = _batch([20, 9, 14], 40, 0.2, torch.float64, seed=3)
        rewards, values, mask = rewards[:, ::2], values[:, ::2], mask[:, ::2]  # not contiguous along T
        before = rewards.clone(), values.clone()
        adv, ret = fused.gae(rewards, values, mask, 0.97, 0.9, "skip", block=16)
        ref_adv, ref_ret = reference.gae(rewards, values, mask, 0.97, 0.9, "skip")
        _close(adv, ref_adv)
        _close(ret, ref_ret)
        assert torch.equal(rewards, before[0]) and torch.equal(values, before[1])

    def test_first_order_combine_is_associative(self, fused):
        """(a∘b)∘c = a∘(b∘c) for the scan's combine step: the GPU's parallel scan groups steps freely."""
        combine = fused.first_order.fn
        rng = random.Random(0)
        for _ in range(200):
            a, b, c = ((rng.uniform(-2, 2), rng.uniform(-2, 2)) for _ in range(3))
            left = combine(*combine(*a, *b), *c)
            right = combine(*a, *combine(*b, *c))
            assert left == pytest.approx(right, rel=1e-12, abs=1e-12)
        # and it is the recurrence y = x + c·y_prev: two steps from y_prev = 0 give x_b + c_b·x_a
        assert combine(0.5, 2.0, 0.25, 3.0) == (0.125, 3.5)

    @pytest.mark.parametrize("estimator", ["grpo", "rloo", "dr_grpo"])
    def test_coalesced_requests_get_the_bits_they_get_alone(self, fused, estimator):
        """The engine's coalescing promise holds with the group kernel: its reductions depend only on
        a group's own members, not on the batch around them."""
        engine = Engine("cpu", kernels="triton")
        requests = []
        for seed, rows in ((1, 12), (2, 37), (3, 5)):
            scores, groups = _scattered_groups(torch.float32, seed)
            keep = groups.index < 4  # groups 0 (150 members), 1 (one), 2 (equal scores), 3
            mask = torch.ones(int(keep.sum()), rows, dtype=torch.bool)
            requests.append(AdvantageRequest(estimator, {"rewards": scores[keep], "response_mask": mask,
                                                         "group_ids": groups.index[keep] + 10 * seed},
                                             preset="verl", params={"kl_coef": 0.0}))
        prepared = [engine.prepare_advantages(r) for r in requests]
        assert prepared[0].coalescing_key is not None and len({p.coalescing_key for p in prepared}) == 1
        together = engine.run_advantages(prepared)
        for job, result in zip(prepared, together):
            alone = engine.run_advantages([job])[0]
            assert torch.equal(result.advantages, alone.advantages) and torch.equal(result.returns, alone.returns)

    @pytest.mark.parametrize("preset", ["paper", "openrlhf"])  # mask gaps "skip" and "step"
    def test_engine_runs_the_kernels_when_told(self, fused, monkeypatch, preset):
        engine = Engine("cpu", kernels="triton")
        assert engine.kernels == "triton"
        calls = []
        kernel = fused.gae
        monkeypatch.setattr(fused, "gae", lambda *args, **kwargs: calls.append(args[-1]) or kernel(*args, **kwargs))
        result = engine.compute_advantages(_gae_request(preset, seed=11))
        expected = Engine("cpu", kernels="torch").compute_advantages(_gae_request(preset, seed=11))
        assert calls == [{"paper": "skip", "openrlhf": "step"}[preset]]  # the engine ran the kernel, once
        _close(result.advantages, expected.advantages)
        _close(result.returns, expected.returns)
        request = _gae_request(preset, seed=11)  # the in-process API, told the same
        through_api = advserve.compute_advantages("gae", preset=preset, params=request.params, dtype="float64",
                                                  device="cpu", kernels="triton", **request.tensors)
        assert len(calls) == 2
        _close(through_api.advantages, expected.advantages)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
    def test_group_baselines_match_the_torch_path(self, dtype):
        fused_groups = importlib.import_module("advserve.kernels.groups")
        scores, groups = _scattered_groups(dtype, seed=5)
        for ddof, eps, singletons in STD_FORMS:
            for scale_by_std in (True, False):
                for scope in ("group", "batch"):
                    kwargs = dict(scale_by_std=scale_by_std, std_ddof=ddof, std_eps=eps, singleton_groups=singletons,
                                  std_scope=scope)
                    expected = functional_groups.group_normalized_advantages(scores, groups, **kwargs)
                    actual = fused_groups.group_normalized_advantages(scores, groups, **kwargs)
                    _close(actual, expected)
                    assert torch.equal(actual == 0, expected == 0)  # exact zeros stay exact: constant groups
            expected = functional_groups.leave_one_out_advantages(scores, groups, singleton_groups=singletons)
            _close(fused_groups.leave_one_out_advantages(scores, groups, singleton_groups=singletons), expected)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
    def test_whitening_matches_the_torch_path(self, dtype):
        """Every preset's whitening form (ddof, eps, where eps goes, with and without the std) over tokens
        [B, T] and over sequences [B], in blocks of 16 (many block summaries merged) and of the default
        size; a constant batch and an empty one give exact zeros, as the torch path does."""
        fused_whiten = importlib.import_module("advserve.kernels.whiten")
        rewards, _, mask = _batch(LENGTHS, 53, 0.2, dtype, seed=17)
        valid = mask.to(dtype)
        x = (3 * rewards + 5) * valid  # a mean far from 0
        rows = valid[:, 0] * 0 + 1
        for ddof, eps, mode, use_std in WHITEN_FORMS:
            kwargs = dict(ddof=ddof, eps=eps, eps_mode=mode, use_std=use_std)
            for block in (16, None):
                _close(fused_whiten.whiten(x, valid, block=block, **kwargs), masks.whiten(x, valid, **kwargs))
            _close(fused_whiten.whiten(x[:, 0], rows, block=4, **kwargs), masks.whiten(x[:, 0], rows, **kwargs))
        for value in (0.75, 0.1):  # 0.1: a one-pass mean of it is an ulp off in float64
            constant = torch.full_like(x, value) * valid
            for eps in (0.0, 1e-8):
                for block in (16, None):
                    zeros = torch.zeros_like(x)
                    assert torch.equal(fused_whiten.whiten(constant, valid, ddof=1, eps=eps, block=block), zeros)
                assert torch.equal(masks.whiten(constant, valid, ddof=1, eps=eps), torch.zeros_like(x))
        empty = torch.zeros_like(x)
        assert torch.equal(fused_whiten.whiten(empty, empty, ddof=1, eps=1e-8, block=16), torch.zeros_like(x))

    def test_engine_whitens_with_the_kernel(self, fused, monkeypatch):
        fused_whiten = importlib.import_module("advserve.kernels.whiten")
        calls = []
        kernel = fused_whiten.whiten
        monkeypatch.setattr(fused_whiten, "whiten", lambda *a, **kw: calls.append(kw["eps_mode"]) or kernel(*a, **kw))
        request = _gae_request("openrlhf", seed=19)
        request = dataclasses.replace(request, params={**request.params, "whiten": True})  # OpenRLHF's: eps "floor"
        actual = Engine("cpu", kernels="triton").compute_advantages(request)
        expected = Engine("cpu", kernels="torch").compute_advantages(request)
        assert calls == ["floor"]
        _close(actual.advantages, expected.advantages)
        _close(actual.returns, expected.returns)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
    def test_fused_ppo_clip_kl_matches_the_torch_path(self, dtype):
        """kernels.losses.ppo_clip_kl against the torch functions the engine composes (policy_ratio,
        policy_loss "ppo_clip", kl_loss, aggregation_weights): each KL estimator with and without its
        clamps (one that binds), with and without the dual clip and the ratio clamp (one that binds),
        token-mean and seq-mean-token-mean weights, several blocks per batch."""
        fused_losses = importlib.import_module("advserve.kernels.losses")
        lp, old, ref, adv, mask = _loss_batch(dtype, seed=23)
        for form in LOSS_FORMS:
            weights, policy, kl, expected_grad = _torch_ppo_clip_kl(lp, old, ref, adv, mask, form)
            estimator, kl_clamp, dual_clip, ratio_clamp, _ = form
            loss, got_policy, got_kl, grad = fused_losses.ppo_clip_kl(
                lp, old, ref, adv, *weights, clip_low=0.2, clip_high=0.28, dual_clip=dual_clip,
                ratio_clamp=ratio_clamp, kl_coef=0.05, kl_estimator=estimator, kl_clamp=kl_clamp, block=64)
            _close(grad, expected_grad)
            _close(got_policy, policy)
            _close(got_kl, kl)
            _close(loss, policy + 0.05 * kl)

    def test_fused_ppo_clip_kl_gives_the_engines_loss_and_gradient(self):
        """The verl preset's ppo_clip (dual clip 3, log-ratio clamp 20, token-mean) + kl_loss k3 (clamp 10)
        through Engine.compute_losses, and the kernel with the same weights."""
        fused_losses = importlib.import_module("advserve.kernels.losses")
        lp, old, ref, adv, mask = _loss_batch(torch.float64, seed=29)
        result = Engine("cpu", kernels="torch").compute_losses(LossRequest(
            preset="verl", kl_loss={"estimator": "k3"}, dtype="float64",
            tensors={"logprobs": lp, "old_logprobs": old, "ref_logprobs": ref, "advantages": adv,
                     "response_mask": mask}))
        w = masks.aggregation_weights(mask.double(), mask.double().sum(dim=1), "token-mean")
        loss, policy, kl, grad = fused_losses.ppo_clip_kl(lp, old, ref, adv, w, w, clip_low=0.2, clip_high=0.2,
                                                          dual_clip=3.0, ratio_clamp=20.0, kl_coef=0.001,
                                                          kl_estimator="k3", kl_clamp=10.0)
        _close(grad, result.grad_logprobs)
        assert float(loss) == pytest.approx(result.loss, rel=1e-12)
        assert float(policy) == pytest.approx(result.components["policy"], rel=1e-12)
        assert float(kl) == pytest.approx(result.components["kl"], rel=1e-12)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(case=st.data())
    def test_engine_computes_the_losses_with_the_kernel(self, monkeypatch, case):
        """Engine(kernels="triton") and the in-process API dispatch the terms the kernel covers to it (one
        launch, in blocks of 64 here) and agree with kernels="torch": loss, components, metrics and every
        gradient, for random batches (ragged rows, interior gaps, an empty row) and random term sets."""
        fused_losses = importlib.import_module("advserve.kernels.losses")
        calls = []
        kernel = fused_losses.loss_terms
        monkeypatch.setattr(fused_losses, "loss_terms", lambda *a, **kw: calls.append(sorted(a[0])) or kernel(*a, **kw))
        monkeypatch.setattr(fused_losses, "BLOCK", 64)
        dtype = case.draw(st.sampled_from([torch.float64, torch.float32]))
        lengths = case.draw(st.lists(st.integers(0, 60), min_size=1, max_size=6))
        width = max(lengths) + case.draw(st.integers(0, 7)) or 1
        tensors = _loss_tensors(lengths, width, case.draw(st.sampled_from([0.0, 0.3])), dtype,
                                case.draw(st.integers(0, 2**16)))
        options = case.draw(_covered_loss_options())
        expected = _losses(tensors, options, "torch", dtype, engine=True)
        actual = _losses(tensors, options, "triton", dtype, engine=case.draw(st.booleans()))
        assert calls == [sorted(t for t, given in options.items() if t.endswith(("_loss", "_bonus", "_correction"))
                                and given)]
        _same_losses(actual, expected, dtype)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
    @pytest.mark.parametrize("policy", COVERED_POLICIES, ids=lambda p: "-".join(str(v) for v in p.values()))
    def test_every_covered_policy_agrees(self, monkeypatch, dtype, policy):
        """Each covered policy form, with every other term (an importance-weighted k3 KL, a clipped value
        loss, entropy, token_loss), through the kernel in blocks of 64, as kernels="torch" computes it
        (the random requests above may miss a form in a given run; these never do)."""
        fused_losses = importlib.import_module("advserve.kernels.losses")
        calls = []
        kernel = fused_losses.loss_terms
        monkeypatch.setattr(fused_losses, "loss_terms", lambda *a, **kw: calls.append(a) or kernel(*a, **kw))
        monkeypatch.setattr(fused_losses, "BLOCK", 64)
        tensors = _loss_tensors([60, 0, 1, 37, 59, 12], 61, 0.3, dtype, seed=47)
        options = {"policy_loss": policy, "kl_loss": {"estimator": "k3", "importance_weighted": True, "coef": 0.5},
                   "value_loss": {"clip": 0.2, "clip_ties": "split"}, "entropy_bonus": {"coef": 0.01},
                   "token_loss": {}, "return_kl_values": True}
        actual = _losses(tensors, options, "triton", dtype, engine=True)
        expected = _losses(tensors, options, "torch", dtype, engine=True)
        assert len(calls) == 1
        _same_losses(actual, expected, dtype)

    def test_packed_requests_run_the_kernel(self, monkeypatch):
        """layout "packed" (sequences end to end, cu_seqlens): the kernel runs on the padded batch the
        engine lays out, and the outputs come back packed as the torch path's do."""
        fused_losses = importlib.import_module("advserve.kernels.losses")
        calls = []
        kernel = fused_losses.loss_terms
        monkeypatch.setattr(fused_losses, "loss_terms", lambda *a, **kw: calls.append(a) or kernel(*a, **kw))
        padded = _loss_tensors([40, 0, 17, 33, 1], 41, 0.3, torch.float64, seed=41)
        mask = padded["response_mask"]
        ends = (mask * torch.arange(1, mask.shape[1] + 1)).amax(dim=1)  # each row up to its last valid token
        keep = torch.arange(mask.shape[1]) < ends.unsqueeze(1)
        packed = {name: t[keep] for name, t in padded.items()} | {"cu_seqlens": torch.cat([ends.new_zeros(1),
                                                                                            ends.cumsum(0)])}
        options = {"policy_loss": {"mode": "gspo"}, "kl_loss": {"estimator": "k3"}, "value_loss": {"clip": 0.2},
                   "entropy_bonus": {"coef": 0.01}, "layout": "packed", "return_kl_values": True}
        actual = _losses(packed, options, "triton", torch.float64, engine=False)
        expected = _losses(packed, options, "torch", torch.float64, engine=False)
        assert len(calls) == 1 and actual.grad_logprobs.shape == (int(ends.sum()),)
        _same_losses(actual, expected, torch.float64)

    def test_an_error_of_the_torch_path_stays_an_error(self):
        """bypass_mode with rollout_is_weights is refused naming the tensor (the kernel does not take it)."""
        tensors = _loss_tensors([12, 5], 12, 0.0, torch.float64, seed=3)
        bypass = {"policy_loss": {"mode": "bypass_mode"}, "rollout_is_weights": True}
        for kernels in ("triton", "torch"):
            with pytest.raises(InvalidArgument) as refused:
                _losses(tensors, bypass, kernels, torch.float64, engine=True)
            assert refused.value.field == "tensors.rollout_is_weights"

    @pytest.mark.parametrize("options", UNCOVERED_LOSS_OPTIONS)
    def test_terms_the_kernel_does_not_cover_run_the_torch_path(self, monkeypatch, options):
        fused_losses = importlib.import_module("advserve.kernels.losses")
        calls = []
        monkeypatch.setattr(fused_losses, "loss_terms", lambda *a, **kw: calls.append(a))
        tensors = _loss_tensors([40, 0, 17, 33], 41, 0.3, torch.float64, seed=37)
        actual = _losses(tensors, options, "triton", torch.float64, engine=True)
        expected = _losses(tensors, options, "torch", torch.float64, engine=True)
        assert calls == []
        assert actual.loss == expected.loss and actual.components == expected.components
        assert actual.metrics == expected.metrics
        for name, grad in expected.output_tensors().items():
            other = actual.output_tensors()[name]
            assert (grad is None and other is None) or torch.equal(grad, other)

    @pytest.mark.parametrize("preset", list(PRESETS))
    def test_every_estimator_of_every_preset_agrees(self, fused, monkeypatch, preset):
        """The setting changes no result beyond rounding: each estimator of the preset, with its KL
        penalty, on groups of 2-6 scattered through the batch (one of equal rewards), interior gaps."""
        triton_engine, torch_engine = Engine("cpu", kernels="triton"), Engine("cpu", kernels="torch")
        fused_groups = importlib.import_module("advserve.kernels.groups")
        calls = []
        for module, name in ((fused, "gae"), (fused, "reward_to_go"), (fused_groups, "group_normalized_advantages"),
                             (fused_groups, "leave_one_out_advantages")):
            kernel = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
        batch = _estimator_batch(seed=13)
        cases = [(name, None) for name in PRESETS[preset].estimators]
        if preset == "trl":
            cases.append(("grpo", {"std_scope": "batch"}))
        for name, params in cases:
            spec = ESTIMATORS[name]
            tensors = {k: v for k, v in batch.items()
                       if k in {"rewards", "response_mask"} | set(spec.requires) | set(spec.optional)}
            request = AdvantageRequest(name, tensors, preset=preset, params=params, dtype="float64")
            before = len(calls)
            expected = torch_engine.compute_advantages(request)
            assert len(calls) == before  # the torch engine runs no kernel
            actual = triton_engine.compute_advantages(request)
            _close(actual.advantages, expected.advantages)
            _close(actual.returns, expected.returns)
        kernels = {"paper": {"gae", "reward_to_go", "group_normalized_advantages", "leave_one_out_advantages"},
                   "verl": {"gae", "reward_to_go", "group_normalized_advantages", "leave_one_out_advantages"},
                   "openrlhf": {"gae", "reward_to_go", "group_normalized_advantages", "leave_one_out_advantages"},
                   "trl": {"group_normalized_advantages", "leave_one_out_advantages"}}
        assert set(calls) == kernels[preset]  # the triton engine ran each kernel its estimators use


    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
    def test_statistics_match_the_torch_path(self, dtype):
        """`kernels.stats` against `engine.advantage_stats` on the torch path: counts and extremes exact,
        sums to their dtype's rounding (the kernel sums in float64). Rows across several programs (ROWS)
        and blocks (BLOCK_T), rows with no valid token, groups of one, equal scores, more groups than
        programs, a row-strided view (a coalesced request's rows), no groups."""
        from advserve import engine as engine_module

        stats_kernels = importlib.import_module("advserve.kernels.stats")
        rewards, values, mask = _batch([600, 0, 1, 513, 7, 0, 300, 2, 9, 600, 40], 600, 0.2, dtype, seed=5)
        scores = torch.tensor([0.5, 1.0, 0.0, 0.5, 0.25, 0.75, 1.0, 0.0, 0.5, 0.5, 1.0], dtype=dtype)
        for group_ids in ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0, 1, 0, 2, 1, 2, 3, 3, 0, 3, 4], None):
            tensors = {"response_mask": mask, "rewards": scores}
            if group_ids is not None:
                tensors["group_ids"] = torch.tensor(group_ids)
            batch = Engine("cpu", kernels="torch").prepare_advantages(AdvantageRequest("grpo" if group_ids else "gae", {
                **tensors, **({} if group_ids else {"values": values})}, preset="paper", dtype=str(dtype)[6:])).batch
            wide = torch.zeros(mask.shape[0], 700, dtype=dtype)
            wide[:, :600] = values
            for advantages in (values, wide[:, :600]):  # contiguous, and rows of a wider batch
                got = engine_module.advantage_stats(advantages, None, batch, dtype, fused=True)
                want = engine_module.advantage_stats(advantages.contiguous(), None, batch, dtype)
                assert got.keys() == want.keys() and got["tokens"] == want["tokens"] and got["sequences"] == want["sequences"]
                rel = 1e-12 if dtype == torch.float64 else 1e-6
                for part in ("advantages", "rewards"):
                    assert got[part] == pytest.approx(want[part], rel=rel, abs=rel), part
                assert got["advantages"]["min"] == want["advantages"]["min"]
                assert got["advantages"]["max"] == want["advantages"]["max"]
                if group_ids is not None:
                    ints = ("count", "size_min", "size_max", "ids")
                    assert {k: got["groups"][k] for k in ints} == {k: want["groups"][k] for k in ints}
                    assert got["groups"]["zero_variance_fraction"] == pytest.approx(want["groups"]["zero_variance_fraction"])
                    assert got["groups"]["reward_mean"] == pytest.approx(want["groups"]["reward_mean"], rel=rel, abs=rel)
        no_valid = stats_kernels.advantage_statistics(torch.zeros(3, 5, dtype=dtype), torch.zeros(3, 5, dtype=torch.bool),
                                                      torch.zeros(3, dtype=dtype), None)
        assert no_valid[4] == 0 and no_valid[2] == float("inf") and no_valid[3] == float("-inf")

    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(rows=st.integers(1, 40), width=st.integers(1, 700), valid_rate=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
           groups=st.integers(0, 40), dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**16))
    def test_statistics_match_on_random_batches(self, rows, width, valid_rate, groups, dtype, seed):
        """Any shape (a row or a block of a kind), any share of valid tokens (none included), groups of
        any sizes scattered (groups 0: none), ties: the kernels' statistics are the torch path's."""
        from advserve import engine as engine_module

        g = torch.Generator().manual_seed(seed)
        mask = torch.rand(rows, width, generator=g) < valid_rate
        scores = torch.randint(0, 3, (rows,), generator=g).to(dtype) / 2  # ties within groups
        tensors = {"response_mask": mask, "rewards": scores}
        if groups:
            tensors["group_ids"] = torch.randint(0, groups, (rows,), generator=g)
        batch = Engine("cpu", kernels="torch").prepare_advantages(AdvantageRequest(
            "grpo" if groups else "reinforce", tensors, preset="paper", dtype=str(dtype)[6:])).batch
        advantages = torch.randn(rows, width, generator=g, dtype=dtype) * mask
        got = engine_module.advantage_stats(advantages, None, batch, dtype, fused=True)
        want = engine_module.advantage_stats(advantages, None, batch, dtype)
        rel = 1e-12 if dtype == torch.float64 else 1e-5
        assert (got["tokens"], got["sequences"]) == (want["tokens"], want["sequences"])
        moments, expected = dict(got["advantages"]), dict(want["advantages"])
        # the std from Σ A² / N − mean²: the torch path's float32 sums cancel (one valid token: its std is
        # 0 in float64 and ~1e-4·|A| from float32 sums), so the variances agree to rounding of A²'s scale
        scale = max(abs(expected["min"]), abs(expected["max"]))
        assert moments.pop("std") ** 2 == pytest.approx(expected.pop("std") ** 2, rel=rel, abs=4 * rel * scale**2)
        assert moments == pytest.approx(expected, rel=rel, abs=rel)
        assert got["rewards"] == pytest.approx(want["rewards"], rel=rel, abs=rel)
        if groups:
            assert {k: v for k, v in got["groups"].items() if k not in ("reward_mean", "zero_variance_fraction")} == \
                {k: v for k, v in want["groups"].items() if k not in ("reward_mean", "zero_variance_fraction")}
            assert got["groups"]["zero_variance_fraction"] == pytest.approx(want["groups"]["zero_variance_fraction"])
            assert got["groups"]["reward_mean"] == pytest.approx(want["groups"]["reward_mean"], rel=rel, abs=rel)

    @pytest.mark.parametrize("estimator", ["grpo", "rloo"])
    def test_coalesced_requests_get_the_statistics_they_get_alone(self, estimator):
        """The statistics kernels read a request's own rows in an order fixed by its shape: alone and in a
        shared batch, the same bits."""
        engine = Engine("cpu", kernels="triton")
        prepared = []
        for seed, rows in ((1, 12), (2, 600), (3, 5)):
            scores, groups = _scattered_groups(torch.float32, seed)
            keep = groups.index < 4
            mask = torch.rand(int(keep.sum()), rows, generator=torch.Generator().manual_seed(seed)) < 0.7
            prepared.append(engine.prepare_advantages(AdvantageRequest(
                estimator, {"rewards": scores[keep], "response_mask": mask, "group_ids": groups.index[keep] + 10 * seed},
                preset="verl", params={"kl_coef": 0.0})))
        together = engine.run_advantages(prepared)
        for job, result in zip(prepared, together):
            assert repr(result.stats) == repr(engine.run_advantages([job])[0].stats)

    @settings(max_examples=40, deadline=None)
    @given(rows=st.integers(1, 70), width=st.integers(1, 1100), valid_rate=st.sampled_from([0.0, 0.5, 1.0]),
           given_dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
           dtype=st.sampled_from([torch.float64, torch.float32]), bad_masked=st.booleans(), bad_valid=st.booleans(),
           mask_dtype=st.sampled_from([torch.bool, torch.uint8, torch.int64, torch.float32, torch.float64,
                                       torch.bfloat16]),
           mask_value=st.sampled_from([None, -0.0, 2, -1, 0.5, float("nan")]), read_later=st.booleans(),
           seed=st.integers(0, 2**16))
    def test_validation_matches_the_torch_path(self, rows, width, valid_rate, given_dtype, dtype, bad_masked,
                                               bad_valid, mask_dtype, mask_value, read_later, seed):
        """`build_batch(triton=True)` checks the mask and zeroes the token tensors by `kernels.validate` (one
        launch each). The mask, its values in the compute dtype and the lengths: the torch path's bits. The
        token tensors: the torch path's (the same bits where every value is finite and the mask holds no
        −0.0; else equal but for the sign of a masked zero). The same error naming the field for a
        mask value neither 0 nor 1 (−0.0 is a 0) and a NaN or Inf on a valid position; the verdicts read at
        once or after (`Checks(read_later)`). Masks of any dtype, any input float dtype into either
        compute dtype, rows across blocks or many short rows per tile, no valid token or all, negative
        values (x·0 = −0)."""
        from advserve.batch import Checks, build_batch

        g = torch.Generator().manual_seed(seed)
        mask = torch.rand(rows, width, generator=g) < valid_rate
        given_mask = mask.to(mask_dtype)
        if mask_value is not None and (mask_dtype.is_floating_point or not isinstance(mask_value, float)) and (
                mask_dtype != torch.uint8 or mask_value != -1) and mask_dtype != torch.bool:
            given_mask[int(torch.randint(0, rows, (1,), generator=g)), -1] = mask_value
        tensors = {name: (torch.randn(rows, width, generator=g, dtype=torch.float64) * 1e3).to(given_dtype)
                   for name in ("values", "logprobs")}
        for flag, where in ((bad_masked, ~mask), (bad_valid, mask)):
            spots = where & (torch.rand(rows, width, generator=g) < 0.1)
            if flag:
                tensors["values"][spots] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=given_dtype)[
                    torch.randint(0, 3, (int(spots.sum()),), generator=g)]
        raw = {"response_mask": given_mask, **tensors}

        def batch(triton: bool):
            checks = Checks(read_later=read_later)
            try:
                built = build_batch(raw, allowed=raw, required=raw, dtype=dtype, device=torch.device("cpu"),
                                    context="test", checks=checks, triton=triton)
                checks.settle()
            except InvalidArgument as error:
                return error
            return built

        got, want = batch(True), batch(False)
        if isinstance(want, InvalidArgument):
            assert isinstance(got, InvalidArgument) and (got.field, str(got)) == (want.field, str(want))
            return
        assert not isinstance(got, InvalidArgument), got
        assert torch.equal(got.mask, want.mask) and torch.equal(got.lengths, want.lengths)
        assert got.valid.dtype == want.valid.dtype and torch.equal(got.valid.view(torch.uint8), want.valid.view(torch.uint8))
        mask = want.mask
        masked_bad = bool((~torch.isfinite(tensors["values"]) & ~mask).any())
        negative_zero_in_mask = mask_value == 0 and mask_dtype.is_floating_point  # the torch path multiplies by it
        for name in tensors:
            assert got.tensors[name].dtype == dtype and torch.equal(got.tensors[name], want.tensors[name]), name
            if not (masked_bad and name == "values") and not negative_zero_in_mask:
                assert torch.equal(got.tensors[name].view(torch.uint8), want.tensors[name].view(torch.uint8)), name

    def test_a_small_request_launches_a_few_kernels(self):
        """GRPO 8 x 512 computed as on a GPU (the device's branches; its value checks read with the
        results): the kernels it launches, torch's and Triton's, from its prepared batch to its numbers
        and tensors on the host (`bench/bench_launches.py`, which counts them, prints more requests)."""
        sys.path.insert(0, str(ROOT / "bench"))
        import bench_launches

        request = bench_launches.requests(8, 512)["grpo, verl"]
        counted = bench_launches.count("triton", request)
        # the group baselines and the statistics' two kernels; the lengths in the compute dtype, the
        # broadcast to tokens, the verdicts stacked (read with the numbers), converted and joined to the
        # statistics for the copy
        assert counted["triton"] == 3 and counted["compute"] <= 8, counted
        assert bench_launches.count("torch", request)["compute"] >= 5 * counted["compute"]  # the torch path: 72
        # validation: the check flags, the mask's kernel, the rewards' finiteness verdict (three)
        assert counted["validation"] <= 5, counted
        # RLOO and GAE: the reward placement, the scan or baselines, the statistics' kernels, and the same
        # few torch launches
        for name, bound in (("rloo, paper", 10), ("gae, verl (whitened)", 11)):
            other = bench_launches.count("triton", bench_launches.requests(8, 512)[name])
            assert other["compute"] <= bound and other["validation"] <= 8, (name, other)

    def test_a_small_loss_request_launches_a_few_kernels(self):
        """A ppo_clip + k3 KL loss [8, 512] as on a GPU, validation included: the float mask and each token
        tensor checked in one launch each (`kernels.validate`), the terms and the policy metrics in one
        more; torch's launches for the check flags, the weights, the reductions of the partial sums and
        the packing of the numbers."""
        sys.path.insert(0, str(ROOT / "bench"))
        import bench_launches

        request = bench_launches.requests(8, 512)["ppo_clip + k3 KL loss, verl"]
        counted = bench_launches.count("triton", request)
        assert counted["triton"] == 6 and counted["compute"] <= 23, counted  # the mask, 4 token tensors, the loss
        assert bench_launches.count("torch", request)["compute"] >= 4 * counted["compute"]  # the torch path: 134


class TestCompiledForTheGpu:
    """Run only in the child process of `test_the_kernels_compile_for_the_gpu`: the kernels compiled
    to an H100/H200's machine code (sm_90, through the triton wheel's own ptxas; no GPU needed), so a
    kernel that only the interpreter accepts fails here, not on the first GPU."""

    __test__ = CHILD == "compiler"

    @staticmethod
    def _ptx(fn, signature: dict, constexprs: dict) -> str:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile

        signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        return compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32)).asm["ptx"]

    @pytest.mark.parametrize("dtype", ["fp32", "fp64"])
    def test_scans(self, dtype):
        scan = importlib.import_module("advserve.kernels.scan")
        data = f"*{dtype}"
        gae = {"rewards": data, "values": data, "mask": "*u8", "adv_out": data, "ret_out": data, "T": "i32",
               **dict.fromkeys(("stride_r", "stride_v", "stride_m", "stride_a", "stride_o"), "i64"),
               "gamma": "fp64", "gamma_lam": "fp64"}
        rtg = {"rewards": data, "mask": "*u8", "out": data, "T": "i32",
               **dict.fromkeys(("stride_r", "stride_m", "stride_o"), "i64"), "gamma": "fp64"}
        for skip in (True, False):
            assert ".entry _gae_kernel" in self._ptx(scan._gae_kernel, gae, {"SKIP": skip, "BLOCK": 1024})
            assert ".entry _reward_to_go_kernel" in self._ptx(scan._reward_to_go_kernel, rtg,
                                                              {"SKIP": skip, "BLOCK": 1024})
        place = {"rewards": data, "mask": "*u8", "out": data, "B": "i32", "T": "i32", "stride_m": "i64",
                 "stride_o": "i64"}
        for rows, columns in ((1, 1024), (64, 16)):
            assert ".entry _place_kernel" in self._ptx(scan._place_kernel, place, {"ROWS": rows, "BLOCK_T": columns})

    def test_validation(self):
        """The zeroing kernel for every input float dtype into each compute dtype, finiteness tested by a
        comparison (not folded away: no fast-math flag on the compare); the mask kernel for masks of
        bytes, integers and floats."""
        validate = importlib.import_module("advserve.kernels.validate")
        for input_dtype in ("fp16", "bf16", "fp32", "fp64"):
            for dtype in ("fp32", "fp64"):
                signature = {"x": f"*{input_dtype}", "mask": "*u8", "out": f"*{dtype}", "ok": "*i1", "N": "i64"}
                ptx = self._ptx(validate._zero_masked_kernel, signature, {"BLOCK": validate.BLOCK})
                infinity = "0f7F800000" if dtype == "fp32" else "0d7FF0000000000000"
                assert ".entry _zero_masked_kernel" in ptx and infinity in ptx  # |x| < inf is compared
        for mask_dtype in ("u8", "i64", "fp32", "bf16", "fp64"):
            signature = {"given": f"*{mask_dtype}", "mask_out": "*u8", "valid_out": "*fp32", "lengths": "*i32",
                         "ok": "*i1", "B": "i32", "T": "i32"}
            for write_valid, (rows, columns) in ((True, validate.tile(4096)), (False, validate.tile(1))):
                ptx = self._ptx(validate._mask_kernel, signature, {"WRITE_VALID": write_valid, "ROWS": rows,
                                                                   "BLOCK_T": columns})
                assert ".entry _mask_kernel" in ptx

    @pytest.mark.parametrize("dtype", ["fp32", "fp64"])
    def test_group_baselines_divide_and_take_roots_rounded_to_nearest(self, dtype):
        groups = importlib.import_module("advserve.kernels.groups")
        data = f"*{dtype}"
        signature = {"scores": data, "order": "*i64", "starts": "*i64", "sizes": "*i64", "out": data,
                     "batch_divisor": data, "eps": "fp64", "raw_divisor": "fp64", "ddof": "i32"}
        for loo, batch_std in ((False, False), (False, True), (True, False)):
            ptx = self._ptx(groups._group_kernel, signature, {"LOO": loo, "SCALE": True, "BATCH_STD": batch_std,
                                                             "RAW": True, "F32": dtype == "fp32", "BLOCK": groups.GROUP_BLOCK})
            assert ".approx" not in ptx and "div.full" not in ptx  # as torch rounds: no fast division or sqrt
            assert f"div.rn.f{dtype[2:]}" in ptx


    @pytest.mark.parametrize("dtype", ["fp32", "fp64"])
    def test_fused_losses(self, dtype):
        """The loss kernel with every policy mode (token and sequence ratios, importance weights), KL
        estimator and gradient variant, value form and the entropy and token terms (each code path compiled
        at least once); float32 divisions rounded to nearest."""
        losses = importlib.import_module("advserve.kernels.losses")
        data = f"*{dtype}"
        pointers = ("logp", "old", "ref", "adv", "w_pol", "is_w", "w_kl", "values", "old_values", "returns", "w_val",
                    "entropy", "w_ent", "token_losses", "w_tok", "grad_lp", "grad_v", "grad_e", "grad_tok", "kl_out",
                    "seq_log_ratio", "spread_out")
        scalars = ("low", "high", "clip_low", "clip_high", "dual_clip", "ratio_clamp", "cap", "p1", "p2", "kl_coef",
                   "kl_clamp", "value_coef", "value_clip", "entropy_coef", "token_coef")
        signature = {**dict.fromkeys(pointers, data), "valid": "*u8", "partials": data, "counts": "*i64",
                     "extremes": data, "N": "i64", "T": "i32", "n_blocks": "i32", **dict.fromkeys(scalars, "fp64")}
        flags = {"POLICY": 1, "HAS_RATIO_CLAMP": True, "HAS_DUAL": True, "HAS_CAP": True, "IS_W": 0, "SEQ_RATIO": False,
                 "SPREAD": False, "METRICS": True, "KL": 2, "KL_GRAD": -1, "HAS_KL_CLAMP": True, "KL_IW": False,
                 "WRITE_KL": True, "VALUE": 2, "SPLIT_TIES": True, "ENTROPY": True, "TOKEN": True,
                 "F32": dtype == "fp32", "BLOCK": losses.BLOCK}
        variants = [{}, {"HAS_CAP": False, "HAS_DUAL": False, "KL": 0, "VALUE": 3, "SPLIT_TIES": False},
                    {"POLICY": 0, "KL": 1, "KL_GRAD": 2, "VALUE": 1}, {"POLICY": 0, "KL": -1, "VALUE": 0},
                    {"POLICY": 2, "KL": 3, "KL_IW": True}, {"POLICY": 3, "KL_GRAD": losses.UNBIASED},
                    {"POLICY": 4, "IS_W": losses.IS_ON_LOSS}, {"POLICY": 5, "IS_W": losses.IS_ON_WEIGHTS}, {"POLICY": 6},
                    {"POLICY": 1, "SEQ_RATIO": True, "KL_IW": True}, {"POLICY": 3, "SEQ_RATIO": True},
                    {"POLICY": 1, "SEQ_RATIO": True, "SPREAD": True, "KL_IW": True},
                    {"POLICY": 3, "SEQ_RATIO": True, "SPREAD": True, "KL_IW": True},
                    {"POLICY": 7}, {"POLICY": 8}, {"POLICY": 3, "HAS_CAP": False}, {"METRICS": False}]
        for variant in variants:
            ptx = self._ptx(losses._loss_kernel, signature, {**flags, **variant})
            assert ".entry _loss_kernel" in ptx
            assert "div.approx" not in ptx and "div.full" not in ptx  # as torch divides (tl.exp: ex2.approx)

    @pytest.mark.parametrize("dtype", ["fp32", "fp64"])
    def test_whitening_divides_and_takes_roots_rounded_to_nearest(self, dtype):
        whiten = importlib.import_module("advserve.kernels.whiten")
        data, f32 = f"*{dtype}", dtype == "fp32"
        moments = self._ptx(whiten._moments_kernel, {"x": data, "valid": data, "summary": data, "N": "i64"},
                            {"F32": f32, "BLOCK": whiten.BLOCK})
        apply = self._ptx(whiten._apply_kernel, {"x": data, "valid": data, "stats": data, "out": data, "N": "i64"},
                          {"USE_STD": True, "F32": f32, "BLOCK": whiten.BLOCK})
        for mode in range(3):
            combine = self._ptx(whiten._combine_kernel, {"summary": data, "stats": data, "n_blocks": "i32",
                                                         "ddof": "i32", "eps": "fp64"},
                                {"EPS_MODE": mode, "USE_STD": True, "F32": f32, "BLOCK": whiten.COMBINE_BLOCK})
            assert ".approx" not in combine and "div.full" not in combine
        for ptx in (moments, apply):
            assert ".approx" not in ptx and "div.full" not in ptx
            assert f"div.rn.f{dtype[2:]}" in ptx


    @pytest.mark.parametrize("dtype", ["fp32", "fp64"])
    def test_statistics(self, dtype):
        stats = importlib.import_module("advserve.kernels.stats")
        data = f"*{dtype}"
        partials = {"adv": data, "mask": "*u8", "adv_stride": "i64", "mask_stride": "i64", "B": "i32", "T": "i32",
                    "scores": data, "order": "*i64", "starts": "*i64", "sizes": "*i64", "G": "i32",
                    "partials": "*fp64", "group_partials": "*fp64"}
        finish = {"partials": "*fp64", "n_blocks": "i32", "scores": data, "B": "i32", "sizes": "*i64",
                  "group_partials": "*fp64", "G": "i32", "out": "*fp64"}
        for groups in (True, False):
            assert ".entry _partials_kernel" in self._ptx(stats._partials_kernel, partials, {
                "HAS_GROUPS": groups, "ROWS": stats.ROWS, "BLOCK_T": stats.BLOCK_T, "GROUP_BLOCK": stats.GROUP_BLOCK})
            ptx = self._ptx(stats._finish_kernel, finish, {"HAS_GROUPS": groups, "BLOCK": stats.FINISH_BLOCK})
            assert ".approx" not in ptx and "div.full" not in ptx


class TestOnTheGpu:
    """The compiled kernels on CUDA tensors against the torch path on the same device: collected only
    where CUDA and triton are there (a GPU session runs them; CPU-only machines have nothing to run)."""

    __test__ = not CHILD and HAVE_TRITON and torch.cuda.is_available()

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
    @pytest.mark.parametrize("gaps", ["skip", "step"])
    def test_scans(self, dtype, gaps):
        fused = importlib.import_module("advserve.kernels.scan")
        lengths = [5000, 1, 0, 4096, 1024, 1025, 2, 3333] * 8  # blocks of 1024: whole, partial, several
        rewards, values, mask = (t.cuda() for t in _batch(lengths, 5000, 0.2, dtype, seed=1))
        for gamma, lam in COEFFICIENTS:
            for block in (16, None):
                _close_scaled(fused.reward_to_go(rewards, mask, gamma, gaps, block=block),
                              reference.reward_to_go(rewards, mask, gamma, gaps))
                adv, ret = fused.gae(rewards, values, mask, gamma, lam, gaps, block=block)
                ref_adv, ref_ret = reference.gae(rewards, values, mask, gamma, lam, gaps)
                _close_scaled(adv, ref_adv)
                _close_scaled(ret, ref_ret)
                again = fused.gae(rewards, values, mask, gamma, lam, gaps, block=block)
                assert torch.equal(again[0], adv) and torch.equal(again[1], ret)  # deterministic

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
    def test_group_baselines(self, dtype):
        fused_groups = importlib.import_module("advserve.kernels.groups")
        gen = torch.Generator().manual_seed(2)
        index = torch.randint(0, 40_000, (300_000,), generator=gen)  # scattered groups of ~7.5, singletons
        index[:5000] = 40_000  # and one group of 5000
        groups = functional_groups.Groups.from_index(index.cuda())
        scores = (torch.randint(0, 2, index.shape, generator=gen).to(dtype)
                  + 0.1 * torch.randn(index.shape, generator=gen, dtype=dtype)).cuda()
        for ddof, eps, singletons in STD_FORMS:
            for scope in ("group", "batch"):
                kwargs = dict(scale_by_std=True, std_ddof=ddof, std_eps=eps, singleton_groups=singletons,
                              std_scope=scope)
                _close_scaled(fused_groups.group_normalized_advantages(scores, groups, **kwargs),
                              functional_groups.group_normalized_advantages(scores, groups, **kwargs))
            _close_scaled(fused_groups.leave_one_out_advantages(scores, groups, singleton_groups=singletons),
                          functional_groups.leave_one_out_advantages(scores, groups, singleton_groups=singletons))

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
    def test_whitening(self, dtype):
        fused_whiten = importlib.import_module("advserve.kernels.whiten")
        rewards, _, mask = (t.cuda() for t in _batch([5000, 1, 0, 4096, 1025, 3333] * 40, 5000, 0.2, dtype, seed=3))
        valid = mask.to(dtype)
        x = (3 * rewards + 5) * valid
        for ddof, eps, mode, use_std in WHITEN_FORMS:
            kwargs = dict(ddof=ddof, eps=eps, eps_mode=mode, use_std=use_std)
            got = fused_whiten.whiten(x, valid, **kwargs)
            _close_scaled(got, masks.whiten(x, valid, **kwargs))
            assert torch.equal(got, fused_whiten.whiten(x, valid, **kwargs))  # deterministic

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
    def test_fused_ppo_clip_kl(self, dtype):
        fused_losses = importlib.import_module("advserve.kernels.losses")
        lp, old, ref, adv, mask = (t.cuda().repeat(200, 30) for t in _loss_batch(dtype, seed=31))  # [1000, 4500]
        for form in LOSS_FORMS:
            weights, expected_policy, expected_kl, expected_grad = _torch_ppo_clip_kl(lp, old, ref, adv, mask, form)
            estimator, kl_clamp, dual_clip, ratio_clamp, _ = form
            loss, policy, kl, grad = fused_losses.ppo_clip_kl(
                lp, old, ref, adv, *weights, clip_low=0.2, clip_high=0.28, dual_clip=dual_clip,
                ratio_clamp=ratio_clamp, kl_coef=0.05, kl_estimator=estimator, kl_clamp=kl_clamp)
            _close_scaled(grad, expected_grad)
            _close_scaled(policy, expected_policy)
            _close_scaled(kl, expected_kl)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
    @pytest.mark.parametrize("mode", COVERED_POLICY_MODES)
    def test_engine_losses(self, monkeypatch, dtype, mode):
        """Engine("cuda", kernels="triton") runs the loss kernel and agrees with kernels="torch" at [1000, 4500]:
        each covered policy mode with a KL (k3, clamp), clipped value loss, entropy and token terms."""
        fused_losses = importlib.import_module("advserve.kernels.losses")
        calls = []
        kernel = fused_losses.loss_terms
        monkeypatch.setattr(fused_losses, "loss_terms", lambda *a, **kw: calls.append(a) or kernel(*a, **kw))
        tensors = {name: t.cuda().repeat(200, 30) for name, t in
                   _loss_tensors([150, 1, 0, 93, 40], 150, 0.2, dtype, seed=43).items()}
        options = {"policy_loss": {"mode": mode, **({"dro_beta": 0.5} if mode == "dro" else {})},
                   "kl_loss": {"estimator": "k3", "clamp": 10.0}, "value_loss": {"clip": 0.2},
                   "entropy_bonus": {"coef": 0.01}, "token_loss": {}}
        dtype_name = {torch.float64: "float64", torch.float32: "float32"}[dtype]
        expected = Engine("cuda", kernels="torch").compute_losses(LossRequest(tensors=tensors, preset="verl",
                                                                              dtype=dtype_name, **options))
        actual = Engine("cuda", kernels="triton").compute_losses(LossRequest(tensors=tensors, preset="verl",
                                                                             dtype=dtype_name, **options))
        assert len(calls) == 1
        _same_losses(actual, expected, dtype)

    @pytest.mark.parametrize("preset", list(PRESETS))
    def test_every_estimator_of_every_preset_agrees(self, preset):
        triton_engine, torch_engine = Engine("cuda", kernels="triton"), Engine("cuda", kernels="torch")
        assert Engine("cuda").kernels == "triton"  # auto, with CUDA and triton
        batch = _estimator_batch(seed=13)
        for name in PRESETS[preset].estimators:
            spec = ESTIMATORS[name]
            tensors = {k: v for k, v in batch.items()
                       if k in {"rewards", "response_mask"} | set(spec.requires) | set(spec.optional)}
            request = AdvantageRequest(name, tensors, preset=preset, dtype="float64")
            expected = torch_engine.compute_advantages(request)
            actual = triton_engine.compute_advantages(request)
            _close(actual.advantages, expected.advantages)
            _close(actual.returns, expected.returns)

    def test_validation(self):
        """`kernels.validate` on CUDA tensors against the torch path's checks: a float mask, NaN under the
        mask and (an error naming the tensor) Inf on it; 4096 x 1024, float32 and bfloat16 inputs."""
        from advserve.batch import Checks, build_batch

        g = torch.Generator().manual_seed(5)
        mask = torch.rand(4096, 1024, generator=g) < 0.7
        values = torch.randn(4096, 1024, generator=g)
        values[~mask & (torch.rand(4096, 1024, generator=g) < 0.01)] = float("nan")
        for sent in (values, values.bfloat16()):
            for bad in (False, True):
                raw = {"response_mask": mask.float().cuda(), "values": sent.cuda().clone()}
                if bad:
                    raw["values"][7, int(mask[7].nonzero()[0])] = float("inf")
                outcomes = []
                for triton in (True, False):
                    checks = Checks(read_later=True)
                    built = build_batch(raw, allowed=raw, required=raw, dtype=torch.float32, device=torch.device("cuda"),
                                        context="test", checks=checks, triton=triton)
                    try:
                        checks.settle()
                        outcomes.append((built.tensors["values"], built.mask, built.valid, built.lengths))
                    except InvalidArgument as error:
                        outcomes.append(error.field)
                if bad:
                    assert outcomes == ["tensors.values"] * 2
                else:
                    assert all(torch.equal(a, b) for a, b in zip(*outcomes))

    @pytest.mark.parametrize("estimator", ["grpo", "gae"])
    def test_statistics(self, estimator):
        """The statistics kernels on a large batch (4096 rows in 512 groups, T 1024, ragged: the engine
        takes them for small requests only, called here directly) and, through the engine, on a small
        one, against the torch path's statistics on the same device, to float32 rounding."""
        from advserve import engine as engine_module

        g = torch.Generator().manual_seed(3)
        lengths = torch.randint(0, 1025, (4096,), generator=g)
        mask = torch.arange(1024) < lengths[:, None]
        tensors = {"response_mask": mask, "rewards": torch.rand(4096, generator=g),
                   **({"group_ids": torch.randperm(4096, generator=g) % 512} if estimator == "grpo" else
                      {"values": torch.randn(4096, 1024, generator=g) * mask})}
        request = AdvantageRequest(estimator, tensors, preset="verl")
        engine = Engine("cuda", kernels="triton")
        prepared = engine.prepare_advantages(request)
        advantages = engine.run_advantages([prepared])[0].advantages
        fused = engine_module.advantage_stats(advantages, None, prepared.batch, torch.float32, fused=True)
        reference = engine_module.advantage_stats(advantages, None, prepared.batch, torch.float32)
        small = AdvantageRequest(estimator, {k: v[:8] for k, v in tensors.items()}, preset="verl")
        assert engine.compute_advantages(small).stats["tokens"] == int(lengths[:8].sum())
        assert fused["tokens"] == reference["tokens"] == int(lengths.sum())
        for part in ("advantages", "rewards"):
            assert fused[part] == pytest.approx(reference[part], rel=1e-5, abs=1e-5), part
        if estimator == "grpo":
            assert fused["groups"]["size_min"] == reference["groups"]["size_min"]
            assert fused["groups"]["reward_mean"] == pytest.approx(reference["groups"]["reward_mean"], rel=1e-5)


def _close_scaled(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to rounding at long T: |diff| <= tol·(|expected| + max|expected|) (a float32 scan over
    thousands of tokens rounds relative to the sums it carries, not to each output)."""
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1.0))


# the (std_ddof, std_eps, singleton_groups) of the presets: paper, verl, openrlhf, trl
STD_FORMS = [(0, 0.0, "zero"), (1, 1e-6, "raw"), (1, 1e-9, "error"), (1, 1e-4, "zero")]
# (kl estimator, kl clamp, dual clip, ratio clamp, policy agg): clamps that bind (0.05, 0.1) and the presets'
LOSS_FORMS = [("k3", 10.0, 3.0, 20.0, "token-mean"), ("k3", None, None, None, "seq-mean-token-mean"),
              ("k3", 0.05, 3.0, 0.1, "token-mean"), ("k1", 10.0, None, 20.0, "seq-mean-token-mean"),
              ("k1", None, 3.0, None, "token-mean"), ("k2", 0.05, 3.0, 20.0, "token-mean"),
              ("k2", None, None, 0.1, "seq-mean-token-mean")]
# whitening forms (ddof, eps, eps_mode, use_std): verl's (1, 1e-8 inside), OpenRLHF's (0, 1e-8 floor; and
# no_std_norm), TRL's (1, 1e-4 outside), the paper's (0, 0); each eps form at both ddof
WHITEN_FORMS = [(1, 1e-8, "inside", True), (0, 1e-8, "floor", True), (0, 1e-8, "floor", False),
                (1, 1e-4, "outside", True), (0, 0.0, "inside", True), (0, 1e-4, "outside", True),
                (1, 1e-8, "floor", True), (0, 1e-8, "inside", True)]


def _scattered_groups(dtype: torch.dtype, seed: int):
    """scores [170] and their Groups: 8 groups scattered through the batch, one of 150 members (three
    blocks of GROUP_BLOCK = 64), one of a single member, one whose scores are all equal."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.cat([torch.zeros(150, dtype=torch.long), torch.tensor([1]), torch.full((4,), 2),
                       torch.arange(3, 8).repeat_interleave(3)])
    index = index[torch.randperm(index.numel(), generator=gen)]
    scores = torch.randint(0, 2, index.shape, generator=gen).to(dtype) + 0.1 * torch.randn(index.shape, generator=gen,
                                                                                           dtype=dtype)
    scores[index == 2] = 0.75
    return scores, functional_groups.Groups.from_index(index)


def _estimator_batch(seed: int) -> dict:
    rewards, values, mask = _batch([19, 1, 24, 7, 12, 24, 3, 16, 9, 20], 24, 0.2, torch.float64, seed)
    gen = torch.Generator().manual_seed(seed)
    group_ids = torch.tensor([0, 1, 0, 2, 1, 2, 3, 3, 3, 2])
    scores = torch.randint(0, 2, (10,), generator=gen).double() + 0.1 * torch.randn(10, generator=gen, dtype=torch.float64)
    scores[group_ids == 3] = 1.0
    logprobs = -torch.rand(2, *mask.shape, generator=gen, dtype=torch.float64) * mask
    sum_pi_squared = torch.rand(mask.shape, generator=gen, dtype=torch.float64) * mask  # Σ_v π(v)² in (0, 1]
    return {"rewards": scores, "response_mask": mask, "group_ids": group_ids, "values": values,
            "old_logprobs": logprobs[0], "ref_logprobs": logprobs[1], "greedy_rewards": torch.rand(10, generator=gen),
            "sum_pi_squared": sum_pi_squared}


def _loss_batch(dtype: torch.dtype, seed: int):
    """logprobs, old, ref, advantages [5, 150] (0 where masked; ratios on both sides of the clips, some
    log-ratios beyond 0.1) and the mask: rows of 150, 1, 0, 93 and 40 tokens (three blocks of 64)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(150).unsqueeze(0) < torch.tensor([150, 1, 0, 93, 40]).unsqueeze(1)
    valid = mask.to(dtype)
    old = -torch.rand(mask.shape, generator=gen, dtype=dtype) * 3
    lp = old + 0.3 * torch.randn(mask.shape, generator=gen, dtype=dtype)
    ref = old + 0.3 * torch.randn(mask.shape, generator=gen, dtype=dtype)
    adv = torch.randn(mask.shape, generator=gen, dtype=dtype)
    return lp * valid, old * valid, ref * valid, adv * valid, mask


def _torch_ppo_clip_kl(lp, old, ref, adv, mask, form):
    """The torch path's answer for one of LOSS_FORMS (ppo_clip, clip 0.2/0.28, + 0.05 · KL token-mean):
    ((policy weights, kl weights), policy term, kl term, ∂loss/∂lp)."""
    estimator, kl_clamp, dual_clip, ratio_clamp, agg = form
    valid = mask.to(lp.dtype)
    lengths = valid.sum(dim=1)
    w_pol = masks.aggregation_weights(valid, lengths, agg)
    w_kl = masks.aggregation_weights(valid, lengths, "token-mean")
    rho = functional_losses.policy_ratio("ppo_clip", lp, old, mask, ratio_clamp=ratio_clamp)
    loss_t, grad_t, _ = functional_losses.policy_loss("ppo_clip", rho, lp, adv, clip_low=0.2, clip_high=0.28,
                                                      dual_clip=dual_clip)
    kl_t, dkl, _ = functional_losses.kl_loss(lp, ref, estimator, kl_clamp)
    return ((w_pol, w_kl), (w_pol * loss_t).sum(), (w_kl * kl_t).sum(), w_pol * grad_t + (0.05 * w_kl) * dkl)


AGGREGATIONS = list(masks.AGG_MODES)


def _loss_tensors(lengths: list[int], width: int, gap_rate: float, dtype: torch.dtype, seed: int) -> dict:
    """Every tensor of every loss term [B, width] (0 where masked; ragged rows, interior gaps as `_batch`):
    log-probs below 0 with log-ratios on both sides of the clips, some beyond a dual clip of 3 and a
    ratio clamp of 0.1, values exactly on a clip bound of 0.2 here and there."""
    _, _, mask = _batch(lengths, width, gap_rate, dtype, seed)
    gen = torch.Generator().manual_seed(seed)

    def noise() -> torch.Tensor:
        return torch.randn(mask.shape, generator=gen, dtype=dtype)

    old = -torch.rand(mask.shape, generator=gen, dtype=dtype) * 3 - 0.05
    jumps = (torch.rand(mask.shape, generator=gen) < 0.1).to(dtype) * 1.5
    logprobs = (old + 0.4 * noise() + jumps).clamp(max=-0.01)
    old_values = noise()
    values = torch.where(torch.rand(mask.shape, generator=gen) < 0.1, old_values + 0.2, old_values + 0.3 * noise())
    tensors = {"logprobs": logprobs, "old_logprobs": old, "ref_logprobs": old + 0.4 * noise(), "advantages": noise(),
               "values": values, "old_values": old_values, "returns": noise(),
               "entropy": torch.rand(mask.shape, generator=gen, dtype=dtype) * 2, "token_losses": noise()}
    return {**{name: t * mask for name, t in tensors.items()}, "response_mask": mask}


@st.composite
def _covered_loss_options(draw) -> dict:
    """A request's loss options (terms and normalizers) that the fused kernel covers: every policy mode
    it takes with its parameters (or no policy term), the KL estimators with their clamps and gradient
    variants, the value loss's forms, the entropy and token terms."""
    mode = draw(st.sampled_from([None, *COVERED_POLICY_MODES]))
    policy = {"mode": mode or "ppo_clip", "agg": draw(st.sampled_from(AGGREGATIONS)),
              "clip_low": draw(st.sampled_from([0.2, 0.1])), "clip_high": draw(st.sampled_from([0.2, 0.28])),
              "ratio_clamp": draw(st.sampled_from([None, 20.0, 0.1])),
              "seq_denominator": draw(st.sampled_from(["nonempty", "all"])),
              "loss_scale_factor": draw(st.sampled_from([None, 7.0]))}
    if mode in ("ppo_clip", "gspo", "bypass_mode"):
        policy["dual_clip"] = draw(st.sampled_from([None, 3.0]))
    if mode in ("ppo_clip", "gspo", "dppo_tv", "dppo_kl"):
        policy["ratio_cap"] = draw(st.sampled_from([None, 1.5]))
    if mode == "cispo":
        policy["cispo_cap"] = draw(st.sampled_from([None, 1.1]))
        policy["cispo_level"] = draw(st.sampled_from(["token", "sequence"]))
    if mode == "gspo" or policy.get("cispo_level") == "sequence":
        policy["sequence_ratio_gradient"] = draw(st.sampled_from(["token_trick", "through_mean"]))
    if mode == "dro":
        policy["dro_beta"] = draw(st.sampled_from([0.1, 2.0]))
    if mode == "sapo":
        policy |= {"tau_pos": draw(st.sampled_from([1.0, 3.0])), "tau_neg": draw(st.sampled_from([1.05, 0.5]))}
    if mode in ("dppo_tv", "dppo_kl"):  # the trust region's thresholds: some tokens in it, some out
        policy |= {"clip_low": draw(st.sampled_from([0.02, 0.2])), "clip_high": draw(st.sampled_from([0.02, 0.2]))}
    if mode == "bypass_mode":
        policy |= {"bypass_loss": draw(st.sampled_from(["ppo_clip", "reinforce"])),
                   "bypass_is": draw(st.sampled_from([None, "token", "sequence"])),
                   "bypass_is_low": draw(st.sampled_from([None, 0.5]))}
    options: dict = {"policy_loss": policy if mode else False}
    if draw(st.booleans()) or not mode:
        kl = {"estimator": draw(st.sampled_from(["k1", "k2", "k3", "abs"])), "coef": draw(st.sampled_from([0.001, 0.5])),
              "clamp": draw(st.sampled_from([None, 10.0, 0.05])), "agg": draw(st.sampled_from([None, *AGGREGATIONS]))}
        variant = draw(st.sampled_from([None, "gradient_estimator", "unbiased_gradient", "importance_weighted"]))
        if variant == "gradient_estimator":
            kl["gradient_estimator"] = draw(st.sampled_from(["k1", "k2", "k3", "abs"]))
        elif variant is not None:
            kl[variant] = True
        options["kl_loss"] = kl
        options["return_kl_values"] = draw(st.booleans())
    importance = draw(st.sampled_from([None, "rollout_correction", "rollout_is_weights"]))
    if mode not in (None, "bypass_mode") and importance == "rollout_correction":
        options["rollout_correction"] = draw(st.sampled_from(ROLLOUT_CORRECTIONS))
    elif mode not in (None, "bypass_mode") and importance == "rollout_is_weights":
        options["rollout_is_weights"] = True  # a tensor of them (`_losses`)
    if draw(st.booleans()):
        options["value_loss"] = {"coef": draw(st.sampled_from([0.5, 1.0])), "clip": draw(st.sampled_from([None, 0.2])),
                                 "clip_ties": draw(st.sampled_from(["pass", "split"])),
                                 "clip_form": draw(st.sampled_from(["bounds", "delta"])),
                                 "agg": draw(st.sampled_from([None, *AGGREGATIONS]))}
    if draw(st.booleans()):
        options["entropy_bonus"] = {"coef": draw(st.sampled_from([0.0, 0.01])),
                                    "agg": draw(st.sampled_from([None, *AGGREGATIONS]))}
    if draw(st.booleans()):
        options["token_loss"] = {"coef": draw(st.sampled_from([1.0, -0.3])),
                                 "agg": draw(st.sampled_from([None, *AGGREGATIONS]))}
    return _with_normalizers(draw, options)


def _with_normalizers(draw, options: dict) -> dict:
    """`options` with, now and then, the global normalizers its aggregations read and a dp_size."""
    if draw(st.booleans()):
        policy_agg = options["policy_loss"]["agg"] if options["policy_loss"] else "token-mean"  # the verl preset's
        aggs = {t.get("agg") or policy_agg for name, t in options.items() if name.endswith(("_loss", "_bonus")) and t}
        if "token-mean" in aggs:
            options["num_tokens"] = draw(st.sampled_from([1.0, 250.0]))
        if any(agg.startswith("seq-mean") for agg in aggs):
            options["num_sequences"] = draw(st.sampled_from([3.0, 9.0]))
        options["dp_size"] = draw(st.sampled_from([1, 4]))
    return options


def _losses(tensors: dict, options: dict, kernels: str, dtype: torch.dtype, engine: bool):
    """compute_losses of the verl preset through an Engine (engine True) or the in-process API."""
    tensors, options = dict(tensors), dict(options)
    if options.pop("rollout_is_weights", False):
        tensors["rollout_is_weights"] = tensors["entropy"]
    if "rollout_correction" in options:
        tensors["rollout_logprobs"] = tensors["old_logprobs"] + 0.1 * tensors["ref_logprobs"].sin()
    terms = {term for term, given in options.items()
             if term.endswith(("_loss", "_bonus", "_correction")) and given is not False}
    needed = {"response_mask", "rollout_is_weights", "cu_seqlens"}.union(*(loss_specs.TERM_TENSORS[t] for t in terms))
    if options.get("kl_loss", {}).get("importance_weighted") or options.get("kl_loss", {}).get("unbiased_gradient"):
        needed.add("old_logprobs")
    tensors = {name: t for name, t in tensors.items() if name in needed}
    dtype_name = {torch.float64: "float64", torch.float32: "float32"}[dtype]
    if engine:
        return Engine("cpu", kernels=kernels).compute_losses(LossRequest(tensors=tensors, preset="verl",
                                                                         dtype=dtype_name, **options))
    return advserve.compute_losses(preset="verl", dtype=dtype_name, device="cpu", kernels=kernels, **options,
                                   **tensors)


def _same_losses(actual, expected, dtype: torch.dtype) -> None:
    """Two LossResults equal to the tolerance of `dtype`: loss, components, metrics, every output tensor."""
    tol = TOLERANCE[dtype]
    assert actual.loss == pytest.approx(expected.loss, rel=tol, abs=tol)
    assert actual.components.keys() == expected.components.keys()
    for name, value in expected.components.items():
        assert (value is None) == (actual.components[name] is None), name
        assert value is None or actual.components[name] == pytest.approx(value, rel=tol, abs=tol), name
    assert actual.metrics == pytest.approx(expected.metrics, rel=tol, abs=tol)
    for name, grad in expected.output_tensors().items():
        other = actual.output_tensors()[name]
        assert (grad is None) == (other is None), name
        if grad is not None:
            _close(other, grad)


def _gae_request(preset: str, seed: int) -> AdvantageRequest:
    rewards, values, mask = _batch([33, 1, 20, 7], 40, 0.2, torch.float32, seed)
    return AdvantageRequest("gae", {"rewards": rewards.sum(1), "values": values, "response_mask": mask},
                            preset=preset, params={"gamma": 0.99, "lam": 0.95, "kl_coef": 0.0}, dtype="float64")


def test_kernels_setting_resolves():
    cpu = torch.device("cpu")
    assert resolve_kernels("torch", cpu) == "torch"
    assert resolve_kernels("auto", cpu) == "numba"  # the Triton kernels are for CUDA tensors, numba's for the CPU
    assert Engine("cpu").kernels == "numba"
    with pytest.raises(InvalidArgument) as bad:
        resolve_kernels("cuda-graphs", cpu)
    assert bad.value.field == "kernels" and "auto, torch, triton, numba" in str(bad.value)


def test_numba_kernels_setting(monkeypatch):
    """kernels 'numba' runs on the CPU only, and needs numba; without it 'auto' on the CPU is torch."""
    assert Engine("cpu", kernels="numba").kernels == "numba"
    with pytest.raises(InvalidArgument) as on_cuda:
        resolve_kernels("numba", torch.device("cuda"))
    assert on_cuda.value.field == "kernels" and "runs on the CPU" in str(on_cuda.value)
    monkeypatch.setattr(advserve.kernels, "numba_available", lambda: False)
    assert resolve_kernels("auto", torch.device("cpu")) == "torch"
    with pytest.raises(InvalidArgument) as missing:
        Engine("cpu", kernels="numba")
    assert missing.value.field == "kernels" and "numba package" in str(missing.value)


def test_triton_kernels_on_the_cpu_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(advserve.kernels, "triton_available", lambda: True)
    with pytest.raises(InvalidArgument) as no_cuda:
        Engine("cpu", kernels="triton")
    assert no_cuda.value.field == "kernels" and "TRITON_INTERPRET=1" in str(no_cuda.value)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert Engine("cpu", kernels="triton").kernels == "triton"


def test_triton_kernels_without_triton_are_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(advserve.kernels, "triton_available", lambda: False)
    with pytest.raises(InvalidArgument) as missing:
        Engine("cpu", kernels="triton")
    assert missing.value.field == "kernels" and "advserve[kernels]" in str(missing.value)
    assert resolve_kernels("auto", torch.device("cpu")) == "numba"


def test_the_in_process_api_takes_the_kernels_argument(monkeypatch):
    tensors = {"rewards": torch.tensor([1.0, 0.0, 1.0, 1.0]), "response_mask": torch.ones(4, 3, dtype=torch.bool),
               "group_ids": [0, 0, 1, 1]}
    on_torch = advserve.compute_advantages("grpo", kernels="torch", **tensors)
    assert torch.equal(on_torch.advantages, advserve.compute_advantages("grpo", **tensors).advantages)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(advserve.kernels, "triton_available", lambda: True)
    for kernels in ("triton", "fast"):
        with pytest.raises(InvalidArgument) as refused:
            advserve.compute_advantages("grpo", device="cpu", kernels=kernels, **tensors)
        assert refused.value.field == "kernels"


def _loop_gae(rewards, values, mask, gamma: float, lam: float, gaps: str) -> torch.Tensor:
    """A_t token by token in Python floats (float64): next(t) the next valid token ("skip"), or t + 1 with
    a masked position a step of r = V = 0 ("step"); 0 at masked positions."""
    out = torch.zeros(rewards.shape, dtype=torch.float64)
    for i in range(rewards.shape[0]):
        next_value = next_adv = 0.0
        for t in reversed(range(rewards.shape[1])):
            if not mask[i, t]:
                if gaps == "step":
                    next_adv, next_value = gamma * next_value + gamma * lam * next_adv, 0.0
                continue
            next_adv = float(rewards[i, t]) + gamma * next_value - float(values[i, t]) + gamma * lam * next_adv
            next_value = float(values[i, t])
            out[i, t] = next_adv
    return out


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 70), min_size=1, max_size=4),
    extra=st.integers(0, 20),
    gap_rate=st.sampled_from([0.0, 0.3]),
    coefficients=st.sampled_from([(1.0, 1.0), (0.99, 0.95), (1.0, 0.95), (0.97, 1.0), (0.9, 0.0), (0.0, 0.5)]),
    gaps=st.sampled_from(["skip", "step"]),
    seed=st.integers(0, 2**16),
)
def test_torch_scans_match_a_loop_over_tokens(lengths, extra, gap_rate, coefficients, gaps, seed):
    """The chunked scans (two GEMMs per chunk, carries across chunks, rows packed by a permutation when
    masks have interior gaps) in float64 against the recursion itself: T below, at and above one chunk
    and not a multiple of it, empty rows, γλ = 0 and 1."""
    gamma, lam = coefficients
    width = max(lengths) + extra or 1
    rewards, values, mask = _batch(lengths, width, gap_rate, torch.float64, seed)
    before = rewards.clone(), values.clone()
    adv, ret = reference.gae(rewards, values, mask, gamma, lam, gaps)
    expected = _loop_gae(rewards, values, mask, gamma, lam, gaps)
    torch.testing.assert_close(adv, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(ret, adv + values) and bool((adv[~mask] == 0).all())
    rtg = reference.reward_to_go(rewards, mask, gamma, gaps)
    torch.testing.assert_close(rtg, _loop_gae(rewards, torch.zeros_like(values), mask, gamma, 1.0, gaps),
                               rtol=1e-12, atol=1e-12)
    assert torch.equal(rewards, before[0]) and torch.equal(values, before[1])  # inputs left as given
