"""Run by tests/test_integrations_openrlhf.py under the REAL OpenRLHF 0.11.2 (tests/real_libraries.py:
installed --no-deps, its other import-time dependencies stubbed by tests/golden/openrlhf_stub.py), with
advserve's own dependencies from the project venv appended to sys.path.

`advserve.integrations.openrlhf.install()` wraps OpenRLHF's RemoteExperienceMaker.compute_advantages_and_returns;
on random experience lists (micro-batches of different widths, groups of n_samples_per_prompt by position,
KL in the reward from action_log_probs / base_action_log_probs), the wrapped method and OpenRLHF's own
(the original, on a copy) give the same advantages, returns and logging info.

argv: <project venv site-packages> <advserve address or "">. Prints one JSON document.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from types import SimpleNamespace as NS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE, ADDRESS = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.join(ROOT, "tests", "golden"))
sys.path.insert(0, os.path.join(ROOT, "client"))
sys.path.insert(0, os.path.join(ROOT, "service"))
sys.path.append(SITE)
if ADDRESS:
    os.environ["ADVSERVE_ADDRESS"] = ADDRESS

import openrlhf_stub  # noqa: E402

openrlhf_stub.install()

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from openrlhf.models.utils import compute_approx_kl  # noqa: E402
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker  # noqa: E402

from advserve.integrations import openrlhf as integration  # noqa: E402

original = RemoteExperienceMaker.compute_advantages_and_returns
integration.install()
integration.install()  # idempotent
wrapped = RemoteExperienceMaker.compute_advantages_and_returns
rng = np.random.default_rng(20261204)


def case(estimator, dtype):
    n = 1 if estimator in ("gae", "reinforce", "flash_reinforce") else int(rng.integers(2, 5))
    groups = int(rng.integers(2, 4))
    B = groups * n
    positions = rng.permutation(B)  # any order of the rows; OpenRLHF sorts them back by index
    kl_coef = float(rng.choice([0.0, 0.05]))
    kl_name = str(rng.choice(["k1", "k2", "k3"]))
    experiences, start = [], 0
    while start < B:
        rows = int(min(rng.integers(1, 4), B - start))
        width = int(rng.integers(2, 7))
        lengths = rng.integers(1, width + 1, rows)
        mask = torch.tensor(np.arange(width)[None, :] < lengths[:, None])
        old = torch.tensor(np.log(rng.uniform(0.05, 0.95, (rows, width))), dtype=dtype)
        ref = old + torch.tensor(rng.normal(0, 0.3, (rows, width)), dtype=dtype)
        experiences.append(NS(
            rewards=torch.tensor(rng.integers(0, 2, rows) if rng.random() < 0.5 else rng.normal(size=rows),
                                 dtype=dtype),
            index=[int(i) for i in positions[start:start + rows]], action_mask=mask, action_log_probs=old,
            base_action_log_probs=ref, kl=compute_approx_kl(old, ref, kl_estimator=kl_name) * mask,
            values=torch.tensor(rng.normal(size=(rows, width)), dtype=dtype), info={},
            response_length=mask.sum(-1)))
        start += rows
    args = NS(algo=NS(advantage=NS(estimator=estimator, gamma=float(rng.choice([1.0, 0.9])),
                                   lambd=float(rng.choice([1.0, 0.95])), no_std_norm=bool(rng.random() < 0.3)),
                      kl=NS(use_loss=False, estimator=kl_name)),
              rollout=NS(n_samples_per_prompt=n, max_new_tokens=None),
              reward=NS(clip_range=(-float(rng.uniform(0.5, 10)), float(rng.uniform(0.5, 10))),
                        overlong_buffer_len=None, stop_properly_penalty_coef=None),
              data=NS(max_len=4096))
    makers = []
    for _ in range(2):
        maker = object.__new__(RemoteExperienceMaker)
        maker.strategy = NS(args=copy.deepcopy(args))
        maker.args = maker.strategy.args
        maker.advantage_estimator = estimator
        maker.kl_ctl = NS(value=kl_coef)
        makers.append(maker)
    theirs = original(makers[0], copy.deepcopy(experiences))
    ours = wrapped(makers[1], copy.deepcopy(experiences))
    # on the valid positions: at masked ones OpenRLHF leaves its whitening's shift, advserve 0 (documented)
    diff = max(max(float(((a.advantages.double() - b.advantages.double()) * a.action_mask).abs().max()),
                   float(((a.returns.double() - b.returns.double()) * a.action_mask).abs().max()))
               for a, b in zip(ours, theirs))
    same_info = all(a.info.keys() == b.info.keys() and all(torch.equal(a.info[k], b.info[k]) for k in a.info)
                    for a, b in zip(ours, theirs))
    same_dtype = all(a.advantages.dtype == b.advantages.dtype and a.returns.dtype == b.returns.dtype
                     for a, b in zip(ours, theirs))
    return {"estimator": estimator, "dtype": str(dtype), "kl_coef": kl_coef, "diff": diff, "same_info": same_info,
            "same_dtype": same_dtype}


report = {"wrapped": getattr(wrapped, "advserve", False) and wrapped.__wrapped__ is original, "cases": []}
for estimator in integration.ESTIMATORS:
    for trial in range(6):
        report["cases"].append(case(estimator, torch.float64 if trial % 2 else torch.float32))
print("\n" + json.dumps(report))  # the last line (OpenRLHF logs to stdout)
