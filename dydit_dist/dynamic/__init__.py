"""Trained dynamic compute: DyDiT routers with masked (training) and fast (inference) paths."""

from .dydit import ROUTER_KEY_PATTERNS, DyDiT, DynamicOutput, DyPixArt, RouterOptions
from .fast import FastPath, WidthPlan
from .losses import dydit_loss_terms, flops_ratio, lambda_schedule, stratified_timesteps

__all__ = [
    "ROUTER_KEY_PATTERNS",
    "DyDiT",
    "DyPixArt",
    "DynamicOutput",
    "FastPath",
    "RouterOptions",
    "WidthPlan",
    "dydit_loss_terms",
    "flops_ratio",
    "lambda_schedule",
    "stratified_timesteps",
]
