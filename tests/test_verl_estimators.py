"""verl 0.9.1's other advantage estimators (grpo_passk, opo, gpg, gdpo, rloo_vectorized, the optimal
token baselines) and its masked token rewards, against the real library; the `paper` form of OPO from
its formula; the identities the algorithms imply.

Golden vectors: tests/golden/verl_0.9.1_estimators.json, written by
``/tmp/verlenv/bin/python tests/golden/make_verl_estimators.py`` (see that script).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import advserve
import golden_cases
from advserve.errors import InvalidArgument

DATA = json.loads((golden_cases.GOLDEN_DIR / "verl_0.9.1_estimators.json").read_text())
assert DATA["library"] == "verl" and DATA["version"] == "0.9.1"
CASES = DATA["advantages"]
# gdpo's whitening: verl's masked_mean divides by N + 1e-8 (see test_verl_golden.TOL); the rest ~1e-15.
# float32: gdpo with reward components, which verl's trainer reads as float32
TOL = {"float64": 1e-8, "float32": 1e-5}


def test_the_golden_file_covers_every_new_estimator_at_least_ten_times():
    counts: dict[str, int] = {}
    for case in CASES:
        key = "rloo_vectorized" if case["case"].startswith("rloo_vectorized") else case["estimator"]
        counts[key] = counts.get(key, 0) + 1
    for name in ("grpo_passk", "opo", "gpg", "gdpo", "rloo_vectorized", "optimal_token_baseline",
                 "tir_optimal_token_baseline"):
        assert counts.get(name, 0) >= 10, (name, counts)


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_verl_estimators(case):
    tensors = golden_cases.inputs(case["tensors"])
    if "error" in case["expected"]:
        with pytest.raises(InvalidArgument) as info:
            advserve.compute_advantages(case["estimator"], preset="verl", params=case["params"], dtype=case["dtype"],
                                        **tensors)
        assert info.value.field == "tensors.group_ids"
        return
    res = advserve.compute_advantages(case["estimator"], preset="verl", params=case["params"], dtype=case["dtype"],
                                      **tensors)
    golden_cases.check_advantages(case, res, TOL[case["dtype"]])


def test_masked_token_rewards_count_under_verl_only():
    """verl's outcome estimators sum token rewards over every position; the other presets ignore the
    masked ones (OpenRLHF and TRL take one reward per sequence: nothing there to sum)."""
    mask = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]])
    tr = np.array([[0.0, 1.0, 5.0, 0.0], [0.5, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 1.0]])
    ids = ["a", "a", "a"]
    verl = advserve.compute_advantages("dr_grpo", preset="verl", token_rewards=tr, response_mask=mask, group_ids=ids,
                                       dtype="float64")
    R = tr.sum(axis=1)  # 6, 2.5, 1
    np.testing.assert_allclose(verl.advantages[:, 0], R - R.mean(), rtol=1e-15)
    ignore = advserve.compute_advantages("dr_grpo", preset="verl", params={"masked_token_rewards": "ignore"},
                                         token_rewards=tr, response_mask=mask, group_ids=ids, dtype="float64")
    R = (tr * mask).sum(axis=1)
    np.testing.assert_allclose(ignore.advantages[:, 0], R - R.mean(), rtol=1e-15)
    paper = advserve.compute_advantages("dr_grpo", preset="paper", token_rewards=tr, response_mask=mask,
                                        group_ids=ids, dtype="float64")
    np.testing.assert_allclose(paper.advantages, ignore.advantages, rtol=1e-15)


def test_nan_on_a_masked_token_reward_is_refused_where_it_would_be_summed():
    mask = np.array([[1, 0], [1, 1]])
    tr = np.array([[1.0, np.nan], [0.0, 1.0]])
    with pytest.raises(InvalidArgument) as info:
        advserve.compute_advantages("grpo", preset="verl", token_rewards=tr, response_mask=mask, group_ids=[0, 0])
    assert info.value.field == "tensors.token_rewards"
    out = advserve.compute_advantages("grpo", preset="paper", token_rewards=tr, response_mask=mask, group_ids=[0, 0])
    assert np.isfinite(out.advantages).all()


# --- the paper form of OPO, by hand ---------------------------------------------------------------


def test_opo_paper_by_hand():
    """OPO (arXiv:2505.23585, eq. for b*): b = Σ_i L_i R_i / Σ_i L_i, A_i = R_i − b. Group a: lengths
    3, 1, 2 and rewards 1, 0, 0.5: b = (3 + 0 + 1)/6 = 2/3; group b: one response, b = R, A = 0."""
    mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]])
    r = np.array([1.0, 0.0, 0.5, 0.3])
    out = advserve.compute_advantages("opo", preset="paper", rewards=r, response_mask=mask,
                                      group_ids=["a", "a", "a", "b"], dtype="float64")
    want = np.array([1 - 2 / 3, -2 / 3, 0.5 - 2 / 3, 0.0])[:, None] * mask
    np.testing.assert_allclose(out.advantages, want, rtol=0, atol=1e-15)
    verl = advserve.compute_advantages("opo", preset="verl", rewards=r, response_mask=mask,
                                       group_ids=["a", "a", "a", "b"], dtype="float64")
    np.testing.assert_allclose(verl.advantages[3], 0.3 * mask[3], rtol=0, atol=0)  # verl: baseline 0 alone


def test_passk_by_hand():
    """Pass@k: rewards 0.2, 0.9, 0.5 → only 0.9 moves, by (0.9 − 0.5)/(std + 1e-6), std unbiased."""
    r = np.array([0.2, 0.9, 0.5])
    out = advserve.compute_advantages("grpo_passk", preset="verl", rewards=r, response_mask=np.ones((3, 2)),
                                      group_ids=[7, 7, 7], dtype="float64")
    std = np.std(r, ddof=1)
    np.testing.assert_allclose(out.advantages[:, 1], [0.0, 0.4 / (std + 1e-6), 0.0], rtol=1e-14, atol=0)


def test_gpg_by_hand():
    """GPG: α = B / #{R ≠ 0} = 5/3 (float32-rounded, as verl), A = α (R − mean_g R); a group of one
    keeps its reward (mean 0)."""
    r = np.array([1.0, 0.0, 2.0, 0.0, 0.5])
    out = advserve.compute_advantages("gpg", preset="verl", rewards=r, response_mask=np.ones((5, 1)),
                                      group_ids=["a", "a", "b", "b", "c"], dtype="float64")
    alpha = float(np.float32(5) / np.float32(3))
    np.testing.assert_allclose(out.advantages[:, 0], alpha * np.array([0.5, -0.5, 1.0, -1.0, 0.5]), rtol=1e-15)
    assert alpha != 5 / 3


def test_optimal_token_baseline_by_hand():
    """Two responses of one prompt, lengths 2 and 3, rewards 1 and 0 (on the last token), w_t = 1 −
    2π + Σπ² = 0.5 everywhere: W = 0.5, 1.0, 1.5. Column 0: b = (1·0.5 + 0·0.5)/(1.0 + ε); column 1:
    (1·1 + 0)/(2 + ε); column 2: the longer response alone, beyond the shorter one's length: b = 0
    (handle_zero_tail), A = G = 0."""
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    logp = np.log(np.full((2, 3), 0.5))  # π = 0.5, Σπ² = 0.5: w = 1 − 1 + 0.5
    out = advserve.compute_advantages("optimal_token_baseline", preset="verl", rewards=np.array([1.0, 0.0]),
                                      response_mask=mask, group_ids=[0, 0], old_logprobs=logp,
                                      sum_pi_squared=np.full((2, 3), 0.5), dtype="float64")
    eps = 1e-8
    b = np.array([0.5 / (1.0 + eps), 1.0 / (2.0 + eps), 0.0])
    G = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(out.advantages, (G - b) * mask, rtol=1e-15, atol=1e-16)
    np.testing.assert_allclose(out.returns, G * mask, rtol=0, atol=0)


def test_optimal_token_baseline_without_eps_has_no_nan():
    """baseline_eps 0, a column where every member of group 0 is masked, and a group (1) whose weights
    are 0 everywhere (π = 1, Σπ² = 1: w = 1 − 2π + Σπ² = 0): verl divides 0 by 0 there; the baseline
    is 0 instead, the masked positions are exactly 0 and the valid ones the by-hand values."""
    mask = np.array([[1, 0, 1], [1, 0, 1], [1, 1, 1], [1, 1, 0]])
    pi = np.array([[0.5] * 3, [0.5] * 3, [1.0] * 3, [1.0] * 3])
    out = advserve.compute_advantages("optimal_token_baseline", preset="verl", rewards=np.array([1.0, 0.0, 1.0, 0.0]),
                                      response_mask=mask, group_ids=[0, 0, 1, 1], old_logprobs=np.log(pi),
                                      sum_pi_squared=2 * pi - 0.5 - (pi == 1) * 0.5,  # w = 0.5 for π = 0.5, 0 for π = 1
                                      params={"baseline_eps": 0.0, "handle_zero_tail": False}, dtype="float64")
    assert np.isfinite(out.advantages).all() and (out.advantages[mask == 0] == 0).all()
    # group 0: W = 0.5, -, 1.0 at the valid columns; G = (1, -, 1) in row 0, 0 in row 1
    b = np.array([0.5 / 1.0, 0.0, 1.0 / 2.0])
    np.testing.assert_allclose(out.advantages[:2], (np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]) - b) * mask[:2],
                               rtol=1e-15, atol=1e-16)
    np.testing.assert_array_equal(out.advantages[2:], out.returns[2:])  # group 1: no weight, no baseline


# --- identities ------------------------------------------------------------------------------------


@st.composite
def grouped(draw, max_b=9, max_t=6):
    B = draw(st.integers(2, max_b))
    T = draw(st.integers(1, max_t))
    lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    mask = np.array([[1] * L + [0] * (T - L) for L in lengths])
    ids = draw(st.lists(st.integers(0, 3), min_size=B, max_size=B))
    r = np.array(draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.25]), min_size=B, max_size=B)))
    return mask, ids, r


@settings(max_examples=40, deadline=None)
@given(b=grouped(), pad=st.integers(1, 3))
def test_padding_is_invisible(b, pad):
    """Extra masked columns change nothing (the OTB's columns beyond every response contribute 0)."""
    mask, ids, r = b
    logp = -np.abs(np.sin(np.arange(mask.size, dtype=float))).reshape(mask.shape) - 0.05
    extra = {"old_logprobs": logp, "sum_pi_squared": np.exp(2 * logp)}
    for est in ("opo", "gpg", "gdpo", "optimal_token_baseline", "tir_optimal_token_baseline"):
        more = extra if "baseline" in est else {}
        a = advserve.compute_advantages(est, preset="verl", rewards=r, response_mask=mask, group_ids=ids,
                                        dtype="float64", **more)
        wide = {k: np.pad(v, ((0, 0), (0, pad))) for k, v in more.items()}
        w = advserve.compute_advantages(est, preset="verl", rewards=r, response_mask=np.pad(mask, ((0, 0), (0, pad))),
                                        group_ids=ids, dtype="float64", **wide)
        np.testing.assert_allclose(np.asarray(w.advantages)[:, :mask.shape[1]], a.advantages, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(b=grouped())
def test_passk_gives_one_winner_per_group_and_opo_is_length_weighted_zero_mean(b):
    mask, ids, r = b
    ids = [i % 2 for i in range(len(ids))]  # two groups of ≥ 1; make every group ≥ 2
    if len(ids) < 4:
        ids = [0] * len(ids)
    pk = advserve.compute_advantages("grpo_passk", preset="verl", rewards=r, response_mask=mask, group_ids=ids,
                                     dtype="float64")
    per = np.asarray(pk.advantages)[:, 0]
    for g in set(ids):
        rows = [i for i, x in enumerate(ids) if x == g]
        assert (per[rows] != 0).sum() <= 1
        assert (per[rows] >= 0).all()
        top = r[rows].max()
        if (r[rows] == top).sum() == 1 and per[rows].max() > 0:
            assert r[rows][np.argmax(per[rows])] == top
    opo = advserve.compute_advantages("opo", preset="paper", rewards=r, response_mask=mask, group_ids=ids,
                                      dtype="float64")
    lengths = mask.sum(axis=1)
    per = np.asarray(opo.advantages)[:, 0]
    for g in set(ids):
        rows = [i for i, x in enumerate(ids) if x == g]
        assert abs((lengths[rows] * per[rows]).sum()) < 1e-12


def test_tir_equals_otb_on_contiguous_masks_and_skips_gaps():
    """With every response's tokens contiguous from position 0 the two baselines agree; with an interior
    gap the multi-turn one aligns each response's k-th valid token."""
    rng = np.random.default_rng(3)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    logp = -rng.uniform(0.05, 2, size=mask.shape)
    t = dict(rewards=np.array([1.0, 0.0, 0.5]), group_ids=[0, 0, 0], old_logprobs=logp,
             sum_pi_squared=np.exp(2 * logp), dtype="float64")
    a = advserve.compute_advantages("optimal_token_baseline", preset="verl", response_mask=mask, **t)
    b = advserve.compute_advantages("tir_optimal_token_baseline", preset="verl", response_mask=mask, **t)
    np.testing.assert_allclose(a.advantages, b.advantages, rtol=1e-15, atol=0)
    gap = np.array([[1, 0, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    squeezed = advserve.compute_advantages("tir_optimal_token_baseline", preset="verl", response_mask=gap, **t)
    assert np.asarray(squeezed.advantages)[0, 1] == 0  # the alignment itself: the golden cases with gaps


def test_rollout_is_weights_scale_w_by_their_square():
    """w_t ρ_t²: weights √2 everywhere double every W, which leaves b = Σ G W / Σ W unchanged (ε aside)."""
    mask = np.ones((3, 3), dtype=int)
    logp = np.log(np.array([[0.2, 0.5, 0.9], [0.3, 0.3, 0.3], [0.7, 0.1, 0.4]]))
    t = dict(rewards=np.array([1.0, 0.0, 0.25]), response_mask=mask, group_ids=[0, 0, 0], old_logprobs=logp,
             sum_pi_squared=np.exp(2 * logp) + 0.1, dtype="float64", params={"baseline_eps": 0.0})
    a = advserve.compute_advantages("optimal_token_baseline", preset="verl", **t)
    b = advserve.compute_advantages("optimal_token_baseline", preset="verl", rollout_is_weights=np.full((3, 3), 2 ** 0.5),
                                    **t)
    np.testing.assert_allclose(a.advantages, b.advantages, rtol=1e-13, atol=1e-15)


def test_the_analysis_leaves_out_what_the_seeds_table_lacks():
    """/v1/analysis evaluates the seed's bias table: under `verl` it analyses the estimators that table
    has and refuses the others by name."""
    t = dict(rewards=np.array([1.0, 0.0, 1.0, 0.0]), response_mask=np.ones((4, 3)), group_ids=[0, 0, 1, 1])
    out = advserve.analyze(preset="verl", **t)
    assert "grpo" in out["estimators"] and not set(out["estimators"]) & {"opo", "gpg", "gdpo", "grpo_passk"}
    with pytest.raises(InvalidArgument) as info:
        advserve.analyze(preset="verl", estimators=["opo"], **t)
    assert info.value.field == "estimators"


def test_gdpo_components_by_hand():
    """Two components, groups {0, 1} and {2, 3}, weights 1 and 0.5: A_k = (r_k − mean)/(std + 1e-6) per
    group (two members: ±(d/2)/(|d|/√2 + 1e-6)), summed with the weights, then whitened over the tokens."""
    comps = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    mask = np.array([[1, 1], [1, 0], [1, 1], [1, 1]])
    out = advserve.compute_advantages("gdpo", preset="verl", reward_components=comps, response_mask=mask,
                                      group_ids=[0, 0, 1, 1], params={"reward_weights": [1.0, 0.5]}, dtype="float64")

    def norm(a, b):
        d = (a - b) / 2
        s = abs(a - b) / np.sqrt(2)
        return np.array([d, -d]) / (s + 1e-6)
    per_seq = np.concatenate([norm(1, 0) + 0.5 * norm(0, 1), norm(1, 1) + 0.5 * norm(1, 0)])
    tokens = np.repeat(per_seq, mask.sum(axis=1))
    want = (per_seq[:, None] - tokens.mean()) / np.sqrt(tokens.var(ddof=1) + 1e-8) * mask
    np.testing.assert_allclose(out.advantages, want, rtol=1e-13, atol=1e-15)


def test_gdpo_with_the_batch_std_divides_each_component_by_its_std_over_the_batch():
    """std_scope 'batch' (not verl's; TRL's scale_rewards='batch' applied per component): A_k =
    (r_k − mean_g r_k)/(std_batch r_k + 1e-6), the std unbiased over all B values of component k."""
    comps = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 0.0], [0.5, 0.5]])
    mask = np.ones((5, 2))
    groups = np.array([0, 0, 1, 1, 1])
    out = advserve.compute_advantages("gdpo", preset="verl", reward_components=comps, response_mask=mask,
                                      group_ids=groups, dtype="float64",
                                      params={"reward_weights": [1.0, 0.5], "std_scope": "batch", "whiten": False})
    means = np.array([[comps[groups == g, k].mean() for k in (0, 1)] for g in groups])
    per_seq = ((comps - means) / (comps.std(axis=0, ddof=1) + 1e-6)) @ np.array([1.0, 0.5])
    np.testing.assert_allclose(out.advantages, per_seq[:, None] * mask, rtol=1e-13, atol=1e-15)


def test_gdpo_component_errors_name_the_field():
    comps = np.ones((4, 2))
    t = dict(reward_components=comps, response_mask=np.ones((4, 2)), group_ids=[0, 0, 1, 1])
    for extra, field in ((dict(rewards=np.ones(4)), "tensors.rewards"),
                         (dict(params={"reward_weights": [1.0]}), "params.reward_weights"),
                         (dict(params={"reward_weights": [1.0, "x"]}), "params.reward_weights"),
                         (dict(params={"kl_coef": 0.1}, old_logprobs=np.zeros((4, 2)), ref_logprobs=np.zeros((4, 2))),
                          "params.kl_coef"),
                         (dict(reward_components=np.ones((4, 0))), "tensors.reward_components"),
                         (dict(reward_components=np.ones(4)), "tensors.reward_components")):
        with pytest.raises(InvalidArgument) as info:
            advserve.compute_advantages("gdpo", preset="verl", **{**t, **extra})
        assert info.value.field == field, (extra, info.value)


@pytest.mark.parametrize("kind", ["rest-binary", "rest-json", "grpc"])
def test_the_new_inputs_cross_every_transport(server, kind):
    """reward_components [B, K], the list parameter reward_weights, sum_pi_squared and rollout_is_weights,
    and token rewards on masked positions: the same numbers and params over REST (binary, JSON) and gRPC
    as in process."""
    from advserve_client import Client

    rng = np.random.default_rng(5)
    mask = np.array([[1, 1, 0, 1], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    old = np.log(rng.uniform(0.1, 0.9, size=mask.shape))
    requests = [
        ("gdpo", dict(params={"reward_weights": [1.0, 0.3]}, reward_components=rng.normal(size=(4, 2)))),
        ("gdpo", dict(rewards=rng.normal(size=4))),
        ("optimal_token_baseline", dict(rewards=rng.normal(size=4), old_logprobs=old,
                                        sum_pi_squared=np.exp(2 * old) + 0.05,
                                        rollout_is_weights=rng.uniform(0.5, 1.5, size=mask.shape))),
        ("grpo", dict(token_rewards=rng.normal(size=mask.shape))),  # masked positions summed (verl)
    ]
    address = server.grpc_address if kind == "grpc" else server.url
    with (Client(address, transport="grpc") if kind == "grpc" else Client(address, binary=kind == "rest-binary")) as c:
        for estimator, extra in requests:
            t = dict(response_mask=mask, group_ids=["a", "a", "b", "b"], dtype="float64", **extra)
            local = advserve.compute_advantages(estimator, preset="verl", **t)
            remote = c.compute_advantages(estimator, preset="verl", **t)
            np.testing.assert_array_equal(remote.advantages, np.asarray(local.advantages), err_msg=estimator)
            np.testing.assert_array_equal(remote.returns, np.asarray(local.returns), err_msg=estimator)
            assert remote.params == local.params, estimator
        for bad in ([1.0, "x"], [], "x", [1.0, True]):
            with pytest.raises(Exception) as info:
                c.compute_advantages("gdpo", preset="verl", params={"reward_weights": bad}, response_mask=mask,
                                     group_ids=["a", "a", "b", "b"], rewards=np.ones(4))
            assert getattr(info.value, "field", None) == "params.reward_weights", (bad, info.value)


@settings(max_examples=30, deadline=None)
@given(a=grouped(), b=grouped())
def test_group_local_estimators_see_only_their_group(a, b):
    """Two batches with disjoint groups, computed together, give each row what its own batch gives (the
    group-local estimators; gpg's α and gdpo's whitening are batch-wide and excluded)."""
    (ma, ia, ra), (mb, ib, rb) = a, b
    T = max(ma.shape[1], mb.shape[1])
    ma, mb = np.pad(ma, ((0, 0), (0, T - ma.shape[1]))), np.pad(mb, ((0, 0), (0, T - mb.shape[1])))
    ib = [i + 10 for i in ib]

    def extra(m):
        logp = -np.abs(np.cos(np.arange(m.size, dtype=float))).reshape(m.shape) - 0.05
        return {"old_logprobs": logp, "sum_pi_squared": np.exp(2 * logp) + 0.01}
    ea, eb = extra(ma), extra(mb)
    for est, params in (("opo", {}), ("grpo_passk", {"singleton_groups": "zero"}), ("optimal_token_baseline", {}),
                        ("tir_optimal_token_baseline", {})):
        more = "baseline" in est

        def run(m, ids, r, e):
            return np.asarray(advserve.compute_advantages(est, preset="verl", params=params, rewards=r, response_mask=m,
                                                          group_ids=ids, dtype="float64",
                                                          **(e if more else {})).advantages)
        both = run(np.concatenate([ma, mb]), ia + ib, np.concatenate([ra, rb]),
                   {k: np.concatenate([ea[k], eb[k]]) for k in ea})
        np.testing.assert_allclose(both[:len(ia)], run(ma, ia, ra, ea), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(both[len(ia):], run(mb, ib, rb, eb), rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(b=grouped(), data=st.data())
def test_under_sum_only_a_rows_total_token_reward_matters(b, data):
    """masked_token_rewards 'sum': R is the row's total over all T positions, so moving reward between a
    row's masked and valid positions leaves every outcome estimator's advantages unchanged."""
    mask, ids, r = b
    T = mask.shape[1]
    where = np.array([data.draw(st.integers(0, T - 1)) for _ in range(len(r))])
    placed = np.zeros(mask.shape)
    placed[np.arange(len(r)), where] = r  # anywhere in the row, masked or not
    last = np.zeros(mask.shape)
    last[np.arange(len(r)), mask.sum(axis=1) - 1] = r
    for est in ("grpo", "dr_grpo", "rloo", "opo", "gpg", "gdpo"):
        t = dict(response_mask=mask, group_ids=ids, dtype="float64")
        moved = advserve.compute_advantages(est, preset="verl", token_rewards=placed, **t)
        at_end = advserve.compute_advantages(est, preset="verl", token_rewards=last, **t)
        outcome = advserve.compute_advantages(est, preset="verl", rewards=r, **t)
        np.testing.assert_array_equal(moved.advantages, at_end.advantages, err_msg=est)
        np.testing.assert_allclose(np.asarray(moved.advantages), np.asarray(outcome.advantages), rtol=1e-12,
                                   atol=1e-12, err_msg=est)


@pytest.mark.parametrize("transport", ["http-binary", "http-json", "grpc"])
def test_gdpo_components_over_the_open_inference_protocol(server, transport):
    """tritonclient: reward_components as a [B, K] input, reward_weights as JSON text (OIP parameters are
    scalars), the optimal token baseline's sum_pi_squared; the same numbers as in process."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from test_oip import infer

    rng = np.random.default_rng(9)
    mask = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], bool)
    ids = np.array([0, 0, 1, 1], np.int64)
    comps = rng.normal(size=(4, 2)).astype(np.float32)
    old = np.log(rng.uniform(0.1, 0.9, size=mask.shape)).astype(np.float32)
    cases = [("gdpo", {"reward_components": comps}, {"preset": "verl", "reward_weights": "[1.0, 0.25]"},
              {"reward_components": comps, "params": {"reward_weights": [1.0, 0.25]}}),
             ("optimal_token_baseline", {"rewards": np.array([1, 0, 1, 0.5], np.float32), "old_logprobs": old,
                                         "sum_pi_squared": np.exp(2 * old)}, {"preset": "verl"}, {})]
    http = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    grpc_ = grpcclient.InferenceServerClient(server.grpc_address)
    try:
        for model, arrays, parameters, local_kw in cases:
            arrays = {"response_mask": mask, "group_ids": ids, **arrays}
            result = infer(transport, (http, grpc_), model, arrays, parameters)
            local_arrays = {k: v for k, v in arrays.items() if k not in local_kw}
            local = advserve.compute_advantages(model, preset="verl", **local_arrays, **local_kw)
            np.testing.assert_array_equal(result.as_numpy("advantages"), np.asarray(local.advantages), err_msg=model)
    finally:
        http.close()
        grpc_.close()


@settings(max_examples=200, deadline=None)
@given(eps=st.one_of(st.floats(0.0, 1e-3), st.floats(1e-12, 1.0), st.sampled_from([0.0, 1e-6, 1e-8, 1e-4, 5.9604645e-08])))
def test_the_raw_singleton_divisor_is_verls_float32_one_plus_eps(eps):
    """verl divides a group of one by torch.tensor(1.0) + eps; advserve takes that number on the host."""
    import torch

    from advserve.functional.groups import verl_raw_divisor

    assert verl_raw_divisor(eps) == float(torch.tensor(1.0, dtype=torch.float32) + eps)
