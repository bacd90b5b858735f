"""Training-free acceleration at sampling time: feature caching (FORA, EB-Cache) and token pruning (AT-EDM).

Every method is a runner, callable like the network, built by `build_runner(method, model, options)`;
see `base.py` for the interface the sample job drives.
"""

from .at_edm import PruningRunner, gwpr, recover
from .backend import Backend, flops_arch
from .base import METHODS, FastPathRunner, Runner, StaticRunner, build_runner
from .cache import BlockCache, CachingRunner, forward_with_cache
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
    "CachingRunner",
    "EBCacheOptions",
    "FORAOptions",
    "FastPathRunner",
    "PruningRunner",
    "Runner",
    "StaticRunner",
    "build_runner",
    "eps_scale_at",
    "flops_arch",
    "fora_schedule",
    "forward_with_cache",
    "gwpr",
    "parse_eps_scale",
    "parse_schedule",
    "recover",
]
