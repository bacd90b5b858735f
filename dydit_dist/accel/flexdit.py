"""FlexDiT as a sampling method: a runner like the training-free ones (`accel.base.Runner`).

    runner = FlexDiTRunner(Backend(flex_model.eval()))   # or accel.build_runner("flexdit", flex_model)
    runner.begin(num_steps)
    x0 = sample(cfg_model_fn(runner, 1.5), shape, steps=num_steps, step_callback=runner.step_callback, ...)
    runner.mean_flops()                              # MACs of one model call of one sample row, averaged

The grid of each call comes from the timesteps it is given (the model's schedule); its FLOPs are
those of `flexdit_flops.model_flops` for that grid, averaged over the rows when rows differ.
"""

from __future__ import annotations

from dydit_dist import flops
from dydit_dist.dynamic import FlexModel
from dydit_dist.dynamic.flexdit_flops import model_flops

from .backend import Backend
from .base import Runner


class FlexDiTRunner(Runner):
    """Runs a `FlexDiT` / `FlexPixArt` (eval mode) and records the sparse grid of every call."""

    method = "flexdit"

    def __init__(self, backend: Backend):
        if not isinstance(backend.model, FlexModel):
            raise ValueError(f"method 'flexdit' needs a FlexDiT / FlexPixArt model, got {type(backend.model).__name__}")
        super().__init__(backend)
        self._per_grid: dict[int, float] = {}
        self._intervals = backend.model.schedule.intervals()  # [(t_lo, t_hi, grid)]

    def forward(self, x, t, cond):
        if self.timestep is not None:
            # The sampler's host-side timestep picks the grid: no read of t from the device.
            grid = self._grid_at(self.timestep)
            return self.model.forward_grid(x, t, grid, **cond), [{grid: 1.0}]
        grids = self.model.grids_for(t)  # rows at several timesteps: grouped by the model (host reads)
        out = self.model(x, t, **cond)
        sizes, counts = grids.unique(return_counts=True)
        share = {int(g): int(c) / grids.numel() for g, c in zip(sizes, counts, strict=True)}
        return out, [share]  # the call's record: {grid: fraction of the rows}

    def _grid_at(self, timestep: float) -> int:
        """The schedule's sparse grid at an original timestep, from its intervals (host ints; a fractional
        timestep is in the interval of its integer part, as the model's schedule floors it)."""
        for lo, hi, grid in self._intervals:
            if lo <= timestep < hi:
                return grid
        raise ValueError(f"timestep {timestep} outside the schedule's [0, {self._intervals[-1][1]})")

    def flops_per_step(self) -> list[float]:
        """MACs of each model call since `begin`, for one sample row."""
        if not self._calls:
            raise ValueError("flexdit: no model call recorded yet; run a sampling pass first")
        return [sum(frac * self.grid_flops(g) for g, frac in share.items()) for (share,) in self._calls]

    def grid_flops(self, grid: int) -> float:
        if grid not in self._per_grid:
            self._per_grid[grid] = model_flops(self.model, grid)
        return self._per_grid[grid]

    def grids(self) -> list[dict[int, float]]:
        """{grid: fraction of rows} of each model call since `begin`."""
        return [share for (share,) in self._calls]

    def static_flops(self) -> float:
        """MACs of the static network on one sample (the baseline of the speedup)."""
        return flops.count(self.backend.arch, self.model.input_size, vae_downsample=1).total
