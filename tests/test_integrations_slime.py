"""advserve as slime's `--custom-advantage-function-path` (advserve.integrations.slime.compute_advantages),
called as slime's compute_advantages_and_returns calls it: `custom_adv_fn(args, rollout_data)` with per-sample
lists, filling rollout_data["advantages"] and ["returns"] with one [R_i] tensor per sample.

Properties: GRPO's (r − mean)/std (population, the paper preset) and Dr.GRPO's r − mean over consecutive
groups of n_samples_per_prompt, and GAE's recursion, written here from their definitions, on ragged
samples with multi-turn gaps; the same numbers from a remote server; whole responses required."""

from __future__ import annotations

from argparse import Namespace

import numpy as np
import pytest
import torch

from advserve.integrations.slime import compute_advantages


def rollout(seed: int, samples: int = 8):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (samples,), generator=g).tolist()
    masks = [(torch.rand(n, generator=g) < 0.8).float() for n in lengths]
    for m in masks:
        m[0] = 1.0  # every response has a trained token
    return {"rewards": torch.randint(0, 2, (samples,), generator=g).float().tolist(), "loss_masks": masks,
            "response_lengths": lengths, "total_lengths": [n + 5 for n in lengths],
            "values": [torch.randn(n, generator=g) for n in lengths],
            "log_probs": [-torch.rand(n, generator=g) for n in lengths], "kl": [torch.zeros(n) for n in lengths]}


def grpo_reference(rewards, size, scale):
    r = np.asarray(rewards).reshape(-1, size)
    centred = r - r.mean(1, keepdims=True)
    std = r.std(1, keepdims=True)
    out = np.where(std > 0, centred / np.where(std > 0, std, 1), 0.0) if scale else centred
    return out.reshape(-1)


@pytest.mark.parametrize("std_normalization", [True, False])
def test_grpo_and_dr_grpo_over_consecutive_groups(monkeypatch, std_normalization):
    monkeypatch.delenv("ADVSERVE_ADDRESS", raising=False)
    monkeypatch.delenv("ADVSERVE_ESTIMATOR", raising=False)
    data = rollout(1)
    args = Namespace(advantage_estimator="grpo", n_samples_per_prompt=4, kl_coef=0.0,
                     grpo_std_normalization=std_normalization)
    compute_advantages(args, data)
    expected = grpo_reference(data["rewards"], 4, std_normalization)
    assert [a.shape[0] for a in data["advantages"]] == data["response_lengths"]
    for advantage, value, mask in zip(data["advantages"], expected, data["loss_masks"]):
        assert advantage.dtype == torch.float32
        np.testing.assert_allclose(advantage.numpy(), value * mask.numpy(), rtol=1e-6, atol=1e-6)


def test_gae_from_slimes_ppo(monkeypatch):
    """slime's ppo: GAE with --gamma and --lambd over each sample's values (paper preset, no whitening);
    masked positions are skipped by the recursion (advserve's mask_gaps 'skip')."""
    monkeypatch.delenv("ADVSERVE_ADDRESS", raising=False)
    monkeypatch.delenv("ADVSERVE_ESTIMATOR", raising=False)
    data = rollout(2)
    for m in data["loss_masks"]:
        m.fill_(1.0)  # no gaps: the textbook recursion
    gamma, lam = 0.9, 0.8
    compute_advantages(Namespace(advantage_estimator="ppo", gamma=gamma, lambd=lam, kl_coef=0.0), data)
    for advantage, reward, values in zip(data["advantages"], data["rewards"], data["values"]):
        v = values.double().numpy()
        n = len(v)
        delta = np.array([(reward if t == n - 1 else 0.0) + (gamma * v[t + 1] if t < n - 1 else 0.0) - v[t]
                          for t in range(n)])
        expected = np.array([sum((gamma * lam) ** k * delta[t + k] for k in range(n - t)) for t in range(n)])
        np.testing.assert_allclose(advantage.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_remote_gives_the_in_process_numbers(server, monkeypatch):
    monkeypatch.delenv("ADVSERVE_ESTIMATOR", raising=False)
    args = Namespace(advantage_estimator="reinforce_plus_plus_baseline", n_samples_per_prompt=2, kl_coef=0.0)
    monkeypatch.delenv("ADVSERVE_ADDRESS", raising=False)
    local = rollout(3)
    compute_advantages(args, local)
    for address in (server.url, f"grpc://{server.grpc_address}"):
        monkeypatch.setenv("ADVSERVE_ADDRESS", address)
        remote = rollout(3)
        compute_advantages(args, remote)
        for a, b in zip(remote["advantages"] + remote["returns"], local["advantages"] + local["returns"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_environment_chooses_the_estimator_and_whole_responses_are_required(monkeypatch):
    monkeypatch.delenv("ADVSERVE_ADDRESS", raising=False)
    monkeypatch.setenv("ADVSERVE_ESTIMATOR", "rloo")
    data = rollout(4)
    compute_advantages(Namespace(advantage_estimator="grpo", n_samples_per_prompt=2, kl_coef=0.0), data)
    r = np.asarray(data["rewards"]).reshape(-1, 2)
    expected = (r - r[:, ::-1]).reshape(-1)  # leave-one-out with two per group: r_i − r_other
    for advantage, value, mask in zip(data["advantages"], expected, data["loss_masks"]):
        np.testing.assert_allclose(advantage.numpy(), value * mask.numpy(), atol=1e-6)
    data["loss_masks"][0] = data["loss_masks"][0][:-1] if data["response_lengths"][0] > 1 else torch.ones(2)
    with pytest.raises(ValueError, match="whole responses"):
        compute_advantages(Namespace(advantage_estimator="grpo", n_samples_per_prompt=2), data)
    monkeypatch.delenv("ADVSERVE_ESTIMATOR")
    with pytest.raises(ValueError, match="'on_policy_distillation' has no advserve equivalent"):
        compute_advantages(Namespace(advantage_estimator="on_policy_distillation"), rollout(5))
