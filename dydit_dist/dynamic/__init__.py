"""Trained dynamic compute: DyDiT routers with masked (training) and fast (inference) paths, FlexDiT.

Names load their submodule on first use (`dydit_dist.lazy_exports`): the options and the FlexDiT
layout are read by the config without torch.
"""

from __future__ import annotations

from dydit_dist import lazy_exports

_EXPORTS = {
    "FLEXDIT_KEY_PATTERNS": "keys",
    "ROUTER_KEY_PATTERNS": "keys",
    "ROUTER_KEYS": "keys",
    "added_key_patterns": "keys",
    "DyDiT": "dydit",
    "DyDiTOptions": "dydit_options",
    "DyPixArt": "dydit",
    "DynamicModel": "dydit",
    "DynamicOutput": "dydit",
    "FastBranches": "fast",
    "FastPath": "fast",
    "FlexDiT": "flexdit",
    "FlexModel": "flexdit",
    "FlexOptions": "flexdit_schedule",
    "FlexPixArt": "flexdit",
    "WidthPlan": "fast",
    "dydit_loss_terms": "losses",
    "flexdit_from_static": "flexdit",
    "flops_ratio": "losses",
    "lambda_schedule": "losses",
    "stratified_timesteps": "losses",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
