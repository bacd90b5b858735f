"""DiT against diffusers' DiTTransformer2DModel, the official key list, and the official parameter counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers_convert import (
    align_dit_timestep_embedding,
    dit_diffusers_config,
    dit_from_diffusers,
    dit_to_diffusers,
)
from model_util import randomize_

from dydit_dist.models import DiT, DiT_models, build_model
from dydit_dist.models.registry import DIT_ARCHS

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)
TIMESTEPS = [0, 1, 250, 500, 999]


def read_keys_tsv(name: str) -> dict[str, list[int]]:
    path = REFERENCE / name
    if not path.exists():  # a missing key list fails: the checkpoint-compatibility check must not vanish into skips
        raise FileNotFoundError(f"reference data not found at {path}; the official checkpoints' key lists live in "
                                f"../shared/reference beside the checkout (see the README)")
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    return {key: [int(s) for s in shape.strip("[]").split(",")] for key, shape in rows}


@pytest.fixture
def ours_and_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ours = DiT(**TINY).eval()
    randomize_(ours)
    theirs = diffusers.DiTTransformer2DModel(**dit_diffusers_config(**TINY)).eval()
    theirs.load_state_dict(dit_to_diffusers(ours.state_dict()), strict=True)
    return ours, theirs


def _inputs(t: int, batch: int = 3):
    g = torch.Generator().manual_seed(t)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    y = torch.tensor([3, 7, 10][:batch])  # 10 = the null class
    return x, torch.full((batch,), t), y


@torch.no_grad()
def test_matches_diffusers_with_official_timestep_features(ours_and_diffusers):
    ours, theirs = ours_and_diffusers
    align_dit_timestep_embedding(theirs)
    for t in TIMESTEPS:
        x, tt, y = _inputs(t)
        expected = theirs(x, timestep=tt, class_labels=y).sample
        out = ours(x, tt, y)
        assert out.shape == (3, 8, 8, 8)
        assert out.abs().max() > 0.1  # randomized weights: not a trivially zero output
        assert (out - expected).abs().max() < 1e-5, t


@torch.no_grad()
def test_diffusers_default_timestep_shift_differs(ours_and_diffusers):
    """diffusers' DiT builds frequencies with downscale_freq_shift=1 (official: 0): same at t=0 only."""
    ours, theirs = ours_and_diffusers
    assert theirs.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift == 1
    x, t, y = _inputs(0)
    assert (ours(x, t, y) - theirs(x, timestep=t, class_labels=y).sample).abs().max() < 1e-5
    x, t, y = _inputs(999)
    assert (ours(x, t, y) - theirs(x, timestep=t, class_labels=y).sample).abs().max() > 1e-4


def test_diffusers_round_trip_is_identity():
    model = DiT(**TINY)
    randomize_(model)
    sd = model.state_dict()
    back = dit_from_diffusers(dit_to_diffusers(sd), input_size=TINY["input_size"])
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_from_diffusers_refuses_other_family():
    with pytest.raises(ValueError, match="transformer_blocks"):
        dit_from_diffusers({"blocks.0.attn.qkv.weight": torch.zeros(3, 1)})


@torch.no_grad()
def test_split_api_composes_to_forward():
    model = DiT(**TINY).eval()
    randomize_(model, seed=1)
    x, t, y = _inputs(500)
    inp = model.embed(x, t, y)
    tokens, c = inp.tokens, inp.cond
    assert tokens.shape == (3, 16, 32) and c.shape == inp.t_emb.shape == (3, 32) and inp.grid == (4, 4)
    assert torch.equal(inp.t_emb, model.t_embedder(t))
    assert inp.head_cond is c and inp.caption is None
    for block in model.blocks:
        mod = block.modulation(inp)
        assert mod.gate_msa.shape == (3, 1, 32)
        tokens = tokens + mod.gate_msa * block.attn_branch(tokens, mod)
        assert block.cross_attn_branch(tokens, inp) is None
        tokens = tokens + mod.gate_mlp * block.mlp_branch(tokens, mod)
    assert torch.equal(model.head(tokens, inp), model(x, t, y))


@torch.no_grad()
def test_forward_with_cfg_matches_official_formula():
    model = DiT(**TINY).eval()
    randomize_(model, seed=2)
    x = torch.randn(4, 4, 8, 8)
    t, y, scale = torch.tensor([500, 40, 500, 40]), torch.tensor([3, 7, 10, 10]), 4.0
    full = model(torch.cat([x[:2], x[:2]]), t, y)
    cond, uncond = full[:2], full[2:]
    guided = uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3])
    expected = torch.cat([torch.cat([guided, guided]), full[:, 3:]], dim=1)
    assert torch.allclose(model.forward_with_cfg(x, t, y, scale), expected, atol=1e-6)
    # guidance_channels=None guides all 4 noise channels, leaving the 4 variance channels.
    all_eps = model.forward_with_cfg(x, t, y, scale, guidance_channels=None)
    guided4 = uncond[:, :4] + scale * (cond[:, :4] - uncond[:, :4])
    assert torch.allclose(all_eps[:2, :4], guided4, atol=1e-6)
    assert torch.equal(all_eps[:, 4:], full[:, 4:])
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(x[:3], t[:3], y[:3], scale)


def test_xl2_keys_and_shapes_match_official_checkpoint():
    expected = read_keys_tsv("dit_xl2_256_state_dict_keys.tsv")
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    assert list(model.state_dict()) == list(expected)  # same order as the official file


def _official_count(
    depth, hidden_size, patch_size, num_heads, input_size=32, in_channels=4, num_classes=1000
):
    d, p, out = hidden_size, patch_size, 2 * in_channels
    per_block = 18 * d * d + 15 * d  # qkv, proj, fc1, fc2 (ratio 4), adaLN (6D)
    embed = (
        (input_size // p) ** 2 * d
        + d * in_channels * p * p
        + d
        + (256 * d + d + d * d + d)
        + (num_classes + 1) * d
    )
    final = 2 * d * d + 2 * d + d * p * p * out + p * p * out
    return embed + depth * per_block + final


@pytest.mark.parametrize("name", list(DIT_ARCHS))
def test_every_variant_builds_with_official_parameter_count(name):
    with torch.device("meta"):
        model = DiT_models[name]()
    assert sum(p.numel() for p in model.parameters()) == _official_count(**DIT_ARCHS[name])
    if name == "DiT-XL/2":
        assert _official_count(**DIT_ARCHS[name]) == 675_129_632  # README of the reference data


def test_published_sizes():
    millions = {"DiT-S/2": 33.0, "DiT-B/2": 130.5, "DiT-L/2": 458.1, "DiT-XL/2": 675.1}
    for name, m in millions.items():
        assert abs(_official_count(**DIT_ARCHS[name]) / 1e6 - m) < 0.5, name


def test_user_errors_are_value_errors():
    with pytest.raises(ValueError, match="valid names"):
        build_model("DiT-XXL/2")
    with pytest.raises(ValueError, match="fixed by the architecture"):
        DiT_models["debug"](depth=3)
    with pytest.raises(ValueError, match="unknown keywords.*depth"):
        build_model("debug", depth=3)
    with pytest.raises(ValueError, match="unknown keywords"):
        build_model("debug", caption_channels=8)
    with pytest.raises(ValueError, match="input_size=8"):
        build_model("debug", input_size=8, num_classes=10)(
            torch.zeros(1, 4, 16, 16), torch.zeros(1), torch.zeros(1).long()
        )
    with pytest.raises(ValueError, match="divisible"):
        DiT(input_size=9, patch_size=2)
