"""advserve in OpenRLHF 0.11.2 (advserve.integrations.openrlhf): RemoteExperienceMaker.compute_advantages_and_returns
wrapped, advserve's advantages and returns in place of OpenRLHF's.

* Against the REAL OpenRLHF 0.11.2 (installed by the suite, --no-deps, into build/real-libraries/openrlhf:
  tests/real_libraries.py): tests/integrations_openrlhf_check.py installs the hook and compares the
  wrapped method with OpenRLHF's own on random experience lists, every estimator, in process, against a
  server, and against a list of servers used in turn (the --reward.remote_url convention).
* Everywhere: the golden advantage cases of tests/golden/openrlhf_0.11.2.json (computed by the real
  OpenRLHF) through advserve_advantages on experiences built as that generator builds them.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

import real_libraries

from advserve.integrations import openrlhf as integration
from advserve.integrations._backend import RoundRobin, backend

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "openrlhf_0.11.2.json").read_text())
OPENRLHF_NAME = {ours: theirs for theirs, ours in integration.ESTIMATORS.items()}


@pytest.mark.parametrize("where", ["in process", "remote", "two servers"])
def test_real_openrlhf_wrapped_method(where, request):
    address = ""
    if where != "in process":
        server = request.getfixturevalue("server")
        address = server.url if where == "remote" else f"{server.url},grpc://{server.grpc_address}"
    out = real_libraries.run("openrlhf", ROOT / "tests" / "integrations_openrlhf_check.py",
                             sysconfig.get_paths()["purelib"], address)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["wrapped"]
    assert len(report["cases"]) == 6 * len(integration.ESTIMATORS)
    for case in report["cases"]:
        assert case["same_info"] and case["same_dtype"], case
        assert case["diff"] <= 1e-6, case  # OpenRLHF's KL and whitening statistics are float32


def golden_experiences(case):
    """The experience list and maker of tests/golden/make_openrlhf_golden.py's openrlhf_advantages."""
    p, tensors = case["params"], case["tensors"]
    mask = torch.tensor(tensors["response_mask"]).bool()
    B = mask.shape[0]
    if "group_ids" in tensors:
        order: dict = {}
        for i, g in enumerate(tensors["group_ids"]):
            order.setdefault(g, []).append(i)
        index, position = [0] * B, 0
        for rows in order.values():
            for i in rows:
                index[i], position = position, position + 1
        n = len(next(iter(order.values())))
    else:
        index, n = list(range(B)), 1

    def tensor(name):
        return torch.tensor(tensors[name], dtype=torch.float64) if name in tensors else None

    experiences, start = [], 0
    for rows in case["micro_batches"]:
        part = slice(start, start + rows)
        start += rows
        experiences.append(NS(rewards=tensor("rewards")[part].clone(), index=index[part], action_mask=mask[part],
                              values=None if tensor("values") is None else tensor("values")[part],
                              action_log_probs=None if tensor("old_logprobs") is None else tensor("old_logprobs")[part],
                              base_action_log_probs=None if tensor("ref_logprobs") is None else
                              tensor("ref_logprobs")[part], info={}))
    args = NS(algo=NS(advantage=NS(estimator=OPENRLHF_NAME[case["estimator"]], gamma=p.get("gamma", 1.0),
                                   lambd=p.get("lam", 1.0), no_std_norm=not p.get("whiten_std", True)),
                      kl=NS(use_loss=False, estimator=p["kl_estimator"])),
              rollout=NS(n_samples_per_prompt=n), reward=NS(clip_range=(p["reward_clip_low"], p["reward_clip_high"])))
    return NS(strategy=NS(args=args), kl_ctl=NS(value=p["kl_coef"])), experiences, mask


CASES = [c for c in GOLDEN["advantages"] if c["estimator"] in OPENRLHF_NAME]


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_golden_cases_of_the_real_openrlhf(case, monkeypatch):
    monkeypatch.delenv("ADVSERVE_ADDRESS", raising=False)
    maker, experiences, mask = golden_experiences(case)
    out = integration.advserve_advantages(maker, experiences)
    advantages = torch.cat([e.advantages for e in out]) * mask
    returns = torch.cat([e.returns for e in out]) * mask
    tol = case["tol"]
    np.testing.assert_allclose(advantages.numpy(), case["expected"]["advantages"], rtol=tol, atol=tol)
    np.testing.assert_allclose(returns.numpy(), case["expected"]["returns"], rtol=tol, atol=tol)


def test_the_launcher_takes_its_own_flag_and_passes_openrlhfs():
    flags = ["--actor.eps_clip", "0.2", "--reward.remote_url", "http://rm:5000,http://rm2:5000"]
    assert integration.split_argv(["--advserve.url", "http://a:8000,http://b:8000", *flags]) == (
        "http://a:8000,http://b:8000", flags)
    assert integration.split_argv(["--advserve.url=http://a:8000", *flags]) == ("http://a:8000", flags)
    assert integration.split_argv(flags) == (None, flags)
    with pytest.raises(SystemExit):
        integration.split_argv(["--advserve.url"])


def test_a_url_list_is_used_in_turn(server, monkeypatch):
    """ADVSERVE_ADDRESS with several URLs (OpenRLHF's --reward.remote_url convention): one call each, in turn."""
    monkeypatch.setenv("ADVSERVE_ADDRESS", f"{server.url}, grpc://{server.grpc_address}")
    pool = backend()
    assert isinstance(pool, RoundRobin) and pool.addresses == [server.url, f"grpc://{server.grpc_address}"]
    batch = {"rewards": np.array([1.0, 0.0], np.float32), "response_mask": np.ones((2, 3), bool),
             "group_ids": [0, 0]}
    first, second = (pool.compute_advantages("grpo", **batch) for _ in range(2))
    np.testing.assert_array_equal(first.advantages, second.advantages)
    assert first.stats["groups"]["ids"] == [0] and second.stats["groups"]["ids"] == ["0"]  # REST, then gRPC
