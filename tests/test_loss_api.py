"""The loss API's verl-facing parts (issue 16, "API gaps"): the token_loss term (verl's agg_loss of any
per-token matrix), per-term loss_scale_factor and seq_denominator, dp_size and the global normalizers'
contract, per-token KL values and straight-through KL estimators, precomputed rollout_is_weights, and
OpenRLHF's value clip arithmetic (clip_form "delta").

Golden vectors: tests/golden/verl_0.9.1_loss_api.json, from the real verl 0.9.1
(tests/golden/make_verl_loss_api.py). Gradients against torch autograd of an independent torch
formulation; hypothesis identities; errors naming their field.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import advserve
from advserve import InvalidArgument
import golden_cases

DATA = json.loads((golden_cases.GOLDEN_DIR / "verl_0.9.1_loss_api.json").read_text())
assert DATA["library"] == "verl" and DATA["version"] == "0.9.1"
CASES = DATA["cases"]
OUTPUTS = ("grad_logprobs", "grad_values", "grad_entropy", "grad_token_losses", "kl_values")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tolerance(case: dict) -> float:
    """verl divides each row's sum by L_i + 1e-8 in seq-mean-token-mean (advserve by L_i): a relative
    difference of up to 1e-8 there (1e-8 on a one-token row). Everything else agrees to rounding."""
    if "seq-mean-token-mean" in case["case"]:
        return 2e-8
    return 1e-12


def test_the_golden_file_covers_what_it_claims():
    groups = {c["group"] for c in CASES}
    assert groups == {"agg", "kl", "policy", "value", "entropy"}
    aggs = {c["request"]["token_loss"]["agg"] for c in CASES if c["group"] == "agg" and "agg" in c["request"]["token_loss"]}
    assert aggs == set(AGG_MODES)
    assert {c["request"].get("dp_size", 1) for c in CASES} >= {1, 2, 4}
    assert any("num_tokens" in c["request"] for c in CASES) and any("num_sequences" in c["request"] for c in CASES)
    assert any(np.any(np.asarray(c["tensors"].get("rollout_is_weights", [1])) == 0) for c in CASES)
    assert {c["request"]["kl_loss"].get("gradient_estimator") for c in CASES if c["group"] == "kl"} == {None, "k2"}
    lengths = {int(n) for c in CASES for n in np.asarray(c["tensors"]["response_mask"]).sum(1)}
    assert {0, 1} <= lengths  # empty and one-token rows


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_verl_golden(case):
    res = advserve.compute_losses(preset="verl", dtype=case["dtype"], **case["request"],
                                  **golden_cases.inputs(case["tensors"]))
    tol = tolerance(case)
    expected = case["expected"]
    golden_cases.check_scalar(case, "loss", res.loss, expected["loss"], tol)
    for name, value in expected["components"].items():
        if value is None:
            assert res.components[name] is None, (case["case"], name)
        else:
            golden_cases.check_scalar(case, f"components[{name!r}]", res.components[name], value, tol)
    for name in OUTPUTS:
        if name in expected:
            golden_cases.check_array(case, name, getattr(res, name), expected[name], tol)
        else:
            assert getattr(res, name) is None, (case["case"], name)


# --------------------------------------------------------------------------------------------------
# OpenRLHF's value clip at a rounding tie (issue 16, item 5)
# --------------------------------------------------------------------------------------------------


def test_openrlhf_value_clip_rounding_tie():
    """returns 2.0, clip 0.2, old 0.1, values 0.30000000000000004: v − v_old = 0.20000000000000004 > 0.2, so
    OpenRLHF's clamp passes no gradient, yet old + clamp(v − old) = 0.30000000000000004 = v: torch.max of two
    equal terms splits the gradient. ValueLoss gives loss 1.445 and dL/dv = −0.85 (½ · ½ · 2 (v − G))."""
    one = dict(response_mask=np.array([[1]]), values=np.array([[0.30000000000000004]]), old_values=np.array([[0.1]]),
               returns=np.array([[2.0]]))
    res = advserve.compute_losses(preset="openrlhf", policy_loss=False, value_loss={"clip": 0.2}, dtype="float64",
                                  **one)
    assert res.loss == pytest.approx(1.445, rel=1e-15)
    assert float(res.grad_values[0, 0]) == pytest.approx(-0.85, rel=1e-15)
    assert res.params["value_loss"]["clip_form"] == "delta"
    # the bounds form (verl, TRL): clip(v, 0.1 ± 0.2) passes v itself (v == v_old + clip exactly): the whole gradient
    bounds = advserve.compute_losses(preset="openrlhf", policy_loss=False, value_loss={"clip": 0.2, "clip_form": "bounds"},
                                     dtype="float64", **one)
    assert float(bounds.grad_values[0, 0]) == pytest.approx(-1.7, rel=1e-15)
    # autograd of OpenRLHF's own expression
    v = torch.tensor([[0.30000000000000004]], dtype=torch.float64, requires_grad=True)
    old, ret = torch.tensor([[0.1]], dtype=torch.float64), torch.tensor([[2.0]], dtype=torch.float64)
    clipped = old + (v - old).clamp(-0.2, 0.2)
    loss = 0.5 * torch.max((clipped - ret) ** 2, (v - ret) ** 2).mean()
    (g,) = torch.autograd.grad(loss, [v])
    assert res.loss == loss.item() and float(res.grad_values[0, 0]) == g.item()


# --------------------------------------------------------------------------------------------------
# gradients against torch autograd of an independent formulation
# --------------------------------------------------------------------------------------------------


def torch_weights(m: torch.Tensor, agg: str, num_tokens=None, num_sequences=None, lsf=None, seq_den="nonempty",
                  dp=1) -> torch.Tensor:
    """docs/semantics.md's w_t, written again: D·m/N, D·m, D·m/(S·L), D·m/S, D·m/(S·C)."""
    L = m.sum(1)
    n = float(num_tokens) if num_tokens is not None else max(float(m.sum()), 1.0)
    if num_sequences is not None:
        s = float(num_sequences)
    elif seq_den == "all":
        s = float(m.shape[0])
    else:
        s = max(float((L > 0).sum()), 1.0)
    c = float(m.shape[1]) if lsf is None else float(lsf)
    w = {"token-mean": m / n, "token-sum": m, "seq-mean-token-mean": m / (s * L.clamp(min=1))[:, None],
         "seq-mean-token-sum": m / s, "seq-mean-token-sum-norm": m / (s * c)}[agg]
    return w * dp


def kl_value(d: torch.Tensor, est: str) -> torch.Tensor:
    if est == "k1":
        return d
    if est == "k2":
        return 0.5 * d * d
    if est == "abs":
        return d.abs()
    return torch.exp(-d) + d - 1


@st.composite
def batches(draw):
    b, t = draw(st.integers(1, 6)), draw(st.integers(1, 7))
    ends = draw(st.lists(st.integers(0, t), min_size=b, max_size=b))
    m = np.zeros((b, t), dtype=bool)
    for i, e in enumerate(ends):
        m[i, :e] = True
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    old = -np.abs(rng.normal(1.0, 0.5, size=(b, t)))
    v_old = rng.normal(size=(b, t))
    w = rng.uniform(0, 2, size=(b, t)) * (rng.uniform(size=(b, t)) > 0.3)
    return dict(response_mask=m, logprobs=old + rng.normal(0, 0.3, size=(b, t)), old_logprobs=old,
                advantages=rng.normal(size=(b, t)), ref_logprobs=old + rng.normal(0, 0.5, size=(b, t)),
                values=v_old + rng.normal(0, 0.3, size=(b, t)), old_values=v_old, returns=rng.normal(size=(b, t)),
                entropy=np.abs(rng.normal(size=(b, t))), token_losses=rng.normal(size=(b, t)), rollout_is_weights=w)


@SETTINGS
@given(b=batches(), data=st.data())
def test_gradients_equal_torch_autograd(b, data):
    """policy (ppo_clip, rollout_is_weights) + kl (straight-through or not, kl_values) + value (both clip
    forms) + entropy + token_loss, each term with its own agg / loss_scale_factor / seq_denominator and
    the request's dp_size: value and every gradient against torch.autograd of the same loss."""
    draw = data.draw
    pol_agg = draw(st.sampled_from(AGG_MODES))
    dp = draw(st.sampled_from([1, 1, 2, 8]))
    m_np = b["response_mask"]
    terms = {}
    for term in ("kl_loss", "value_loss", "entropy_bonus", "token_loss"):
        spec = {"agg": draw(st.sampled_from((None, *AGG_MODES))),
                "loss_scale_factor": draw(st.sampled_from([None, 3.0, 64.0])),
                "seq_denominator": draw(st.sampled_from([None, "nonempty", "all"]))}
        terms[term] = spec
    terms["kl_loss"].update(coef=0.3, estimator=draw(st.sampled_from(["k1", "k2", "k3", "abs"])), clamp=None,
                            gradient_estimator=draw(st.sampled_from([None, "k1", "k2", "k3", "abs"])))
    terms["value_loss"].update(coef=0.7, clip=0.2, clip_form=draw(st.sampled_from(["bounds", "delta"])))
    terms["entropy_bonus"].update(coef=0.01)
    terms["token_loss"].update(coef=draw(st.sampled_from([1.0, -0.5])))
    pol = {"mode": "ppo_clip", "agg": pol_agg, "loss_scale_factor": draw(st.sampled_from([None, 5.0])),
           "seq_denominator": draw(st.sampled_from(["nonempty", "all"])), "dual_clip": None, "ratio_clamp": None}
    aggs = {pol_agg} | {spec["agg"] or pol_agg for spec in terms.values()}
    m = torch.tensor(m_np, dtype=torch.float64)
    norm = {}
    if "token-mean" in aggs and (dp > 1 or draw(st.booleans())):
        norm["num_tokens"] = float(m_np.sum() + 3)
    if any(a.startswith("seq-mean") for a in aggs) and (dp > 1 or draw(st.booleans())):
        norm["num_sequences"] = float(m_np.shape[0] + 2)
    res = advserve.compute_losses(preset="paper", dtype="float64", policy_loss=pol, dp_size=dp, return_kl_values=True,
                                  **terms, **norm, **b)

    T = {k: torch.tensor(np.where(m_np, v, 0.0), dtype=torch.float64) for k, v in b.items() if k != "response_mask"}
    lp = T["logprobs"].clone().requires_grad_(True)
    v = T["values"].clone().requires_grad_(True)
    ent = T["entropy"].clone().requires_grad_(True)
    tl = T["token_losses"].clone().requires_grad_(True)

    def weights(spec):
        lsf = pol["loss_scale_factor"] if spec.get("loss_scale_factor") is None else spec["loss_scale_factor"]
        den = pol["seq_denominator"] if spec.get("seq_denominator") is None else spec["seq_denominator"]
        return torch_weights(m, spec.get("agg") or pol_agg, norm.get("num_tokens"), norm.get("num_sequences"), lsf,
                             den, dp)

    rho = torch.exp(lp - T["old_logprobs"])
    A = T["advantages"]
    ell = torch.maximum(-A * rho, -A * rho.clamp(0.8, 1.2)) * T["rollout_is_weights"]
    total = (weights(pol) * ell).sum()
    kl = terms["kl_loss"]
    d = lp - T["ref_logprobs"]
    forward = kl_value(d, kl["estimator"])
    if kl["gradient_estimator"] is not None:  # verl's straight-through: backward − sg(backward) + sg(forward)
        backward = kl_value(d, kl["gradient_estimator"])
        forward = backward - backward.detach() + forward.detach()
    total = total + kl["coef"] * (weights(kl) * forward).sum()
    vl = terms["value_loss"]
    if vl["clip_form"] == "delta":
        vc = T["old_values"] + (v - T["old_values"]).clamp(-0.2, 0.2)
    else:
        vc = torch.clamp(v, T["old_values"] - 0.2, T["old_values"] + 0.2)
    total = total + vl["coef"] * (weights(vl) * 0.5 * torch.max((v - T["returns"]) ** 2, (vc - T["returns"]) ** 2)).sum()
    total = total - 0.01 * (weights(terms["entropy_bonus"]) * ent).sum()
    total = total + terms["token_loss"]["coef"] * (weights(terms["token_loss"]) * tl).sum()
    grads = torch.autograd.grad(total, [lp, v, ent, tl])

    assert res.loss == pytest.approx(total.item(), rel=1e-10, abs=1e-10)
    for name, g in zip(("grad_logprobs", "grad_values", "grad_entropy", "grad_token_losses"), grads):
        np.testing.assert_allclose(getattr(res, name), (g * m).numpy(), rtol=1e-10, atol=1e-10, err_msg=name)
    np.testing.assert_allclose(res.kl_values, (kl_value(d, kl["estimator"]) * m).detach().numpy(), rtol=1e-12,
                               atol=1e-12)


# --------------------------------------------------------------------------------------------------
# identities
# --------------------------------------------------------------------------------------------------


@SETTINGS
@given(b=batches(), agg=st.sampled_from(AGG_MODES), dp=st.integers(2, 4), data=st.data())
def test_dp_ranks_average_to_the_global_loss(b, agg, dp, data):
    """verl's invariance: split a batch into dp shards of whole rows, each called with dp_size = D and the
    global counts; the ranks' mean loss (DDP averages gradients) is the one-call loss, their gradients
    divided by D the one-call gradients."""
    m = b["response_mask"]
    if m.shape[0] < dp:
        return
    tensors = {k: b[k] for k in ("response_mask", "token_losses")}
    norm = {}
    if agg == "token-mean":
        norm["num_tokens"] = max(int(m.sum()), 1)
    elif agg.startswith("seq-mean"):
        norm["num_sequences"] = max(int((m.sum(1) > 0).sum()), 1)
    kw = dict(preset="verl", policy_loss=False, token_loss={"agg": agg, "loss_scale_factor": 7.0}, dtype="float64")
    full = advserve.compute_losses(**kw, **tensors)
    cuts = sorted(data.draw(st.lists(st.integers(1, m.shape[0] - 1), min_size=dp - 1, max_size=dp - 1, unique=True)))
    bounds = [0, *cuts, m.shape[0]]
    losses, grads = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        shard = {k: v[lo:hi] for k, v in tensors.items()}
        res = advserve.compute_losses(**kw, dp_size=dp, **norm, **shard)
        losses.append(res.loss)
        grads.append(np.asarray(res.grad_token_losses) / dp)
    assert sum(losses) / dp == pytest.approx(full.loss, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(np.concatenate(grads), full.grad_token_losses, rtol=1e-10, atol=1e-12)


@SETTINGS
@given(b=batches(), agg=st.sampled_from((None, *AGG_MODES)))
def test_token_loss_of_the_entropy_is_the_entropy_bonus_negated(b, agg):
    tensors = {"response_mask": b["response_mask"]}
    bonus = advserve.compute_losses(policy_loss=False, entropy_bonus={"coef": 0.3, "agg": agg}, dtype="float64",
                                    entropy=b["entropy"], **tensors)
    token = advserve.compute_losses(policy_loss=False, token_loss={"coef": -0.3, "agg": agg}, dtype="float64",
                                    token_losses=b["entropy"], **tensors)
    assert token.loss == bonus.loss and token.components["token_loss"] == bonus.components["entropy"]
    np.testing.assert_array_equal(token.grad_token_losses, bonus.grad_entropy)


@SETTINGS
@given(b=batches(), estimator=st.sampled_from(["k1", "k3", "abs"]))
def test_straight_through_kl_has_one_value_and_the_others_gradient(b, estimator):
    kw = dict(preset="verl", policy_loss=False, dtype="float64", return_kl_values=True,
              **{k: b[k] for k in ("response_mask", "logprobs", "ref_logprobs")})
    plain = advserve.compute_losses(kl_loss={"coef": 1.0, "estimator": estimator}, **kw)
    st_ = advserve.compute_losses(kl_loss={"coef": 1.0, "estimator": estimator, "gradient_estimator": "k2"}, **kw)
    k2 = advserve.compute_losses(kl_loss={"coef": 1.0, "estimator": "k2", "clamp": None}, **kw)
    assert st_.loss == plain.loss and st_.components == plain.components
    np.testing.assert_array_equal(st_.kl_values, plain.kl_values)
    np.testing.assert_array_equal(st_.grad_logprobs, k2.grad_logprobs)


@SETTINGS
@given(b=batches())
def test_ones_as_rollout_is_weights_change_nothing_and_zeros_drop_tokens(b):
    kw = dict(preset="verl", dtype="float64", **{k: b[k] for k in ("response_mask", "logprobs", "old_logprobs",
                                                                  "advantages")})
    plain = advserve.compute_losses(**kw)
    ones = advserve.compute_losses(rollout_is_weights=np.ones_like(b["logprobs"]), **kw)
    assert ones.loss == plain.loss
    np.testing.assert_array_equal(ones.grad_logprobs, plain.grad_logprobs)
    w = b["rollout_is_weights"]
    weighted = advserve.compute_losses(rollout_is_weights=w, **kw)
    np.testing.assert_array_equal(np.asarray(weighted.grad_logprobs)[w == 0], 0.0)


def test_a_value_only_call_takes_its_own_normalizers():
    """No dummy policy term: value_loss's own agg, loss_scale_factor and seq_denominator."""
    m = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=bool)
    v = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    zero = np.zeros_like(v)
    res = advserve.compute_losses(preset="verl", policy_loss=False, dtype="float64", response_mask=m, values=v,
                                  old_values=v, returns=zero,
                                  value_loss={"clip": None, "agg": "seq-mean-token-sum-norm", "loss_scale_factor": 4.0,
                                              "seq_denominator": "all"})
    # ½ v² summed per row: 2.5, 0, 4.5; over S = 3 rows (all) and C = 4
    assert res.loss == pytest.approx(7.0 / 12.0, rel=1e-15)
    np.testing.assert_allclose(res.grad_values, v / 12.0, rtol=1e-15)
    assert res.params["value_loss"]["loss_scale_factor"] == 4.0


# --------------------------------------------------------------------------------------------------
# errors name the field
# --------------------------------------------------------------------------------------------------

M = np.array([[1, 1], [1, 0]], dtype=bool)
X = np.array([[0.1, -0.2], [0.3, 0.0]])
POLICY = dict(logprobs=X, old_logprobs=X, advantages=X, response_mask=M)
ERRORS = [
    (dict(policy_loss=False, token_loss={"agg": "token-sum"}, num_tokens=10, token_losses=X, response_mask=M),
     "num_tokens"),
    (dict(policy_loss=False, token_loss={"agg": "token-sum"}, num_sequences=10, token_losses=X, response_mask=M),
     "num_sequences"),
    (dict(policy_loss={"agg": "token-mean"}, num_sequences=4, **POLICY), "num_sequences"),
    (dict(policy_loss={"agg": "seq-mean-token-sum"}, num_tokens=4, **POLICY), "num_tokens"),
    (dict(policy_loss={"agg": "token-mean"}, dp_size=2, **POLICY), "num_tokens"),
    (dict(policy_loss={"agg": "seq-mean-token-mean"}, dp_size=2, num_tokens=3, **POLICY), "num_tokens"),
    (dict(policy_loss={"agg": "seq-mean-token-mean"}, dp_size=2, **POLICY), "num_sequences"),
    (dict(dp_size=0, **POLICY), "dp_size"),
    (dict(dp_size=1.5, **POLICY), "dp_size"),
    (dict(dp_size=True, **POLICY), "dp_size"),
    (dict(dp_size=2**40, **POLICY), "dp_size"),
    (dict(return_kl_values=True, **POLICY), "return_kl_values"),
    (dict(return_kl_values="yes", kl_loss={}, ref_logprobs=X, **POLICY), "return_kl_values"),
    (dict(rollout_is_weights=-X, **POLICY), "tensors.rollout_is_weights"),
    (dict(rollout_is_weights=np.abs(X), rollout_correction={}, rollout_logprobs=X, **POLICY),
     "tensors.rollout_is_weights"),
    (dict(policy_loss=False, value_loss={}, values=X, old_values=X, returns=X, response_mask=M,
          rollout_is_weights=np.abs(X)), "tensors.rollout_is_weights"),
    (dict(rollout_is_weights=np.array([[np.nan, 1.0], [1.0, 1.0]]), **POLICY), "tensors.rollout_is_weights"),
    (dict(kl_loss={"gradient_estimator": "k5"}, ref_logprobs=X, **POLICY), "kl_loss.gradient_estimator"),
    (dict(preset="openrlhf", kl_loss={"gradient_estimator": "k2", "unbiased_gradient": True}, ref_logprobs=X,
          **POLICY), "kl_loss.gradient_estimator"),
    (dict(value_loss={"clip_form": "round"}, values=X, old_values=X, returns=X, **POLICY), "value_loss.clip_form"),
    (dict(token_loss={}, **POLICY), "tensors.token_losses"),
    (dict(token_loss={"seq_denominator": "some"}, token_losses=X, **POLICY), "token_loss.seq_denominator"),
    (dict(entropy_bonus={"loss_scale_factor": 0}, entropy=X, **POLICY), "entropy_bonus.loss_scale_factor"),
    (dict(token_loss={"coef": float("nan")}, token_losses=X, **POLICY), "token_loss.coef"),
]


@pytest.mark.parametrize("kwargs,field", ERRORS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(ERRORS)])
def test_errors_name_the_field(kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        advserve.compute_losses(dtype="float64", **kwargs)
    assert info.value.field == field, str(info.value)


# --------------------------------------------------------------------------------------------------
# every transport: the same numbers and errors
# --------------------------------------------------------------------------------------------------

TRANSPORTS = ("rest-binary", "rest-json", "grpc")


@pytest.fixture(scope="module")
def clients(server):
    from advserve_client import Client

    made = {"rest-binary": Client(server.url, binary=True), "rest-json": Client(server.url, binary=False),
            "grpc": Client(server.grpc_address, transport="grpc")}
    yield made
    for c in made.values():
        c.close()


def _requests():
    rng = np.random.default_rng(7)
    m = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    old = -np.abs(rng.normal(1, 0.5, size=m.shape))
    base = dict(response_mask=m, logprobs=old + rng.normal(0, 0.3, size=m.shape), old_logprobs=old,
                advantages=rng.normal(size=m.shape))
    w = rng.uniform(0, 2, size=m.shape)
    w[0, 1] = 0.0
    return [
        dict(preset="verl", policy_loss={"agg": "seq-mean-token-sum-norm", "loss_scale_factor": 3.0}, dp_size=2,
             num_sequences=6, rollout_is_weights=w, kl_loss={"estimator": "k3", "gradient_estimator": "k2",
                                                              "agg": "token-mean", "seq_denominator": "all"},
             num_tokens=20, return_kl_values=True, ref_logprobs=old, token_loss={"coef": 0.5, "agg": "token-sum"},
             token_losses=rng.normal(size=m.shape), dtype="float64", **base),
        dict(preset="openrlhf", policy_loss=False, dtype="float64", response_mask=m,
             value_loss={"clip": 0.2, "loss_scale_factor": 2.0, "agg": "seq-mean-token-sum-norm"},
             values=np.full(m.shape, 0.30000000000000004), old_values=np.full(m.shape, 0.1),
             returns=np.full(m.shape, 2.0), entropy_bonus={"coef": 0.1, "seq_denominator": "all",
                                                           "agg": "seq-mean-token-mean"},
             entropy=rng.uniform(0, 1, size=m.shape)),
        dict(preset="verl", policy_loss={"agg": "token-sum"}, num_tokens=5, **base),  # an error
        dict(preset="verl", dp_size=0, **base),  # an error
        dict(preset="verl", return_kl_values=True, **base),  # an error
        dict(preset="verl", rollout_is_weights=-w, **base),  # an error
    ]


def test_new_fields_are_the_same_over_every_transport(clients):
    for request in _requests():
        try:
            local = advserve.compute_losses(**request)
        except InvalidArgument as exc:
            for kind, client in clients.items():
                with pytest.raises(Exception) as info:
                    client.compute_losses(**request)
                assert (info.value.code, info.value.field) == (exc.code, exc.field), kind
            continue
        for kind, client in clients.items():
            got = client.compute_losses(**request)
            assert got.loss == local.loss and got.components == local.components, kind
            assert got.metrics == local.metrics and got.params == local.params, kind
            for name in OUTPUTS:
                expected = getattr(local, name)
                if expected is None:
                    assert getattr(got, name) is None, (kind, name)
                else:
                    np.testing.assert_array_equal(getattr(got, name), expected, err_msg=f"{kind} {name}")


def test_every_loss_parameter_round_trips_the_proto():
    """Each parameter of every loss term, at every choice and at null where nullable, survives
    protocol.params_to_pb / params_from_pb (an enum field needs its kind in protocol._ENUMS, a nullable
    one its no_* flag), so the gRPC client sends what REST sends."""
    from advserve.loss_specs import LOSS_TERMS
    from advserve_client import protocol
    from advserve_client._pb import advserve_pb2 as pb

    messages = {"policy_loss": pb.PolicyLoss, "kl_loss": pb.KLLoss, "value_loss": pb.ValueLoss,
                "entropy_bonus": pb.EntropyBonus, "rollout_correction": pb.RolloutCorrection,
                "token_loss": pb.TokenLoss}
    assert set(messages) == set(LOSS_TERMS) == set(protocol.LOSS_TERMS)
    for term, specs in LOSS_TERMS.items():
        for name, spec in specs.items():
            values = list(spec.choices or []) or [{"float": 0.5, "int": 3, "bool": True}[spec.kind.__name__]]
            values += [None] if spec.nullable else []
            for value in values:
                message = protocol.params_to_pb(messages[term](), {name: value})
                assert protocol.params_from_pb(message) == {name: value}, (term, name, value)
