"""dydit_dist: dynamic diffusion transformers, distributed with Ray and DeepSpeed."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

__version__ = "0.1.0"


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """PEP 562 `__getattr__` and `__dir__` for a package whose public names (name -> submodule) load
    their submodule on first use, so that importing the package or one light submodule of it (an
    options dataclass, a registry) does not import torch: a config typo is reported in a second.

        __getattr__, __dir__ = lazy_exports(__name__, {"DiT": "dit", ...})
    """

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
