"""AT-EDM token pruning (both variants; the default per_layer unless named): G-WPR by hand, recovery,
exactness at ratio 0, the single variant's DSAP, shapes, FLOPs, DyDiT and PixArt, row independence."""

from __future__ import annotations

import pytest
import torch

from dydit_dist.accel import ATEDMOptions, Backend, BlockRecord, ScoringBranches, build_runner, gwpr, recover
from dydit_dist.accel.synthetic import randomize_routers, randomize_zero_init
from dydit_dist.diffusion import sample
from dydit_dist.dynamic import DyDiT
from dydit_dist.flops import BlockActivity
from dydit_dist.models import build_model


def dit(depth_name="debug"):
    model = build_model(depth_name, input_size=8, num_classes=10)
    randomize_zero_init(model, torch.Generator().manual_seed(0))
    return model.eval()


OPTS = dict(score_layer=0, dense_last=1, dsap_fraction=0.0)


def test_gwpr_matches_a_hand_computation():
    # Row i = where query i attends. Token 2 receives most attention, token 0 least.
    a = torch.tensor([[0.2, 0.3, 0.5],
                      [0.1, 0.4, 0.5],
                      [0.0, 0.5, 0.5]])
    # s0 = 1/3 each; s1_j = sum_i a_ij / 3 = [0.1, 0.4, 0.5]
    # s2_j = sum_i a_ij s1_i: [0.2*.1 + .1*.4 + 0, .3*.1 + .4*.4 + .5*.5, .5*.1 + .5*.4 + .5*.5] = [.06, .44, .5]
    torch.testing.assert_close(gwpr(a[None], 1)[0], torch.tensor([0.1, 0.4, 0.5]))
    torch.testing.assert_close(gwpr(a[None], 2)[0], torch.tensor([0.06, 0.44, 0.5]))
    assert gwpr(a[None], 7).sum().item() == pytest.approx(1.0)


def test_the_ranking_runs_in_full_fp32_on_cuda_too(monkeypatch):
    """G-WPR's scores are all near 1/N: the ranking and the copy recovery's similarities run with autocast off
    and, on CUDA, TF32 off (its 10-bit mantissa swaps near-tied tokens), whatever `sample.tf32` set. Here the
    CPU tensors' device is taken for CUDA's when the precision switches are set."""
    from dydit_dist import precision
    from dydit_dist.accel import at_edm

    seen = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *args: seen.append(
        (torch.backends.cuda.matmul.allow_tf32, torch.is_autocast_enabled("cpu"))) or bmm(*args))
    monkeypatch.setattr(at_edm, "exact_fp32", lambda device: precision.exact_fp32(torch.device("cuda")))
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as sample.tf32 sets it
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            gwpr(torch.softmax(torch.randn(2, 6, 6), dim=-1), 2)
            at_edm.nearest_kept(torch.randn(2, 6, 4), torch.tensor([[0, 1, 2]] * 2), torch.tensor([[3, 4, 5]] * 2))
        assert seen == [(False, False)] * 3 and torch.backends.cuda.matmul.allow_tf32  # restored after
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("dynamic", [False, True])
def test_explicit_attention_of_the_scoring_layer_matches_the_fused_one(dynamic):
    model = dit()
    if dynamic:
        model = DyDiT.from_static(model)
        randomize_routers(model, torch.Generator().manual_seed(1))
        model.eval()
    backend = Backend(model)
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 300)
    inp = model.embed(x, t, torch.tensor([1, 2]))
    branches = backend.branches(300)
    scoring = ScoringBranches(branches)
    mod = model.blocks[1].modulation(inp)
    with torch.no_grad():
        out = scoring.attn(1, model.blocks[1], inp.tokens, mod)
        torch.testing.assert_close(out, branches.attn(1, model.blocks[1], inp.tokens, mod), rtol=1e-5, atol=1e-5)
    attn_map = scoring.attn_map
    assert attn_map.shape == (2, 16, 16)
    torch.testing.assert_close(attn_map.sum(-1), torch.ones(2, 16))


def test_recovery_restores_every_position():
    features = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]]])  # (1, 4, 2)
    keep_idx, drop_idx = torch.tensor([[1, 0]]), torch.tensor([[2, 3]])
    kept = torch.tensor([[[5.0, 5.0], [7.0, 7.0]]])  # the kept tokens (positions 1 and 0) after more blocks
    frozen = recover(features, kept, keep_idx, drop_idx, "freeze")
    torch.testing.assert_close(frozen, torch.tensor([[[7.0, 7.0], [5.0, 5.0], [0.9, 0.1], [0.1, 0.9]]]))
    copied = recover(features, kept, keep_idx, drop_idx, "copy")
    # token 2 is most like token 0 (now [7, 7]); token 3 most like token 1 (now [5, 5])
    torch.testing.assert_close(copied, torch.tensor([[[7.0, 7.0], [5.0, 5.0], [7.0, 7.0], [5.0, 5.0]]]))


def run(model, runner, steps=3, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    y = torch.arange(batch) % 10
    if runner is not None:
        runner.begin(steps)
    return sample(runner if runner is not None else model, x.shape, "ddim", steps, noise=x, model_kwargs={"y": y},
                  step_callback=None if runner is None else runner.step_callback)


def test_zero_ratio_is_exactly_the_plain_network():
    model = dit()
    runner = build_runner("at_edm", model, ATEDMOptions(ratio=0.0, **OPTS))
    static = build_runner("static", model)
    assert torch.equal(run(model, runner), run(model, None))
    assert torch.equal(run(model, static), run(model, None))
    # The scoring cost (G-WPR: iterations * N^2 MACs, plus the copy recovery's similarity matmul) is charged
    # only by a block that drops tokens; "a step with nothing to prune runs the plain network, unchanged"
    # (accel.at_edm), so at ratio 0 there is no scoring cost and every step costs exactly the static network.
    assert len(static.flops_per_step()) == 3 and min(static.flops_per_step()) > 0
    assert runner.flops_per_step() == static.flops_per_step()


@pytest.mark.parametrize("recovery", ["copy", "freeze"])
def test_pruned_forward_keeps_shapes_and_saves_flops(recovery):
    model = dit()
    runner = build_runner("at_edm", model, ATEDMOptions(ratio=0.5, recovery=recovery, **OPTS))
    static = build_runner("static", model)
    out = run(model, runner)
    plain = run(model, static)
    assert out.shape == plain.shape and torch.isfinite(out).all()
    assert not torch.equal(out, plain)
    assert runner.mean_flops() < 0.85 * static.mean_flops()


def test_single_variant_dsap_prunes_nothing_in_the_early_steps():
    model = dit()
    options = ATEDMOptions(ratio=0.5, score_layer=0, dense_last=1, dsap_fraction=0.5, variant="single")
    assert [options.ratio_at(i, 4) for i in range(4)] == [0.0, 0.0, 0.5, 0.5]
    runner = build_runner("at_edm", model, options)
    run(model, runner, steps=4)
    per_step = runner.flops_per_step()
    assert per_step[0] == per_step[1] > per_step[2] == per_step[3]


def test_pruning_runs_on_the_dydit_fast_path():
    model = DyDiT.from_static(dit())
    randomize_routers(model, torch.Generator().manual_seed(1))
    model.eval()
    dydit = build_runner("dydit", model)
    pruned = build_runner("at_edm", model, ATEDMOptions(ratio=0.5, **OPTS))
    exact = build_runner("at_edm", model, ATEDMOptions(ratio=0.0, **OPTS))
    assert torch.equal(run(model, exact), run(model, dydit))
    out = run(model, pruned)
    assert torch.isfinite(out).all() and pruned.mean_flops() < dydit.mean_flops()


def test_pruning_runs_on_pixart():
    model = build_model("PixArt-debug", input_size=8, caption_channels=16, model_max_length=6)
    randomize_zero_init(model, torch.Generator().manual_seed(0))
    model.eval()
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 400)
    cond = {"y": torch.randn(2, 1, 6, 16), "mask": torch.tensor([[1] * 6, [1] * 2 + [0] * 4])}
    runner = build_runner("at_edm", model, ATEDMOptions(ratio=0.25, **OPTS))
    runner.begin(1)
    runner.step_callback(0, 400)
    out = runner(x, t, **cond)
    assert out.shape == model(x, t, **cond).shape and torch.isfinite(out).all()
    assert runner.mean_flops() < build_runner("static", model).backend.count([BlockRecord(BlockActivity())] * 4, (4, 4))


def test_rows_are_ranked_independently():
    model = dit()
    outs = []
    for batch in (3, 1):
        runner = build_runner("at_edm", model, ATEDMOptions(ratio=0.5, **OPTS))
        outs.append(run(model, runner, batch=batch))
    torch.testing.assert_close(outs[0][:1], outs[1], rtol=1e-5, atol=1e-5)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="ratio"):
        ATEDMOptions(ratio=1.0)
    with pytest.raises(ValueError, match="recovery"):
        ATEDMOptions(recovery="interpolate")
    with pytest.raises(ValueError, match="variant"):
        ATEDMOptions(variant="twice")
    with pytest.raises(ValueError, match="dsap_ratio applies to variant 'single'"):
        ATEDMOptions(dsap_ratio=0.1)
    with pytest.raises(ValueError, match="dsap_layers applies to variant 'per_layer'"):
        ATEDMOptions(variant="single", dsap_layers=0.2)
    with pytest.raises(ValueError, match="leave no block to prune"):
        build_runner("at_edm", dit(), ATEDMOptions(score_layer=2, dense_last=1))
