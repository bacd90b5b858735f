"""Exponential moving average of the weights that stays correct, and cheap, under ZeRO-3.

Partitioned EMA: every parameter, flattened (n elements), is cut into W = world-size slices of
ceil(n / W) elements (the last one zero-padded), and rank r keeps an fp32 EMA of slice r only. That
is exactly how ZeRO-3 partitions a parameter (`param.ds_tensor` is slice r), so under ZeRO-3 the
update reads the rank's own partition and never gathers; under ZeRO-0/1/2 the slice is cut from the
full parameter every rank holds. Each rank thus stores 4 bytes x parameters / W, updates only its
slice, and checkpoints only its slice; `gather()` assembles the full EMA on rank 0 (one collective)
for the exported weights. Resuming needs the same world size.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


def collective_ready(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` where the process group's collectives take it: NCCL moves device tensors only (a CPU
    tensor is "No backend type associated with device type cpu"): a CPU one (an offloaded optimizer's
    gradients, a CPU EMA) goes to this process's GPU; gloo takes it where it is."""
    if tensor.device.type == "cpu" and dist.is_initialized() and dist.get_backend() == "nccl":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


class PartitionedEMA:
    """EMA (`decay`) of this rank's slice of every parameter of `network` (frozen ones included)."""

    def __init__(self, network: nn.Module, decay: float, rank: int = 0, world_size: int = 1):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.rank, self.world_size = decay, rank, world_size
        self.names, self.params = zip(*network.named_parameters(), strict=True)
        self.shapes = [tuple(p.ds_shape) if hasattr(p, "ds_tensor") else tuple(p.shape) for p in self.params]
        self.slice_sizes = [math.ceil(math.prod(s) / world_size) for s in self.shapes]
        self.shadow = [self._local(i).float().clone() for i in range(len(self.params))]

    def _local(self, i: int) -> torch.Tensor:
        """This rank's slice of parameter i, (slice_size,) in the parameter's dtype."""
        p, size = self.params[i], self.slice_sizes[i]
        if hasattr(p, "ds_tensor"):  # ZeRO-3: DeepSpeed's partition is this very slice
            local = p.ds_tensor.detach().reshape(-1)
            assert local.numel() == size, f"{self.names[i]}: partition {local.numel()} != slice {size}"
            return local
        flat = p.detach().reshape(-1)
        lo = min(self.rank * size, flat.numel())
        piece = flat[lo : lo + size]
        if piece.numel() < size:
            piece = torch.cat([piece, piece.new_zeros(size - piece.numel())])
        return piece

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- decay * shadow + (1 - decay) * current slice."""
        current = [self._local(i).float() for i in range(len(self.params))]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    @torch.no_grad()
    def gather(self, dst: int = 0) -> dict[str, torch.Tensor] | None:
        """The full EMA weights {name: tensor (shape), fp32, CPU} on rank `dst`; None on the others."""
        flat = torch.cat(self.shadow)
        if self.world_size > 1:
            flat = collective_ready(flat)  # parameters offloaded to CPU keep a CPU EMA
        if self.world_size == 1:
            parts = [flat]
        else:
            parts = [torch.empty_like(flat) for _ in range(self.world_size)] if self.rank == dst else None
            dist.gather(flat, parts, dst=dst)
            if self.rank != dst:
                return None
        out, offset = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.slice_sizes, strict=True):
            full = torch.cat([part[offset : offset + size] for part in parts])[: math.prod(shape)]
            out[name] = full.reshape(shape).cpu()
            offset += size
        return out

    def state_dict(self) -> dict:
        return {"decay": self.decay, "rank": self.rank, "world_size": self.world_size,
                "shadow": {n: s.cpu() for n, s in zip(self.names, self.shadow, strict=True)}}

    def load_state_dict(self, state: dict) -> None:
        if (state["world_size"], state["rank"]) != (self.world_size, self.rank):
            raise ValueError(f"EMA slices were saved by rank {state['rank']} of {state['world_size']}; this is rank "
                             f"{self.rank} of {self.world_size}: resume with ray.num_workers={state['world_size']}")
        missing = sorted(set(self.names) - set(state["shadow"]))
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for i, name in enumerate(self.names):
            saved = state["shadow"][name]
            if saved.shape != self.shadow[i].shape:
                raise ValueError(f"EMA slice of {name}: saved {tuple(saved.shape)}, expected {tuple(self.shadow[i].shape)}")
            self.shadow[i].copy_(saved)
