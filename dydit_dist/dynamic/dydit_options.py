"""DyDiT's options (the `model.dynamic` section of the config), apart from the network so that the config
reads them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class DyDiTOptions:
    """DyDiT's routers and their training objective: the `model.dynamic` section of the config."""

    tdw: bool = True  # head and MLP-group routers on the timestep embedding
    sdt: bool = True  # per-block token router: dropped tokens skip the MLP
    target_lambda: float = field(default=0.5, metadata={"range": "(0, 1]"})  # FLOPs target as a fraction of the static model
    lambda_hold_steps: int = field(default=100, metadata={"range": "[0, inf)"})  # lambda_t = 1 for these first steps (the ramp below still starts at step 0)
    lambda_warmup_steps: int = field(default=1000, metadata={"range": "[0, inf)"})  # lambda_t falls linearly from 1 at step 0 to target_lambda at this step
    flops_loss_weight: float = field(default=2.0, metadata={"range": "[0, inf)"})
    stage: Literal[1, 2] = 1  # 1: add the complete-model loss; 2: drop it
    stage1_steps: int | None = field(default=None, metadata={"range": "[0, inf)"})  # stage 1 for these steps, then stage 2 in the same run (optimizer, EMA kept)
    gumbel_temperature: float = field(default=5.0, metadata={"range": "(0, inf)"})
    router_bias_init: float = field(default=15.0, metadata={"range": "(-inf, inf)"})
    token_router_bias_init: float = field(default=35.0, metadata={"range": "(-inf, inf)"})

    def __post_init__(self):
        if not 0.0 < self.target_lambda <= 1.0:
            raise ValueError(f"target_lambda={self.target_lambda} must be in (0, 1]")
        if self.stage1_steps is not None and (self.stage != 1 or self.stage1_steps < 0):
            raise ValueError(f"stage1_steps={self.stage1_steps} needs stage=1 and a count >= 0 (got stage={self.stage})")

    def stage_at(self, step: int) -> int:
        """The training stage of optimizer step `step` (0-based)."""
        if self.stage1_steps is not None and step >= self.stage1_steps:
            return 2
        return self.stage
