"""Host reads per sampling step: the runners' fast paths make none beyond what their method needs.

On a GPU every read of a device value on the host (`.item()`, `.tolist()`, `bool(t)`, `nonzero`,
`unique`, `.cpu()`, ...) waits for the device. The counter below patches those entry points and
counts the outermost calls made inside each model call of a sampling run; a runner fails when a
step exceeds its budget. What a method needs: a DyDiT reads its width plan once per new timestep
(all blocks together) and, with spatial token routing (SDT), each block's kept-token count once
(the router decides it on the block's own input). Caching, FlexDiT and the static path need nothing.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from dydit_dist.accel import build_runner
from dydit_dist.accel.synthetic import randomize_routers, randomize_zero_init
from dydit_dist.diffusion import CounterNoise, sample
from dydit_dist.dynamic import DyDiT, FlexDiT, FlexOptions
from dydit_dist.models import build_model

READS = [(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__",
                                           "nonzero", "unique", "cpu", "numpy", "any", "all")]
READS += [(torch, "nonzero"), (torch, "unique"), (torch, "masked_select"), (torch, "argwhere")]


class SyncCounter:
    """Counts host reads of tensor values while `active`; nested calls (unique calling nonzero) count once."""

    def __init__(self):
        self.active, self.depth, self.count = False, 0, 0
        self.names: list[str] = []

    @contextlib.contextmanager
    def patched(self):
        saved = [(owner, name, getattr(owner, name)) for owner, name in READS]
        for owner, name, original in saved:
            setattr(owner, name, self._wrap(name, original))
        try:
            yield self
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            if self.active and self.depth == 0:
                self.count += 1
                self.names.append(name)
            self.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1

        return counted


def dit():
    model = build_model("debug", input_size=8, num_classes=10)
    randomize_zero_init(model, torch.Generator().manual_seed(0))
    return model.eval()


def dydit():
    model = DyDiT.from_static(dit())
    randomize_routers(model, torch.Generator().manual_seed(1))
    return model.eval()


def flexdit():
    return FlexDiT.from_static(dit(), FlexOptions(grid_sizes=(3, 2), num_intervals=2)).eval()


def syncs_per_step(runner, steps: int = 4) -> list[list[int]]:
    """Host reads inside each model call of two sampling runs (a first batch, then a second one that
    meets the same timesteps again): [[run 1 per step], [run 2 per step]]."""
    counter = SyncCounter()
    per_run = []

    def model_fn(x, t, **cond):
        counter.active, counter.count = True, 0
        try:
            out = runner(x, t, **cond)
        finally:
            counter.active = False
        calls.append(counter.count)
        return out

    with counter.patched():
        for seed in (0, 1):
            calls: list[int] = []
            x = CounterNoise.from_seeds([seed, seed + 10]).draw(0, (2, 4, 8, 8))
            runner.begin(steps)
            sample(model_fn, x.shape, "ddpm", steps, CounterNoise.from_seeds([seed, seed + 10]), noise=x,
                   model_kwargs={"y": torch.tensor([1, 3])}, step_callback=runner.step_callback)
            per_run.append(calls)
    return per_run


class OneRead:
    """A stand-in runner whose every model call makes the host reads of `read(t)` and nothing else: the
    positive control of the counter (a budget of 0 passes silently if the counter stops seeing reads)."""

    def __init__(self, read):
        self.read = read

    def begin(self, steps):
        pass

    def step_callback(self, i, t):
        pass

    def __call__(self, x, t, **cond):
        self.read(t)
        return torch.zeros_like(x)


CONTROLS = [
    ("item", lambda t: t[0].item(), 1),
    ("tolist", lambda t: t.tolist(), 1),
    ("bool", lambda t: bool(t[0] > 0), 1),
    ("unique", lambda t: t.unique(), 1),  # Tensor.unique calls torch.unique: nested, counted once
    ("item and tolist", lambda t: (t[0].item(), t.tolist()), 2),
    ("no read", lambda t: t + 1, 0),
]


@pytest.mark.parametrize("read, per_call", [c[1:] for c in CONTROLS], ids=[c[0] for c in CONTROLS])
def test_the_counter_sees_each_host_read(read, per_call):
    assert syncs_per_step(OneRead(read)) == [[per_call] * 4, [per_call] * 4]


# (name, network, method, options, budget of a step at a new timestep, budget at a known one, exact)
# exact: every step makes exactly its budget of reads. A DyDiT (default options: TDW and SDT in every
# block) needs, by the module docstring, its width plan once per new timestep plus each block's kept-token
# count: exactly 1 + DEPTH reads at a new timestep and DEPTH at a known one. Fewer would mean the counter
# misses reads of the real fast path. eb_cache reuses whole steps (no reads there) and AT-EDM "may" read.
DEPTH = len(dit().blocks)
CASES = [
    ("static", dit, "static", None, 0, 0, True),
    ("dydit", dydit, "dydit", None, 1 + DEPTH, DEPTH, True),
    ("fora", dit, "fora", {"interval": 2}, 0, 0, True),
    ("eb_cache", dit, "eb_cache", {"schedule": "0120"}, 0, 0, True),
    ("eb_cache on dydit", dydit, "eb_cache", {"schedule": "0120"}, 1 + DEPTH, DEPTH, False),
    ("flexdit", flexdit, "flexdit", None, 0, 0, True),
    # AT-EDM may read its pruned-token count once per step (the allowance), never per block.
    ("at_edm", dit, "at_edm", {"score_layer": 0, "dense_last": 1}, 1, 1, False),
]


@pytest.mark.parametrize("name, network, method, options, first_budget, budget, exact", CASES,
                         ids=[c[0] for c in CASES])
def test_host_reads_per_step_within_budget(name, network, method, options, first_budget, budget, exact):
    torch.manual_seed(0)
    first, again = syncs_per_step(build_runner(method, network(), options))
    print(f"{name}: host reads per step, first run {first}, second run {again}")
    assert max(first) <= first_budget, f"{name}: {first} exceeds {first_budget} host reads per step"
    assert max(again) <= budget, f"{name}: {again} exceeds {budget} host reads per step"
    if exact:
        assert (first, again) == ([first_budget] * 4, [budget] * 4), f"{name}: {first}, {again} != its needs"


def test_counting_a_dydit_runs_flops_reads_the_device_once():
    """The FLOPs of a whole sampling run come from the token fractions kept on the device: read in one go
    at the end (not one read per block and step, 7,000 for DiT-XL at 250 steps), and the same numbers."""
    torch.manual_seed(0)
    runner = build_runner("dydit", dydit(), None)
    syncs_per_step(runner)
    counter = SyncCounter()
    with counter.patched():
        counter.active = True
        per_step = runner.flops_per_step()
        counter.active = False
    assert counter.count == 1 and len(per_step) == 4
    one_by_one = [runner.backend.count(records, runner._grid) for records in runner._calls]  # a read per record
    assert per_step == one_by_one and len(set(per_step)) > 1
