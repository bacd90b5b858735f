"""The SD-XL AT-EDM benchmark: its lockstep loop is the plain DDIM loop for each UNet, and its smoke run."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch

from dydit_dist.accel import ATEDMOptions
from dydit_dist.accel.at_edm_unet import UNetPruner, unet_inputs
from dydit_dist.accel.sdxl_synthetic import random_unet

_spec = importlib.util.spec_from_file_location("sdxl_at_edm", Path(__file__).parents[1] / "benchmarks" / "sdxl_at_edm.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_lockstep_is_each_unets_own_ddim_loop():
    torch.set_num_threads(1)
    static = random_unet()
    pruned, zero = copy.deepcopy(static), copy.deepcopy(static)
    pruners = {"pruned": UNetPruner(pruned, ATEDMOptions(ratio=0.5), 16),
               "zero": UNetPruner(zero, ATEDMOptions(ratio=0.0), 16)}
    cond = unet_inputs(static, 16, batch=2, text_tokens=8, generator=torch.Generator().manual_seed(0))
    noise = cond.pop("sample")[:1]
    cond.pop("timestep")
    with torch.no_grad():
        state = bench.lockstep({"static": static, "pruned": pruned, "zero": zero}, pruners, noise, cond, 3, 5.0, "cpu")
        for name, unet in (("static", static), ("pruned", pruned)):  # the same loop written plainly
            sched, x = bench.scheduler(3), noise.clone()
            if name in pruners:
                pruners[name].begin(3)
            for i, t in enumerate(sched.timesteps):
                if name in pruners:
                    pruners[name].step = i
                uncond, text = unet(torch.cat([x, x]), t, **cond).sample.chunk(2)
                x = sched.step(uncond + 5.0 * (text - uncond), t, x).prev_sample
            assert torch.equal(state[name]["x"], x)
    assert torch.equal(state["zero"]["x"], state["static"]["x"])  # ratio 0: the unpruned UNet exactly
    assert not torch.allclose(state["pruned"]["x"], state["static"]["x"])


def test_smoke_run_reports_every_row():
    result = bench.main(["--smoke"])
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["static (unpruned UNet)"]["rel_l2"] == 0.0 and rows["static (unpruned UNet)"]["flops_saved"] == 0.0
    for name, row in rows.items():
        if name.startswith("AT-EDM"):
            assert 0 < row["flops_saved"] < 1 and row["flops_ideal_speedup"] > 1 and row["rel_l2"] > 0
