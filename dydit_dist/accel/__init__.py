"""Sampling-time methods: the static network, DyDiT's fast path, FlexDiT, feature caching (FORA,
EB-Cache) and token pruning (AT-EDM), each a runner built by `build_runner(method, model, options)`;
see `base.py` for the interface the sample job drives and `methods.py` for the registry. AT-EDM on a
diffusers SD-XL UNet is `UNetPruner` (`at_edm_unet.py`), driven by the sample job's SD-XL path.

Names load their submodule on first use (`dydit_dist.lazy_exports`): the config reads the options and
`METHODS` without torch.
"""

from __future__ import annotations

from dydit_dist import lazy_exports

_EXPORTS = {
    "METHODS": "methods",
    "RELEASED_TABLE_50": "options",
    "ATEDMOptions": "options",
    "Backend": "backend",
    "BlockCache": "cache",
    "BlockRecord": "backend",
    "CachingBranches": "cache",
    "CachingRunner": "cache",
    "EBCacheOptions": "options",
    "FORAOptions": "options",
    "FastPathRunner": "base",
    "FlexDiTRunner": "flexdit",
    "Method": "methods",
    "PruningRunner": "at_edm",
    "Runner": "base",
    "ScoringBranches": "at_edm",
    "StaticRunner": "base",
    "UNetPruner": "at_edm_unet",
    "build_runner": "methods",
    "eps_scale_at": "options",
    "fora_schedule": "options",
    "forward_with_cache": "cache",
    "gwpr": "at_edm",
    "parse_eps_scale": "options",
    "parse_schedule": "options",
    "recover": "at_edm",
    "unet_macs": "at_edm_unet",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
