"""AT-EDM as the paper describes it: G-WPR against numpy, per-layer re-ranking against a plain reference
loop, the DSAP plan (budget conserved, early layers unpruned), exactness at ratio 0, FLOPs, sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_accel_at_edm import run  # one sampling helper for both AT-EDM test files

from dydit_dist import flops
from dydit_dist.accel import ATEDMOptions, ScoringBranches, build_runner, gwpr
from dydit_dist.accel.dsap import (
    SDXL_EARLY_UNPRUNED,
    SDXL_LAYOUT,
    build_plan,
    dit_early_unpruned,
    dit_layout,
    plan_budgets,
    sdxl_reference_plan,
    solve_rate,
)
from dydit_dist.accel.synthetic import randomize_zero_init
from dydit_dist.models import Branches, DiT, block_forward, build_model

OPTS = dict(score_layer=0, dense_last=1)


def dit(depth=4):
    """The debug DiT (hidden 64, 4 heads, 4 x 4 tokens), `depth` blocks deep."""
    model = build_model("debug", input_size=8, num_classes=10) if depth == 4 else DiT(
        input_size=8, patch_size=2, hidden_size=64, depth=depth, num_heads=4, num_classes=10)
    randomize_zero_init(model, torch.Generator().manual_seed(0))
    return model.eval()


def numpy_power_iteration(a: np.ndarray, iterations: int) -> np.ndarray:
    """PageRank's power iteration written out: s_j <- sum_i s_i a_ij, from the uniform vector."""
    s = np.full(a.shape[0], 1.0 / a.shape[0])
    for _ in range(iterations):
        s = np.array([sum(s[i] * a[i, j] for i in range(a.shape[0])) for j in range(a.shape[1])])
    return s


def test_gwpr_matches_numpy_power_iteration_and_the_stationary_vector():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 6))
    a = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # a softmax attention map, rows = queries
    for iterations in (1, 3, 8):
        np.testing.assert_allclose(gwpr(torch.tensor(a)[None], iterations)[0].numpy(),
                                   numpy_power_iteration(a, iterations), rtol=1e-12)
    # many iterations converge to the left eigenvector of eigenvalue 1 (the stationary distribution)
    values, vectors = np.linalg.eig(a.T)
    stationary = np.real(vectors[:, np.argmax(np.real(values))])
    np.testing.assert_allclose(gwpr(torch.tensor(a)[None], 200)[0].numpy(), stationary / stationary.sum(), atol=1e-10)


def test_gwpr_and_the_copy_recovery_rank_in_fp32_under_bf16_autocast():
    """Sampling runs under bf16 autocast: there the scores, all near 1/N, would collapse to a few values (and
    the ranking's ties keep the first tokens in raster order); G-WPR and the nearest-kept search leave it."""
    from dydit_dist.accel.at_edm import nearest_kept

    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(2, 256, 256, generator=g), dim=-1)
    feats = torch.randn(2, 256, 32, generator=g)
    keep, drop = torch.arange(128).expand(2, -1), torch.arange(128, 256).expand(2, -1)
    exact = gwpr(attn, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = gwpr(attn, 5)
        nearest = nearest_kept(feats, keep, drop)
        assert torch.bmm(attn, attn).dtype == torch.bfloat16  # what autocast would have done to them
    assert scores.dtype == torch.float32 and torch.equal(scores, exact) and len(scores[0].unique()) == 256
    assert torch.equal(nearest, nearest_kept(feats, keep, drop))


def reference_per_layer(model, x, t, y, counts, first_dense, iterations, recovery):
    """One pruned call written plainly: each pruning block ranks its own tokens (numpy G-WPR), keeps the
    top ones, and the dropped ones are put back in reverse order before the dense tail."""
    inp = model.embed(x, t, y)
    tokens = inp.tokens
    stack = []
    for i in range(first_dense):
        nxt = counts[i + 1] if i + 1 < first_dense else counts[i]
        if nxt == tokens.shape[1]:
            tokens = block_forward(model.blocks[i], i, tokens, inp)
            continue
        scoring = ScoringBranches(Branches())
        tokens = block_forward(model.blocks[i], i, tokens, inp, scoring)
        rows_keep, rows_drop, rows_fill = [], [], []
        for b in range(tokens.shape[0]):
            score = numpy_power_iteration(scoring.attn_map[b].double().numpy(), iterations)
            order = np.argsort(-score, kind="stable")
            keep, drop = order[:nxt], order[nxt:]
            if recovery == "copy":
                unit = F.normalize(tokens[b], dim=-1)
                fill = (unit[drop] @ unit[keep].T).argmax(-1)
            else:
                fill = tokens[b, drop]
            rows_keep.append(keep), rows_drop.append(drop), rows_fill.append(fill)
        stack.append((rows_keep, rows_drop, rows_fill))
        tokens = torch.stack([tokens[b, rows_keep[b]] for b in range(tokens.shape[0])])
    for rows_keep, rows_drop, rows_fill in reversed(stack):
        full = []
        for b in range(tokens.shape[0]):
            row = torch.empty(len(rows_keep[b]) + len(rows_drop[b]), tokens.shape[-1])
            row[rows_keep[b]] = tokens[b]
            row[rows_drop[b]] = tokens[b, rows_fill[b]] if recovery == "copy" else rows_fill[b]
            full.append(row)
        tokens = torch.stack(full)
    for i in range(first_dense, len(model.blocks)):
        tokens = block_forward(model.blocks[i], i, tokens, inp)
    return model.head(tokens, inp)


@pytest.mark.parametrize("recovery", ["copy", "freeze"])
def test_each_pruning_layer_ranks_on_its_own_attention_map(recovery):
    model = dit(depth=12)
    options = ATEDMOptions(ratio=0.5, score_layer=1, dense_last=2, recovery=recovery, dsap_fraction=0.0)
    runner = build_runner("at_edm", model, options)
    runner.begin(1)
    counts = runner.token_counts(16, 0)
    assert counts[:2] == [16, 16] and counts[-2:] == [16, 16]
    assert sum(a > b for a, b in zip(counts[1:10], counts[2:11], strict=True)) >= 3  # several layers prune
    x, t, y = torch.randn(3, 4, 8, 8), torch.full((3,), 500), torch.tensor([1, 2, 3])
    runner.step_callback(0, 500)
    with torch.no_grad():
        out = runner(x, t, y=y)
        ref = reference_per_layer(model, x, t, y, counts, 10, options.iterations, recovery)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_steps", [10, 50])
def test_dit_plan_conserves_the_budget_and_leaves_early_layers_unpruned(num_steps):
    layout = dit_layout(28, 2, 2, 256, 1152)
    early = dit_early_unpruned(layout, 0.5)
    assert early == frozenset((0, j) for j in range(12))  # 23 pruning layers, the first 12 left alone
    plan = build_plan(layout, 0.5, num_steps, round(0.2 * num_steps), early)
    budgets = plan_budgets(layout, plan)
    assert np.mean(budgets) == pytest.approx(0.5, abs=1e-6)
    uniform = solve_rate(layout, tuple(tuple(j < 23 for j in range(24)) for _ in layout), 0.5)
    e = round(0.2 * num_steps)
    for step, rates in enumerate(plan.rates):
        if step < e:
            assert all(rates[0][j] == 0.0 for j in range(12)) and rates[0][12] == pytest.approx(uniform)
            assert budgets[step] < 0.5
        else:
            assert all(r > uniform for r in rates[0][:23]) and budgets[step] > 0.5
        assert rates[0][23] == 0.0  # the last pruned block never prunes: recovery follows it


def test_sdxl_reference_plan_conserves_the_budget():
    plan = sdxl_reference_plan(0.4)
    budgets = plan_budgets(SDXL_LAYOUT, plan)
    assert len(plan.rates) == 50 and sum(s.layers for s in SDXL_LAYOUT) == 70
    assert np.mean(budgets) == pytest.approx(0.4, abs=1e-6)
    for step in range(10):
        assert all(plan.rates[step][k][j] == 0.0 for k, j in SDXL_EARLY_UNPRUNED)
        assert any(r > 0 for seg in plan.rates[step][4:] for r in seg)
    assert budgets[0] < 0.4 < budgets[10]


def test_runner_token_budget_follows_the_plan():
    runner = build_runner("at_edm", dit(depth=12), ATEDMOptions(ratio=0.4, score_layer=1, dense_last=2))
    runner.begin(10)
    pruned = [np.mean([1 - c / 64 for c in runner.token_counts(64, s)[2:10]]) for s in range(10)]
    assert np.mean(pruned) == pytest.approx(0.4, abs=2 / 64)  # integer token counts
    assert pruned[0] == pruned[1] < pruned[2]


def test_budget_out_of_reach_and_no_late_step_are_refused():
    layout = dit_layout(6, 0, 1, 16, 8)
    with pytest.raises(ValueError, match="no later step"):
        build_plan(layout, 0.5, 2, 2, dit_early_unpruned(layout, 0.5))
    with pytest.raises(ValueError, match="out of reach"):
        build_plan(layout, 0.9, 10, 9, dit_early_unpruned(layout, 1.0))


@pytest.mark.parametrize("variant", ["per_layer", "single"])
def test_zero_ratio_is_exactly_static(variant):
    model = dit()
    runner = build_runner("at_edm", model, ATEDMOptions(ratio=0.0, variant=variant, **OPTS))
    assert torch.equal(run(model, runner, steps=4), run(model, build_runner("static", model), steps=4))


@pytest.mark.parametrize("variant", ["per_layer", "single"])
def test_sampling_end_to_end_saves_flops(variant):
    model = dit()
    runner = build_runner("at_edm", model, ATEDMOptions(ratio=0.5, variant=variant, **OPTS))
    static = build_runner("static", model)
    out, plain = run(model, runner, steps=4), run(model, static, steps=4)
    assert out.shape == plain.shape and torch.isfinite(out).all() and not torch.equal(out, plain)
    assert runner.mean_flops() < static.mean_flops()


def dit_block_macs(n: int, d: int, mlp_hidden: int) -> float:
    """A DiT block at n tokens, written out: adaLN, qkv + proj, QK^T + AV, the MLP, two LayerNorms."""
    return 6 * d * d + 4 * n * d * d + 2 * n * n * d + 2 * n * d * mlp_hidden + flops.LAYERNORM_OPS * d * 2 * n


def test_flops_count_each_block_at_the_tokens_it_carries():
    model = dit(depth=12)
    options = ATEDMOptions(ratio=0.5, score_layer=1, dense_last=2, recovery="freeze", iterations=3, dsap_fraction=0.0)
    runner, static = build_runner("at_edm", model, options), build_runner("static", model)
    run_flops = []
    for r in (runner, static):
        r.begin(1)
        r.step_callback(0, 500)
        with torch.no_grad():
            r(torch.randn(2, 4, 8, 8), torch.full((2,), 500), y=torch.tensor([1, 2]))
        run_flops.append(r.flops_per_step()[0])
    counts, d = runner.token_counts(16, 0), 64
    saved = sum(dit_block_macs(16, d, 4 * d) - dit_block_macs(c, d, 4 * d) for c in counts)
    gwpr_macs = sum(3 * c * c for c, nxt in zip(counts[:9], counts[1:10], strict=True) if nxt < c)
    assert run_flops[0] == pytest.approx(run_flops[1] - saved + gwpr_macs, rel=1e-9)
