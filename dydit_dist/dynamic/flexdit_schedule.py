"""FlexDiT's token density over depth and timesteps: the block layout (`parse_layout`) and the sparse grid g
(g x g sparse tokens) used at each t. Torch is imported only where tensors are made, so the config
reads `FlexOptions` and the layout without it.

The pruning rate r = 1 - M/N (M = g*g sparse tokens, N dense tokens) is `r_min` for t < `ramp_start`*T
and rises linearly to `r_max` at t = T (FlexDiT, arXiv 2412.06028, Sec. 3.3: noisy inputs need fewer
tokens). It is made piecewise constant so that a batch shares one grid: [0, T) is cut into
`num_intervals` equal intervals and interval k uses the largest allowed grid whose token count fits
the budget N * (1 - r) at the interval's midpoint (the pruning rate is at least r there).

    schedule = FlexOptions().schedule(16)        # DiT-XL/2 at 256px: grids 10, 9, 8, 7, 6
    schedule.intervals()                         # [(0, 200, 10), (200, 400, 9), ..., (800, 1000, 6)]
    schedule.grid(t)                             # (B,) long: each sample's grid

With the defaults each of the five grids covers a fifth of the timesteps; that is the schedule whose
FLOPs average (uniform over t, like the 250 respaced DDPM steps) matches the paper's 68 G (256px),
235 G (512px) and 91.6 G (PixArt-alpha), counted as the paper's table counts (every multiply-accumulate,
attention scores included, in the released op order; the released logs count by fvcore's rules, which
leave the scores out); see `flexdit_flops` for the numbers and the alternatives.

In training, rank k of W draws its timesteps from [k*T/W, (k+1)*T/W) (`flexdit_timestep_interval`):
the ranks together still draw t uniformly, and when W is a multiple of `num_intervals` every rank's
batch shares one grid. Otherwise a batch may straddle two grids and the model runs it in two groups.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PAPER_GRID_SIZES = (10, 9, 8, 7, 6)
_LAYOUT_RE = re.compile(r"P*D*(CS*RD*)*")


def default_layout(depth: int) -> str:
    """Paper-shaped layout for `depth` blocks: ~1/14 Poolingformer at the bottom, as many dense at the
    top, the rest in SDTMs of ~6 blocks (C, S..., R, D). depth 28 -> "PP" + "CSSSRD" * 4 + "DD"."""
    pool = round(depth / 14)
    middle = depth - 2 * pool
    modules = max(1, round(middle / 6))
    if middle < 3 * modules:
        raise ValueError(f"depth {depth} is too shallow for a FlexDiT layout (an SDTM needs at least C, R, D)")
    sizes = [middle // modules + (k < middle % modules) for k in range(modules)]
    return "P" * pool + "".join("C" + "S" * (s - 3) + "RD" for s in sizes) + "D" * pool


def parse_layout(layout: str | None, depth: int) -> str:
    """Validated layout string of length `depth` (None: `default_layout(depth)`)."""
    if layout is None:
        return default_layout(depth)
    layout = layout.replace(" ", "").upper()
    if len(layout) != depth:
        raise ValueError(f"FlexDiT layout {layout!r} has {len(layout)} blocks; the model has depth {depth}")
    if not _LAYOUT_RE.fullmatch(layout):
        raise ValueError(f"FlexDiT layout {layout!r} must read P* D* (C S* R D*)*: Poolingformers at the bottom, "
                         "then sparse-dense modules, each opened by C and closed by R; D dense blocks anywhere after")
    return layout



@dataclass(frozen=True)
class FlexOptions:
    """The FlexDiT part of a model: block layout and the timestep schedule of the sparse grid (the
    `model.flexdit` section of the config).

    layout: a letter per block (`flexdit.parse_layout`); None: `flexdit.default_layout(depth)`.
    grid_sizes: the allowed sparse g x g grids, from the least pruned (r_min side) to the most pruned.
    r_min / r_max: pruning rates 1 - M/N; None takes them from the first / last grid size.
    ramp_start: r rises linearly from r_min to r_max over [ramp_start * T, T).
    num_intervals: [0, T) is cut into this many equal intervals, one grid each (`ray.num_workers`: a multiple).
    """

    layout: str | None = None
    grid_sizes: tuple[int, ...] = field(default=PAPER_GRID_SIZES, metadata={"range": "[1, inf)"})
    r_min: float | None = field(default=None, metadata={"range": "[0, 1)"})
    r_max: float | None = field(default=None, metadata={"range": "[0, 1)"})
    ramp_start: float = field(default=0.25, metadata={"range": "[0, 1)"})
    num_intervals: int = field(default=5, metadata={"range": "[1, inf)"})

    def __post_init__(self):
        object.__setattr__(self, "grid_sizes", tuple(int(g) for g in self.grid_sizes))
        sizes = self.grid_sizes
        if not sizes:
            raise ValueError("grid_sizes must list at least one sparse grid size")
        if list(sizes) != sorted(set(sizes), reverse=True):
            raise ValueError(f"grid_sizes {list(sizes)} must be distinct and decreasing (least pruned first)")
        if not 0.0 <= self.ramp_start < 1.0:
            raise ValueError(f"ramp_start={self.ramp_start} must be in [0, 1)")
        if self.num_intervals < 1:
            raise ValueError(f"num_intervals={self.num_intervals} must be >= 1")

    def schedule(self, token_grid: int, num_timesteps: int = 1000) -> GridSchedule:
        """The schedule of these options on a `token_grid` x `token_grid` dense token grid."""
        return GridSchedule(token_grid, self, num_timesteps)


@dataclass(frozen=True)
class GridSchedule:
    """Sparse grid per timestep of `options` for a square `token_grid` x `token_grid` dense token grid."""

    token_grid: int
    options: FlexOptions = FlexOptions()
    num_timesteps: int = 1000

    def __post_init__(self):
        sizes = self.grid_sizes
        if any(not 1 <= g <= self.token_grid for g in sizes):
            raise ValueError(f"grid_sizes {list(sizes)} must lie in 1..{self.token_grid} (the dense token grid "
                             f"is {self.token_grid}x{self.token_grid}); set model.flexdit.grid_sizes")
        if self.num_timesteps < self.num_intervals:
            raise ValueError(f"num_intervals={self.num_intervals} must be in 1..num_timesteps={self.num_timesteps}")
        lo, hi = self.rates
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"pruning rates must satisfy 0 <= r_min <= r_max < 1, got r_min={lo}, r_max={hi}")

    @property
    def grid_sizes(self) -> tuple[int, ...]:
        return self.options.grid_sizes

    @property
    def num_intervals(self) -> int:
        return self.options.num_intervals

    @property
    def num_tokens(self) -> int:
        return self.token_grid**2

    @property
    def rates(self) -> tuple[float, float]:
        """(r_min, r_max), defaults filled in from the grid sizes."""
        n = self.num_tokens
        o = self.options
        lo = 1.0 - o.grid_sizes[0] ** 2 / n if o.r_min is None else float(o.r_min)
        hi = 1.0 - o.grid_sizes[-1] ** 2 / n if o.r_max is None else float(o.r_max)
        return lo, hi

    def pruning_rate(self, t: float) -> float:
        """The continuous schedule r(t): r_min before ramp_start*T, then linear up to r_max at T."""
        lo, hi = self.rates
        start = self.options.ramp_start * self.num_timesteps
        if t < start:
            return lo
        return lo + (hi - lo) * min(1.0, (t - start) / (self.num_timesteps - start))

    def grid_for_rate(self, rate: float) -> int:
        """The largest allowed grid within the token budget N * (1 - rate); the smallest grid if none fits."""
        budget = self.num_tokens * (1.0 - rate)
        fitting = [g for g in self.grid_sizes if g * g <= budget + 1e-6]
        return max(fitting) if fitting else self.grid_sizes[-1]

    def intervals(self) -> list[tuple[int, int, int]]:
        """[(t_lo, t_hi, grid)] covering [0, T): the piecewise-constant schedule, adjacent equal grids merged."""
        T, K = self.num_timesteps, self.num_intervals
        out: list[tuple[int, int, int]] = []
        for k in range(K):
            lo, hi = k * T // K, (k + 1) * T // K
            g = self.grid_for_rate(self.pruning_rate((k + 0.5) * T / K))
            if out and out[-1][2] == g:
                out[-1] = (out[-1][0], hi, g)
            else:
                out.append((lo, hi, g))
        return out

    def table(self) -> torch.Tensor:
        """(T,) long: the grid of every integer timestep."""
        import torch  # at call time: the config reads FlexOptions and the layout without torch

        table = torch.empty(self.num_timesteps, dtype=torch.long)
        for lo, hi, g in self.intervals():
            table[lo:hi] = g
        return table

    def grid(self, t: torch.Tensor | int | float) -> torch.Tensor:
        """Grid of each timestep: t (B,) (any real dtype; fractional t rounds down) -> (B,) long."""
        import torch

        t = torch.as_tensor(t)
        idx = t.detach().to("cpu").floor().long().clamp(0, self.num_timesteps - 1)
        return self.table()[idx.reshape(-1)].reshape(idx.shape)


def flexdit_timestep_interval(rank: int, world_size: int, schedule: GridSchedule | int) -> tuple[int, int]:
    """[lo, hi) of the timesteps rank `rank` of `world_size` trains on: the rank's equal share of [0, T).

    schedule: a `GridSchedule` or the number of timesteps T. Together the ranks draw t uniformly over
    [0, T) (the DiT loss, unbiased); with world_size a multiple of the schedule's intervals each rank's
    batch shares one grid size.
    """
    T = schedule.num_timesteps if isinstance(schedule, GridSchedule) else int(schedule)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..world_size-1 (world_size={world_size})")
    if world_size > T:
        raise ValueError(f"world_size={world_size} exceeds the {T} timesteps: some rank would have none")
    return rank * T // world_size, (rank + 1) * T // world_size
