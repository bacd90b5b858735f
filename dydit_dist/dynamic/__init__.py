"""Trained dynamic compute: DyDiT routers with masked (training) and fast (inference) paths, FlexDiT."""

from .dydit import ROUTER_KEY_PATTERNS, DyDiT, DyDiTOptions, DynamicModel, DynamicOutput, DyPixArt
from .fast import FastBranches, FastPath, WidthPlan
from .flexdit import FLEXDIT_KEY_PATTERNS, FlexDiT, FlexModel, FlexOptions, FlexPixArt, flexdit_from_static
from .losses import dydit_loss_terms, flops_ratio, lambda_schedule, stratified_timesteps

__all__ = [
    "FLEXDIT_KEY_PATTERNS",
    "ROUTER_KEY_PATTERNS",
    "DyDiT",
    "DyDiTOptions",
    "DyPixArt",
    "DynamicModel",
    "DynamicOutput",
    "FastBranches",
    "FastPath",
    "FlexDiT",
    "FlexModel",
    "FlexOptions",
    "FlexPixArt",
    "WidthPlan",
    "dydit_loss_terms",
    "flexdit_from_static",
    "flops_ratio",
    "lambda_schedule",
    "stratified_timesteps",
]
