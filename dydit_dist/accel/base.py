"""The sampling-time method interface, and the runners that change nothing (static) or use DyDiT's fast path.

A runner is callable like the static network and keeps per-run state (`accel.methods.build_runner`
builds one by name):

    runner = build_runner("eb_cache", model, EBCacheOptions(schedule=..., eps_scale="paper"))
    runner.begin(num_steps)                         # before every sampling run (every batch)
    x0 = sample(cfg_model_fn(runner, 1.5), shape, steps=num_steps, step_callback=runner.step_callback, ...)
    runner.flops_per_step()                         # MACs of each model call of that run, per sample row
    runner.mean_flops()

FLOPs are counted by `dydit_dist.flops` for ONE row of the batch and one model call (classifier-free
guidance runs two rows per image). Every runner keeps the rows of a batch independent: caches hold
each row's own features, token pruning ranks each row's own tokens (a fixed count per batch).
"""

from __future__ import annotations

import torch

from dydit_dist.flops import BlockActivity
from dydit_dist.models import run_blocks

from .backend import Backend, BlockRecord


class Runner:
    """Base runner: `__call__(x, t, **cond)`, `begin`, `step_callback`, `flops_per_step`, `mean_flops`.

    Subclasses implement `forward(x, t, cond) -> (output, records)` where `records` is one
    `BlockRecord` per block (`Backend.record`), and `reset()` to drop per-run state.
    """

    method = "static"
    needs_steps = False  # True: begin() and step_callback() are required (caching, DSAP)

    def __init__(self, backend: Backend):
        self.backend = backend
        self.num_steps: int | None = None
        self.step: int | None = None  # index of the current sampling step (0 = noisiest)
        self.timestep: float | None = None  # its original timestep (0..999; fractional under dpm-solver)
        self._calls: list[list[BlockRecord]] = []
        self._grid: tuple[int, int] | None = None

    @property
    def model(self):
        return self.backend.model

    def begin(self, num_steps: int) -> None:
        """Start a sampling run of `num_steps` model calls: drop caches and the FLOPs record."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        self.num_steps = num_steps
        self.step = self.timestep = None
        self._calls = []
        self.reset()

    def reset(self) -> None:
        """Drop per-run state (caches); called by `begin`."""

    def step_callback(self, i: int, t: float) -> None:
        """Called by `sample` before model call i (0 = noisiest step) at original timestep t.

        Step 0 starts a new FLOPs record (a runner that needs no `begin` still reports per run).
        """
        if self.num_steps is not None and not 0 <= i < self.num_steps:
            raise ValueError(f"step {i} outside the run of {self.num_steps} steps started by begin()")
        if i == 0:
            self._calls = []
        self.step, self.timestep = int(i), t

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        if self.needs_steps:
            if self.num_steps is None:
                raise ValueError(f"{self.method}: call runner.begin(num_steps) before sampling")
            if self.step is None:
                raise ValueError(f"{self.method}: call runner.step_callback(i, t) before each model call "
                                 "(pass step_callback=runner.step_callback to sample())")
        self._grid = self.backend.set_grid(x)
        out, records = self.forward(x, t, cond)
        if records is not None:
            self._calls.append(records)
        self.step = self.timestep = None  # the next call needs its own step_callback (a stale timestep would pick its plan)
        return out.float()  # under autocast: the guidance mix and the sampler's step in fp32

    def forward(self, x, t, cond) -> tuple[torch.Tensor, list[BlockRecord] | None]:
        raise NotImplementedError

    def compile(self, **compile_kwargs) -> None:
        """Run this runner's network through `torch.compile` (`sample.compile: true`)."""
        raise ValueError(f"sample.compile: method {self.method!r} has no compiled path; "
                         "valid with static, dydit, and fora / eb_cache on a DyDiT")

    def flops_per_step(self) -> list[float]:
        """MACs of each model call of the current run (since `begin` or step 0), for one sample row."""
        if not self._calls:
            raise ValueError(f"{self.method}: no model call recorded yet; run a sampling pass first")
        kept = [rec.keep for records in self._calls for rec in records if rec.keep is not None]
        values = iter(torch.stack(kept).tolist() if kept else [])  # one host read for all the calls
        return [self.backend.count(records, self._grid, values) for records in self._calls]

    def mean_flops(self) -> float:
        per_step = self.flops_per_step()
        return sum(per_step) / len(per_step)


class StaticRunner(Runner):
    """The un-accelerated network (a DyDiT's or FlexDiT's `static_forward`: the pretrained network on its weights)."""

    method = "static"

    def __init__(self, backend: Backend):
        super().__init__(backend)
        self._forward = getattr(self.model, "static_forward", self.model)

    def compile(self, **compile_kwargs) -> None:
        self._forward = torch.compile(self._forward, **compile_kwargs)

    def forward(self, x, t, cond):
        return self._forward(x, t, **cond), [BlockRecord(BlockActivity()) for _ in range(self.backend.depth)]


class FastPathRunner(Runner):
    """DyDiT's fast path (only active heads, groups and tokens computed), with its FLOPs recorded."""

    method = "dydit"

    def __init__(self, backend: Backend):
        if not backend.dynamic:
            raise ValueError(f"method 'dydit' needs a DyDiT / DyPixArt model, got {type(backend.model).__name__}")
        super().__init__(backend)

    def compile(self, **compile_kwargs) -> None:
        self.backend.fast.compile(**compile_kwargs)

    def forward(self, x, t, cond):
        backend, model = self.backend, self.model
        # A sampler shares one timestep per call; without step_callback the first row's is read (a host sync).
        timestep = self.timestep if self.timestep is not None else t[0].item()
        if self.timestep is None and not bool((t == timestep).all()):
            return backend.fast(x, t, **cond), None  # rows at several timesteps: grouped by FastPath, not counted
        # 1. Input
        inp = model.embed(x, t, **cond)
        # 2. Blocks on the active heads, groups and tokens only
        branches = backend.branches(timestep)
        tokens = run_blocks(model.blocks, inp, branches)
        # 3. Output
        return model.head(tokens, inp), [backend.record(i, branches) for i in range(backend.depth)]
