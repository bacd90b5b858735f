"""FlexDiT: conversion keeps the pretrained weights, the full-grid sparse path is the pretrained network,
exact reorderings, the timestep schedule, grouped batches, FLOPs against the paper, the sampling runner."""

import pytest
import torch
import torch.nn.functional as F
from model_util import randomize_

from dydit_dist import config, flops
from dydit_dist.accel import build_runner
from dydit_dist.diffusion import sample
from dydit_dist.dynamic.flexdit import (
    FlexBranches,
    FlexDiT,
    FlexOptions,
    FlexPixArt,
    default_layout,
    parse_layout,
    pool_tokens,
    pooled_attention,
    upsample_tokens,
)
from dydit_dist.dynamic.flexdit_flops import RELEASED, flexdit_flops, model_flops, paper_comparison
from dydit_dist.dynamic.flexdit_schedule import GridSchedule, flexdit_timestep_interval
from dydit_dist.dynamic.keys import FLEXDIT_KEY_PATTERNS
from dydit_dist.models import DiT, PixArt, block_forward, load_into
from dydit_dist.models.layers import Attention

DIT_KW = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=4, num_classes=10)
PIXART_KW = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=4,
                 caption_channels=16, model_max_length=6)
# 8x8 dense tokens; t < 500 -> 6x6 sparse tokens, t >= 500 -> 4x4
OPTIONS = FlexOptions(layout="PCSRDD", grid_sizes=(6, 4), num_intervals=2)


def _static(family):
    torch.manual_seed(0)
    if family == "dit":
        return randomize_(DiT(**DIT_KW), std=0.1), {"y": torch.tensor([1, 7, 3])}
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    return randomize_(PixArt(**PIXART_KW), std=0.1), {"y": torch.randn(3, 1, 6, 16), "mask": mask}


def _convert(static):
    return (FlexDiT if isinstance(static, DiT) else FlexPixArt).from_static(static, OPTIONS)


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_converted_model_is_the_pretrained_one_plus_w1_w2(family):
    static, _ = _static(family)
    flex = _convert(static)
    own, pretrained = flex.state_dict(keep_vars=True), static.state_dict(keep_vars=True)
    added = sorted(set(own) - set(pretrained))
    assert added == [f"blocks.3.merged_layer{j}.{w}" for j in (1, 2) for w in ("bias", "weight")]
    assert all(own[k] is v for k, v in pretrained.items())  # the same tensors: shared, not copied
    w1, w2 = flex.blocks[3].merged_layer1, flex.blocks[3].merged_layer2
    assert torch.equal(w1.weight, torch.zeros(32, 32)) and torch.equal(w2.weight, torch.eye(32))
    assert not w1.bias.any() and not w2.bias.any()
    assert {id(p) for p in flex.merge_parameters()} == {id(own[k]) for k in added}

    # A static checkpoint loads into a fresh FlexDiT with exactly W1 and W2 missing, and only then.
    fresh = type(flex)(**static.constructor_kwargs(), flexdit=OPTIONS)
    assert sorted(load_into(fresh, static.state_dict(), allow_missing=FLEXDIT_KEY_PATTERNS).missing) == added
    with pytest.raises(ValueError, match="missing keys"):
        load_into(fresh, static.state_dict())


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_full_grid_sparse_path_reproduces_the_pretrained_blocks(family):
    """With g = the token grid, pooling is the identity: the cross-attention block (sparse queries,
    dense keys) and the sparse blocks are the pretrained blocks they were initialised from."""
    static, cond = _static(family)
    flex = _convert(static).eval()
    x, t = torch.randn(3, 4, 16, 16), torch.tensor([10, 700, 300])
    inp = flex.embed(x, t, **cond)
    tokens = inp.tokens
    assert torch.equal(pool_tokens(tokens, inp.grid, 8), tokens)
    ref = tokens
    for i in (1, 2):  # C, S
        ref = static.blocks[i](ref, inp)
    branches = FlexBranches(flex.layout, inp.grid, 8)
    out = block_forward(flex.blocks[1], 1, tokens, inp, branches)
    assert branches.dense is tokens
    out = block_forward(flex.blocks[2], 2, out, inp, branches)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_all_dense_layout_is_the_static_network(family):
    static, cond = _static(family)
    flex = type(_convert(static)).from_static(static, FlexOptions(layout="DDDDDD", grid_sizes=(6, 4))).eval()
    x, t = torch.randn(3, 4, 16, 16), torch.tensor([10, 700, 300])
    torch.testing.assert_close(flex(x, t, **cond), static.eval()(x, t, **cond), rtol=1e-5, atol=1e-6)


def test_reordered_ops_equal_the_papers_op_order():
    torch.manual_seed(0)
    attn, h = Attention(32, num_heads=4), torch.randn(2, 64, 32)
    # Poolingformer: a uniform attention map (softmax of ones) over V, then proj, on every token
    v = F.linear(h, attn.qkv.weight[64:], attn.qkv.bias[64:]).reshape(2, 64, 4, 8).transpose(1, 2)
    uniform = torch.ones(2, 4, 64, 64).softmax(dim=-1) @ v
    ref = attn.proj(uniform.transpose(1, 2).reshape(2, 64, 32))
    torch.testing.assert_close(pooled_attention(attn, h).unsqueeze(1).expand(-1, 64, -1), ref, rtol=1e-5, atol=1e-6)
    # Pooling is AdaptiveAvgPool2d; W1 before nearest upsampling equals W1 after it
    image = h.transpose(1, 2).reshape(2, 32, 8, 8)
    sparse = pool_tokens(h, (8, 8), 3)
    torch.testing.assert_close(sparse, torch.nn.AdaptiveAvgPool2d(3)(image).flatten(2).transpose(1, 2))
    w1 = torch.nn.Linear(32, 32)
    up = F.interpolate(sparse.transpose(1, 2).reshape(2, 32, 3, 3), size=(8, 8), mode="nearest")
    ref = w1(up.flatten(2).transpose(1, 2))
    torch.testing.assert_close(upsample_tokens(w1(sparse), (8, 8)), ref, rtol=0, atol=0)


def test_schedule_gives_the_documented_grid_per_t():
    s = GridSchedule(token_grid=16)  # DiT-XL/2 at 256px
    assert s.intervals() == [(0, 200, 10), (200, 400, 9), (400, 600, 8), (600, 800, 7), (800, 1000, 6)]
    assert s.grid(torch.tensor([0, 199, 200, 399.5, 400, 650, 999])).tolist() == [10, 10, 9, 9, 8, 7, 6]
    r_min, r_max = s.rates
    assert (r_min, r_max) == (1 - 100 / 256, 1 - 36 / 256)
    assert s.pruning_rate(0) == s.pruning_rate(249) == r_min and s.pruning_rate(1000) == r_max
    assert s.pruning_rate(625) == pytest.approx((r_min + r_max) / 2)
    assert [g for *_, g in GridSchedule(token_grid=32).intervals()] == [10, 9, 8, 7, 6]  # 512px: the same grids
    assert OPTIONS.schedule(8).intervals() == [(0, 500, 6), (500, 1000, 4)]

    # Per-rank timestep intervals: together [0, T), each inside one grid when world % intervals == 0.
    for world in (5, 10):
        spans = [flexdit_timestep_interval(r, world, s) for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == 1000
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert all(len(set(s.grid(torch.arange(lo, hi)).tolist())) == 1 for lo, hi in spans)
    with pytest.raises(ValueError, match="rank 2"):
        flexdit_timestep_interval(2, 2, s)
    with pytest.raises(ValueError, match="must lie in 1..8"):
        GridSchedule(token_grid=8)
    with pytest.raises(ValueError, match="decreasing"):
        FlexOptions(grid_sizes=(6, 8)).schedule(16)


def test_layouts():
    assert default_layout(28) == "PP" + "CSSSRD" * 4 + "DD"
    assert default_layout(12) == "P" + "CSSRD" * 2 + "D"
    assert default_layout(4) == "CSRD"
    assert parse_layout("pp cssrd", 7) == "PPCSSRD"
    for bad in ("PCSDD", "CSRP", "RCSD"):
        with pytest.raises(ValueError, match="must read"):
            parse_layout(bad, 5 if len(bad) == 5 else 4)
    with pytest.raises(ValueError, match="depth 6"):
        parse_layout("PCSRD", 6)


def test_batch_with_several_grids_runs_in_groups():
    static, cond = _static("dit")
    flex = randomize_(_convert(static), seed=1, std=0.1).eval()  # W1, W2 non-trivial too
    x, t = torch.randn(3, 4, 16, 16), torch.tensor([100, 900, 300])  # grids 6, 4, 6
    assert flex.grids_for(t).tolist() == [6, 4, 6]
    out = flex(x, t, **cond)
    for b in range(3):
        one = flex(x[b:b + 1], t[b:b + 1], y=cond["y"][b:b + 1])
        torch.testing.assert_close(out[b:b + 1], one, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(flex(x, t, **cond, grid=4)[0], out[0])


def test_the_residual_stream_stays_fp32_under_bf16_autocast(monkeypatch):
    """After a recovery block the stream was the bf16 sum of two Linear outputs, and every block after R
    accumulated in bf16 (the static DiT's stream stays fp32: its fp32 position embedding promotes it)."""
    from dydit_dist.dynamic.flexdit import FlexBranches

    static, cond = _static("dit")
    flex = randomize_(_convert(static), seed=1, std=0.1).eval()
    dtypes = []
    enter = FlexBranches.enter
    monkeypatch.setattr(FlexBranches, "enter", lambda self, i, block, tokens, mod: (
        dtypes.append((self.layout[i], tokens.dtype)), enter(self, i, block, tokens, mod))[1])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        flex(torch.randn(2, 4, 16, 16), torch.tensor([100, 100]), y=cond["y"][:2])
    assert dtypes == [(role, torch.float32) for role in OPTIONS.layout]  # the stream each block enters with


# fvcore's table rows of the released runs (changsn/SparseDiT logs/log_{256x256,512x512}.txt, l. 31-):
# a Poolingformer, token_merge (C), the 3 semantic blocks (S), token_recover (R), a normal block (D),
# down_sample.pooling (its 4 calls) and the model.
RELEASED_LOG_ROWS = {
    "flexdit_xl2_256_released": (256, {"P": "3.483G", "C": "1.539G", "SSS": "3.083G", "R": "4.258G",
                                       "D": "4.087G", "pool": "1.18M", "model": "67.632G"}),
    "flexdit_xl2_512_released": (512, {"P": "14.815G", "C": "3.581G", "SSS": "3.083G", "R": "16.496G",
                                       "D": "16.325G", "pool": "4.719M", "model": "0.22T"}),
}


def _fvcore_size(x: float) -> str:
    """A count as fvcore's `flop_count_table` prints it: 3 decimals in the largest unit below it."""
    for above, scale, unit in ((1e11, 1e12, "T"), (1e8, 1e9, "G"), (1e5, 1e6, "M"), (1e2, 1e3, "K")):
        if x > above:
            return f"{x / scale:.3f}".rstrip("0").rstrip(".") + unit
    return str(x)


@pytest.mark.parametrize("preset", sorted(RELEASED_LOG_ROWS))
def test_fvcore_counting_reproduces_the_released_logs(preset):
    """Fused attention scores uncounted, the Poolingformer's ones @ V counted, pooling and upsampling one
    op per element: the released fvcore tables row for row, as printed."""
    size, log = RELEASED_LOG_ROWS[preset]
    opts = config.load(preset).model.flexdit
    layout, grid, total = RELEASED["DiT-XL/2", size]
    assert (opts.layout, opts.grid_sizes) == (layout, (grid,))
    report = flexdit_flops("DiT-XL/2", size, grid, layout, op_order="paper", counting="fvcore")
    block = [sum(b.values()) for b in report.per_block]
    s = layout.index("S")
    ours = {"P": block[layout.index("P")], "C": block[layout.index("C")], "SSS": sum(block[s:s + 3]),
            "R": block[layout.index("R")], "D": block[-1], "pool": report.by_component["pool"],
            "model": report.total}
    assert {k: _fvcore_size(v) for k, v in ours.items()} == log
    assert abs(report.gflops / total - 1) < 5e-5  # `RELEASED`; at 512 the sum of the printed rows
    # The analytic count (attention scores in, ones @ V out) misses the logs by over 1%
    assert flexdit_flops("DiT-XL/2", size, grid, layout, op_order="paper").gflops / total - 1 > 0.01


def test_flops_against_the_paper():
    rows = {(r["model"], r["image_size"]): r for r in paper_comparison()}
    for row in rows.values():
        assert abs(row["static"] / row["paper_static"] - 1) < 0.005, row
        assert row["implemented"] < row["static"] and row["fvcore"] < row["static"]
    for key, (_, _, log) in RELEASED.items():
        assert abs(rows[key]["released"]["fvcore"] / log - 1) < 5e-5
    # The paper's table follows the analytic count in its op order (the convention of its static
    # baselines): our grid schedule is within 2% of all three; by fvcore's rules (the released logs') it
    # is 6% below at 512px, so the two published sources cannot share one convention.
    for row in rows.values():
        assert abs(row["paper"] / row["paper_flexdit"] - 1) < 0.02, row
        assert row["implemented"] < row["paper"]  # exact reorderings only remove work
    assert abs(rows["DiT-XL/2", 256]["fvcore"] / 68.0 - 1) < 0.01
    assert rows["DiT-XL/2", 512]["fvcore"] / 235.0 - 1 < -0.05
    with pytest.raises(ValueError, match="op_order='paper'"):
        flexdit_flops("DiT-XL/2", 256, 8, counting="fvcore")

    # Exact reorderings only remove work
    for g in (6, 10):
        assert flexdit_flops("DiT-XL/2", 256, g).total < flexdit_flops("DiT-XL/2", 256, g, op_order="paper").total
    full = flexdit_flops("DiT-XL/2", 256, 16, "D" * 28)
    assert full.total == flops.count("DiT-XL/2", 256).total
    # At the full grid the C and S blocks cost exactly the dense blocks they came from
    sparse = flexdit_flops("DiT-XL/2", 256, 16, "CSSSRD" * 4 + "D" * 4)
    assert sparse.per_block[0] == {**full.per_block[0], "norm": full.per_block[0]["norm"] + 4 * 256 * 1152}
    assert sparse.per_block[1] == full.per_block[1]


def test_runner_records_grids_and_flops():
    static, cond = _static("dit")
    model = _convert(static).eval()
    runner = build_runner("flexdit", model)
    runner.begin(4)
    out = sample(runner, (3, 4, 16, 16), "ddpm", 4, generator=torch.Generator().manual_seed(0),
                 model_kwargs=cond, step_callback=runner.step_callback)
    assert torch.isfinite(out).all()
    assert runner.grids() == [{4: 1.0}, {4: 1.0}, {6: 1.0}, {6: 1.0}]  # t = 999, 666, 333, 0
    assert runner.mean_flops() == pytest.approx((model_flops(model, 4) + model_flops(model, 6)) / 2)
    assert model_flops(model, 4) < model_flops(model, 6) < runner.static_flops()
    with pytest.raises(ValueError, match="eval mode"):
        build_runner("flexdit", model.train())
