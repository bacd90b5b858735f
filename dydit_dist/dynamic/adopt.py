"""One way for a dynamic model (DyDiT, FlexDiT) to take over a static model's parameters.

A dynamic model class is its static family's class plus a few added modules (routers, merge layers),
whose keys sit beside the static ones so that official checkpoints load into it. `adopt` builds the
dynamic class on the meta device, hands it the static model's own tensors (shared, not copied), and
builds only the added modules for real, on the static model's device and in its dtype.
"""

from __future__ import annotations

import torch
from torch import nn


def adopt(cls, static: nn.Module, **options) -> nn.Module:
    """`cls(**static.constructor_kwargs(), **options)` on `static`'s parameters; `cls` implements
    `_attach(**options)`, which (re)builds its added modules and returns them."""
    with torch.device("meta"):
        model = cls(**static.constructor_kwargs(), **options)
    _, unexpected = model.load_state_dict(static.state_dict(keep_vars=True), strict=False, assign=True)
    if unexpected:
        raise ValueError(f"static model has keys the {cls.__name__} lacks: {unexpected[:5]}")
    reference = next(static.parameters())
    with torch.device(reference.device):
        added = model._attach(**options)  # fresh added modules, built off the meta device
    for module in added:
        module.to(reference.dtype)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    still_meta += [n for n, b in model.named_buffers() if b.is_meta]
    if still_meta:
        raise ValueError(f"keys not provided by the static model: {still_meta[:5]}")
    return model.train(static.training)
