"""EB-Cache and FORA: exactness without caching, the semantics of every cache state, schedules, FLOPs."""

from __future__ import annotations

import pytest
import torch

from dydit_dist.accel import (
    RELEASED_TABLE_50,
    EBCacheOptions,
    FORAOptions,
    build_runner,
    eps_scale_at,
    fora_schedule,
    parse_eps_scale,
    parse_schedule,
)
from dydit_dist.accel.synthetic import randomize_routers, randomize_zero_init
from dydit_dist.diffusion import cfg_class_batch, cfg_model_fn, sample
from dydit_dist.dynamic import DyDiT, DyPixArt, FastPath
from dydit_dist.flops import count
from dydit_dist.models import build_model

STEPS = 4


def dit(seed=0):
    torch.manual_seed(seed)  # the initial weights (and a DyDiT's xavier routers) never depend on the tests run before
    model = build_model("debug", input_size=8, num_classes=10)
    randomize_zero_init(model, torch.Generator().manual_seed(seed))
    return model.eval()


def pixart(seed=0):
    torch.manual_seed(seed)
    model = build_model("PixArt-debug", input_size=8, caption_channels=16, model_max_length=6)
    randomize_zero_init(model, torch.Generator().manual_seed(seed))
    return model.eval()


def dynamic(static):
    cls = DyPixArt if hasattr(static, "t_block") else DyDiT
    model = cls.from_static(static)
    randomize_routers(model, torch.Generator().manual_seed(1))
    return model.eval()


def inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    if hasattr(model, "t_block"):
        return x, {"y": torch.randn(batch, 1, 6, 16, generator=g), "mask": torch.tensor([[1] * 6, [1] * 3 + [0] * 3])}
    return x, {"y": torch.tensor([1, 3])}


def run(fn, model, runner=None, steps=STEPS):
    x, cond = inputs(model)
    if runner is not None:
        runner.begin(steps)
    return sample(fn, x.shape, "ddpm", steps, torch.Generator().manual_seed(5), noise=x, model_kwargs=cond,
                  step_callback=None if runner is None else runner.step_callback)


@pytest.mark.parametrize("kind", ["dit", "pixart", "dydit"])
def test_all_zero_schedule_is_exactly_the_plain_network(kind):
    model = {"dit": dit, "pixart": pixart, "dydit": lambda: dynamic(dit())}[kind]()
    plain = FastPath(model) if kind == "dydit" else model
    runner = build_runner("eb_cache", model, EBCacheOptions(schedule="0" * STEPS, eps_scale="none"))
    assert torch.equal(run(runner, model, runner), run(plain, model))


def test_guided_sampling_with_fora_interval_1_is_exact():
    model = dit()
    x, y = cfg_class_batch(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), 10)
    runner = build_runner("fora", model, FORAOptions(interval=1))
    runner.begin(STEPS)
    cached = sample(cfg_model_fn(runner, 1.5), x.shape, "ddim", STEPS, noise=x, model_kwargs={"y": y},
                    step_callback=runner.step_callback)
    plain = sample(cfg_model_fn(model, 1.5), x.shape, "ddim", STEPS, noise=x, model_kwargs={"y": y})
    assert torch.equal(cached, plain)


def reference_call(model, x, t, y, state, cache):
    """The cache semantics written out on a static DiT: -> (output, cache of ungated branch outputs)."""
    inp = model.embed(x, t, y)
    tokens = inp.tokens
    new = []
    for i, block in enumerate(model.blocks):
        mod = block.modulation(inp)
        attn = block.attn_branch(tokens, mod) if state in (0, 3) else cache[i][0]
        tokens = tokens + mod.gate_msa * attn
        mlp = block.mlp_branch(tokens, mod) if state in (0, 1) else cache[i][1]
        tokens = tokens + mod.gate_mlp * mlp
        new.append((attn, mlp))
    return model.head(tokens, inp), new


@pytest.mark.parametrize("schedule", ["0222", "0123", "0312", "0101"])
def test_every_state_reuses_the_branches_of_the_step_that_last_computed_them(schedule):
    model = dit()
    runner = build_runner("eb_cache", model, EBCacheOptions(schedule=schedule, eps_scale="none"))
    runner.begin(len(schedule))
    g = torch.Generator().manual_seed(3)
    y = torch.tensor([2, 7])
    cache = None
    with torch.no_grad():
        for i, state in enumerate(schedule):
            x, t = torch.randn(2, 4, 8, 8, generator=g), torch.full((2,), 900 - 250 * i)
            runner.step_callback(i, int(t[0]))
            got = runner(x, t, y=y)
            expected, cache = reference_call(model, x, t, y, int(state), cache)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
            if state == "2":
                # both branches are the very tensors cached by the last step that computed them
                for held, ref in zip(runner._cache, cache, strict=True):
                    torch.testing.assert_close(held.attn, ref[0], rtol=0, atol=1e-6)
                    torch.testing.assert_close(held.mlp, ref[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["pixart", "dydit"])
def test_cached_steps_run_on_pixart_and_dydit(kind):
    model = pixart() if kind == "pixart" else dynamic(dit())
    plain = run(FastPath(model) if kind == "dydit" else model, model)
    runner = build_runner("eb_cache", model, EBCacheOptions(schedule="0213", eps_scale="none"))
    cached = run(runner, model, runner)
    assert cached.shape == plain.shape and torch.isfinite(cached).all()
    assert not torch.equal(cached, plain)
    full = build_runner("eb_cache", model, EBCacheOptions(schedule="0" * STEPS, eps_scale="none"))
    run(full, model, full)
    # Each cached step costs less than computing fully at the same step: a DyDiT's width follows the
    # timestep, so a step that computes only attention at t=500 may still cost more than a full one at t=999.
    saved, every = runner.flops_per_step(), full.flops_per_step()
    assert saved[0] == every[0] and all(s < f for s, f in zip(saved[1:], every[1:], strict=True))


def test_released_table_parses_and_counts_34_full_steps():
    # aSleepyTree/EB-Cache@eeca502 cache_table.npy as stored, indexed by the sampling loop's step counting
    # down from 49 (src/models.py:188): reversed, it is in sampling order (the counts alone miss a reversal)
    stored = "02202202220202020202020202020000000000000000000000"
    assert RELEASED_TABLE_50 == stored[::-1]
    assert parse_schedule(RELEASED_TABLE_50) == RELEASED_TABLE_50
    assert len(RELEASED_TABLE_50) == 50 and RELEASED_TABLE_50.count("0") == 34
    assert RELEASED_TABLE_50.count("2") == 16 and set(RELEASED_TABLE_50) == {"0", "2"}
    assert EBCacheOptions().schedule_for(50).count("0") == 34
    with pytest.raises(ValueError, match="50 steps but sampling runs 25"):
        EBCacheOptions().schedule_for(25)


@pytest.mark.parametrize("bad, match", [("0124", "characters"), ("2000", "must start"), ("", "non-empty")])
def test_bad_schedules_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_schedule(bad)


def test_fora_schedule():
    def official(num_steps, interval):  # prathebaselva/FORA: the step index counts down to 0
        return "".join("0" if step == num_steps - 1 or step % interval == 0 else "2"
                       for step in range(num_steps - 1, -1, -1))

    for num_steps, interval in ((7, 3), (50, 3), (50, 2), (20, 3), (250, 3), (1, 4), (10, 1)):
        assert fora_schedule(num_steps, interval) == official(num_steps, interval), (num_steps, interval)
    assert FORAOptions(interval=3).schedule_for(5) == "00220"  # the last step (t = 0) is always computed
    assert fora_schedule(50, 3).count("0") == 18 and fora_schedule(50, 3).endswith("0")
    with pytest.raises(ValueError, match="interval"):
        FORAOptions(interval=0)


def test_eps_scale_specs():
    """`paper` divides eps by b(t) (1.0 at T, 0.98 at 0.4T, 0.96 at 0), as the released code divides by its
    delta 0.965, which lies in b's range: the factor grows eps toward t = 0, as the released one does."""
    paper = parse_eps_scale("paper")
    assert eps_scale_at(paper, 1.0) == pytest.approx(1.0)
    assert eps_scale_at(paper, 0.4) == pytest.approx(1 / 0.98)
    assert eps_scale_at(paper, 0.0) == pytest.approx(1 / 0.96)
    assert eps_scale_at(paper, 0.7) == pytest.approx(1 / 0.99, abs=2e-4)  # 1 / b with b linear, to 2e-4
    released = eps_scale_at(parse_eps_scale("released"), 0.0)
    assert eps_scale_at(paper, 0.4) < released < eps_scale_at(paper, 0.0)  # the same direction, the same size
    assert eps_scale_at(parse_eps_scale("released"), 0.3) == pytest.approx(1 / 0.965)
    assert eps_scale_at(parse_eps_scale("const:0.97"), 0.1) == pytest.approx(0.97)
    assert eps_scale_at(parse_eps_scale("none"), 0.5) == 1.0
    with pytest.raises(ValueError, match="eps_scale"):
        parse_eps_scale("sometimes")


def test_correction_scales_only_the_noise_channels():
    model = dit()
    x, cond = inputs(model)
    t = torch.full((2,), 999)  # b(T) of "const:0.9" is 0.9 everywhere
    plain = model(x, t, **cond)
    runner = build_runner("eb_cache", model, {"schedule": "0", "eps_scale": "const:0.9"})
    runner.begin(1)
    runner.step_callback(0, 999)
    out = runner(x, t, **cond)
    torch.testing.assert_close(out[:, :4], plain[:, :4] * 0.9)
    assert torch.equal(out[:, 4:], plain[:, 4:])


def test_flops_per_step_follow_the_schedule():
    model = dit()
    runner = build_runner("fora", model, FORAOptions(interval=3))
    run(runner, model, runner, steps=5)
    per_step = runner.flops_per_step()
    full = count("debug", 8, vae_downsample=1).total
    assert per_step[0] == per_step[1] == per_step[4] == full  # schedule "00220"
    assert per_step[2] == per_step[3] < 0.2 * full  # only embedders, adaLN and head
    assert runner.mean_flops() == pytest.approx(sum(per_step) / 5)


def test_dydit_flops_count_the_active_units():
    model = dynamic(dit())
    fast = build_runner("dydit", model)
    cached = build_runner("eb_cache", model, EBCacheOptions(schedule="0" * STEPS, eps_scale="none"))
    run(fast, model, fast)
    run(cached, model, cached)
    assert fast.flops_per_step() == pytest.approx(cached.flops_per_step())
    assert fast.mean_flops() < 0.9 * count("debug", 8, vae_downsample=1).total


def test_rows_are_independent_of_their_batch_companions():
    model = dit()
    x, cond = inputs(model)
    outs = []
    for rows in (slice(0, 2), slice(0, 1)):
        runner = build_runner("eb_cache", model, EBCacheOptions(schedule="0213", eps_scale="paper"))
        runner.begin(4)
        outs.append(sample(runner, (x[rows].shape), "ddim", 4, noise=x[rows], model_kwargs={"y": cond["y"][rows]},
                           step_callback=runner.step_callback))
    # float32 matmul kernels may block a 1-row and a 2-row batch differently (more so after an earlier test
    # changed the thread count): ~1e-5 differences; a row mixed with its companion would be far off.
    torch.testing.assert_close(outs[0][:1], outs[1], rtol=1e-4, atol=1e-4)


def test_misuse_is_reported():
    model = dit()
    x, cond = inputs(model)
    t = torch.full((2,), 10)
    runner = build_runner("eb_cache", model, EBCacheOptions(schedule="02", eps_scale="none"))
    with pytest.raises(ValueError, match="begin"):
        runner(x, t, **cond)
    runner.begin(2)
    with pytest.raises(ValueError, match="step_callback"):
        runner(x, t, **cond)
    with pytest.raises(ValueError, match="2 steps but sampling runs 3"):
        runner.begin(3)
    with pytest.raises(ValueError, match="valid methods: static, dydit, fora, eb_cache, at_edm"):
        build_runner("deepcache", model)
    with pytest.raises(ValueError, match="unknown EBCacheOptions keys"):
        build_runner("eb_cache", model, {"schedul": "00"})
    with pytest.raises(ValueError, match="DyDiT"):
        build_runner("dydit", model)
