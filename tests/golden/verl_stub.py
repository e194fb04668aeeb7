"""Inert stand-ins for the heavy dependencies that ``import verl.trainer.ppo.core_algos`` pulls in.

Only used by ``make_verl_golden.py`` (run with a throwaway venv that has ``verl==0.9.1`` installed with
``--no-deps``). The functions we call from verl (estimators, policy/value losses, agg_loss, kl_penalty,
rollout correction weights) are pure torch; the modules stubbed here (ray, transformers, tensordict, ...)
are only touched at import time, for type hints, decorators and class definitions. Every attribute of a
stubbed module is a permissive dummy: callable, subscriptable, usable as a base class or decorator.
Anything that actually *uses* a stub at run time gets a dummy back, so a golden value that depended on
one would be garbage; none of the code paths we call does.

Call ``install()`` before importing verl.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

# Top-level packages to stub when (and only when) they are not importable for real.
STUBBED = (
    "ray",
    "transformers",
    "codetiming",
    "tensordict",
    "wandb",
    "datasets",
    "accelerate",
    "peft",
    "hydra",
    "pandas",
    "pyarrow",
    "torchdata",
    "tensorboard",
    "dill",
    "pybind11",
    "liger_kernel",
    "flash_attn",
    "vllm",
    "sglang",
    "transfer_queue",
    "safetensors",
    "psutil",
    "cachetools",
    "pydantic",
    "uvicorn",
    "fastapi",
    "aiohttp",
    "orjson",
    "tqdm",
    "PIL",
)


class _DummyMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Dummy

    def __getitem__(cls, item):
        return cls

    def __or__(cls, other):
        return cls

    def __ror__(cls, other):
        return cls

    def __call__(cls, *args, **kwargs):
        # used as a decorator: @ray.remote / @ray.remote(num_cpus=1)
        if len(args) == 1 and not kwargs and callable(args[0]) and not isinstance(args[0], _DummyMeta):
            return args[0]
        return super().__call__(*args, **kwargs)

    def __iter__(cls):
        return iter(())

    def __bool__(cls):
        return False


class _Dummy(metaclass=_DummyMeta):
    """Permissive placeholder for any object of a stubbed module."""

    def __init__(self, *args, **kwargs):
        pass

    def __init_subclass__(cls, **kwargs):
        pass

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Dummy

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]
        return _Dummy()

    def __getitem__(self, item):
        return _Dummy()

    def __iter__(self):
        return iter(())

    def __bool__(self):
        return False


class _StubModule(types.ModuleType):
    __version__ = "0.0.0+stub"

    def __init__(self, name):
        super().__init__(name)
        self.__path__ = []  # behave as a package so submodules import
        self.__file__ = f"<verl_stub {name}>"

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Dummy


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        pass


class _StubFinder(importlib.abc.MetaPathFinder):
    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)
        return None


def install(extra=()):
    """Stub every package of STUBBED (plus ``extra``) that cannot be imported for real."""
    missing = []
    for root in tuple(STUBBED) + tuple(extra):
        if root in sys.modules:
            continue
        if importlib.util.find_spec(root) is None:
            missing.append(root)
    sys.meta_path.append(_StubFinder(missing))
    return missing


class Batch(dict):
    """A stand-in for DataProto.batch (its tensordict is stubbed): the tensors by name, and batch_size,
    all that verl's apply_kl_penalty and compute_advantage touch."""

    def __init__(self, bsz, **tensors):
        super().__init__(**tensors)
        self.batch_size = (bsz,)


class Data:
    """A stand-in for DataProto: `batch` (a `Batch`) and `non_tensor_batch` (uid and the like)."""

    def __init__(self, batch, non_tensor_batch):
        self.batch = batch
        self.non_tensor_batch = non_tensor_batch
