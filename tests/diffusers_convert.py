"""Official <-> diffusers weight conversion for DiT (`DiTTransformer2DModel`) and PixArt
(`PixArtTransformer2DModel`), both ways, plus the diffusers configs that match our keywords.

State dicts are plain {name: tensor} dicts; every input key must be consumed, so a state dict of
another family raises ValueError instead of converting silently to something partial.

Differences the conversion cannot carry:
- `pos_embed` (fixed sin-cos) is not in diffusers state dicts; `*_from_diffusers(..., input_size=)`
  recomputes it, or load with `allow_missing=("pos_embed",)` (the model already holds the table).
- DiT: diffusers keeps a timestep + label embedder in every block (official: one shared); from
  diffusers they must all be equal. diffusers' DiT timestep features use `downscale_freq_shift=1`
  (frequencies exp(-ln(1e4) * i / (half - 1))), official DiT 0 (`/ half`): converted weights give
  slightly different outputs unless `align_dit_timestep_embedding` is applied to the diffusers model.
- PixArt: diffusers has no learned null caption `y_embedder.y_embedding` (its pipelines encode an
  empty prompt instead); pass `y_embedding=` back, or allow it missing.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch

from dydit_dist.models import DiT, PixArt
from dydit_dist.models.layers import get_2d_sincos_pos_embed

_WB = ("weight", "bias")


def _blocks(sd: Mapping, prefix: str) -> int:
    ids = {int(k[len(prefix) :].split(".", 1)[0]) for k in sd if k.startswith(prefix)}
    if not ids or ids != set(range(len(ids))):
        raise ValueError(f"state dict has no consecutive {prefix}0.. keys; is it of the right model family?")
    return len(ids)


def _take(sd: dict, key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"{what} state dict lacks {key!r}")
    return sd.pop(key)


def _done(rest: dict, what: str) -> None:
    if rest:
        raise ValueError(f"keys not understood as a {what} state dict: {sorted(rest)[:10]}")


def _move(src: dict, dst: dict, pairs, what: str) -> None:
    for a, b in pairs:
        for p in _WB:
            dst[f"{b}.{p}"] = _take(src, f"{a}.{p}", what)


def _split(src: dict, dst: dict, a: str, bs: list[str], what: str) -> None:
    for p in _WB:
        for b, part in zip(bs, _take(src, f"{a}.{p}", what).chunk(len(bs), dim=0), strict=True):
            dst[f"{b}.{p}"] = part.clone()


def _join(src: dict, dst: dict, bs: list[str], a: str, what: str) -> None:
    for p in _WB:
        dst[f"{a}.{p}"] = torch.cat([_take(src, f"{b}.{p}", what) for b in bs], dim=0)


def _pos_embed(sd: Mapping, proj: str, input_size: int, lewei_scale: float | None) -> torch.Tensor:
    weight = sd[f"{proj}.weight"]  # (D, C, p, p)
    grid = input_size // weight.shape[-1]
    base = None if lewei_scale is None else grid
    table = get_2d_sincos_pos_embed(weight.shape[0], grid, lewei_scale=lewei_scale or 1.0, base_size=base)
    return torch.from_numpy(table).float().unsqueeze(0)


# ----------------------------------------------------------------------------------------------- DiT


def _dit_block_pairs(i: int) -> list[tuple[str, str]]:
    o, d = f"blocks.{i}", f"transformer_blocks.{i}"
    return [
        (f"{o}.adaLN_modulation.1", f"{d}.norm1.linear"),
        (f"{o}.attn.proj", f"{d}.attn1.to_out.0"),
        (f"{o}.mlp.fc1", f"{d}.ff.net.0.proj"),
        (f"{o}.mlp.fc2", f"{d}.ff.net.2"),
    ]


_DIT_TOP = [("x_embedder.proj", "pos_embed.proj"), ("final_layer.adaLN_modulation.1", "proj_out_1"),
            ("final_layer.linear", "proj_out_2")]  # fmt: skip
_DIT_EMB = [
    ("t_embedder.mlp.0", "timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "timestep_embedder.linear_2"),
]
_DIT_LABELS = ("y_embedder.embedding_table.weight", "class_embedder.embedding_table.weight")


def dit_to_diffusers(sd: Mapping[str, torch.Tensor], depth: int | None = None) -> dict[str, torch.Tensor]:
    """Official DiT state dict -> `DiTTransformer2DModel` state dict (pos_embed dropped)."""
    src, out, what = dict(sd), {}, "DiT"
    depth = depth or _blocks(src, "blocks.")
    src.pop("pos_embed", None)
    _move(src, out, _DIT_TOP, what)
    emb = {}
    _move(src, emb, [(a, a) for a, _ in _DIT_EMB], what)
    labels = _take(src, _DIT_LABELS[0], what)
    for i in range(depth):
        prefix = f"transformer_blocks.{i}.norm1.emb."
        for a, b in _DIT_EMB:
            for p in _WB:
                out[f"{prefix}{b}.{p}"] = emb[f"{a}.{p}"].clone()
        out[prefix + _DIT_LABELS[1]] = labels.clone()
        _split(
            src, out, f"blocks.{i}.attn.qkv", [f"transformer_blocks.{i}.attn1.to_{n}" for n in "qkv"], what
        )
        _move(src, out, _dit_block_pairs(i), what)
    _done(src, what)
    return out


def dit_from_diffusers(
    sd: Mapping[str, torch.Tensor], input_size: int | None = None
) -> dict[str, torch.Tensor]:
    """`DiTTransformer2DModel` state dict -> official DiT state dict (+ pos_embed if input_size is given)."""
    src, out, what = dict(sd), {}, "diffusers DiT"
    depth = _blocks(src, "transformer_blocks.")
    for i in range(depth):
        prefix = f"transformer_blocks.{i}.norm1.emb."
        keys = [f"{b}.{p}" for _, b in _DIT_EMB for p in _WB] + [_DIT_LABELS[1]]
        tensors = {k: _take(src, prefix + k, what) for k in keys}
        if i == 0:
            shared = tensors
        elif any(not torch.equal(shared[k], tensors[k]) for k in keys):
            raise ValueError(
                f"block {i}'s timestep/label embedders differ from block 0's; official DiT shares one"
            )
    for a, b in _DIT_EMB:
        for p in _WB:
            out[f"{a}.{p}"] = shared[f"{b}.{p}"]
    out[_DIT_LABELS[0]] = shared[_DIT_LABELS[1]]
    _move(src, out, [(b, a) for a, b in _DIT_TOP], what)
    for i in range(depth):
        _join(src, out, [f"transformer_blocks.{i}.attn1.to_{n}" for n in "qkv"], f"blocks.{i}.attn.qkv", what)
        _move(src, out, [(b, a) for a, b in _dit_block_pairs(i)], what)
    _done(src, what)
    if input_size is not None:
        out["pos_embed"] = _pos_embed(out, "x_embedder.proj", input_size, None)
    return out


def align_dit_timestep_embedding(diffusers_dit) -> None:
    """Make a diffusers `DiTTransformer2DModel` compute official DiT timestep features (shift 0, not 1).

    Sets `transformer_blocks[i].norm1.emb.time_proj.downscale_freq_shift = 0` in every block (the
    final layer reuses block 0's embedder).
    """
    for block in diffusers_dit.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0


# -------------------------------------------------------------------------------------------- PixArt


def _pixart_block_pairs(i: int) -> list[tuple[str, str]]:
    o, d = f"blocks.{i}", f"transformer_blocks.{i}"
    return [
        (f"{o}.attn.proj", f"{d}.attn1.to_out.0"),
        (f"{o}.cross_attn.q_linear", f"{d}.attn2.to_q"),
        (f"{o}.cross_attn.proj", f"{d}.attn2.to_out.0"),
        (f"{o}.mlp.fc1", f"{d}.ff.net.0.proj"),
        (f"{o}.mlp.fc2", f"{d}.ff.net.2"),
    ]


_PIXART_TOP = [
    ("x_embedder.proj", "pos_embed.proj"),
    ("y_embedder.y_proj.fc1", "caption_projection.linear_1"),
    ("y_embedder.y_proj.fc2", "caption_projection.linear_2"),
    ("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2"),
    ("t_block.1", "adaln_single.linear"),
    ("final_layer.linear", "proj_out"),
]
_PIXART_MS = [
    ("csize_embedder.mlp.0", "adaln_single.emb.resolution_embedder.linear_1"),
    ("csize_embedder.mlp.2", "adaln_single.emb.resolution_embedder.linear_2"),
    ("ar_embedder.mlp.0", "adaln_single.emb.aspect_ratio_embedder.linear_1"),
    ("ar_embedder.mlp.2", "adaln_single.emb.aspect_ratio_embedder.linear_2"),
]


def _pixart_tables(i: int) -> tuple[str, str]:
    return f"blocks.{i}.scale_shift_table", f"transformer_blocks.{i}.scale_shift_table"


def pixart_to_diffusers(sd: Mapping[str, torch.Tensor], depth: int | None = None) -> dict[str, torch.Tensor]:
    """Official PixArt / PixArtMS state dict -> `PixArtTransformer2DModel` state dict.

    Drops `pos_embed` and the null caption `y_embedder.y_embedding` (diffusers has neither).
    """
    src, out, what = dict(sd), {}, "PixArt"
    depth = depth or _blocks(src, "blocks.")
    src.pop("pos_embed", None)
    src.pop("y_embedder.y_embedding", None)
    _move(src, out, _PIXART_TOP, what)
    if "csize_embedder.mlp.0.weight" in src:
        _move(src, out, _PIXART_MS, what)
    out["scale_shift_table"] = _take(src, "final_layer.scale_shift_table", what)
    for i in range(depth):
        o, d = f"blocks.{i}", f"transformer_blocks.{i}"
        a, b = _pixart_tables(i)
        out[b] = _take(src, a, what)
        _split(src, out, f"{o}.attn.qkv", [f"{d}.attn1.to_{n}" for n in "qkv"], what)
        _split(src, out, f"{o}.cross_attn.kv_linear", [f"{d}.attn2.to_k", f"{d}.attn2.to_v"], what)
        _move(src, out, _pixart_block_pairs(i), what)
    _done(src, what)
    return out


def pixart_from_diffusers(
    sd: Mapping[str, torch.Tensor],
    input_size: int | None = None,
    lewei_scale: float = 1.0,
    y_embedding: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """`PixArtTransformer2DModel` state dict -> official PixArt(MS) state dict.

    Adds `pos_embed` when input_size (latent size) is given, with lewei_scale = diffusers'
    interpolation_scale, and `y_embedder.y_embedding` when given (model_max_length, caption_channels).
    """
    src, out, what = dict(sd), {}, "diffusers PixArt"
    depth = _blocks(src, "transformer_blocks.")
    _move(src, out, [(b, a) for a, b in _PIXART_TOP], what)
    if "adaln_single.emb.resolution_embedder.linear_1.weight" in src:
        _move(src, out, [(b, a) for a, b in _PIXART_MS], what)
    out["final_layer.scale_shift_table"] = _take(src, "scale_shift_table", what)
    for i in range(depth):
        o, d = f"blocks.{i}", f"transformer_blocks.{i}"
        a, b = _pixart_tables(i)
        out[a] = _take(src, b, what)
        _join(src, out, [f"{d}.attn1.to_{n}" for n in "qkv"], f"{o}.attn.qkv", what)
        _join(src, out, [f"{d}.attn2.to_k", f"{d}.attn2.to_v"], f"{o}.cross_attn.kv_linear", what)
        _move(src, out, [(b, a) for a, b in _pixart_block_pairs(i)], what)
    _done(src, what)
    if input_size is not None:
        out["pos_embed"] = _pos_embed(out, "x_embedder.proj", input_size, lewei_scale)
    if y_embedding is not None:
        out["y_embedder.y_embedding"] = y_embedding
    return out


# ------------------------------------------------------------------------------------------- configs


def _with_defaults(cls, kwargs: Mapping) -> dict:
    params = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keywords {unknown}; valid: {sorted(params)}")
    return {**params, **kwargs}


def dit_diffusers_config(**dit_kwargs) -> dict:
    """Keywords for `DiTTransformer2DModel` that match `DiT(**dit_kwargs)` (official defaults filled in)."""
    k = _with_defaults(DiT, dit_kwargs)
    if k["mlp_ratio"] != 4.0:
        raise ValueError(f"DiTTransformer2DModel has a fixed MLP ratio of 4, got mlp_ratio={k['mlp_ratio']}")
    if not k["class_dropout_prob"] > 0:
        raise ValueError("DiTTransformer2DModel always has a null-class row; needs class_dropout_prob > 0")
    return dict(
        num_attention_heads=k["num_heads"],
        attention_head_dim=k["hidden_size"] // k["num_heads"],
        in_channels=k["in_channels"],
        out_channels=k["in_channels"] * 2 if k["learn_sigma"] else k["in_channels"],
        num_layers=k["depth"],
        sample_size=k["input_size"],
        patch_size=k["patch_size"],
        num_embeds_ada_norm=k["num_classes"],
        activation_fn="gelu-approximate",
        attention_bias=True,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=1e-6,  # diffusers' default 1e-5 differs from the official LayerNorms
    )


def pixart_diffusers_config(multi_scale: bool = False, **pixart_kwargs) -> dict:
    """Keywords for `PixArtTransformer2DModel` that match `PixArt(**kw)` (or `PixArtMS` if multi_scale)."""
    k = _with_defaults(PixArt, pixart_kwargs)
    if k["mlp_ratio"] != 4.0:
        raise ValueError(
            f"PixArtTransformer2DModel has a fixed MLP ratio of 4, got mlp_ratio={k['mlp_ratio']}"
        )
    return dict(
        num_attention_heads=k["num_heads"],
        attention_head_dim=k["hidden_size"] // k["num_heads"],
        in_channels=k["in_channels"],
        out_channels=k["in_channels"] * 2 if k["pred_sigma"] else k["in_channels"],
        num_layers=k["depth"],
        cross_attention_dim=k["hidden_size"],
        sample_size=k["input_size"],
        patch_size=k["patch_size"],
        interpolation_scale=k["lewei_scale"],
        use_additional_conditions=multi_scale,
        caption_channels=k["caption_channels"],
        activation_fn="gelu-approximate",
        attention_bias=True,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
