"""The network a sampling job runs: the fine-tuning job's network for `cfg.model` (with DyDiT routers
when the model or the sampling method is dynamic), with its checkpoint: an official file, a DyDiT
checkpoint, exported EMA weights, or a fine-tuning run's folder (its newest EMA export).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from dydit_dist.config import Config
from dydit_dist.models import load_into
from dydit_dist.train.network import build_network as build_train_network
from dydit_dist.train.network import resolve_weights

log = logging.getLogger(__name__)


def is_dynamic(cfg: Config) -> bool:
    return cfg.model.method == "dydit" or cfg.sample.method == "dydit"


def resolve_checkpoint(cfg: Config) -> Config:
    """`cfg` with `model.checkpoint` pinned to a weights file (a run folder becomes its newest EMA
    export now, so that every shard of a job, and of its reruns, comes from the same weights)."""
    if not cfg.model.checkpoint:
        return cfg
    model = dataclasses.replace(cfg.model, checkpoint=resolve_weights(cfg.model.checkpoint))
    return dataclasses.replace(cfg, model=model)


def build_network(cfg: Config, device: str | torch.device = "cpu") -> nn.Module:
    """`cfg.model` with `model.checkpoint` loaded (strict), in eval mode on `device`.

    A missing checkpoint leaves the network as initialized (only sensible for tests and smoke runs)
    and says so in the log; a checkpoint that does not fit the network is a ValueError naming it.
    """
    if (cfg.model.method == "flexdit") != (cfg.sample.method == "flexdit"):
        raise ValueError("a FlexDiT samples with its own method: set both model.method and sample.method to flexdit")
    model_cfg = dataclasses.replace(cfg.model, method="dydit") if is_dynamic(cfg) else cfg.model
    model = build_train_network(model_cfg)
    checkpoint = cfg.model.checkpoint
    if checkpoint:
        load_into(model, resolve_weights(checkpoint))
    else:
        log.warning("no checkpoint (model.checkpoint is unset): sampling from an initialized %s", cfg.model.name)
    return model.to(device).eval().requires_grad_(False)
