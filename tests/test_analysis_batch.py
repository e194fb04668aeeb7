"""The analysis of a user's batch (`advserve.analyze`, POST /v1/analysis, the Analyze RPC and
`Client.analyze`): implied weights checked against hand formulas computed here with numpy loops (not
with `advserve.analysis.theory`), sign disagreement against a token-by-token count over the engine's
advantages, invariances (packed layout, row order) as properties, the same document over every
transport, and every error naming its field."""

from __future__ import annotations

import asyncio
import math

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import advserve
from advserve_client import AsyncClient, Client, InvalidArgument, NotFound, framing
from conftest import RunningServer

TRANSPORTS = ("rest-binary", "rest-json", "grpc")


def issue_batch(t: int = 3) -> dict:
    """Two prompts of 16 responses: one solved once, one solved 8 times (the issue's example)."""
    rewards = np.array([1.0] + [0.0] * 15 + [1.0] * 8 + [0.0] * 8)
    return dict(rewards=rewards, response_mask=np.ones((32, t), dtype=bool), group_ids=np.repeat(["hard", "even"], 16))


def mixed_batch(seed: int = 0) -> dict:
    """Scattered string groups of sizes 2..6, ragged lengths, non-binary rewards, one no-signal group, values."""
    rng = np.random.default_rng(seed)
    sizes = [2, 3, 5, 6, 4]
    ids = np.array([f"q{g}" for g, n in enumerate(sizes) for _ in range(n)])
    order = rng.permutation(len(ids))
    ids = ids[order]
    rewards = rng.choice([0.0, 0.25, 1.0, 2.0], size=len(ids))
    rewards[ids == "q4"] = 0.5  # all equal: no signal
    lengths = rng.integers(1, 8, size=len(ids))
    mask = np.arange(7)[None, :] < lengths[:, None]
    values = np.round(rng.normal(size=mask.shape), 3)
    return dict(rewards=rewards, response_mask=mask, group_ids=ids, values=values)


def tensors_for(estimators: list[str], batch: dict) -> dict:
    """The batch without the critic values unless a critic estimator is analysed (an unused tensor is
    an error, as for /v1/advantages)."""
    return batch if {"gae", "orz"} & set(estimators) else {k: v for k, v in batch.items() if k != "values"}


# --- the numbers ----------------------------------------------------------------------------------


def test_issue_example_grpo_weights_one_in_sixteen_about_twice_eight_in_sixteen():
    out = advserve.analyze(["grpo", "rloo", "dr_grpo"], **issue_batch())
    grpo = out["analysis"]["grpo"]
    assert out["groups"]["ids"] == ["hard", "even"] and out["groups"]["pass_rate"] == [1 / 16, 0.5]
    # by hand: 1/sqrt(1/16 · 15/16) = 16/sqrt(15) and 1/sqrt(1/4) = 2
    assert grpo["weights"] == pytest.approx([16 / math.sqrt(15), 2.0], rel=1e-12)
    assert grpo["weights"][0] / grpo["weights"][1] == pytest.approx(2.0656, abs=1e-4)
    assert grpo["summary"]["max_over_min"] == pytest.approx(8 / math.sqrt(15), rel=1e-12)
    assert grpo["bias"] == "reweighted"
    # the median of two weights is their mean
    median = (16 / math.sqrt(15) + 2) / 2
    assert grpo["relative_to_median"] == pytest.approx([16 / math.sqrt(15) / median, 2 / median], rel=1e-12)
    # the finite-group weights are smaller and closer together (exact enumeration in test_analysis_theory)
    exact = grpo["weights_exact"]
    assert exact[0] < grpo["weights"][0] and exact[1] < grpo["weights"][1] and 1.5 < exact[0] / exact[1] < 2.0
    assert out["analysis"]["rloo"]["weights"] == [1.0, 1.0] and out["analysis"]["rloo"]["bias"] == "unbiased"
    assert out["analysis"]["dr_grpo"]["weights"] == [15 / 16, 15 / 16]
    assert out["no_signal_fraction"] == 0.0


def hand_weights(batch: dict, estimator: str, *, ddof: int = 0, eps: float = 0.0, whiten_ddof: int = 0,
                 whiten_eps: float = 0.0, whiten: bool | None = None) -> list[float]:
    """The implied weight of each group, group by group and token by token, from the docs' formulas."""
    r, mask, ids = batch["rewards"], batch["response_mask"], batch["group_ids"]
    labels = list(dict.fromkeys(ids.tolist()))
    lengths = mask.sum(axis=1)
    tokens_r = [r[i] for i in range(len(r)) for _ in range(lengths[i])]  # R on each valid token

    def token_std(values_per_token: list[float]) -> float:
        n = len(values_per_token)
        mean = sum(values_per_token) / n
        return math.sqrt(sum((v - mean) ** 2 for v in values_per_token) / (n - whiten_ddof) + whiten_eps)

    out = []
    for label in labels:
        rows = [i for i in range(len(r)) if ids[i] == label]
        m = len(rows)
        g = [r[i] for i in rows]
        mean = sum(g) / m
        std = math.sqrt(sum((v - mean) ** 2 for v in g) / (m - ddof)) + eps
        inv_std = 1 / std if std > 0 else 0.0
        if estimator in ("reinforce", "reinforce_rtg", "rloo", "remax"):
            out.append(1.0)
        elif estimator == "dr_grpo":
            out.append((m - 1) / m)
        elif estimator == "grpo":
            out.append(inv_std)
        elif estimator == "dapo":
            out.append(inv_std / (sum(max(lengths[i], 1) for i in rows) / m))
        elif estimator == "grpo_original":
            out.append(inv_std * sum(1 / max(lengths[i], 1) for i in rows) / m)
        elif estimator == "reinforce_pp":
            out.append(1 / token_std(tokens_r))
        elif estimator == "reinforce_pp_baseline":
            group_mean = {lab: np.mean([r[i] for i in range(len(r)) if ids[i] == lab]) for lab in labels}
            centered = [r[i] - group_mean[ids[i]] for i in range(len(r)) for _ in range(lengths[i])]
            out.append((m - 1) / m / token_std(centered))
        elif estimator in ("gae", "orz"):
            if not whiten:
                out.append(1.0)
            else:  # γ = λ = 1, β = 0: A_t = R − V_t
                raw = [r[i] - batch["values"][i, t] for i in range(len(r)) for t in range(mask.shape[1]) if mask[i, t]]
                out.append(1 / token_std(raw))
    return out


@pytest.mark.parametrize("estimator", ["reinforce", "reinforce_rtg", "reinforce_pp", "reinforce_pp_baseline", "rloo",
                                       "orz", "gae", "grpo", "grpo_original", "dapo", "dr_grpo"])
def test_weights_follow_the_formulas_on_a_mixed_batch_paper(estimator):
    batch = mixed_batch()
    params = {"gae": {"lam": 1.0}} if estimator == "gae" else None
    out = advserve.analyze([estimator], params=params, dtype="float64", **tensors_for([estimator], batch))
    assert out["binary_rewards"] is False
    assert out["analysis"][estimator]["weights"] == pytest.approx(hand_weights(batch, estimator), rel=1e-10)
    assert out["analysis"][estimator]["weights_exact"] is None  # rewards are not 0/1


@pytest.mark.parametrize("estimator", ["reinforce_pp", "reinforce_pp_baseline", "rloo", "orz", "gae", "grpo",
                                       "dr_grpo"])
def test_weights_follow_the_formulas_on_a_mixed_batch_verl(estimator):
    """verl: group std with ddof 1 + 1e-6; whitening with ddof 1 and ε 1e-8, on GAE and ORZ too."""
    batch = mixed_batch(1)
    out = advserve.analyze([estimator], preset="verl", dtype="float64", **tensors_for([estimator], batch))
    entry = out["analysis"][estimator]
    whiten = entry["params"].get("whiten")
    expected = hand_weights(batch, estimator, ddof=1, eps=1e-6, whiten_ddof=1, whiten_eps=1e-8, whiten=whiten)
    assert entry["weights"] == pytest.approx(expected, rel=1e-9)
    if estimator in ("gae", "orz"):
        assert whiten is True and entry["whitening_scale"] == pytest.approx(expected[0], rel=1e-9)
        assert entry["formula"].endswith("(whitening)")


def test_groups_no_signal_and_summary_statistics():
    batch = mixed_batch()
    out = advserve.analyze(["grpo", "rloo", "reinforce"], dtype="float64", **tensors_for(["grpo"], batch))
    groups = out["groups"]
    ids = batch["group_ids"]
    labels = list(dict.fromkeys(ids.tolist()))
    lengths = batch["response_mask"].sum(axis=1)
    assert groups["ids"] == labels and groups["count"] == 5
    assert groups["size"] == [int((ids == lab).sum()) for lab in labels]
    assert groups["pass_rate"] == pytest.approx([batch["rewards"][ids == lab].mean() for lab in labels])
    assert groups["reward_std"] == pytest.approx([batch["rewards"][ids == lab].std() for lab in labels])
    assert groups["tokens"] == [int(lengths[ids == lab].sum()) for lab in labels]
    assert groups["mean_length"] == pytest.approx([lengths[ids == lab].mean() for lab in labels])
    assert groups["harmonic_mean_length"] == pytest.approx([1 / (1 / lengths[ids == lab]).mean() for lab in labels])
    assert groups["no_signal"] == [lab == "q4" for lab in labels]
    assert out["no_signal_fraction"] == pytest.approx(1 / 5)
    assert out["no_signal_token_fraction"] == pytest.approx(lengths[ids == "q4"].sum() / lengths.sum())
    assert out["tokens"] == int(lengths.sum()) and out["sequences"] == len(ids)

    grpo = out["analysis"]["grpo"]
    signal = [not flag for flag in groups["no_signal"]]
    w = np.array(grpo["weights"])[signal]
    n = np.array(groups["tokens"])[signal]
    assert grpo["weights"][labels.index("q4")] == 0.0  # std 0: no signal
    assert grpo["summary"] == pytest.approx({"min": w.min(), "median": np.median(w), "max": w.max(), "mean": w.mean(),
                                             "token_weighted_mean": (w * n).sum() / n.sum(),
                                             "max_over_min": w.max() / w.min()})
    assert grpo["relative_to_median"] == pytest.approx(list(np.array(grpo["weights"]) / np.median(w)))
    # every group-baseline estimator gives the no-signal group zero advantages; REINFORCE does not (0.5 > 0)
    assert grpo["zero_advantage_fraction"] == pytest.approx(1 / 5)
    assert out["analysis"]["rloo"]["zero_advantage_fraction"] == pytest.approx(1 / 5)
    assert out["analysis"]["reinforce"]["zero_advantage_fraction"] == 0.0


def test_all_groups_without_signal_give_null_summaries():
    out = advserve.analyze(["grpo", "dr_grpo"], rewards=[1, 1, 0, 0], response_mask=np.ones((4, 2)),
                           group_ids=[0, 0, 1, 1])
    assert out["no_signal_fraction"] == 1.0 and out["no_signal_token_fraction"] == 1.0
    for name in ("grpo", "dr_grpo"):
        entry = out["analysis"][name]
        assert set(entry["summary"].values()) == {None}
        assert entry["relative_to_median"] is None and entry["zero_advantage_fraction"] == 1.0
    assert out["analysis"]["grpo"]["weights"] == [0.0, 0.0]
    assert out["analysis"]["grpo"]["weights_exact"] == [0.0, 0.0]
    assert out["sign_disagreement"] == [[0.0, 0.0], [0.0, 0.0]]


# --- sign disagreement ----------------------------------------------------------------------------


def test_sign_matrices_by_hand():
    """Group [1, 0], one token each. reinforce A = [1, 0]; rloo A = [1, −1]; grpo A = [1, −1];
    reinforce_pp (whitened over the batch) A = [1, −1]. A zero against a −1 is a disagreement (three
    signs), not an opposition."""
    out = advserve.analyze(["reinforce", "rloo", "grpo", "reinforce_pp"], rewards=[1, 0],
                           response_mask=[[1], [1]], group_ids=["q", "q"])
    assert out["sign_disagreement"] == [[0, 0.5, 0.5, 0.5], [0.5, 0, 0, 0], [0.5, 0, 0, 0], [0.5, 0, 0, 0]]
    assert out["sign_opposition"] == [[0.0] * 4] * 4
    # REINFORCE++ whitened over a batch whose mean reward is 2/3: the r = 0.5 rows turn negative
    out = advserve.analyze(["reinforce", "reinforce_pp"], rewards=[1, 0.5, 1, 0.5, 0.5, 0.5],
                           response_mask=np.ones((6, 1)), group_ids=[0, 0, 1, 1, 2, 2])
    assert out["sign_opposition"][0][1] == pytest.approx(4 / 6)


def test_sign_matrices_count_the_engines_advantages_token_by_token():
    batch = mixed_batch(2)
    names = ["reinforce", "reinforce_pp_baseline", "rloo", "gae", "grpo", "dapo", "dr_grpo"]
    out = advserve.analyze(names, dtype="float64", **batch)
    assert out["estimators"] == names
    mask = batch["response_mask"]
    signs = {}
    for name in names:
        tensors = {k: v for k, v in batch.items() if k != "values" or name == "gae"}
        if name in ("reinforce", "gae"):
            tensors.pop("group_ids")
        adv = advserve.compute_advantages(name, dtype="float64", **tensors).advantages
        # the documented rule: within 1024 ulps of the largest |A| counts as 0 (rounding residue)
        tolerance = 1024 * np.finfo(np.float64).eps * max(abs(adv[i, t]) for i in range(mask.shape[0])
                                                          for t in range(mask.shape[1]) if mask[i, t])
        signs[name] = [float(np.sign(adv[i, t])) if abs(adv[i, t]) > tolerance else 0.0
                       for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t]]
    n = int(mask.sum())
    for a, name_a in enumerate(names):
        for b, name_b in enumerate(names):
            differ = sum(x != y for x, y in zip(signs[name_a], signs[name_b])) / n
            opposite = sum(x * y < 0 for x, y in zip(signs[name_a], signs[name_b])) / n
            assert out["sign_disagreement"][a][b] == pytest.approx(differ, abs=1e-15)
            assert out["sign_opposition"][a][b] == pytest.approx(opposite, abs=1e-15)
    assert out["sign_disagreement"][names.index("gae")][names.index("grpo")] > 0  # the critic changes signs


def assert_close_documents(a, b, path: str = "") -> None:
    """Equal structure and strings, numbers equal to rounding (summation order may differ)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            assert_close_documents(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_documents(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=1e-12, abs=1e-12), path
    else:
        assert a == b, path


@st.composite
def batches(draw):
    sizes = draw(st.lists(st.integers(2, 5), min_size=1, max_size=5))
    ids = draw(st.permutations([g for g, n in enumerate(sizes) for _ in range(n)]))
    b = len(ids)
    t = draw(st.integers(1, 5))
    lengths = draw(st.lists(st.integers(1, t), min_size=b, max_size=b))
    mask = np.arange(t)[None, :] < np.array(lengths)[:, None]
    rewards = np.array(draw(st.lists(st.sampled_from([0.0, 1.0, 0.5, -1.0]), min_size=b, max_size=b)))
    return dict(rewards=rewards, response_mask=mask, group_ids=np.array(ids))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), data=st.data())
def test_properties(batch, data):
    """Matrices symmetric with a zero diagonal, opposition within disagreement; unbiased weights 1;
    the packed layout and a row permutation give the same analysis (groups in order of first
    appearance, so the permutation keeps the first row)."""
    out = advserve.analyze(dtype="float64", **batch)
    d, o = np.array(out["sign_disagreement"]), np.array(out["sign_opposition"])
    assert np.array_equal(d, d.T) and np.array_equal(o, o.T)
    assert np.all(np.diag(d) == 0) and np.all((0 <= o) & (o <= d) & (d <= 1))
    for name, entry in out["analysis"].items():
        if entry["bias"] == "unbiased":
            assert entry["weights"] == [1.0] * out["groups"]["count"], name
        assert all(w >= 0 for w in entry["weights"])

    mask = batch["response_mask"]
    lengths = mask.sum(axis=1)
    packed = dict(rewards=batch["rewards"], group_ids=batch["group_ids"], response_mask=mask[mask],
                  cu_seqlens=np.concatenate([[0], np.cumsum(lengths)]))
    assert_close_documents(advserve.analyze(dtype="float64", layout="packed", **packed), out)

    rest = data.draw(st.permutations(list(range(1, len(lengths)))))
    order = np.array([0, *rest])
    permuted = {k: v[order] for k, v in batch.items()}
    again = advserve.analyze(dtype="float64", **permuted)
    if again["groups"]["ids"] == out["groups"]["ids"]:
        assert_close_documents(again, out)


def test_rounding_residue_of_a_zero_advantage_has_no_sign():
    """Equal lengths, groups [1, 0] and [1, 1]: after REINFORCE++-baseline's batch whitening the
    no-signal group's advantage is −μ/σ with μ = 0 exactly but a floating-point sum of ±1 terms; it
    counts as 0 whatever the layout or row order (the falsifying case of test_properties, seed 2)."""
    rewards = np.array([1.0, 0.0, 1.0, 1.0, 0.3, 0.7])
    mask = np.ones((6, 3), dtype=bool)
    groups = np.array([0, 0, 1, 1, 2, 2])
    outs = [advserve.analyze(["reinforce", "reinforce_pp_baseline"], dtype="float64", rewards=rewards[order],
                             response_mask=mask, group_ids=groups[order])
            for order in (np.arange(6), np.array([0, 2, 1, 3, 5, 4]))]
    for out in outs:
        assert out["analysis"]["reinforce_pp_baseline"]["zero_advantage_fraction"] == pytest.approx(1 / 3)
    assert outs[0]["sign_disagreement"] == outs[1]["sign_disagreement"]


def test_default_estimators_are_those_the_tensors_allow():
    base = issue_batch()
    assert advserve.analyze(**base)["estimators"] == ["reinforce", "reinforce_rtg", "reinforce_pp",
                                                      "reinforce_pp_baseline", "rloo", "grpo", "grpo_original",
                                                      "dapo", "dr_grpo"]
    full = advserve.analyze(values=np.zeros((32, 3)), greedy_rewards=np.zeros(32), **base)["estimators"]
    assert {"gae", "orz", "remax"} <= set(full) and len(full) == 12
    verl = advserve.analyze(preset="verl", **base)
    assert verl["preset"] == "verl" and set(verl["estimators"]) == {"grpo", "dr_grpo", "rloo", "reinforce_pp",
                                                                    "reinforce_pp_baseline"}


def test_estimators_whose_default_kl_needs_logprobs_are_left_out_unless_given():
    base = issue_batch()
    with pytest.raises(advserve.InvalidArgument) as caught:
        advserve.analyze(preset="openrlhf", **base)  # every openrlhf estimator has kl_coef > 0 by default
    assert caught.value.field == "tensors" and "old_logprobs" in caught.value.message
    kl = dict(old_logprobs=np.full((32, 3), -1.0), ref_logprobs=np.full((32, 3), -1.0))
    out = advserve.analyze(preset="openrlhf", **base, **kl)
    assert "flash_reinforce" in out["estimators"] and out["analysis"]["flash_reinforce"]["weights"] == [1.0, 1.0]
    only = advserve.analyze(preset="openrlhf", params={"grpo": {"kl_coef": 0.0}}, **base)
    assert only["estimators"] == ["grpo"]


def test_grpo_with_the_batch_std_scope_is_only_scaled():
    """std_scope 'batch' (TRL's scale_rewards='batch'): every group divided by the std of all B scores."""
    batch = issue_batch()
    out = advserve.analyze(["grpo"], params={"grpo": {"std_scope": "batch"}}, dtype="float64", **batch)
    entry = out["analysis"]["grpo"]
    assert entry["weights"] == pytest.approx([1 / batch["rewards"].std()] * 2, rel=1e-12)
    assert entry["weights_exact"] is None and entry["summary"]["max_over_min"] == pytest.approx(1.0)


def test_params_per_estimator():
    out = advserve.analyze(["grpo", "dapo"], params={"grpo": {"std_ddof": 1}}, **issue_batch())
    assert out["analysis"]["grpo"]["params"]["std_ddof"] == 1 and out["analysis"]["dapo"]["params"]["std_ddof"] == 0
    # unbiased group std: sqrt(M/(M−1)) larger, weight smaller
    assert out["analysis"]["grpo"]["weights"][1] == pytest.approx(2 * math.sqrt(15 / 16), rel=1e-6)


# --- errors ---------------------------------------------------------------------------------------

ERRORS = [
    # (estimators, params, tensors, error class, field)
    (None, None, dict(rewards=[1, 0], response_mask=[[1], [1]]), InvalidArgument, "tensors.group_ids"),
    (None, None, dict(rewards=[1, 0], response_mask=[[1], [1]], group_ids=["a", "b"]), InvalidArgument,
     "tensors.group_ids"),
    (None, None, dict(rewards=[], response_mask=[], group_ids=[]), InvalidArgument, "tensors.response_mask"),
    (None, None, dict(rewards=[1.0, float("nan")], response_mask=[[1], [1]], group_ids=[0, 0]), InvalidArgument,
     "tensors.rewards"),
    (None, None, dict(response_mask=[[1], [1]], group_ids=[0, 0]), InvalidArgument, "tensors.rewards"),
    (["nope"], None, dict(rewards=[1, 0], response_mask=[[1], [1]], group_ids=[0, 0]), NotFound, "estimators"),
    ([], None, dict(rewards=[1, 0], response_mask=[[1], [1]], group_ids=[0, 0]), InvalidArgument, "estimators"),
    (["grpo", "grpo"], None, dict(rewards=[1, 0], response_mask=[[1], [1]], group_ids=[0, 0]), InvalidArgument,
     "estimators"),
    (["gae"], None, dict(rewards=[1, 0], response_mask=[[1], [1]], group_ids=[0, 0]), InvalidArgument,
     "tensors.values"),
    (["grpo"], None, dict(rewards=[1, 0], response_mask=[[1], [1]], group_ids=[0, 0], values=[[0], [0]]),
     InvalidArgument, "tensors.values"),
    (["grpo"], {"rloo": {}}, dict(rewards=[1, 0], response_mask=[[1], [1]], group_ids=[0, 0]), InvalidArgument,
     "params.rloo"),
    (["grpo"], {"grpo": {"std_eps": -1.0}}, dict(rewards=[1, 0], response_mask=[[1], [1]], group_ids=[0, 0]),
     InvalidArgument, "params.grpo.std_eps"),
    (["grpo"], {"grpo": {"whiten": True}}, dict(rewards=[1, 0], response_mask=[[1], [1]], group_ids=[0, 0]),
     InvalidArgument, "params.grpo.whiten"),
    (["grpo"], None, dict(rewards=[1, 0], response_mask=[[1], [2]], group_ids=[0, 0]), InvalidArgument,
     "tensors.response_mask"),
]


@pytest.mark.parametrize("estimators, params, tensors, error, field", ERRORS)
def test_errors_in_process(estimators, params, tensors, error, field):
    with pytest.raises((advserve.InvalidArgument, advserve.NotFound)) as caught:
        advserve.analyze(estimators, params=params, **tensors)
    assert caught.value.field == field
    assert caught.value.code == error.code


def test_an_estimator_the_preset_lacks_is_not_found():
    with pytest.raises(advserve.NotFound) as caught:
        advserve.analyze(["reinforce"], preset="verl", **issue_batch())
    assert caught.value.field == "estimators" and "verl" in caught.value.message


# --- over the wire --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def analysis_server():
    server = RunningServer()
    yield server
    server.stop()


def make_client(server: RunningServer, kind: str, client_class: type = Client):
    if kind == "grpc":
        return client_class(server.grpc_address, transport="grpc")
    return client_class(server.url, binary=(kind == "rest-binary"))


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_every_transport_gives_the_in_process_document(analysis_server, kind):
    batch = mixed_batch(3)
    expected = advserve.analyze(**batch)
    with make_client(analysis_server, kind) as client:
        assert client.analyze(**batch) == expected
        chosen = client.analyze(("grpo", "gae"), params={"gae": {"whiten": True}}, dtype="float64", **batch)
    assert chosen == advserve.analyze(["grpo", "gae"], params={"gae": {"whiten": True}}, dtype="float64", **batch)
    assert chosen["analysis"]["gae"]["whitening_scale"] > 0


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_async_client(analysis_server, kind):
    batch = issue_batch()

    async def run():
        async with make_client(analysis_server, kind, AsyncClient) as client:
            return await asyncio.gather(client.analyze(["grpo"], **batch), client.analyze(["rloo"], **batch))

    grpo, rloo = asyncio.run(run())
    assert grpo["analysis"]["grpo"]["weights"] == pytest.approx([16 / math.sqrt(15), 2.0], rel=1e-6)
    assert rloo["estimators"] == ["rloo"]


def expressible(kind: str, tensors: dict) -> bool:
    """JSON has no NaN; the binary framing has no dtype for an empty nested list (gRPC carries both)."""
    values = [np.asarray(v, dtype=float) for v in tensors.values() if not isinstance(v[0] if len(v) else 0, str)]
    if kind == "rest-json":
        return all(np.isfinite(v).all() for v in values)
    return kind == "grpc" or all(v.size for v in values)


@pytest.mark.parametrize("kind, estimators, params, tensors, error, field",
                         [(kind, *case) for kind in TRANSPORTS for case in ERRORS if expressible(kind, case[2])])
def test_errors_over_the_wire_name_the_field(analysis_server, kind, estimators, params, tensors, error, field):
    with make_client(analysis_server, kind) as client, pytest.raises(error) as caught:
        client.analyze(estimators, params=params, **tensors)
    assert caught.value.field == field


def test_rest_binary_request_json_answer_and_the_openapi_page(analysis_server):
    batch = issue_batch()
    document = {"estimators": ["grpo"]}
    n, chunks = framing.encode(document, {
        "rewards": framing.RawTensor.from_numpy(batch["rewards"].astype(np.float32)),
        "response_mask": framing.RawTensor.from_numpy(batch["response_mask"]),
        "group_ids": batch["group_ids"].tolist()})
    headers = {"content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(n)}
    body = b"".join(bytes(c) for c in chunks)
    binary = httpx.post(f"{analysis_server.url}/v1/analysis", content=body, headers=headers)
    assert binary.status_code == 200 and binary.headers["content-type"] == framing.CONTENT_TYPE
    answer, tensors = framing.decode(binary.content, binary.headers[framing.HEADER_LENGTH])
    assert tensors == {} and answer == advserve.analyze(["grpo"], **batch)
    as_json = httpx.post(f"{analysis_server.url}/v1/analysis", content=body,
                         headers={**headers, "accept": "application/json"})
    assert as_json.json() == answer and "server-timing" in as_json.headers

    schema = httpx.get(f"{analysis_server.url}/openapi.json").json()
    operation = schema["paths"]["/v1/analysis"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/AnalysisBody")
    assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/AnalysisResponse")
    assert {"estimators", "params", "tensors"} <= set(schema["components"]["schemas"]["AnalysisBody"]["properties"])


def test_metrics_count_the_analysis_endpoint():
    server = RunningServer()
    try:
        with Client(server.url) as rest, Client(server.grpc_address, transport="grpc") as rpc:
            rest.analyze(["grpo"], **issue_batch())
            rpc.analyze(["grpo"], **issue_batch())
            with pytest.raises(NotFound):
                rest.analyze(["nope"], **issue_batch())
        text = httpx.get(f"{server.url}/metrics").text
        assert 'advserve_requests_total{endpoint="analysis",estimator="",status="200",transport="http"} 1.0' in text
        assert 'advserve_requests_total{endpoint="analysis",estimator="",status="OK",transport="grpc"} 1.0' in text
        assert 'advserve_requests_total{endpoint="analysis",estimator="",status="404",transport="http"} 1.0' in text
        assert 'advserve_tokens_total{endpoint="analysis"} 192.0' in text  # 2 requests of 32 x 3
        assert server.problems() == []
    finally:
        server.stop()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(batch=batches(), kind=st.sampled_from(TRANSPORTS), dtype=st.sampled_from(["float32", "float64"]))
def test_every_transport_gives_the_in_process_document_on_random_batches(analysis_server, batch, kind, dtype):
    """/v1/analysis (JSON and binary) and gRPC Analyze are the in-process analyze, number for number,
    on scattered ragged batches (the transport-equivalence property of the advantage and loss
    endpoints, for the analysis)."""
    expected = advserve.analyze(dtype=dtype, **batch)
    with make_client(analysis_server, kind) as client:
        assert client.analyze(dtype=dtype, **batch) == expected
