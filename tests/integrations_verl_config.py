"""Run by tests/test_integrations_verl.py under the REAL verl 0.9.1 (tests/real_libraries.py): docs/integrations.md's
GRPO config diff applied to verl's own trainer config (verl/trainer/config/_generated_ppo_trainer.yaml), the
overrides as Hydra applies them (`+key` adds a key). Reports the keys whose values differ between the two
configs, whether `import verl` (the entry point) registered what the new config names, whether the actor's
policy_loss section still converts to verl's PolicyLossConfig, the runtime env verl's main_ppo would give Ray,
and GRPO advantages computed through verl's compute_advantage with each config's algorithm section.

argv: <project venv site-packages>. Prints one JSON document.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "golden"))
sys.path.insert(0, os.path.join(ROOT, "client"))
sys.path.insert(0, os.path.join(ROOT, "service"))
sys.path.append(sys.argv[1])
plugin_dir = tempfile.mkdtemp()  # advserve as an installed distribution with pyproject.toml's entry point
os.makedirs(os.path.join(plugin_dir, "advserve_plugin-0.0.0.dist-info"))
with open(os.path.join(plugin_dir, "advserve_plugin-0.0.0.dist-info", "METADATA"), "w") as f:
    f.write("Metadata-Version: 2.1\nName: advserve-plugin\nVersion: 0.0.0\n")
with open(os.path.join(plugin_dir, "advserve_plugin-0.0.0.dist-info", "entry_points.txt"), "w") as f:
    f.write("[verl.plugins]\nadvserve = advserve.integrations.verl\n")
sys.path.insert(0, plugin_dir)

import verl_stub  # noqa: E402

verl_stub.install()

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import verl  # noqa: E402
from verl.trainer.ppo import core_algos as ca  # noqa: E402
from verl.trainer.ppo import ray_trainer as rt  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig  # noqa: E402

docs = open(os.path.join(ROOT, "docs", "integrations.md")).read()
diff = re.search(r"```diff\n(.*?)```", docs, re.S)[1].splitlines()


def overrides(keep: str) -> list[str]:
    lines = [line[1:] for line in diff if line[0] in (" ", keep)]
    return [line.strip().rstrip("\\").strip() for line in lines if not line.strip().startswith("python3")]


def config(items: list[str]):
    cfg = OmegaConf.load(os.path.join(os.path.dirname(verl.__file__), "trainer", "config",
                                      "_generated_ppo_trainer.yaml"))
    for item in items:
        key, value = item.split("=", 1)
        add = key.startswith("+")
        key = key.lstrip("+")
        node, exists = OmegaConf.to_container(cfg, resolve=False), True
        for part in key.split("."):
            exists = isinstance(node, dict) and part in node
            if not exists:
                break
            node = node[part]
        # Hydra: a plain override needs the key, `+key` needs it absent
        assert exists != add, f"{item}: {'+' if add else 'no +'} for a key verl's config {'has' if exists else 'lacks'}"
        OmegaConf.update(cfg, key, yaml.safe_load(value), force_add=add)
    return cfg


def flat(node, prefix=""):
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


before, after = config(overrides("-")), config(overrides("+"))
a = flat(OmegaConf.to_container(before, resolve=False))
b = flat(OmegaConf.to_container(after, resolve=False))
changed = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))

estimator = ca.get_adv_estimator_fn(after.algorithm.adv_estimator)
loss = ca.get_policy_loss_fn(after.actor_rollout_ref.actor.policy_loss.loss_mode)
policy_loss_config = omega_conf_to_dataclass(after.actor_rollout_ref.actor.policy_loss, PolicyLossConfig)
runtime_env = OmegaConf.to_container(OmegaConf.merge({"env_vars": {"NCCL_DEBUG": "WARN"}},
                                                     after.ray_kwargs.ray_init.runtime_env))


_Batch, _Data = verl_stub.Batch, verl_stub.Data  # DataProto stand-ins


rng = np.random.default_rng(0)
mask = torch.tensor(np.arange(6)[None, :] < rng.integers(1, 7, 10)[:, None], dtype=torch.float32)
scores = torch.zeros(10, 6)
scores[torch.arange(10), mask.sum(-1).long() - 1] = torch.tensor(rng.integers(0, 2, 10), dtype=torch.float32)
uids = np.array([f"q{i % 2}" for i in range(10)], dtype=object)
advantages = {}
for name, cfg in (("before", before), ("after", after)):
    data = _Data(_Batch(10, response_mask=mask, token_level_rewards=scores.clone()), {"uid": uids})
    data = rt.compute_advantage(data, adv_estimator=cfg.algorithm.adv_estimator, gamma=cfg.algorithm.gamma,
                                lam=cfg.algorithm.lam, num_repeat=cfg.actor_rollout_ref.rollout.n,
                                norm_adv_by_std_in_grpo=cfg.algorithm.get("norm_adv_by_std_in_grpo", True),
                                config=cfg.algorithm)
    advantages[name] = data.batch["advantages"]

os.environ.pop("ADVSERVE_ADDRESS", None)
print(json.dumps({
    "changed": changed,
    "estimator": getattr(estimator, "__module__", ""), "policy_loss": getattr(loss, "__module__", ""),
    "policy_loss_config_mode": policy_loss_config.loss_mode,
    "address": runtime_env["env_vars"].get("ADVSERVE_ADDRESS"),
    "advantages_diff": float((advantages["before"] - advantages["after"]).abs().max()),
}))
