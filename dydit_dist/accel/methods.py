"""The one registry of sampling methods: a name, the runner that implements it, and its options type.

The config schema (`sample.method`, the per-method option sections), the sample job and the
benchmarks all read `METHODS`; nothing below this module imports it.

    runner = build_runner("eb_cache", model, EBCacheOptions(schedule=..., eps_scale="paper"))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .options import ATEDMOptions, EBCacheOptions, FORAOptions, from_mapping

if TYPE_CHECKING:
    from .backend import Backend
    from .base import Runner


@dataclass(frozen=True)
class Method:
    """A sampling method: `runner(backend, options)` builds it; `options` is its options dataclass (or
    None); `networks` are the network variants (`model.method`) it runs on."""

    name: str
    runner: Callable[[Backend, object], Runner]
    options: type | None = None
    networks: tuple[str, ...] = ("static", "dydit")  # a training-free method runs on a DyDiT's fast path too


# The runners import torch when a runner is built, not when the registry is read: the config validates
# `sample.method` and its options without torch.
def _static(b: Backend, o: None) -> Runner:
    from .base import StaticRunner
    return StaticRunner(b)


def _fast_path(b: Backend, o: None) -> Runner:
    from .base import FastPathRunner
    return FastPathRunner(b)


def _caching(method: str) -> Callable[[Backend, object], Runner]:
    def build(b: Backend, o: FORAOptions | EBCacheOptions) -> Runner:
        from .cache import CachingRunner
        return CachingRunner(b, o, method=method)
    return build


def _pruning(b: Backend, o: ATEDMOptions) -> Runner:
    from .at_edm import PruningRunner
    return PruningRunner(b, o)


def _flexdit(b: Backend, o: None) -> Runner:
    from .flexdit import FlexDiTRunner
    return FlexDiTRunner(b)


METHODS: dict[str, Method] = {m.name: m for m in (
    # the full network (a DyDiT at full width, a FlexDiT's pretrained network)
    Method("static", _static, networks=("static", "dydit", "flexdit")),
    # DyDiT's fast path: only the active heads, MLP groups and tokens
    Method("dydit", _fast_path, networks=("dydit",)),
    # FORA interval caching; EB-Cache: calibrated caching + exposure-bias correction
    Method("fora", _caching("fora"), FORAOptions),
    Method("eb_cache", _caching("eb_cache"), EBCacheOptions),
    # AT-EDM attention-driven token pruning
    Method("at_edm", _pruning, ATEDMOptions),
    # FlexDiT's token density by timestep
    Method("flexdit", _flexdit, networks=("flexdit",)),
)}


def build_runner(method: str, model, options=None) -> Runner:
    """A runner for `method` on `model` (DiT, PixArt, a DyDiT / DyPixArt or FlexDiT in eval mode).

    options: the method's options dataclass (`FORAOptions`, `EBCacheOptions`, `ATEDMOptions`), a
    plain mapping of its fields, or None for the defaults. On a DyDiT, "fora", "eb_cache" and
    "at_edm" run on top of its fast path (dynamic width and tokens); "static" runs its full width.
    """
    if method not in METHODS:
        raise ValueError(f"unknown acceleration method {method!r}; valid methods: {', '.join(METHODS)}")
    spec = METHODS[method]
    if spec.options is not None:
        if options is None or isinstance(options, Mapping):
            options = from_mapping(spec.options, options)
        elif not isinstance(options, spec.options):
            raise ValueError(f"method {method!r} takes {spec.options.__name__}, got {type(options).__name__}")
    elif options is not None:
        raise ValueError(f"method {method!r} takes no options, got {options!r}")
    if model.training:
        raise ValueError("sampling runners need the model in eval mode (model.eval())")
    from .backend import Backend

    return spec.runner(Backend(model), options)
