"""Input validation and the catalog's integrity, through the in-process API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import advserve
from advserve.estimators import ESTIMATORS
from advserve.loss_specs import LOSS_TERMS
from advserve.presets import PRESETS


def batch(**overrides):
    base = {"rewards": np.array([1.0, 0.0, 1.0, 0.0]), "response_mask": np.ones((4, 3)), "group_ids": [0, 0, 1, 1]}
    out = {**base, **overrides}
    if "values" in out:  # a critic estimator: no groups
        del out["group_ids"]
    return out


def test_nan_on_an_unmasked_position_is_rejected():
    values = np.zeros((4, 3))
    values[2, 1] = np.nan
    with pytest.raises(advserve.InvalidArgument) as err:
        advserve.compute_advantages("gae", **batch(values=values))
    assert err.value.field == "tensors.values"


def test_nan_on_a_masked_position_is_ignored():
    mask = np.ones((4, 3))
    mask[2, 2] = 0
    values = np.zeros((4, 3))
    values[2, 2] = np.nan
    out = advserve.compute_advantages("gae", dtype="float64", **batch(values=values, response_mask=mask))
    assert np.isfinite(out.advantages).all() and out.advantages[2, 2] == 0
    clean = advserve.compute_advantages("gae", dtype="float64", **batch(values=np.zeros((4, 3)), response_mask=mask))
    np.testing.assert_array_equal(out.advantages, clean.advantages)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_rewards_are_rejected(bad):
    with pytest.raises(advserve.InvalidArgument) as err:
        advserve.compute_advantages("grpo", **batch(rewards=np.array([1.0, bad, 0.0, 0.0])))
    assert err.value.field == "tensors.rewards"


def test_group_ids_must_be_ints_or_strings():
    with pytest.raises(advserve.InvalidArgument) as err:
        advserve.compute_advantages("grpo", **batch(group_ids=np.array([0.5, 0.5, 1.0, 1.0])))
    assert err.value.field == "tensors.group_ids"


def test_torch_in_torch_out_numpy_in_numpy_out():
    out = advserve.compute_advantages("grpo", **{k: torch.as_tensor(np.asarray(v)) for k, v in batch().items()})
    assert isinstance(out.advantages, torch.Tensor) and out.advantages.dtype == torch.float32
    out = advserve.compute_advantages("grpo", **batch())
    assert isinstance(out.advantages, np.ndarray)


def test_bfloat16_logprobs_are_accepted():
    lp = torch.log(torch.rand(2, 4)).to(torch.bfloat16)
    out = advserve.compute_losses(logprobs=lp, old_logprobs=lp, advantages=torch.ones(2, 4),
                                  response_mask=torch.ones(2, 4, dtype=torch.bool))
    assert out.grad_logprobs.dtype == torch.float32
    # paper preset: reinforce surrogate, seq-mean-token-sum: ∂/∂lp = −A·ρ/B = −1/2 at ρ = 1
    torch.testing.assert_close(out.grad_logprobs, torch.full((2, 4), -0.5))


def test_returned_tensors_can_enter_a_trainers_autograd_graph():
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = advserve.compute_advantages("grpo", rewards=torch.tensor([1.0, 0.0]), response_mask=mask,
                                      group_ids=torch.tensor([0, 0]))
    logp = torch.zeros(2, 3, requires_grad=True)
    (-(out.advantages * logp.exp()).sum()).backward()  # would fail on inference-mode tensors
    assert logp.grad is not None


def test_a_tensor_the_estimator_does_not_use_is_named():
    with pytest.raises(advserve.InvalidArgument) as err:
        advserve.compute_advantages("grpo", values=np.zeros((4, 3)), **batch())
    assert err.value.field == "tensors.values" and "group_ids" in err.value.message


def _covers(table, specs) -> bool:
    """Every name of the table is a parameter, and every parameter without a default of its own
    (params.neutral) is in the table."""
    return set(table) <= set(specs) and {n for n, spec in specs.items() if not spec.has_default} <= set(table)


def test_every_preset_gives_every_parameter_a_default():
    for preset in PRESETS.values():
        for name, defaults in preset.estimators.items():
            assert _covers(defaults, ESTIMATORS[name].param_specs()), (preset.name, name)
        for name in ESTIMATORS:
            assert name in preset.estimators or name in preset.unavailable, (preset.name, name)
        for term, specs in LOSS_TERMS.items():
            assert _covers(preset.losses[term], specs), (preset.name, term)
    assert any(spec.has_default for spec in LOSS_TERMS["policy_loss"].values())  # the mechanism is in use


def test_preset_defaults_pass_their_own_validation():
    for preset in PRESETS.values():
        for name, defaults in preset.estimators.items():
            specs = ESTIMATORS[name].param_specs()
            for param, value in defaults.items():
                if not hasattr(value, "resolve"):
                    assert specs[param].check(value, param) == value


def test_verl_clamps_only_k3():
    lp = np.zeros((1, 2))
    ref = np.array([[-30.0, 30.0]])
    common = dict(preset="verl", dtype="float64", rewards=np.array([1.0]), response_mask=np.ones((1, 2)),
                  old_logprobs=lp, ref_logprobs=ref)
    k3 = advserve.compute_advantages("reinforce_pp", params={"kl_coef": 1.0, "kl_estimator": "k3", "whiten": False},
                                     **common)
    k1 = advserve.compute_advantages("reinforce_pp", params={"kl_coef": 1.0, "kl_estimator": "k1", "whiten": False},
                                     **common)
    # k3 values are clamped at 10 each: rtg = 1 − 10 − 10 at t = 0
    np.testing.assert_allclose(k3.returns, [[1 - 20.0, 1 - 10.0]])
    # k1 is old − ref = (30, −30), unclamped
    np.testing.assert_allclose(k1.returns, [[1 - 30 + 30, 1 + 30.0]])
    assert k3.params["kl_clamp"] == 10.0 and k1.params["kl_clamp"] is None


def test_unavailable_estimator_explains_itself():
    with pytest.raises(advserve.NotFound) as err:
        advserve.compute_advantages("grpo_original", preset="verl", **batch())
    assert "seq-mean-token-mean" in str(err.value)


def test_every_setting_is_documented_in_the_readme_and_the_help():
    import subprocess
    import sys
    from pathlib import Path

    from advserve.config import env_name, setting_fields

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    help_text = subprocess.run([sys.executable, "-m", "advserve.cli", "serve", "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    for f in setting_fields():
        assert env_name(f.name) in readme, f"README does not list {env_name(f.name)}"
        assert "--" + f.name.replace("_", "-") in help_text and env_name(f.name) in help_text, f.name


def test_settings_are_validated_with_a_clear_message():
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "advserve.cli", "serve", "--tls-cert", "/nonexistent.pem"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "tls_cert and tls_key go together" in bad.stderr
    env = subprocess.run([sys.executable, "-m", "advserve.cli", "serve"], capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "ADVSERVE_MAX_TOKENS": "lots"})
    assert env.returncode == 2 and "ADVSERVE_MAX_TOKENS" in env.stderr
