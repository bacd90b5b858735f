"""Every runner's reported FLOPs are what torch actually computes: torch's FlopCounterMode, per model call.

The runners report MACs from their own records (`backend.record`, FlexDiT's grid); a runner that
computed the full network and then dropped or masked part of it would still report the saving. Here
each model call of a sampling run is counted by torch (math SDPA, so attention shows up as matmuls)
and compared with the runner's figure for that step, exactly: torch counts no LayerNorm, so the test
charges LayerNorm nothing (`flops.LAYERNORM_OPS`), and a DyDiT's width plan (a few routers on one row per
call) is added to the runner's figure.
"""

from __future__ import annotations

import pytest
import torch
from model_util import randomize_, torch_macs

from dydit_dist import flops
from dydit_dist.accel import build_runner
from dydit_dist.accel.synthetic import randomize_routers, randomize_zero_init
from dydit_dist.diffusion import sample
from dydit_dist.dynamic import DyDiT, DyPixArt, FlexDiT, FlexOptions
from dydit_dist.models import DiT, build_model

STEPS = 6
AT_EDM = {"ratio": 0.5, "score_layer": 0, "dense_last": 1, "dsap_fraction": 0.0}


def _dit():
    model = build_model("debug", input_size=8, num_classes=10)
    randomize_zero_init(model, torch.Generator().manual_seed(0))
    return model.eval(), (2, 4, 8, 8), {"y": torch.tensor([1, 3])}


def _pixart():
    model = build_model("PixArt-debug", input_size=8, caption_channels=16, model_max_length=6)
    randomize_zero_init(model, torch.Generator().manual_seed(0))
    cond = {"y": torch.randn(2, 1, 6, 16, generator=torch.Generator().manual_seed(2)),
            "mask": torch.tensor([[1] * 6, [1] * 3 + [0] * 3])}
    return model.eval(), (2, 4, 8, 8), cond


def _dynamic(build):
    def make():
        static, shape, cond = build()
        model = (DyPixArt if hasattr(static, "t_block") else DyDiT).from_static(static)
        randomize_routers(model, torch.Generator().manual_seed(1))
        return model.eval(), shape, cond

    return make


def _flexdit():
    torch.manual_seed(0)
    static = randomize_(DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=4,
                            num_classes=10), std=0.1)
    model = FlexDiT.from_static(static, FlexOptions(layout="PCSRDD", grid_sizes=(6, 4), num_intervals=2))
    return model.eval(), (2, 4, 16, 16), {"y": torch.tensor([1, 7])}


CASES = {
    "static-dit": (_dit, "static", None),
    "fora-dit": (_dit, "fora", {"interval": 3}),
    "eb_cache-dit": (_dit, "eb_cache", {"schedule": "012012", "eps_scale": "none"}),
    "at_edm-dit": (_dit, "at_edm", AT_EDM),
    "at_edm_single-dit": (_dit, "at_edm", {**AT_EDM, "variant": "single"}),
    "dydit": (_dynamic(_dit), "dydit", None),
    "eb_cache-dydit": (_dynamic(_dit), "eb_cache", {"schedule": "020202", "eps_scale": "none"}),
    "at_edm-dydit": (_dynamic(_dit), "at_edm", AT_EDM),
    "static-pixart": (_pixart, "static", None),
    "dydit-pixart": (_dynamic(_pixart), "dydit", None),
    "fora-pixart": (_pixart, "fora", {"interval": 2}),
    "flexdit": (_flexdit, "flexdit", None),
}


def _counted_run(runner, shape, cond) -> list[float]:
    """Sample STEPS DDPM steps through `runner`; torch's MACs of each model call, per sample row."""
    macs = []

    def counted(x, t, **kwargs):
        total, out = torch_macs(lambda: runner(x, t, **kwargs))
        macs.append(total / x.shape[0])
        return out

    runner.begin(STEPS)
    sample(counted, shape, "ddpm", STEPS, torch.Generator().manual_seed(5), model_kwargs=cond,
           step_callback=runner.step_callback)
    return macs


def _width_plan_macs(model, rows: int) -> float:
    """What a DyDiT's fast path computes once per call besides the network, per sample row: its width plan
    (`FastPath.plan`: the timestep embedder and every block's two width routers on one row), which the
    runners leave uncounted (under 0.01% of a DiT-XL/2 call)."""
    d, heads, depth = model.blocks[0].attn.proj.weight.shape[0], model.blocks[0].attn.num_heads, len(model.blocks)
    embedder = sum(m.weight.numel() for m in model.t_embedder.mlp if isinstance(m, torch.nn.Linear))
    return (embedder + 2 * depth * d * (heads - 1)) / rows


@pytest.mark.parametrize("case", list(CASES))
def test_reported_flops_are_the_flops_torch_counts(case, monkeypatch):
    """Exactly, with LayerNorm (which torch does not count) charged nothing: the tolerance of the LayerNorm
    ops (~1% of a debug network) let a forgotten router or merge-layer charge through."""
    monkeypatch.setattr(flops, "LAYERNORM_OPS", 0)
    build, method, options = CASES[case]
    model, shape, cond = build()
    runner = build_runner(method, model, options)
    counted = _counted_run(runner, shape, cond)
    reported = runner.flops_per_step()
    static = flops.count(flops.arch_of(model), tuple(shape[-2:]), vae_downsample=1)  # latent size, no VAE
    plan = _width_plan_macs(model, shape[0]) if "dydit" in case else 0.0
    cached = (options or {}).get("schedule", "")  # EB-Cache: state 2 reuses every block, plans nothing
    assert len(reported) == len(counted) == STEPS
    for step, (rep, got) in enumerate(zip(reported, counted, strict=True)):
        planned = 0.0 if cached[step:step + 1] == "2" else plan
        assert rep + planned == pytest.approx(got, abs=1.0), (
            f"{case} step {step}: reported {rep:.0f} MACs (+ {planned:.0f} of the width plan), torch counted {got:.0f}")
    if method != "static":  # the method saves work torch can see, not just work it reports saved
        assert sum(counted) < 0.95 * STEPS * static.total, (case, counted, static.total)
