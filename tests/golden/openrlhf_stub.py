"""Inert stand-ins for the heavy dependencies that importing OpenRLHF's loss / experience-maker modules
pulls in (deepspeed, ray, transformers, ...).

Only used by ``make_openrlhf_golden.py`` (run in a throwaway venv with ``openrlhf`` installed
``--no-deps`` plus torch and numpy). The OpenRLHF functions we call (compute_approx_kl, compute_reward,
masked_mean, PolicyLoss, ValueLoss, aggregate_loss, RemoteExperienceMaker.compute_advantages_and_returns)
are pure torch; the stubbed packages are only touched at import time (type hints, decorators, class
definitions). The permissive-dummy machinery is the one of ``verl_stub.py``; this module only names
the packages OpenRLHF needs stubbed.

Call ``install()`` before importing openrlhf.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import verl_stub  # noqa: E402  (generic import-time stubs)

STUBBED = (
    "deepspeed",
    "ray",
    "vllm",
    "transformers",
    "peft",
    "flash_attn",
    "bitsandbytes",
    "datasets",
    "accelerate",
    "optimum",
    "einops",
    "wandb",
    "tensorboard",
    "tqdm",
    "jsonlines",
    "loralib",
    "torchmetrics",
    "liger_kernel",
    "ring_flash_attn",
    "PIL",
    "qwen_vl_utils",
    "pynvml",
    "math_verify",
    "latex2sympy2_extended",
    "sklearn",
    "safetensors",
    "psutil",
    "torchdata",
    "packaging",
    "pandas",
    "pyarrow",
    "huggingface_hub",
    "tokenizers",
    "fastapi",
    "uvicorn",
    "aiohttp",
    "requests",
    "openai",
    "yaml",
    "pylatexenc",
)


def install(extra=()):
    """Stub every package of STUBBED (plus ``extra``) that cannot be imported for real."""
    return verl_stub.install(extra=tuple(STUBBED) + tuple(extra))
