"""Stable Diffusion XL through diffusers (model.family sdxl): the UNet's DSAP layout, AT-EDM pruning inside
its attention blocks (exact at ratio 0, FLOPs as the plan predicts), and the sample job's SD-XL path on a
tiny random pipeline, per-sample deterministic and evaluated by the coco protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_util import tiny_clip
from sdxl_util import IMAGE_SIZE, VAE_DOWNSAMPLE, tiny_sdxl, tiny_unet

from dydit_dist import config, preflight
from dydit_dist.accel import ATEDMOptions
from dydit_dist.accel.at_edm_unet import UNetPruner, unet_inputs, unet_macs
from dydit_dist.accel.dsap import (
    SDXL_LAYOUT,
    build_plan,
    sdxl_reference_plan,
    unet_early_unpruned,
    unet_layout,
)
from dydit_dist.config import ConfigError
from dydit_dist.models.registry import arch
from dydit_dist.sample import pack, plan_shards, sampling_settings
from dydit_dist.sample.manifest import SamplesManifest
from dydit_dist.sample.pool import shard_generator
from dydit_dist.sample.sdxl import SDXLShardGenerator
from dydit_dist.shardset import write_shard

LATENT = IMAGE_SIZE // VAE_DOWNSAMPLE
PROMPTS = ["a red square", "a blue circle", "green on grey"]


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    return tiny_sdxl(str(tmp_path_factory.mktemp("sdxl")))


def sdxl_config(root, folder, *overrides):
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return config.load("debug", [
        f"storage.root=file://{root}", "storage.run=t", "model.name=SDXL-debug", f"model.checkpoint={folder}",
        f"model.image_size={IMAGE_SIZE}", f"model.vae_downsample={VAE_DOWNSAMPLE}", "sample.sampler=ddim",
        "sample.steps=3", "sample.cfg_scale=5.0", f"sample.prompts={root / 'prompts.txt'}", "sample.precision=fp32",
        "sample.vae_precision=fp32", "sample.batch_size=3", "sample.shard_size=3", "sample.num_samples=4", *overrides])


def test_layout_of_the_released_unet_is_the_reference_layout():
    assert unet_layout(arch("SDXL-base-1.0"), 128) == SDXL_LAYOUT
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # the module agrees with its config: the pruner finds every block's layers
        unet = UNet2DConditionModel(**arch("SDXL-base-1.0"))
    assert UNetPruner(unet, ATEDMOptions(ratio=0.3), 128).layout == SDXL_LAYOUT
    # DSAP's unpruned early layers: the first 20 of the 59 pruning layers are the four down-stage blocks
    preset = config.load("at_edm_sdxl_1024").sample.at_edm
    plan = build_plan(SDXL_LAYOUT, 0.4, 50, preset.early_steps(50), unet_early_unpruned(SDXL_LAYOUT, preset.dsap_layers))
    assert plan == sdxl_reference_plan(0.4)


def test_ratio_zero_is_the_unpruned_unet_exactly():
    x = unet_inputs(tiny_unet(), LATENT, batch=2, text_tokens=16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_unet()(**x).sample
        for variant in ("per_layer", "single"):
            unet = tiny_unet()
            pruner = UNetPruner(unet, ATEDMOptions(ratio=0.0, variant=variant), LATENT)
            pruner.begin(4)
            for step in range(4):
                pruner.step = step
                assert torch.equal(unet(**x).sample, ref)


def predicted_saving(layout, counts_of, rows: int, text_tokens: int, iterations: int) -> float:
    """Multiply-accumulates a pruned step saves (the project's FLOPs, `unet_macs`), written out: per layer at
    width D on n_j of N tokens, the linear layers (q, k, v, out: 4 D^2; cross q, out: 2 D^2; GEGLU FFN
    8 D^2 + 4 D^2), self-attention (2 N^2 D), cross-attention (2 N L D); minus the ranking (G-WPR:
    iterations x N^2) and the copy similarity."""
    saved = 0.0
    for k, seg in enumerate(layout):
        n, d, counts = seg.tokens, seg.width, counts_of(k)
        for j, c in enumerate(counts):
            saved += (n - c) * 18 * d * d + 2 * (n * n - c * c) * d + 2 * (n - c) * text_tokens * d
            keep = counts[j + 1] if j + 1 < len(counts) else c
            if keep < c:
                saved -= iterations * c * c + (c - keep) * keep * d
    return rows * saved


def test_pruning_drops_tokens_and_flops_as_the_plan_says():
    x = unet_inputs(tiny_unet(), LATENT, batch=2, text_tokens=16, generator=torch.Generator().manual_seed(0))
    static = tiny_unet()
    unet = tiny_unet()
    pruner = UNetPruner(unet, ATEDMOptions(ratio=0.5, dsap_fraction=0.5), LATENT)
    pruner.begin(4)
    assert [seg.layers for seg in pruner.layout] == [2, 2, 2, 2]  # down 1, mid, up 0 (x 2)
    # DSAP: the early steps spare the first half of the pruning layers (the down block's and the mid block's)
    assert pruner.counts(0, 64) == pruner.counts(1, 64) == [64, 64] and pruner.counts(2, 64)[1] < 64
    pruner.step = 3
    assert all(pruner.counts(k, 64)[1] < 64 for k in range(4))
    with torch.no_grad():
        out, ref = unet(**x).sample, static(**x).sample
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.allclose(out, ref)
    for step in (0, 3):
        pruner.step = step
        saved = unet_macs(static, **x) - unet_macs(unet, **x)
        expected = predicted_saving(pruner.layout, lambda k: pruner.counts(k, 64), 2, 16, 5)
        assert saved > 0 and saved == pytest.approx(expected, rel=1e-6)


def _independent_pruned_block(block, x, context, counts, iterations):
    """One SD-XL attention block (Transformer2DModel) with AT-EDM written out from the paper's steps, apart
    from the project's code: each layer ranks its tokens by G-WPR on its own head-averaged self-attention
    map, keeps the top `counts[j + 1]` after its FFN; every dropped token finally copies the features of the
    kept token most similar to it when it was dropped (following the chain when that one is dropped later),
    before proj_out."""
    B, C, H, W = x.shape
    h = block.proj_in(block.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C))
    where = torch.arange(H * W).expand(B, -1)  # the grid position of each token carried
    copies = {}  # (row, dropped position) -> the position it copies
    for j, layer in enumerate(block.transformer_blocks):
        a = layer.attn1
        q, k, v = (proj(layer.norm1(h)).unflatten(-1, (a.heads, -1)).transpose(1, 2) for proj in (a.to_q, a.to_k, a.to_v))
        attention = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (B, heads, N, N)
        h = h + a.to_out[1](a.to_out[0]((attention @ v).transpose(1, 2).flatten(2)))
        h = h + layer.attn2(layer.norm2(h), encoder_hidden_states=context)
        h = h + layer.ff(layer.norm3(h))
        keep = counts[min(j + 1, len(counts) - 1)]
        if keep >= h.shape[1]:
            continue
        scores = torch.full((B, h.shape[1]), 1.0 / h.shape[1])
        for _ in range(iterations):  # a token's score: the attention it receives, weighted by its attenders'
            scores = torch.einsum("bi,bij->bj", scores, attention.mean(1))
        order = scores.argsort(dim=1, descending=True, stable=True)
        kept, dropped = order[:, :keep], order[:, keep:]
        unit = torch.nn.functional.normalize(h, dim=-1)
        for b in range(B):
            nearest = (unit[b, dropped[b]] @ unit[b, kept[b]].T).argmax(dim=1)
            for d, n in zip(dropped[b].tolist(), nearest.tolist(), strict=True):
                copies[(b, int(where[b, d]))] = int(where[b, kept[b, n]])
        h = h.gather(1, kept[..., None].expand(-1, -1, h.shape[-1]))
        where = where.gather(1, kept)
    grid = torch.empty(B, H * W, h.shape[-1])
    for b in range(B):
        grid[b, where[b]] = h[b]
        for position in range(H * W):
            source = position
            while (b, source) in copies:
                source = copies[(b, source)]
            grid[b, position] = grid[b, source]
    return block.proj_out(grid).reshape(B, H, W, -1).permute(0, 3, 1, 2) + x


def test_a_pruned_block_equals_the_method_written_out_independently():
    """SD-XL-small's mid block (4 layers) at a late step, on an odd, non-square grid (5 x 7 = 35 tokens) and
    two rows: the pruned block's output is that of the independent version above."""
    import copy

    unet = tiny_unet("SDXL-small")
    reference = copy.deepcopy(unet.mid_block.attentions[0])
    pruner = UNetPruner(unet, ATEDMOptions(ratio=0.5), 16)
    pruner.begin(10)
    pruner.step = 9
    segment = next(k for k, seg in enumerate(pruner.layout) if seg.name == "mid_block.attentions.0")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, reference.config.in_channels, 5, 7, generator=generator)
    context = torch.randn(2, 9, unet.config.cross_attention_dim, generator=generator)
    counts = pruner.counts(segment, 35)
    assert counts[0] == 35 and counts[-1] < 35 and len(set(counts)) > 2  # several layers drop tokens
    with torch.no_grad():
        ours = unet.mid_block.attentions[0](x, encoder_hidden_states=context).sample
        theirs = _independent_pruned_block(reference, x, context, counts, ATEDMOptions().iterations)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_samples_do_not_depend_on_their_batch(tmp_path, pipeline_folder):
    torch.set_num_threads(1)
    latents = {}
    for method in ("static", "at_edm"):
        gen = SDXLShardGenerator(sdxl_config(tmp_path, pipeline_folder, f"sample.method={method}",
                                             "sample.at_edm.ratio=0.5"))
        batch, alone = gen.latents([0, 1, 2]), gen.latents([1])
        assert batch.shape == (3, 4, LATENT, LATENT)
        torch.testing.assert_close(batch[1:2], alone, rtol=1e-3, atol=1e-3)
        assert torch.equal(gen.latents([0, 1, 2]), batch)  # the same batch, the same bits
        latents[method] = batch
    assert not torch.allclose(latents["static"], latents["at_edm"])


def test_the_samplers_end_where_sdxls_euler_scheduler_ends(tmp_path, pipeline_folder):
    """From SD-XL's released scheduler config (`set_alpha_to_one: false`), DDIM takes Euler's updates and
    its last step ends at sigma 0, as the pipeline's default Euler does: the same final latents (it ended
    at sigma 0.029: a relative gap of 1.3e-3 here, noise of std ~0.03 left in every image). DPM-Solver++
    (another, 2nd-order method) ends at sigma 0 too."""
    from diffusers import EulerDiscreteScheduler

    torch.set_num_threads(1)
    gen = SDXLShardGenerator(sdxl_config(tmp_path, pipeline_folder, "sample.sampler=ddim", "sample.steps=8"))
    ours = gen.latents([0, 1])
    gen.pipe.scheduler = EulerDiscreteScheduler.from_config(gen.pipe.scheduler.config)
    euler = gen.latents([0, 1])
    assert float((ours - euler).norm() / euler.norm()) < 1e-4
    dpm = SDXLShardGenerator(sdxl_config(tmp_path, pipeline_folder, "sample.sampler=dpm-solver++")).pipe.scheduler
    dpm.set_timesteps(8)
    assert float(dpm.sigmas[-1]) == 0.0
    # an SD-XL samples folder of before (DDIM ending at sigma 0.029) is other settings; other families' are not
    assert sampling_settings(sdxl_config(tmp_path, pipeline_folder))["scheduler"] == {"set_alpha_to_one": True}
    assert "scheduler" not in sampling_settings(config.load("debug"))
    # DPM-Solver++ folders are those of before (nothing set over the folder's config)
    assert "scheduler" not in sampling_settings(sdxl_config(tmp_path, pipeline_folder, "sample.sampler=dpm-solver++"))


def test_the_guidance_mix_is_fp32_under_bf16_autocast(tmp_path, pipeline_folder):
    """diffusers mixes uncond + scale * (text - uncond) in the dtype the UNet returns: fp32, not bf16."""
    gen = SDXLShardGenerator(sdxl_config(tmp_path, pipeline_folder, "sample.precision=bf16"))
    unet = gen.pipe.unet
    inputs = unet_inputs(unet, LATENT, generator=torch.Generator().manual_seed(0))
    with gen._autocast(), torch.no_grad():
        assert unet(**inputs, return_dict=False)[0].dtype == torch.float32
        assert unet(**inputs).sample.dtype == torch.float32


def test_sample_and_evaluate_end_to_end(tmp_path, pipeline_folder):
    """The sample job's worker (`pool.shard_generator`) writes shards that `jobs.evaluate`'s coco protocol reads."""
    from dydit_dist.eval.digits import DigitsNet
    from dydit_dist.eval.evaluate import evaluate
    from dydit_dist.network import save_weights

    torch.set_num_threads(1)
    clip = tiny_clip(str(tmp_path / "clip"))
    save_weights(DigitsNet(), str(tmp_path / "digits.safetensors"))  # the feature extractor every evaluation loads
    cfg = sdxl_config(tmp_path, pipeline_folder, "sample.method=at_edm", "eval.protocol=coco", "eval.metrics=[clip]",
                      f"eval.clip_model={clip}", "eval.num_actors=0", "eval.batch_size=4",
                      "eval.feature_extractor=digits-cnn", f"eval.feature_extractor_weights={tmp_path / 'digits.safetensors'}")
    gen = shard_generator(cfg, "cpu")
    assert isinstance(gen, SDXLShardGenerator)
    url = f"file://{tmp_path}/runs/t/samples"
    shards = plan_shards(cfg.sample.num_samples, cfg.sample.shard_size)
    manifest = SamplesManifest(sampling_settings(cfg), len(shards))
    for shard in shards:
        samples, timing = gen.generate(shard)
        assert [s.meta["prompt"] for s in samples] == [PROMPTS[k % 3] for k in shard.indices]
        assert all(s.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and s.image.dtype == np.uint8 for s in samples)
        manifest.add({**write_shard(url, shard.index, pack(samples), shard.count, replace=True), "start": shard.start, "timing": timing})
    manifest.stats.update(gen.stats())
    manifest.write(url)
    assert 0 < manifest.stats["gflops"] < unet_macs(tiny_unet(), **unet_inputs(tiny_unet(), LATENT, text_tokens=16)) / 1e9
    record = evaluate(cfg)
    assert set(record["metrics"]) == {"clip_score"} and np.isfinite(record["metrics"]["clip_score"])


def test_bad_inputs_are_named(tmp_path, pipeline_folder):
    (tmp_path / "empty").mkdir()
    cfg = sdxl_config(tmp_path, tmp_path / "empty")
    with pytest.raises(ValueError, match="no model_index.json or unet/config.json"):
        SDXLShardGenerator(cfg)
    plan = preflight.plan(cfg, "sample")
    assert [(i.key, i.problem) for i in plan.problems] == [
        ("model.checkpoint", "not a StableDiffusionXLPipeline folder: no model_index.json, unet/config.json")]
    assert not preflight.plan(sdxl_config(tmp_path, pipeline_folder), "sample").problems
    assert preflight.plan(sdxl_config(tmp_path, pipeline_folder), "finetune").problems[0].key == "model.name"
    with pytest.raises(ConfigError, match="model.family sdxl supports sample.method static or at_edm"):
        sdxl_config(tmp_path, pipeline_folder, "sample.method=fora")
    with pytest.raises(ConfigError, match="sample.sampler='ddpm'"):
        sdxl_config(tmp_path, pipeline_folder, "sample.sampler=ddpm")
    with pytest.raises(ValueError, match="SD-XL UNet"):
        from dydit_dist.models import build_model

        build_model("SDXL-debug")


def test_preset_ratio_saves_the_papers_flops_on_the_released_unet():
    """at_edm_sdxl_1024's ratio: the released UNet's FLOPs (FlopCounterMode, meta device, 128 x 128 latents)
    averaged over the 50 steps' DSAP plans drop by the paper's 38.8%."""
    from diffusers import UNet2DConditionModel

    cfg = config.load("at_edm_sdxl_1024")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch(cfg.model.name))
    x = unet_inputs(unet, cfg.model.input_size, device="meta")
    static = unet_macs(unet, **x)
    pruner = UNetPruner(unet, cfg.sample.at_edm, cfg.model.input_size)
    rates = pruner.plan(cfg.sample.steps)
    pruner.begin(cfg.sample.steps)
    counted = {}
    for step, rate in enumerate(rates):  # two distinct plans: DSAP's early steps and the rest
        pruner.step = step
        if repr(rate) not in counted:
            counted[repr(rate)] = unet_macs(unet, **x)
    assert len(counted) == 2
    mean = sum(counted[repr(r)] for r in rates) / len(rates)
    assert 1 - mean / static == pytest.approx(0.388, abs=0.002)
