"""The sampling-time method interface, and the runners that change nothing (static) or use DyDiT's fast path.

A runner is callable like the static network and keeps per-run state:

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

from collections.abc import Mapping

import torch

from .backend import Backend

METHODS = ("static", "dydit", "fora", "eb_cache", "at_edm", "flexdit")


class Runner:
    """Base runner: `__call__(x, t, **cond)`, `begin`, `step_callback`, `flops_per_step`, `mean_flops`.

    Subclasses implement `forward(x, t, cond) -> (output, activities)` where `activities` is one
    `Backend.activity(...)` dict per block, and `reset()` to drop per-run state.
    """

    method = "static"
    needs_steps = False  # True: begin() and step_callback() are required (caching, DSAP)

    def __init__(self, backend: Backend):
        self.backend = backend
        self.num_steps: int | None = None
        self.step: int | None = None  # index of the current sampling step (0 = noisiest)
        self.timestep: int | None = None  # its original timestep (0..999)
        self._calls: list[list[dict]] = []
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

    def step_callback(self, i: int, t: int) -> None:
        """Called by `sample` before model call i (0 = noisiest step) at original timestep t.

        Step 0 starts a new FLOPs record (a runner that needs no `begin` still reports per run).
        """
        if self.num_steps is not None and not 0 <= i < self.num_steps:
            raise ValueError(f"step {i} outside the run of {self.num_steps} steps started by begin()")
        if i == 0:
            self._calls = []
        self.step, self.timestep = int(i), int(t)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        if self.needs_steps:
            if self.num_steps is None:
                raise ValueError(f"{self.method}: call runner.begin(num_steps) before sampling")
            if self.step is None:
                raise ValueError(f"{self.method}: call runner.step_callback(i, t) before each model call "
                                 "(pass step_callback=runner.step_callback to sample())")
        self._grid = self.backend.set_grid(x)
        out, activities = self.forward(x, t, cond)
        self._calls.append(activities)
        self.step = None  # the next call needs its own step_callback
        return out

    def forward(self, x, t, cond) -> tuple[torch.Tensor, list[dict]]:
        raise NotImplementedError

    def flops_per_step(self) -> list[float]:
        """MACs of each model call of the current run (since `begin` or step 0), for one sample row."""
        if not self._calls:
            raise ValueError(f"{self.method}: no model call recorded yet; run a sampling pass first")
        return [self.backend.count(acts, self._grid) for acts in self._calls]

    def mean_flops(self) -> float:
        per_step = self.flops_per_step()
        return sum(per_step) / len(per_step)


class StaticRunner(Runner):
    """The un-accelerated network (a DyDiT's full-width `static_forward`)."""

    method = "static"

    def forward(self, x, t, cond):
        model = self.model
        out = model.static_forward(x, t, **cond) if self.backend.dynamic else model(x, t, **cond)
        return out, [{} for _ in range(self.backend.depth)]


class FastPathRunner(Runner):
    """DyDiT's own `FastPath` (only active heads, groups and tokens computed), with its FLOPs recorded.

    The token routers' keep fractions are read by forward hooks that live only during a call.
    """

    method = "dydit"

    def forward(self, x, t, cond):
        backend = self.backend
        if not backend.dynamic:
            raise ValueError("method 'dydit' needs a DyDiT / DyPixArt model")
        keeps: list[torch.Tensor] = []
        handles = []
        if backend.sdt:
            for block in self.model.blocks:
                hook = lambda _m, _inp, logits: keeps.append((logits > 0).float().mean())  # noqa: E731
                handles.append(block.token_selection.register_forward_hook(hook))
        try:
            out = backend.fast(x, t, timestep=self.timestep, **cond)  # None: grouped by t
        finally:
            for h in handles:
                h.remove()
        timestep = self.timestep if self.timestep is not None else int(t[0])
        w = backend.step_weights(timestep)
        acts = [backend.activity(i, w, keep=keeps[i] if keeps else None) for i in range(backend.depth)]
        return out, acts


def build_runner(method: str, model, options=None) -> Runner:
    """A runner for `method` on `model` (DiT, PixArt, or a DyDiT / DyPixArt in eval mode).

    options: the method's options dataclass (`FORAOptions`, `EBCacheOptions`, `ATEDMOptions`), a
    plain mapping of its fields, or None for the defaults. On a DyDiT, "fora", "eb_cache" and
    "at_edm" run on top of its fast path (dynamic width and tokens); "static" runs its full width.
    """
    from .at_edm import PruningRunner
    from .cache import CachingRunner
    from .options import ATEDMOptions, EBCacheOptions, FORAOptions, from_mapping

    if method not in METHODS:
        raise ValueError(f"unknown acceleration method {method!r}; valid methods: {', '.join(METHODS)}")
    option_types = {"fora": FORAOptions, "eb_cache": EBCacheOptions, "at_edm": ATEDMOptions}
    if method in option_types:
        cls = option_types[method]
        if options is None or isinstance(options, Mapping):
            options = from_mapping(cls, options)
        elif not isinstance(options, cls):
            raise ValueError(f"method {method!r} takes {cls.__name__}, got {type(options).__name__}")
    elif options is not None:
        raise ValueError(f"method {method!r} takes no options, got {options!r}")
    if model.training:
        raise ValueError("sampling runners need the model in eval mode (model.eval())")
    if method == "flexdit":  # a trained FlexDiT / FlexPixArt; its grid per step comes from its schedule
        from dydit_dist.dynamic.flexdit_runner import FlexDiTRunner

        return FlexDiTRunner(model)
    backend = Backend(model)
    if method == "static":
        return StaticRunner(backend)
    if method == "dydit":
        if not backend.dynamic:
            raise ValueError(f"method 'dydit' needs a DyDiT / DyPixArt model, got {type(model).__name__}")
        return FastPathRunner(backend)
    if method == "at_edm":
        return PruningRunner(backend, options)
    return CachingRunner(backend, options, method=method)
