"""PixArt / PixArtMS against diffusers' PixArtTransformer2DModel, and the official key list."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers_convert import pixart_diffusers_config, pixart_from_diffusers, pixart_to_diffusers
from model_util import randomize_

from dydit_dist.models import PixArt, PixArt_models, PixArtMS, build_model

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
            caption_channels=16, model_max_length=8)  # fmt: skip
TINY_MS = {**TINY, "hidden_size": 48}  # PixArtMS splits D into three size embeddings
MASK = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1, 0, 0]])


def read_keys_tsv(name: str) -> dict[str, list[int]]:
    path = REFERENCE / name
    if not path.exists():  # a missing key list fails: the checkpoint-compatibility check must not vanish into skips
        raise FileNotFoundError(f"reference data not found at {path}; the official checkpoints' key lists live in "
                                f"../shared/reference beside the checkout (see the README)")
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    return {key: [int(s) for s in shape.strip("[]").split(",")] for key, shape in rows}


def _inputs(t: int, batch: int = 3, hw=(8, 8)):
    g = torch.Generator().manual_seed(t)
    x = torch.randn(batch, 4, *hw, generator=g)
    y = torch.randn(batch, 1, 8, 16, generator=g)
    return x, torch.full((batch,), t), y


def _pair(cls, kwargs, multi_scale=False):
    diffusers = pytest.importorskip("diffusers")
    ours = cls(**kwargs).eval()
    randomize_(ours)
    config = pixart_diffusers_config(multi_scale=multi_scale, **kwargs)
    theirs = diffusers.PixArtTransformer2DModel(**config).eval()
    theirs.load_state_dict(pixart_to_diffusers(ours.state_dict()), strict=True)
    return ours, theirs


@pytest.mark.parametrize("lewei_scale", [1.0, 0.5])
@torch.no_grad()
def test_matches_diffusers_with_caption_masks(lewei_scale):
    ours, theirs = _pair(PixArt, {**TINY, "lewei_scale": lewei_scale})
    for t in [0, 1, 500, 999]:
        x, tt, y = _inputs(t)
        expected = theirs(x, encoder_hidden_states=y[:, 0], timestep=tt, encoder_attention_mask=MASK,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample  # fmt: skip
        out = ours(x, tt, y, MASK)
        assert out.shape == (3, 8, 8, 8) and out.abs().max() > 0.1
        assert (out - expected).abs().max() < 1e-5, t
    # Without a mask every caption token is attended to, on both sides.
    expected = theirs(x, encoder_hidden_states=y[:, 0], timestep=tt).sample
    assert (ours(x, tt, y) - expected).abs().max() < 1e-5


@torch.no_grad()
def test_masked_caption_tokens_are_ignored():
    model = PixArt(**TINY).eval()
    randomize_(model)
    x, t, y = _inputs(300)
    noisy = y.clone()
    noisy[:, 0][MASK == 0] = 100.0
    assert torch.equal(model(x, t, y, MASK), model(x, t, noisy, MASK))
    assert not torch.allclose(model(x, t, y), model(x, t, noisy))
    with pytest.raises(ValueError, match="at least one unmasked token"):
        model(x, t, y, torch.zeros(3, 8))


@torch.no_grad()
def test_multiscale_matches_diffusers_on_a_non_square_input():
    ours, theirs = _pair(PixArtMS, TINY_MS, multi_scale=True)
    x, t, y = _inputs(700, hw=(8, 12))
    hw = torch.tensor([[64.0, 96.0], [64.0, 96.0], [64.0, 96.0]])
    ar = torch.tensor([[64 / 96]] * 3)
    expected = theirs(x, encoder_hidden_states=y[:, 0], timestep=t, encoder_attention_mask=MASK,
                      added_cond_kwargs={"resolution": hw, "aspect_ratio": ar}).sample  # fmt: skip
    out = ours(x, t, y, MASK, data_info={"img_hw": hw, "aspect_ratio": ar})
    assert out.shape == (3, 8, 8, 12)
    assert (out - expected).abs().max() < 1e-5
    # A (1, 2) size condition is broadcast over the batch, as upstream.
    same = ours(x, t, y, MASK, data_info={"img_hw": hw[:1], "aspect_ratio": ar[:1]})
    assert torch.allclose(same, out, atol=1e-6)
    with pytest.raises(ValueError, match="data_info"):
        ours(x, t, y, MASK)


def test_diffusers_round_trip_is_identity():
    for cls, kwargs in [(PixArt, {**TINY, "lewei_scale": 0.5}), (PixArtMS, TINY_MS)]:
        model = cls(**kwargs)
        randomize_(model)
        sd = model.state_dict()
        back = pixart_from_diffusers(pixart_to_diffusers(sd), input_size=8, lewei_scale=kwargs.get("lewei_scale", 1.0),
                                     y_embedding=sd["y_embedder.y_embedding"])  # fmt: skip
        assert back.keys() == sd.keys()
        assert all(torch.equal(back[k], sd[k]) for k in sd), cls


@torch.no_grad()
def test_split_api_composes_to_forward():
    model = PixArt(**TINY).eval()
    randomize_(model, seed=3)
    x, t, y = _inputs(20)
    inp = model.embed(x, t, y, MASK)
    assert inp.cond.shape == (3, 6 * 32) and inp.caption.shape == (3, 8, 32) and inp.grid == (4, 4)
    assert torch.equal(inp.t_emb, model.t_embedder(t)) and inp.head_cond is inp.t_emb
    tokens = inp.tokens
    for block in model.blocks:
        mod = block.modulation(inp)
        tokens = tokens + mod.gate_msa * block.attn_branch(tokens, mod)
        tokens = tokens + block.cross_attn_branch(tokens, inp)
        tokens = tokens + mod.gate_mlp * block.mlp_branch(tokens, mod)
    assert torch.equal(model.head(tokens, inp), model(x, t, y, MASK))


@torch.no_grad()
def test_forward_with_cfg_matches_official_formula():
    model = PixArt(**TINY).eval()
    randomize_(model, seed=4)
    x, _, y = _inputs(5, batch=2)
    x = torch.cat([x, torch.randn_like(x)])
    null = model.y_embedder.y_embedding.expand(2, 1, 8, 16)
    y2, t, scale = torch.cat([y, null]), torch.tensor([500, 30, 500, 30]), 4.5
    mask = MASK[:2]  # covers half the batch: repeated for the null captions, as upstream
    full = model(torch.cat([x[:2], x[:2]]), t, y2, mask.repeat(2, 1))
    cond, uncond = full[:2], full[2:]
    guided = uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3])
    expected = torch.cat([torch.cat([guided, guided]), full[:, 3:]], dim=1)
    assert torch.allclose(model.forward_with_cfg(x, t, y2, scale, mask), expected, atol=1e-6)


def test_xl2_keys_and_shapes_match_official_checkpoint():
    expected = read_keys_tsv("pixart_xl2_256_state_dict_keys.tsv")
    with torch.device("meta"):
        model = PixArt_models["PixArt-XL/2"](input_size=32)
        ms = PixArt_models["PixArtMS-XL/2"](input_size=128, lewei_scale=2.0)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    extra = {k: list(v.shape) for k, v in ms.state_dict().items() if k not in expected}
    assert extra == {
        "csize_embedder.mlp.0.weight": [384, 256], "csize_embedder.mlp.0.bias": [384],
        "csize_embedder.mlp.2.weight": [384, 384], "csize_embedder.mlp.2.bias": [384],
        "ar_embedder.mlp.0.weight": [384, 256], "ar_embedder.mlp.0.bias": [384],
        "ar_embedder.mlp.2.weight": [384, 384], "ar_embedder.mlp.2.bias": [384],
    }  # fmt: skip
    assert list(ms.state_dict()["pos_embed"].shape) == [1, 64 * 64, 1152]


@torch.no_grad()
def test_registry_builds_debug_models():
    pixart = build_model("PixArt-debug", input_size=8, caption_channels=16, model_max_length=8).eval()
    ms = build_model("PixArtMS-debug", input_size=8, caption_channels=16, model_max_length=8).eval()
    x, t, y = _inputs(1, batch=3, hw=(8, 8))
    assert pixart(x, t, y[:, 0], MASK).shape == (3, 8, 8, 8)  # (B, L, C) captions accepted too
    info = {"img_hw": torch.tensor([[64.0, 64.0]]), "aspect_ratio": torch.tensor([1.0])}
    assert ms(torch.randn(3, 4, 16, 8), t, y, MASK, data_info=info).shape == (3, 8, 16, 8)
    with pytest.raises(ValueError, match="valid"):
        build_model("PixArt-debug", num_classes=10)
