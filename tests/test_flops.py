"""The analytic FLOPs count: published numbers, per-block formulas, activities, and torch's own counter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_util import torch_macs
from torch import nn

from dydit_dist import models
from dydit_dist.flops import Arch, BlockActivity, block_macs, count, main, mlp_macs

G = 1e9


@pytest.mark.parametrize("name, gflops", [("DiT-XL/2", 118.69), ("DiT-B/2", 23.02), ("DiT-S/2", 6.07)])
def test_published_dit_numbers(name, gflops):
    report = count(name, 256)
    assert report.gflops == pytest.approx(gflops, rel=1e-3)
    assert round(report.gflops, 2) == gflops


def test_xl2_split_matches_reference():
    c = count("DiT-XL/2", 256).by_component
    assert round((c["attn"] + c["mlp"]) / G, 2) == 118.38
    rest = c["patch_embed"] + c["t_embedder"] + c["y_embedder"] + c["adaLN"] + c["final_layer"]
    assert round(rest / G, 2) == 0.24
    assert round(c["norm"] / G, 2) == 0.07


@pytest.mark.parametrize("image_size", [256, 512])
def test_per_block_formulas(image_size):
    n, d = (image_size // 16) ** 2, 1152
    dit = count("DiT-XL/2", image_size)
    assert dit.num_tokens == n and len(dit.per_block) == 28
    assert dit.per_block[0] == {
        "adaLN": 6 * d * d,
        "attn": 4 * n * d * d + 2 * n * n * d,
        "mlp": 8 * n * d * d,
        "norm": 2 * 4 * n * d,
    }
    pixart = count("PixArt-XL/2", image_size)
    L = 120
    assert pixart.per_block[0] == {
        "attn": 4 * n * d * d + 2 * n * n * d,
        "cross_attn": 2 * n * d * d + 2 * L * d * d + 2 * n * L * d,
        "mlp": 8 * n * d * d,
        "norm": 2 * 4 * n * d,
    }
    assert pixart.by_component["y_embedder"] == L * (4096 * d + d * d)
    assert pixart.by_component["t_block"] == 6 * d * d


def test_pixart_near_flexdit_number():
    # FlexDiT reports 148.7 G for PixArt-alpha at 256; the caption projection (0.73 G) is part of ours.
    assert count("PixArt-XL/2", 256).gflops == pytest.approx(148.7, rel=5e-3)


def test_debug_model_by_hand():
    # 32 px -> 4x4 latent -> 4 tokens of width 64, 4 blocks, 8 output channels per pixel.
    n, d = 4, 64
    patch_embed, t_embedder = n * d * 4 * 4, 256 * d + d * d
    block = 6 * d * d + 4 * n * d * d + 2 * n * n * d + 8 * n * d * d + 2 * 4 * n * d
    final = 4 * n * d + n * d * 32 + d * 2 * d  # norm_final, linear, adaLN
    expected = patch_embed + t_embedder + 4 * block + final
    assert count("debug", 32).total == expected == 943104


def test_half_active_block_halves_attention_and_mlp():
    full = count("DiT-XL/2", 256)
    half = count("DiT-XL/2", 256, [BlockActivity(heads=0.5, mlp=0.5)] * 28)
    c = full.by_component
    assert half.total == pytest.approx(full.total - 0.5 * (c["attn"] + c["mlp"]))
    assert half.by_component["norm"] == c["norm"] and half.by_component["adaLN"] == c["adaLN"]


def test_activities_of_each_method():
    a = Arch(family="dit", depth=1, hidden_size=8, patch_size=1, num_heads=2)
    n, d = 16, 8
    # EB-Cache: both branches cached, gates still recomputed.
    assert block_macs(a, n, BlockActivity(heads=0, mlp=0), 0) == {
        "adaLN": 6 * d * d,
        "attn": 0,
        "mlp": 0,
        "norm": 0,
    }
    # AT-EDM: half the tokens pruned: linear parts halve, attention scores quarter.
    pruned = block_macs(a, n, BlockActivity(tokens=0.5), 0)
    assert pruned["attn"] == 4 * 8 * d * d + 2 * 8 * 8 * d and pruned["mlp"] == 8 * 8 * d * d
    # FlexDiT dense-to-sparse: 4 sparse queries attend to 16 dense keys; both token sets normalised.
    sparse = block_macs(a, n, BlockActivity(tokens=0.25, kv_tokens=1.0), 0)
    assert sparse["attn"] == 4 * d * d + 2 * 16 * d * d + 2 * 4 * 16 * d + 4 * d * d
    assert sparse["norm"] == 4 * d * (4 + 16 + 4)
    # Poolingformer: V projection and output projection only.
    assert block_macs(a, n, BlockActivity(attn_scores=False), 0)["attn"] == 2 * n * d * d
    # DyDiT: tokens skip the MLP; a router charged as an extra component.
    router = mlp_macs(n, d, d // 16 or 1, 1)
    dydit = count(a, 16, [BlockActivity(mlp_tokens=0.25, extra={"router": router})], vae_downsample=4)
    assert dydit.per_block[0]["mlp"] == 8 * 4 * d * d and dydit.by_component["router"] == router


def test_arch_mapping_takes_constructor_keywords():
    keys = dict(family="pixart", depth=28, hidden_size=1152, patch_size=2, num_heads=16)
    mapped = count(
        {**keys, "pred_sigma": True, "mlp_ratio": 4.0, "model_max_length": 120, "lewei_scale": 1.0}, 256
    )
    assert mapped.total == count("PixArt-XL/2", 256).total
    assert count(keys, 256, pred_sigma=False).by_component["final_layer"] == 256 * 1152 * 16


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="depth 28"):
        count("DiT-XL/2", 256, [BlockActivity()] * 3)
    with pytest.raises(ValueError, match="heads"):
        BlockActivity(heads=2)
    with pytest.raises(ValueError, match="divisible"):
        count("DiT-XL/2", 250)
    with pytest.raises(ValueError, match="mlp_rato"):
        count("DiT-XL/2", 256, mlp_rato=2)
    with pytest.raises(ValueError, match="hidden_size"):
        count({"depth": 1, "hidden": 8, "patch_size": 1, "num_heads": 1}, 8)
    with pytest.raises(ValueError, match="unknown model name"):
        count("DiT-XXL/2", 256)


def test_cli_prints_tables(capsys):
    main(["DiT-XL/2", "--image-size", "256"])
    assert "118.69 GFLOPs" in capsys.readouterr().out
    main(["debug", "--image-size", "32", "--per-block"])
    assert "0.94 MFLOPs" in capsys.readouterr().out
    main(["--all"])
    out = capsys.readouterr().out
    assert "| DiT-S/8 |" in out and "| PixArt-XL/2 | 149.12 | 618.26 |" in out


def _macs(fn) -> float:
    return torch_macs(fn)[0]


class _FastBlock(nn.Module):
    """A DiT block computing only what a BlockActivity keeps: the contract dynamic fast paths follow."""

    def __init__(self, d: int, num_heads: int, hidden: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d // num_heads
        self.ada, self.q, self.kv = nn.Linear(d, 6 * d), nn.Linear(d, d), nn.Linear(d, 2 * d)
        self.proj, self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x, dense, c, act: BlockActivity):  # x (B, Nq, D), dense (B, Nk, D), c (B, D)
        d, h = x.shape[-1], round(act.heads * self.num_heads)
        w, hid = h * self.head_dim, round(act.mlp * self.fc1.out_features)
        self.ada(c)
        xn = F.layer_norm(x, (d,))
        kn = xn if dense is None else F.layer_norm(dense, (d,))
        v = F.linear(kn, self.kv.weight[d : d + w])
        if act.attn_scores:
            q = F.linear(xn, self.q.weight[:w]).unflatten(-1, (h, -1)).transpose(1, 2)
            k = F.linear(kn, self.kv.weight[:w]).unflatten(-1, (h, -1)).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v.unflatten(-1, (h, -1)).transpose(1, 2))
            o = o.transpose(1, 2).flatten(2)
        else:
            o = v.mean(1, keepdim=True).expand(-1, x.shape[1], -1)
        x = x + F.linear(o, self.proj.weight[:, :w])
        keep = round((act.tokens if act.mlp_tokens is None else act.mlp_tokens) / act.tokens * x.shape[1])
        m = F.layer_norm(x[:, :keep], (d,))
        return F.linear(F.gelu(F.linear(m, self.fc1.weight[:hid])), self.fc2.weight[:, :hid])


@pytest.mark.parametrize(
    "act",
    [
        BlockActivity(),
        BlockActivity(heads=0.5, mlp=0.25, mlp_tokens=0.5),  # DyDiT
        BlockActivity(tokens=0.5),  # AT-EDM
        BlockActivity(tokens=0.25, kv_tokens=1.0),  # FlexDiT sparse queries, dense keys
        BlockActivity(attn_scores=False),  # Poolingformer
    ],
)
def test_activity_matches_torch_counter_on_a_fast_block(act):
    d, heads, n = 32, 4, 16
    a = Arch(family="dit", depth=1, hidden_size=d, patch_size=1, num_heads=heads)
    block = _FastBlock(d, heads, 4 * d)
    x = torch.randn(1, round(act.tokens * n), d)
    dense = None if act.kv_tokens is None else torch.randn(1, round(act.kv_tokens * n), d)
    macs = block_macs(a, n, act, 0)
    assert (
        _macs(lambda: block(x, dense, torch.randn(1, d), act))
        == macs["adaLN"] + macs["attn"] + macs["mlp"]
    )


@pytest.mark.parametrize("name", ["debug", "DiT-S/8"])
def test_dit_matches_torch_counter(name):
    model = models.build_model(name, input_size=8, num_classes=10).eval()
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.tensor([3])
    report = count(name, 64, num_classes=10)
    assert _macs(lambda: model(x, t, y)) == report.total - report.by_component["norm"]


def test_pixart_matches_torch_counter():
    kw = dict(caption_channels=48, model_max_length=6)
    model = models.build_model("PixArt-debug", input_size=8, **kw).eval()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    y, mask = torch.randn(1, 1, 6, 48), torch.ones(1, 6, dtype=torch.long)
    report = count("PixArt-debug", 64, **kw)
    assert _macs(lambda: model(x, t, y, mask)) == report.total - report.by_component["norm"]


def test_pixart_ms_matches_torch_counter():
    kw = dict(hidden_size=48, depth=1, num_heads=4, patch_size=2)
    model = models.PixArtMS(input_size=8, caption_channels=24, model_max_length=5, **kw).eval()
    x, t, y = torch.randn(1, 4, 8, 16), torch.tensor([500]), torch.randn(1, 1, 5, 24)
    info = {"img_hw": torch.tensor([[64.0, 128.0]]), "aspect_ratio": torch.tensor([[0.5]])}
    report = count(dict(family="pixart_ms", **kw), (64, 128), caption_channels=24, model_max_length=5)
    assert report.by_component["size_embedder"] == 3 * (256 * 16 + 16 * 16)
    assert _macs(lambda: model(x, t, y, data_info=info)) == report.total - report.by_component["norm"]
