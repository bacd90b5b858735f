"""The one registry of sampling methods: a name, the runner that implements it, and its options type.

The config schema (`sample.method`, the per-method option sections), the sample job and the
benchmarks all read `METHODS`; nothing below this module imports it.

    runner = build_runner("eb_cache", model, EBCacheOptions(schedule=..., eps_scale="paper"))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .at_edm import PruningRunner
from .backend import Backend
from .base import FastPathRunner, Runner, StaticRunner
from .cache import CachingRunner
from .flexdit import FlexDiTRunner
from .options import ATEDMOptions, EBCacheOptions, FORAOptions, from_mapping


@dataclass(frozen=True)
class Method:
    """A sampling method: `runner(backend, options)` builds it; `options` is its options dataclass (or
    None); `networks` are the network variants (`model.method`) it runs on."""

    name: str
    runner: Callable[[Backend, object], Runner]
    options: type | None = None
    networks: tuple[str, ...] = ("static", "dydit")  # a training-free method runs on a DyDiT's fast path too


METHODS: dict[str, Method] = {m.name: m for m in (
    # the full network (a DyDiT at full width, a FlexDiT's pretrained network)
    Method("static", lambda b, o: StaticRunner(b), networks=("static", "dydit", "flexdit")),
    # DyDiT's fast path: only the active heads, MLP groups and tokens
    Method("dydit", lambda b, o: FastPathRunner(b), networks=("dydit",)),
    # FORA interval caching; EB-Cache: calibrated caching + exposure-bias correction
    Method("fora", lambda b, o: CachingRunner(b, o, method="fora"), FORAOptions),
    Method("eb_cache", lambda b, o: CachingRunner(b, o, method="eb_cache"), EBCacheOptions),
    # AT-EDM attention-driven token pruning
    Method("at_edm", lambda b, o: PruningRunner(b, o), ATEDMOptions),
    # FlexDiT's token density by timestep
    Method("flexdit", lambda b, o: FlexDiTRunner(b), networks=("flexdit",)),
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
    return spec.runner(Backend(model), options)
