"""The loss behaviours of the openrlhf and trl presets (docs/semantics.md, "Presets" and "Losses")
against the float64 loops of tests/reference.py, and their errors.

Each parameter is tested on batches with interior mask gaps, empty rows and length-1 rows, with
log-ratios spread so that every clip, cap and gate binds somewhere: per-term aggregation, the
seq-mean denominator over all rows, TRL's ratio cap (delta) and absolute CISPO cap, sequence ratios
whose gradient passes through the mean, dual clip for gspo, OpenRLHF's unbiased KL gradient, TRL's
importance-weighted KL, and the rollout correction's log clamp, sequence_mean level, divergence
gating and per-token survivor weights. (Autograd checks: tests/test_loss_autograd.py; the libraries'
own numbers: tests/test_openrlhf_golden.py, tests/test_trl_golden.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

import advserve
import reference as ref_impl

TOL = dict(rtol=1e-10, atol=1e-12)
SEEDS = (0, 1, 2)


def make_batch(seed, B=7, T=6):
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, T), dtype=bool)
    ends = [T, 1, 0] + list(rng.integers(1, T + 1, size=B - 3))  # a full row, a length-1 row, an empty row
    for i, e in enumerate(ends):
        mask[i, :e] = True
        if e > 3 and rng.random() < 0.7:
            mask[i, int(rng.integers(1, e - 1))] = False  # an interior gap
    old = -np.abs(rng.normal(1.0, 0.6, size=(B, T))) - 0.05
    d = rng.normal(0.0, 0.4, size=(B, T))
    far = rng.random((B, T))
    d = np.where(far < 0.12, rng.uniform(1.0, 1.8, size=(B, T)), d)
    d = np.where(far > 0.9, rng.uniform(-1.8, -1.0, size=(B, T)), d)
    adv_rows = rng.normal(size=(B, 1))
    return dict(
        response_mask=mask,
        logprobs=old + d,
        old_logprobs=old,
        advantages=np.where(rng.random((B, T)) < 0.5, adv_rows, rng.normal(size=(B, T))),
        ref_logprobs=old + rng.normal(0.0, 0.7, size=(B, T)),
        values=rng.normal(size=(B, T)),
        old_values=rng.normal(size=(B, T)),
        returns=rng.normal(size=(B, T)),
        entropy=np.abs(rng.normal(size=(B, T))),
        rollout_logprobs=old + rng.normal(0.0, 0.5, size=(B, T)),
    )


def pick(b, *names):
    return {k: b[k] for k in ("response_mask", *names)}


POLICY = ("logprobs", "old_logprobs", "advantages")


def full_policy(**kw):
    """Every policy parameter explicit (the formula is then preset-independent)."""
    p = dict(mode="ppo_clip", clip_low=0.2, clip_high=0.28, dual_clip=None, ratio_clamp=None, ratio_cap=None,
             cispo_cap=None, cispo_level="token", sequence_ratio_gradient="token_trick", agg="token-mean",
             loss_scale_factor=None, seq_denominator="nonempty")
    p.update(kw)
    return p


def compare(res, want):
    assert res.loss == pytest.approx(want["loss"], rel=1e-10, abs=1e-12)
    for name, value in want["components"].items():
        if value is None:
            assert res.components[name] is None, name
        else:
            assert res.components[name] == pytest.approx(value, rel=1e-10, abs=1e-12), name
    for name in ("grad_logprobs", "grad_values", "grad_entropy"):
        if want[name] is None:
            assert getattr(res, name) is None, name
        else:
            np.testing.assert_allclose(np.asarray(getattr(res, name), dtype=np.float64), want[name], **TOL,
                                       err_msg=name)


def reference(b, pol, **kw):
    ref_pol = {k: pol[k] for k in ("mode", "clip_low", "clip_high", "dual_clip", "ratio_clamp", "ratio_cap",
                                   "cispo_cap", "cispo_level", "sequence_ratio_gradient")}
    return ref_impl.compute_losses(agg=pol["agg"], policy=ref_pol, loss_scale_factor=pol["loss_scale_factor"],
                                   seq_denominator=pol["seq_denominator"], **kw, **b)


# --------------------------------------------------------------------------------------------------
# policy term
# --------------------------------------------------------------------------------------------------

POLICY_CASES = {
    "gspo-through-mean": full_policy(mode="gspo", clip_low=0.1, clip_high=0.1, sequence_ratio_gradient="through_mean"),
    "gspo-through-mean-seq-mean": full_policy(mode="gspo", clip_low=0.1, clip_high=0.1, agg="seq-mean-token-mean",
                                              sequence_ratio_gradient="through_mean"),
    "gspo-through-mean-clamp": full_policy(mode="gspo", ratio_clamp=0.05, agg="seq-mean-token-sum",
                                           sequence_ratio_gradient="through_mean"),
    "gspo-dual-clip": full_policy(mode="gspo", clip_low=0.05, clip_high=0.05, dual_clip=1.1),
    "gspo-dual-clip-through-mean": full_policy(mode="gspo", clip_low=0.05, clip_high=0.05, dual_clip=1.1,
                                               sequence_ratio_gradient="through_mean"),
    "gspo-ratio-cap": full_policy(mode="gspo", ratio_cap=1.05, sequence_ratio_gradient="through_mean"),
    "ppo-ratio-cap-above-clip": full_policy(ratio_cap=2.0),
    "ppo-ratio-cap-inside-clip": full_policy(ratio_cap=1.1, dual_clip=3.0),
    "cispo-cap": full_policy(mode="cispo", cispo_cap=1.5),
    "cispo-cap-below-one": full_policy(mode="cispo", cispo_cap=0.2, agg="seq-mean-token-mean"),
    "cispo-sequence": full_policy(mode="cispo", cispo_cap=1.2, cispo_level="sequence"),
    "cispo-sequence-relative": full_policy(mode="cispo", cispo_level="sequence", sequence_ratio_gradient="through_mean"),
    "seq-denominator-all-token-mean": full_policy(agg="seq-mean-token-mean", seq_denominator="all"),
    "seq-denominator-all-sum-norm": full_policy(agg="seq-mean-token-sum-norm", seq_denominator="all",
                                                loss_scale_factor=16.0),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(POLICY_CASES))
def test_policy_against_reference(name, seed):
    b = pick(make_batch(seed), *POLICY)
    pol = POLICY_CASES[name]
    for preset in ("paper", "openrlhf", "trl"):
        res = advserve.compute_losses(preset=preset, policy_loss=pol, dtype="float64", **b)
        compare(res, reference(b, pol))


# --------------------------------------------------------------------------------------------------
# kl, value and entropy terms
# --------------------------------------------------------------------------------------------------

KL_CASES = {
    "agg-token-mean-under-seq-mean": (full_policy(agg="seq-mean-token-mean"),
                                      dict(coef=0.1, estimator="k2", clamp=None, agg="token-mean")),
    "unbiased-k1-clamped": (full_policy(), dict(coef=0.2, estimator="k1", clamp=0.3, unbiased_gradient=True)),
    "unbiased-k3": (full_policy(agg="seq-mean-token-sum"), dict(coef=0.2, estimator="k3", clamp=10.0,
                                                                 unbiased_gradient=True)),
    "importance-weighted-token": (full_policy(ratio_clamp=0.5), dict(coef=0.3, estimator="k3", clamp=None,
                                                                     importance_weighted=True)),
    "importance-weighted-gspo-through-mean": (
        full_policy(mode="gspo", agg="seq-mean-token-mean", sequence_ratio_gradient="through_mean"),
        dict(coef=0.3, estimator="k3", clamp=None, importance_weighted=True)),
    "importance-weighted-gspo-token-trick": (full_policy(mode="gspo"),
                                             dict(coef=0.3, estimator="k2", clamp=None, importance_weighted=True)),
    "importance-weighted-cispo-sequence": (
        full_policy(mode="cispo", cispo_level="sequence", cispo_cap=2.0, sequence_ratio_gradient="through_mean"),
        dict(coef=0.3, estimator="abs", clamp=None, importance_weighted=True, agg="token-sum")),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(KL_CASES))
def test_kl_against_reference(name, seed):
    b = pick(make_batch(seed), *POLICY, "ref_logprobs")
    pol, kl = KL_CASES[name]
    res = advserve.compute_losses(preset="paper", policy_loss=pol, kl_loss=kl, dtype="float64", **b)
    compare(res, reference(b, pol, kl=kl))


@pytest.mark.parametrize("seed", SEEDS)
def test_kl_without_a_policy_term_uses_the_policy_parameters_for_its_ratio(seed):
    b = pick(make_batch(seed), "logprobs", "old_logprobs", "ref_logprobs")
    kl = dict(coef=0.5, estimator="k3", clamp=None, importance_weighted=True)
    res = advserve.compute_losses(preset="trl", policy_loss=False, kl_loss=kl, dtype="float64", **b)
    pol = full_policy(mode=None, clip_low=0.2, clip_high=0.2, agg="token-mean", loss_scale_factor=512.0,
                      seq_denominator="all", sequence_ratio_gradient="through_mean")
    compare(res, reference(b, pol, kl=kl))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("agg", ("seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum"))
def test_value_and_entropy_aggregation_of_their_own(agg, seed):
    b = pick(make_batch(seed), *POLICY, "values", "old_values", "returns", "entropy")
    pol = full_policy(agg=agg, seq_denominator="all")
    value = dict(coef=0.5, clip=0.2, agg="token-mean")
    res = advserve.compute_losses(preset="verl", policy_loss=pol, value_loss=value,
                                  entropy_bonus=dict(coef=0.01, agg="seq-mean-token-mean"), num_sequences=9,
                                  dtype="float64", **b)
    compare(res, reference(b, pol, value=value, entropy_coef=0.01, entropy_agg="seq-mean-token-mean",
                           num_sequences=9))


# --------------------------------------------------------------------------------------------------
# rollout correction
# --------------------------------------------------------------------------------------------------

RC_CASES = [
    dict(level="token", mode="mask", low=None, high=1.3, log_clamp=None, gating="ratio", weight="unit"),
    dict(level="sequence", mode="mask", low=None, high=1.5, log_clamp=None, gating="ratio", weight="unit"),
    dict(level="sequence", mode="truncate", low=None, high=None, log_clamp=0.5, gating="ratio", weight="unit"),
    dict(level="sequence_mean", mode="mask", low=0.8, high=1.25, log_clamp=None, gating="ratio", weight="token"),
    dict(level="sequence_mean", mode="mask", low=0.9, high=1.1, log_clamp=None, gating="ratio", weight="unit"),
    dict(level="sequence_mean", mode="truncate", low=0.9, high=1.1, log_clamp=20.0, gating="ratio", weight="unit"),
    dict(level="token", mode="truncate", low=0.8, high=1.5, log_clamp=None, gating="ratio", weight="token"),
    dict(level="token", mode="mask", low=None, high=0.1, log_clamp=None, gating="tv", weight="token"),
    dict(level="sequence_mean", mode="mask", low=None, high=0.05, log_clamp=None, gating="binary_kl", weight="token"),
    dict(level="sequence", mode="mask", low=None, high=0.2, log_clamp=None, gating="binary_kl", weight="token"),
    dict(level="token", mode="mask", low=0.0, high=0.05, log_clamp=None, gating="binary_kl", weight="token"),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rc", RC_CASES, ids=lambda r: "-".join(str(r[k]) for k in ("level", "mode", "gating", "weight")))
@pytest.mark.parametrize("mode", ("ppo_clip", "gspo"))
def test_rollout_correction_against_reference(mode, rc, seed):
    b = pick(make_batch(seed), *POLICY, "rollout_logprobs")
    pol = full_policy(mode=mode, sequence_ratio_gradient="through_mean")
    res = advserve.compute_losses(preset="paper", policy_loss=pol, rollout_correction=rc, dtype="float64", **b)
    compare(res, reference(b, pol, rollout=rc))
    assert 0.0 <= res.metrics["rollout_is_fraction_outside"] <= 1.0


def test_rollout_correction_gates_something_in_each_case():
    # the cases above are not vacuous: every gate drops or clamps some tokens and keeps others
    b = make_batch(0)
    mask = b["response_mask"]
    for rc in RC_CASES:
        w = ref_impl.rollout_weights(mask, b["old_logprobs"], b["rollout_logprobs"], **rc)
        raw = np.exp(b["old_logprobs"] - b["rollout_logprobs"])
        assert np.any(w[mask] != raw[mask]), rc
        assert np.any(w[mask] != 0), rc


# --------------------------------------------------------------------------------------------------
# errors name their field
# --------------------------------------------------------------------------------------------------

BAD = [
    (dict(policy_loss={"mode": "ppo_clip", "cispo_cap": 5.0}), "policy_loss.cispo_cap"),
    (dict(policy_loss={"mode": "cispo", "ratio_cap": 1.5}), "policy_loss.ratio_cap"),
    (dict(policy_loss={"mode": "gspo", "cispo_level": "sequence"}), "policy_loss.cispo_level"),
    (dict(policy_loss={"ratio_cap": 0.0}), "policy_loss.ratio_cap"),
    (dict(policy_loss={"cispo_cap": -1.0}), "policy_loss.cispo_cap"),
    (dict(policy_loss={"seq_denominator": "some"}), "policy_loss.seq_denominator"),
    (dict(policy_loss={"sequence_ratio_gradient": "mean"}), "policy_loss.sequence_ratio_gradient"),
    (dict(kl_loss={"agg": "mean"}), "kl_loss.agg"),
    (dict(kl_loss={"unbiased_gradient": 1}), "kl_loss.unbiased_gradient"),
    (dict(kl_loss={"unbiased_gradient": True, "importance_weighted": True}), "kl_loss.importance_weighted"),
    (dict(value_loss={"agg": "token"}), "value_loss.agg"),
    (dict(entropy_bonus={"agg": 3}), "entropy_bonus.agg"),
    (dict(rollout_correction={"log_clamp": 0}), "rollout_correction.log_clamp"),
    (dict(rollout_correction={"level": "seq"}), "rollout_correction.level"),
    (dict(rollout_correction={"gating": "kl"}), "rollout_correction.gating"),
    (dict(rollout_correction={"gating": "tv", "mode": "truncate", "weight": "token", "low": None}),
     "rollout_correction.mode"),
    (dict(rollout_correction={"gating": "tv", "mode": "mask", "low": 0.5, "high": 1.0, "weight": "token"}),
     "rollout_correction.low"),
    (dict(rollout_correction={"gating": "binary_kl", "mode": "mask", "low": None, "weight": "unit"}),
     "rollout_correction.weight"),
    (dict(rollout_correction={"level": "sequence", "mode": "truncate", "weight": "token"}), "rollout_correction.weight"),
    (dict(rollout_correction={"low": 2.0, "high": 1.0}), "rollout_correction.low"),
]


@pytest.mark.parametrize("spec,field", BAD, ids=[f for _, f in BAD])
def test_bad_values_name_their_field(spec, field):
    b = make_batch(0)
    needs = set(POLICY)
    for term, tensors in (("kl_loss", {"ref_logprobs"}), ("rollout_correction", {"rollout_logprobs"}),
                          ("value_loss", {"values", "old_values", "returns"}), ("entropy_bonus", {"entropy"})):
        if term in spec:
            needs |= tensors
    with pytest.raises(advserve.InvalidArgument) as err:
        advserve.compute_losses(preset="paper", dtype="float64", **spec, **pick(b, *sorted(needs - {"response_mask"})))
    assert err.value.field == field, err.value.message


@pytest.mark.parametrize("flag", ("unbiased_gradient", "importance_weighted"))
def test_kl_corrections_need_old_logprobs(flag):
    b = pick(make_batch(0), "logprobs", "ref_logprobs")
    with pytest.raises(advserve.InvalidArgument) as err:
        advserve.compute_losses(preset="paper", policy_loss=False, kl_loss={flag: True}, **b)
    assert err.value.field == "tensors.old_logprobs"


# --------------------------------------------------------------------------------------------------
# every parameter travels: the proto has a field for each, and both transports give the engine's numbers
# --------------------------------------------------------------------------------------------------

MESSAGES = {"policy_loss": "PolicyLoss", "kl_loss": "KLLoss", "value_loss": "ValueLoss",
            "entropy_bonus": "EntropyBonus", "rollout_correction": "RolloutCorrection", "token_loss": "TokenLoss"}


def test_every_loss_parameter_has_a_proto_field():
    from advserve.loss_specs import LOSS_TERMS
    from advserve_client import protocol
    from advserve_client._pb import advserve_pb2 as pb

    for term, specs in LOSS_TERMS.items():
        fields = getattr(pb, MESSAGES[term]).DESCRIPTOR.fields_by_name
        for name, spec in specs.items():
            assert name in fields, (term, name)
            if spec.choices is not None:
                assert fields[name].enum_type is not None, (term, name)
            if spec.nullable:
                assert f"no_{name}" in fields, (term, name)  # null must be sayable where a preset's default is not
            if spec.kind is int and spec.choices is None:  # an int field, or a double the server checks
                integral = fields[name].type in (fields[name].TYPE_INT32, fields[name].TYPE_INT64)
                assert integral or name in protocol.INTEGER_DOUBLES, (term, name)


LIBRARY_REQUESTS = [
    {"preset": "trl", "policy_loss": {"mode": "cispo", "cispo_level": "sequence", "seq_denominator": "all",
                                      "agg": "seq-mean-token-mean", "loss_scale_factor": None},
     "kl_loss": {"coef": 0.04, "agg": None}, "entropy_bonus": {"coef": 0.01, "agg": "token-mean"},
     "rollout_correction": {"low": None, "high": None, "log_clamp": None}},
    {"preset": "trl", "policy_loss": {"mode": "gspo", "ratio_cap": 1.1, "sequence_ratio_gradient": "through_mean"},
     "kl_loss": {"coef": 0.1, "importance_weighted": True},
     "rollout_correction": {"level": "token", "mode": "truncate", "low": 0.5, "high": 2.0, "log_clamp": 20.0}},
    {"preset": "openrlhf", "policy_loss": {"mode": "gspo", "dual_clip": 1.2}, "kl_loss": {"unbiased_gradient": True},
     "value_loss": {"agg": "seq-mean-token-mean"}, "entropy_bonus": {"coef": 0.01},
     "rollout_correction": {"level": "sequence_mean", "gating": "binary_kl", "weight": "token", "low": None,
                            "high": 0.05}},
    {"preset": "openrlhf", "policy_loss": {"mode": "cispo", "cispo_cap": None, "ratio_cap": None},
     "kl_loss": {"agg": None, "importance_weighted": False}, "value_loss": {"agg": None},
     "rollout_correction": {"gating": "tv", "weight": "token", "low": None, "high": 0.1}},
]


@pytest.mark.parametrize("spec", LIBRARY_REQUESTS, ids=range(len(LIBRARY_REQUESTS)))
def test_protocol_round_trip_of_the_library_parameters(spec):
    from advserve_client import protocol

    document, _ = protocol.losses_request_from_pb(protocol.losses_request_to_pb(spec, {}))
    for term in MESSAGES:
        assert document.get(term) == spec.get(term), term


@pytest.fixture(scope="module")
def transports(server):
    from advserve_client import Client

    made = {"rest-binary": Client(server.url, binary=True), "rest-json": Client(server.url, binary=False),
            "grpc": Client(server.grpc_address, transport="grpc")}
    yield made
    for c in made.values():
        c.close()


@pytest.mark.parametrize("spec", LIBRARY_REQUESTS, ids=range(len(LIBRARY_REQUESTS)))
def test_library_parameters_over_every_transport(transports, spec):
    b = make_batch(5)
    names = set(POLICY) | {"ref_logprobs", "rollout_logprobs"}
    names |= {"values", "old_values", "returns"} if "value_loss" in spec else set()
    names |= {"entropy"} if "entropy_bonus" in spec else set()
    tensors = pick(b, *sorted(names - {"response_mask"}))
    local = advserve.compute_losses(dtype="float64", **spec, **tensors)
    for kind, c in transports.items():
        got = c.compute_losses(dtype="float64", **spec, **tensors)
        assert got.loss == local.loss and got.components == local.components, kind
        assert got.params == local.params, kind
        np.testing.assert_array_equal(got.grad_logprobs, local.grad_logprobs, err_msg=kind)


# --------------------------------------------------------------------------------------------------
# the catalog's translation of library options names real loss parameters
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,least", [("openrlhf", 20), ("trl", 20), ("verl", 8)])
def test_loss_options_name_real_parameters(preset, least):
    import re

    from advserve.estimators import PARAMS
    from advserve.loss_specs import LOSS_TERMS
    from advserve.presets import PRESETS

    options = PRESETS[preset].options
    named = 0
    for option, request in options.items():
        for term, name in re.findall(r"\b(policy_loss|kl_loss|value_loss|entropy_bonus|rollout_correction)\.(\w+)",
                                     request):
            assert name in LOSS_TERMS[term], (option, term, name)
            named += 1
        for name in re.findall(r"\bparams\.(\w+)", request):
            assert name in PARAMS, (option, name)
        for name in re.findall(r"\bestimator='(\w+)'", request):
            assert name in PRESETS[preset].estimators, (option, name)
    assert named >= least
    if preset == "trl":
        for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo"):
            assert f"GRPOConfig.loss_type='{loss_type}'" in options
    from advserve.engine import Engine

    assert {p["name"]: p for p in Engine.catalog()["presets"]}[preset]["options"] == dict(options)  # GET /v1/estimators
