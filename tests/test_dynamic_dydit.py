"""DyDiT: masked path semantics, fast path == masked path, checkpoint keys, estimator, losses."""

from pathlib import Path

import pytest
import torch

from dydit_dist.accel import build_runner
from dydit_dist.diffusion import cfg_caption_batch, cfg_class_batch, cfg_model_fn, create_diffusion, sample
from dydit_dist.dynamic import (
    ROUTER_KEY_PATTERNS,
    DyDiT,
    DyPixArt,
    FastPath,
    dydit_loss_terms,
    flops_ratio,
    lambda_schedule,
    stratified_timesteps,
)
from dydit_dist.dynamic.losses import block_costs
from dydit_dist.models import DiT, PixArt, load_into

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
DIT_KW = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, num_classes=10)
PIXART_KW = dict(
    input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4,
    caption_channels=16, model_max_length=6,
)


def _randomize(model, router_std=0.0):
    """Non-trivial weights everywhere (official init zeroes adaLN and the output layer)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            is_router = any(k in name for k in ("attn_rate", "mlp_rate", "token_selection"))
            if not is_router:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif router_std:
                p.copy_(torch.randn(p.shape, generator=g) * router_std)
    return model


def _mixed_routers(model, token_bias=0.3):
    """Routers that switch off a mix of heads, groups and tokens, differently per block and timestep."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.blocks:
            for router in (block.attn_rate.router, block.mlp_rate.router):
                router.weight.copy_(torch.randn(router.weight.shape, generator=g))
                router.bias.copy_(torch.randn(router.bias.shape, generator=g))
            head = block.token_selection.mlp_head
            for layer in (head[0], head[2]):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.5)
                layer.bias.zero_()
            head[2].bias.fill_(token_bias)
    return model


def _dit_inputs(batch=4):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 999, 999][:batch])
    y = torch.tensor([1, 2, 3, 10][:batch])
    return x, t, y


def _pixart_inputs(batch=3):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999][:batch])
    y = torch.randn(batch, 1, 6, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]][:batch])
    return x, t, y, mask


# ----------------------------------------------------------------------------- all on == static


def test_fresh_routers_equal_static_dit():
    model = _randomize(DyDiT(**DIT_KW)).eval()
    x, t, y = _dit_inputs()
    result = model(x, t, y)
    assert torch.equal(result.out, model.static_forward(x, t, y))
    assert result.head_masks.shape == (4, 3, 4) and result.token_masks.shape == (4, 3, 16)
    assert bool((result.head_masks == 1).all() and (result.mlp_masks == 1).all() and (result.token_masks == 1).all())


def test_fresh_routers_are_initialized_as_the_official_code():
    """DyDiT models.py `initialize_weights`: xavier-uniform on every Linear (routers too), zero biases, then the
    router biases 15 / 15 / 35. Weights drawn, not zeroed: the logits depend on t and on the token from step 0."""
    torch.manual_seed(0)
    block = DyDiT(**DIT_KW).blocks[1]
    linears = {"attn_rate.router": block.attn_rate.router, "mlp_rate.router": block.mlp_rate.router,
               "token_selection.mlp_head.0": block.token_selection.mlp_head[0],
               "token_selection.mlp_head.2": block.token_selection.mlp_head[2]}
    for name, linear in linears.items():
        fan_out, fan_in = linear.weight.shape
        bound = (6 / (fan_in + fan_out)) ** 0.5
        w = linear.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound, name  # uniform on [-bound, bound]
    assert bool((block.attn_rate.router.bias == 15).all() and (block.mlp_rate.router.bias == 15).all())
    assert bool((block.token_selection.mlp_head[0].bias == 0).all())
    assert bool((block.token_selection.mlp_head[2].bias == 35).all())


def test_fresh_routers_equal_static_in_training_mode():
    """Bias 15 (35 for tokens) against Gumbel noise at temperature 5: every unit stays on."""
    model = _randomize(DyDiT(**DIT_KW)).train()
    x, t, y = _dit_inputs()
    result = model(x, t, y, generator=torch.Generator().manual_seed(0))
    assert bool((result.head_masks == 1).all() and (result.token_masks == 1).all())


def test_fresh_routers_equal_static_pixart():
    model = _randomize(DyPixArt(**PIXART_KW)).eval()
    x, t, y, mask = _pixart_inputs()
    assert torch.equal(model(x, t, y, mask).out, model.static_forward(x, t, y, mask))


def test_from_static_shares_weights_and_matches():
    static = _randomize(DiT(**DIT_KW)).eval()
    dyn = DyDiT.from_static(static).eval()
    assert dyn.blocks[0].attn.qkv.weight is static.blocks[0].attn.qkv.weight
    x, t, y = _dit_inputs()
    assert torch.equal(dyn(x, t, y).out, static(x, t, y))
    static_px = _randomize(PixArt(**PIXART_KW)).eval()
    dyn_px = DyPixArt.from_static(static_px).eval()
    x, t, y, mask = _pixart_inputs()
    assert torch.equal(dyn_px(x, t, y, mask).out, static_px(x, t, y, mask))


# ----------------------------------------------------------------------------- official semantics


def _force(model, heads_on, groups_on, tokens_on: bool):
    """Routers with zero weights whose biases switch units 1.. on/off as given (same for every block)."""
    with torch.no_grad():
        for block in model.blocks:
            for router, on in ((block.attn_rate.router, heads_on), (block.mlp_rate.router, groups_on)):
                router.weight.zero_()
                router.bias.copy_(torch.tensor([10.0 if u in on else -10.0 for u in range(1, 4)]))
            block.token_selection.mlp_head[2].weight.zero_()
            block.token_selection.mlp_head[2].bias.fill_(10.0 if tokens_on else -10.0)


def test_head_mask_acts_before_proj_and_head0_always_on():
    dyn = _randomize(DyDiT(**DIT_KW)).eval()
    _force(dyn, heads_on={2}, groups_on={1, 2, 3}, tokens_on=True)
    x, t, y = _dit_inputs()
    result = dyn(x, t, y)
    assert result.head_masks[0, 0].tolist() == [1, 0, 1, 0]
    # Independent reference: the static model with the off heads' columns of proj zeroed.
    static = DiT(**DIT_KW).eval()
    static.load_state_dict(dyn.state_dict(), strict=False)
    with torch.no_grad():
        for block in static.blocks:
            for head in (1, 3):
                block.attn.proj.weight[:, head * 16 : (head + 1) * 16] = 0
    torch.testing.assert_close(result.out, static(x, t, y), rtol=0, atol=1e-6)


def test_group_mask_acts_on_fc1_output_and_group0_always_on():
    dyn = _randomize(DyDiT(**DIT_KW)).eval()
    _force(dyn, heads_on={1, 2, 3}, groups_on={3}, tokens_on=True)
    x, t, y = _dit_inputs()
    result = dyn(x, t, y)
    assert result.mlp_masks[0, 0].tolist() == [1, 0, 0, 1]
    # Reference: group g owns hidden channels [64g, 64(g+1)) of the 256; zero them in fc1 (rows, bias).
    static = DiT(**DIT_KW).eval()
    static.load_state_dict(dyn.state_dict(), strict=False)
    with torch.no_grad():
        for block in static.blocks:
            for group in (1, 2):
                block.mlp.fc1.weight[group * 64 : (group + 1) * 64] = 0
                block.mlp.fc1.bias[group * 64 : (group + 1) * 64] = 0
    torch.testing.assert_close(result.out, static(x, t, y), rtol=0, atol=1e-6)


def test_token_mask_skips_the_mlp_branch_only():
    dyn = _randomize(DyDiT(**DIT_KW)).eval()
    _force(dyn, heads_on={1, 2, 3}, groups_on={1, 2, 3}, tokens_on=False)
    x, t, y = _dit_inputs()
    result = dyn(x, t, y)
    assert bool((result.token_masks == 0).all())
    # Every token skips every MLP: the static model with the MLP output zeroed; attention unchanged.
    static = DiT(**DIT_KW).eval()
    static.load_state_dict(dyn.state_dict(), strict=False)
    with torch.no_grad():
        for block in static.blocks:
            block.mlp.fc2.weight.zero_()
            block.mlp.fc2.bias.zero_()
    torch.testing.assert_close(result.out, static(x, t, y), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- fast == masked


def test_fast_path_equals_masked_path_dit():
    model = _mixed_routers(_randomize(DyDiT(**DIT_KW))).eval()
    x, t, y = _dit_inputs()
    masked = model(x, t, y)
    off = lambda m: float((m == 0).float().mean())  # noqa: E731
    assert 0 < off(masked.head_masks) < 1 and 0 < off(masked.mlp_masks) < 1 and 0 < off(masked.token_masks) < 1
    fast = FastPath(model)
    torch.testing.assert_close(fast(x, t, y=y), masked.out, rtol=0, atol=1e-4)


def test_fast_path_equals_masked_path_with_guidance():
    model = _mixed_routers(_randomize(DyDiT(**DIT_KW))).eval()
    x, _, y = _dit_inputs()
    x2, y2 = cfg_class_batch(x, y.clamp(max=9), num_classes=10)
    t2 = torch.full((8,), 640)
    masked = cfg_model_fn(lambda a, b, **kw: model(a, b, **kw).out, 4.0)(x2, t2, y=y2)
    fast = cfg_model_fn(FastPath(model), 4.0)(x2, t2, y=y2)
    torch.testing.assert_close(fast, masked, rtol=0, atol=1e-4)
    # A sampler passing the shared timestep (no grouping by t, no host sync) gets the same values.
    shared = FastPath(model)
    told = cfg_model_fn(lambda a, b, **kw: shared(a, b, timestep=640, **kw), 4.0)(x2, t2, y=y2)
    torch.testing.assert_close(told, masked, rtol=0, atol=1e-4)


def test_fast_path_equals_masked_path_pixart():
    model = _mixed_routers(_randomize(DyPixArt(**PIXART_KW))).eval()
    x, t, y, mask = _pixart_inputs()
    masked = model(x, t, y, mask)
    assert 0 < float((masked.head_masks == 0).float().mean()) < 1
    torch.testing.assert_close(FastPath(model)(x, t, y=y, mask=mask), masked.out, rtol=0, atol=1e-4)
    # With guidance: null captions in the second half, one shared timestep.
    x2, y2, m2 = cfg_caption_batch(x, y, model.y_embedder.y_embedding, mask)
    t2 = torch.full((6,), 300)
    ref = cfg_model_fn(lambda a, b, **kw: model(a, b, **kw).out, 4.5, None)(x2, t2, y=y2, mask=m2)
    torch.testing.assert_close(cfg_model_fn(FastPath(model), 4.5, None)(x2, t2, y=y2, mask=m2), ref, rtol=0, atol=1e-4)


def test_fast_path_plans_a_fractional_timestep_as_the_network_embeds_it():
    # dpm-solver calls the network at 949.05: a head whose router logit crosses 0 between 949 and 949.05
    # is on in the masked network; a plan of the rounded timestep (949) left it off.
    model = _mixed_routers(_randomize(DyDiT(**DIT_KW))).eval()
    router = model.blocks[0].attn_rate.router
    with torch.no_grad():
        lo, hi = (router(model.t_embedder(torch.tensor([t])))[0] for t in (949.0, 949.05))
        unit = int((hi - lo).abs().argmax())
        router.bias[unit] -= (lo[unit] + hi[unit]) / 2  # logit 0 halfway between the two timesteps
    fast = FastPath(model)
    assert fast.plan(949.05).heads != fast.plan(949).heads
    x, _, y = _dit_inputs()
    t = torch.full((4,), 949.05)
    masked = model(x, t, y).out
    torch.testing.assert_close(FastPath(model)(x, t, y=y), masked, rtol=0, atol=1e-4)
    # through the sampler and the dydit runner: step 1 of 20 is 949.05
    runner = build_runner("dydit", model)
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    seen = []

    def masked_fn(x, t, y):
        seen.append(float(t[0]))
        return model(x, t, y).out

    ref = sample(masked_fn, noise.shape, "dpm-solver", 20, noise=noise, model_kwargs={"y": y})
    got = sample(runner, noise.shape, "dpm-solver", 20, noise=noise, model_kwargs={"y": y},
                 step_callback=runner.step_callback)
    assert seen[1] == pytest.approx(949.05)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_fast_path_plans_depend_on_timestep_only():
    model = _mixed_routers(_randomize(DyDiT(**DIT_KW))).eval()
    fast = FastPath(model)
    plan = fast.plan(999)
    assert fast.plan(999) is plan
    assert all(h[0] == 0 for h in plan.heads) and all(g[0] == 0 for g in plan.groups)
    masks = model(*_dit_inputs()).head_masks
    assert [tuple(masks[2, i].nonzero().flatten().tolist()) for i in range(3)] == list(plan.heads)


def test_fast_path_keeps_its_sliced_weights_in_the_autocast_dtype(monkeypatch):
    """Under bf16 autocast the slices are cast once when copied out, not by autocast on every call (it caches
    casts of leaf parameters only): the same values as casting per call, in fewer copies per call."""
    import torch.profiler

    from dydit_dist.dynamic import fast as fast_module

    model = _mixed_routers(_randomize(DyDiT(**DIT_KW))).eval()
    x, _, y = _dit_inputs()
    t = torch.full((4,), 640)

    def run(path):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            path(x, t, timestep=640, y=y)  # the plan and the slices
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                out = path(x, t, timestep=640, y=y)
        return out, sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")

    once = FastPath(model)
    out, copies = run(once)
    slices = [s for cache in once._slices for s in cache.values()]
    assert slices and all(s.qkv_w.dtype == s.fc2_w.dtype == torch.bfloat16 for s in slices)
    monkeypatch.setattr(fast_module, "autocast_dtype", lambda device: None)  # as before: fp32 slices
    per_call, per_call_copies = run(FastPath(model))
    assert torch.equal(out, per_call)
    assert copies < per_call_copies


def test_fast_path_refuses_training_mode():
    with pytest.raises(ValueError, match="eval"):
        FastPath(DyDiT(**DIT_KW).train())


# ----------------------------------------------------------------------------- checkpoints


def _tsv(name):
    rows = (REFERENCE / name).read_text().splitlines()[1:]
    return {k: list(map(int, s.strip("[]").split(","))) for k, s in (r.split("\t") for r in rows)}


def test_dydit_xl2_keys_are_official_dit_keys_plus_router_keys():
    with torch.device("meta"):
        model = DyDiT(input_size=32, patch_size=2, hidden_size=1152, depth=28, num_heads=16)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = _tsv("dit_xl2_256_state_dict_keys.tsv") | _tsv("dydit_xl2_256_router_keys.tsv")
    assert ours == expected


def test_static_checkpoint_loads_with_only_router_keys_missing(tmp_path):
    static = _randomize(DiT(**DIT_KW))
    path = tmp_path / "static.pt"
    torch.save(static.state_dict(), path)
    dyn = DyDiT(**DIT_KW)
    from dydit_dist.models import load_state_dict_file

    load_into(dyn, load_state_dict_file(str(path)), allow_missing=ROUTER_KEY_PATTERNS)
    x, t, y = _dit_inputs()
    assert torch.equal(dyn.eval()(x, t, y).out, static.eval()(x, t, y))
    with pytest.raises(ValueError, match=r"does not fit DyDiT(.|\n)*missing keys.*: blocks\.0\.attn_rate\."):
        load_into(DyDiT(**DIT_KW), load_state_dict_file(str(path)))  # router keys are required by default


# ----------------------------------------------------------------------------- training objective


def test_gradients_reach_routers_through_straight_through_estimator():
    model = _randomize(DyDiT(**DIT_KW), router_std=0.1)
    with torch.no_grad():  # logits near 0 so the sigmoid is not saturated
        for block in model.blocks:
            block.attn_rate.router.bias.zero_()
            block.mlp_rate.router.bias.zero_()
            block.token_selection.mlp_head[2].bias.zero_()
    model.train()
    x, _, y = _dit_inputs()
    from dydit_dist.dynamic import DyDiTOptions

    terms = dydit_loss_terms(model, create_diffusion(), x, 5000, DyDiTOptions(), y=y,
                             generator=torch.Generator().manual_seed(0))
    terms["loss"].backward()
    for block in model.blocks:
        assert block.attn_rate.router.weight.grad.abs().sum() > 0
        assert block.mlp_rate.router.weight.grad.abs().sum() > 0
        assert block.token_selection.mlp_head[0].weight.grad.abs().sum() > 0
    assert set(terms) >= {"loss", "diffusion", "complete", "flops", "flops_ratio", "lambda_t"}


def test_flops_ratio_and_loss_follow_the_formula():
    model = DyDiT(**DIT_KW)
    from dydit_dist.dynamic import DynamicOutput

    heads = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float)[None]  # (1, 3, 4)
    groups = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 1]], dtype=torch.float)[None]
    tokens = torch.zeros(1, 3, 16)
    tokens[0, 0, :8] = 1
    tokens[0, 1, :] = 1
    tokens[0, 2, :4] = 1
    result = DynamicOutput(torch.zeros(1), heads, groups, tokens)
    attn, mlp = block_costs(model, 16)
    assert attn == 4 * 16 * 64 * 64 + 2 * 16 * 16 * 64 and mlp == 2 * 16 * 64 * 256
    expected = (attn * (0.5 + 0.25 + 1) + mlp * (0.25 * 0.5 + 1 * 1 + 0.75 * 0.25)) / (3 * (attn + mlp))
    assert float(flops_ratio(model, result)[0]) == pytest.approx(expected)
    # masks out of fp16 / bf16 autocast: the ratio is computed in fp32 (a block's MACs overflow fp16)
    for dtype in (torch.float16, torch.bfloat16):
        low = DynamicOutput(torch.zeros(1), heads.to(dtype), groups.to(dtype), tokens.to(dtype))
        ratio = flops_ratio(model, low)
        assert ratio.dtype == torch.float32 and float(ratio[0]) == pytest.approx(expected, rel=1e-6)


def test_stratified_timesteps_cover_quarters():
    t = stratified_timesteps(64, 1000, torch.Generator().manual_seed(0))
    quarter = torch.arange(64) % 4
    assert bool(((t >= quarter * 250) & (t < (quarter + 1) * 250)).all())


def test_stage_two_drops_the_complete_model_loss():
    from dydit_dist.dynamic import DyDiTOptions

    model = _randomize(DyDiT(**DIT_KW)).train()
    x, _, y = _dit_inputs()
    terms = dydit_loss_terms(model, create_diffusion(), x, 0, DyDiTOptions(stage=2), y=y)
    assert float(terms["complete"]) == 0.0
    terms = dydit_loss_terms(model, create_diffusion(), x, 0, DyDiTOptions(stage=1), y=y)
    assert float(terms["complete"]) > 0.0
    # stage1_steps: stage 1, then stage 2 from that step on, in the same run
    switch = DyDiTOptions(stage=1, stage1_steps=3)
    assert float(dydit_loss_terms(model, create_diffusion(), x, 2, switch, y=y)["complete"]) > 0.0
    assert float(dydit_loss_terms(model, create_diffusion(), x, 3, switch, y=y)["complete"]) == 0.0
    with pytest.raises(ValueError, match="stage1_steps=3 needs stage=1"):
        DyDiTOptions(stage=2, stage1_steps=3)


def test_lambda_schedule_is_the_official_one():
    """DyDiT train.py:261-268: linear from 1 at step 0 to the target at warmup_step, held at 1 below step 100."""
    assert [lambda_schedule(s, 0.5, 100, 1000) for s in (0, 99, 100, 500, 1000, 5000)] == [
        1.0, 1.0, 0.95, 0.75, 0.5, 0.5]
    assert lambda_schedule(2500, 0.7, 100, 5000) == pytest.approx(0.85)
    assert lambda_schedule(10**6, 0.5) == 0.5


# ----------------------------------------------------------------------------- FLOPs and inspection


def test_dynamic_flops_match_the_counter_and_include_routers():
    from dydit_dist import flops
    from dydit_dist.dynamic.dydit_flops import dynamic_flops, flops_of_output, static_flops

    model = DyDiT(**DIT_KW).eval()
    f_static = static_flops(model)
    arch = dict(family="dit", depth=3, hidden_size=64, patch_size=2, num_heads=4)
    assert f_static == flops.count(arch, 8, vae_downsample=1).total
    full = dynamic_flops(model, [1.0] * 3, [1.0] * 3, [1.0] * 3)
    D, H, N = 64, 4, 16
    routers = 3 * (2 * (D * (H - 1)) + N * (D * 4 + 4 * 1))
    assert full == pytest.approx(f_static + routers)
    half = dynamic_flops(model, [0.5] * 3, [0.5] * 3, [1.0] * 3)
    attn, mlp = block_costs(model, N)
    assert full - half == pytest.approx(3 * 0.5 * (attn + mlp))  # attention and MLP scale with width
    result = model(*_dit_inputs())
    assert torch.allclose(flops_of_output(model, result), torch.tensor(full, dtype=torch.float32))


def test_inspect_entry_point_writes_table_and_plot(tmp_path):
    from dydit_dist.dynamic import inspect

    summary = inspect.main(["--model", "debug", "--image-size", "8", "--vae-downsample", "1", "--num-classes",
                            "10", "--steps", "10", "--tokens", "2", "--out", str(tmp_path)])
    assert (tmp_path / "width_vs_timestep.png").stat().st_size > 1000
    assert 0 < summary["ratio"] <= 1.01 and len(summary["per_timestep_gflops"]) == 10


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver", "dpm-solver++"])
def test_inspect_measures_tokens_at_the_timesteps_of_its_sampler(tmp_path, sampler):
    """Token fractions come from sampling with the table's sampler; a timestep without one is an error,
    never a silent 'all tokens kept'."""
    from dydit_dist.dynamic import inspect

    model = inspect.build("debug", 8, None, vae_downsample=1, num_classes=10)
    timesteps = inspect.schedule_timesteps(sampler, 6)
    tokens = inspect.token_fractions(model, timesteps, 2, sampler=sampler)
    assert set(timesteps) <= set(tokens)
    table = inspect.width_table(model, timesteps)
    assert len(inspect.summarize(model, table, tokens)["per_timestep_gflops"]) == 6
    with pytest.raises(ValueError, match="no token fractions measured at timesteps"):
        inspect.summarize(model, table, inspect.token_fractions(model, timesteps, 2))  # ddpm's timesteps


def test_the_width_plan_is_read_with_full_fp32_matmuls_on_cuda():
    """TF32 (sample.tf32, on by default) rounds fp32 matmuls to a 10-bit mantissa: a router logit near 0 would
    give another plan on the GPU than on the CPU. The plan's reads turn it off and restore the setting (the
    evaluation's features too, convolutions included)."""
    from dydit_dist.precision import exact_fp32

    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    before = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = True
        with exact_fp32(torch.device("cuda", 0)):
            assert [f.allow_tf32 for f in flags] == [False, False]
        assert [f.allow_tf32 for f in flags] == [True, True]
        with exact_fp32(torch.device("cpu")):
            assert [f.allow_tf32 for f in flags] == [True, True]  # nothing to change off CUDA
    finally:
        for f, value in zip(flags, before, strict=True):
            f.allow_tf32 = value


def test_the_width_plan_reads_its_routers_under_exact_fp32(monkeypatch):
    import contextlib

    from dydit_dist.dynamic import fast as fast_module

    devices = []
    monkeypatch.setattr(fast_module, "exact_fp32", lambda device: devices.append(device) or contextlib.nullcontext())
    model = _mixed_routers(_randomize(DyDiT(**DIT_KW))).eval()
    FastPath(model).plan(500)
    assert devices == [torch.device("cpu")]


def test_the_fast_path_takes_conditions_by_name():
    """`fast(x, t, y)` would bind the labels to `timestep`: refused by the signature, not a confusing later error."""
    model = _mixed_routers(_randomize(DyDiT(**DIT_KW))).eval()
    x, t, y = _dit_inputs()
    with pytest.raises(TypeError, match="positional"):
        FastPath(model)(x, t, y)
