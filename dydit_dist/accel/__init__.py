"""Sampling-time methods: the static network, DyDiT's fast path, FlexDiT, feature caching (FORA,
EB-Cache) and token pruning (AT-EDM), each a runner built by `build_runner(method, model, options)`;
see `base.py` for the interface the sample job drives and `methods.py` for the registry.
"""

from .at_edm import PruningRunner, ScoringBranches, gwpr, recover
from .backend import Backend, BlockRecord
from .base import FastPathRunner, Runner, StaticRunner
from .cache import BlockCache, CachingBranches, CachingRunner, forward_with_cache
from .flexdit import FlexDiTRunner
from .methods import METHODS, Method, build_runner
from .options import (
    RELEASED_TABLE_50,
    ATEDMOptions,
    EBCacheOptions,
    FORAOptions,
    eps_scale_at,
    fora_schedule,
    parse_eps_scale,
    parse_schedule,
)

__all__ = [
    "METHODS",
    "RELEASED_TABLE_50",
    "ATEDMOptions",
    "Backend",
    "BlockCache",
    "BlockRecord",
    "CachingBranches",
    "CachingRunner",
    "EBCacheOptions",
    "FORAOptions",
    "FastPathRunner",
    "FlexDiTRunner",
    "Method",
    "PruningRunner",
    "Runner",
    "ScoringBranches",
    "StaticRunner",
    "build_runner",
    "eps_scale_at",
    "fora_schedule",
    "forward_with_cache",
    "gwpr",
    "parse_eps_scale",
    "parse_schedule",
    "recover",
]
