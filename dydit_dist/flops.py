"""Analytic FLOPs of DiT and PixArt-alpha, counted the way fvcore counts them, per component and block.

"FLOPs" here follows the diffusion papers (DiT, DyDiT, FlexDiT): multiply-accumulates of linear
layers, matmuls and convolutions, plus LayerNorm at 4 ops per element; softmax, GELU/SiLU, the
sin-cos timestep features, embedding lookups and elementwise modulation count nothing. Counts are
per forward pass of one image (classifier-free guidance doubles them). DiT-XL/2 at 256x256 gives
118.69 G: blocks (attention + MLP) 118.38, embedders + adaLN + final layer 0.24, LayerNorm 0.07.

Per block with N tokens, width D, MLP ratio 4 and L caption tokens (PixArt):
  attention 4*N*D^2 + 2*N^2*D; MLP 8*N*D^2; cross-attention 2*N*D^2 + 2*L*D^2 + 2*N*L*D;
  adaLN (DiT only) 6*D^2; LayerNorm 2 x 4*N*D.

Dynamic methods describe what each block computes with a `BlockActivity`:

    count("DiT-XL/2", 256, [BlockActivity(heads=h / 16, mlp=g / 16, mlp_tokens=k / 256,
                                          extra={"router": mlp_macs(256, 1152, 72, 1)})] * 28)
    # DyDiT: h heads, g MLP groups, k tokens through the MLP, a token router per block
    BlockActivity(tokens=0.6)                                  # AT-EDM: 40% of tokens pruned
    BlockActivity(tokens=64 / 256, kv_tokens=1.0)              # FlexDiT: 64 sparse queries, 256 dense keys
    BlockActivity(kv_tokens=64 / 256, extra={"merge": 2 * mlp_macs(256, 1152, 1152)})  # FlexDiT recovery
    BlockActivity(attn_scores=False)                           # FlexDiT Poolingformer: V only
    BlockActivity(heads=0, mlp=0)                              # EB-Cache / FORA: both branches cached

Command line: `python -m dydit_dist.flops DiT-XL/2 --image-size 256` or `python -m dydit_dist.flops --all`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from dydit_dist.models import DiT, PixArt, PixArtMS
from dydit_dist.models.registry import DIT_ARCHS, PIXART_ARCHS, arch, family

FREQ_EMBED = 256  # TimestepEmbedder / SizeEmbedder sin-cos feature width
LAYERNORM_OPS = 4  # fvcore: 4 ops per element for a LayerNorm without affine parameters


@dataclass(frozen=True)
class BlockActivity:
    """What one transformer block computes, every field a fraction of the full static block.

    heads: self-attention heads computed, h/H (DyDiT width); 0 skips the attention branch and its
        LayerNorm (a cached branch: EB-Cache, FORA). Scales qkv, scores, attn*V and proj.
    mlp: MLP hidden channels computed, g/G of the groups (DyDiT width); 0 skips the MLP branch.
    tokens: image tokens the block carries, n/N: the queries of self- and cross-attention and,
        unless `mlp_tokens` says otherwise, the MLP's tokens (AT-EDM pruning, FlexDiT sparse blocks).
    kv_tokens: keys and values taken from a separate token set of this size, normalised on its own
        (FlexDiT dense-to-sparse: tokens=M/N sparse queries, kv_tokens=1.0 dense keys; recovery:
        tokens=1.0, kv_tokens=M/N). None: self-attention over the block's own tokens.
    mlp_tokens: tokens entering the MLP and its LayerNorm (DyDiT token skipping); None: `tokens`.
    attn_scores: False for a Poolingformer block: no Q, K, QK^T or attn*V; V projected, mean-pooled
        (free), output projection on every query token.
    cross_heads: PixArt cross-attention heads computed; 0 skips (caches) the branch.
    modulation: the block's adaLN Linear runs (DiT); False when the whole block is reused. A cached
        branch still recomputes its gates, so caching keeps this True.
    extra: named extra MACs charged to the block (routers, merge layers, ranking); each name is a
        component of its own in `FlopsReport.by_component`.
    """

    heads: float = 1.0
    mlp: float = 1.0
    tokens: float = 1.0
    kv_tokens: float | None = None
    mlp_tokens: float | None = None
    attn_scores: bool = True
    cross_heads: float = 1.0
    modulation: bool = True
    extra: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("heads", "mlp", "tokens", "kv_tokens", "mlp_tokens", "cross_heads"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"BlockActivity.{name} is a fraction of the full block in [0, 1], got {value}"
                )
        for name, value in self.extra.items():
            if value < 0:
                raise ValueError(f"BlockActivity.extra[{name!r}] must be >= 0 MACs, got {value}")


def mlp_macs(tokens: float, *widths: int) -> float:
    """MACs of a chain of Linear layers widths[0] -> widths[1] -> ... applied to `tokens` rows.

    DyDiT's token router is `mlp_macs(N, D, D // 16, 1)`; its head router `mlp_macs(1, D, H - 1)`.
    """
    if len(widths) < 2:
        raise ValueError(f"mlp_macs needs at least an input and an output width, got {widths}")
    return tokens * sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=False))


@dataclass(frozen=True)
class Arch:
    """Everything the count needs about a network: the registry entry plus constructor keywords."""

    family: str  # "dit", "pixart" or "pixart_ms"
    depth: int
    hidden_size: int
    patch_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    in_channels: int = 4
    learn_sigma: bool = True  # DiT `learn_sigma`, PixArt `pred_sigma`: output channels doubled
    caption_channels: int = 4096
    model_max_length: int = 120

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels


# Constructor keywords that do not change the count; accepted so a model config can be passed whole.
_NEUTRAL_KWARGS = {"num_classes", "class_dropout_prob", "lewei_scale", "input_size", "name", "drop_path"}


def resolve_arch(model: str | Mapping | Arch, **model_kwargs) -> Arch:
    """An `Arch` from a registry name, an `Arch`, or a mapping of the registry keys (depth,
    hidden_size, patch_size, num_heads) plus `family` (default "dit") and any constructor keywords."""
    structural = ("family", "depth", "hidden_size", "patch_size", "num_heads")
    if isinstance(model, Arch):
        base = model
    elif isinstance(model, str):
        if family(model) == "sdxl":
            raise ValueError(f"{model!r} is an SD-XL UNet (family sdxl): the analytic count covers the DiT and PixArt "
                             "families; count an SD-XL UNet's forward with accel.at_edm_unet.unet_macs")
        base = Arch(family=family(model), **arch(model))
    else:
        missing = [k for k in structural[1:] if k not in model]
        if missing:
            raise ValueError(f"arch mapping lacks {missing}; it needs {', '.join(structural[1:])}")
        base = Arch(family=model.get("family", "dit"), **{k: model[k] for k in structural[1:]})
        model_kwargs = {**{k: v for k, v in model.items() if k not in structural}, **model_kwargs}
    if "pred_sigma" in model_kwargs:
        model_kwargs["learn_sigma"] = model_kwargs.pop("pred_sigma")
    fields = set(Arch.__dataclass_fields__) - set(structural)
    unknown = set(model_kwargs) - fields - _NEUTRAL_KWARGS
    if unknown:
        valid = ", ".join(sorted(fields | _NEUTRAL_KWARGS | {"pred_sigma"}))
        raise ValueError(f"unknown model keyword(s) {sorted(unknown)}; valid: {valid}")
    base = replace(base, **{k: v for k, v in model_kwargs.items() if k in fields})
    if base.family not in ("dit", "pixart", "pixart_ms"):
        raise ValueError(f"family must be 'dit', 'pixart' or 'pixart_ms', got {base.family!r}")
    return base


def arch_of(model: DiT | PixArt) -> Arch:
    """The `Arch` of a network object (static or dynamic): its family and constructor keywords."""
    if not isinstance(model, DiT | PixArt):
        raise ValueError(f"expected a DiT or PixArt model, got {type(model).__name__}")
    fam = "pixart_ms" if isinstance(model, PixArtMS) else "pixart" if isinstance(model, PixArt) else "dit"
    return resolve_arch({"family": fam, **model.constructor_kwargs()})


@dataclass
class FlopsReport:
    """MACs of one forward pass of one image: `total`, `by_component` (summed over blocks), `per_block`."""

    model: str
    image_size: tuple[int, int]
    num_tokens: int
    by_component: dict[str, float]
    per_block: list[dict[str, float]]

    @property
    def total(self) -> float:
        return sum(self.by_component.values())

    @property
    def gflops(self) -> float:
        return self.total / 1e9

    def table(self, per_block: bool = False) -> str:
        """Markdown table of the components in GFLOPs (MFLOPs for tiny models), optionally every block."""
        h, w = self.image_size
        unit, scale = ("GFLOPs", 1e9) if self.total >= 1e8 else ("MFLOPs", 1e6)
        lines = [
            f"{self.model} at {h}x{w} ({self.num_tokens} tokens): {self.total / scale:.2f} {unit}",
            "",
            f"| component | {unit} | share |",
            "| --- | ---: | ---: |",
        ]
        for name, macs in self.by_component.items():
            lines.append(f"| {name} | {macs / scale:.4f} | {100 * macs / self.total:.2f}% |")
        lines.append(f"| **total** | **{self.total / scale:.4f}** | 100.00% |")
        if per_block:
            names = list(self.per_block[0])
            lines += [
                "",
                "| block | " + " | ".join(names) + f" | total ({unit}) |",
                "| ---: |" + " ---: |" * (len(names) + 1),
            ]
            for i, block in enumerate(self.per_block):
                cells = " | ".join(f"{block.get(n, 0.0) / scale:.4f}" for n in names)
                lines.append(f"| {i} | {cells} | {sum(block.values()) / scale:.4f} |")
        return "\n".join(lines)


def block_macs(a: Arch, n: int, act: BlockActivity, text_tokens: int) -> dict[str, float]:
    """MACs of one block at `n` full-resolution tokens under `act`, by component."""
    d, pixart = a.hidden_size, a.family != "dit"
    nq = act.tokens * n
    nk = nq if act.kv_tokens is None else act.kv_tokens * n
    nm = nq if act.mlp_tokens is None else act.mlp_tokens * n
    width = act.heads * d  # inner width of the active heads
    out: dict[str, float] = {}
    if not pixart:
        out["adaLN"] = 6 * d * d if act.modulation else 0.0
    if act.attn_scores:
        # q on the queries, k and v on the keys; QK^T and attn*V; proj back to d on the queries
        out["attn"] = nq * d * width + 2 * nk * d * width + 2 * nq * nk * width + nq * width * d
    else:
        out["attn"] = nk * d * width + nq * width * d
    if pixart:
        cw = act.cross_heads * d
        out["cross_attn"] = 2 * nq * d * cw + 2 * text_tokens * d * cw + 2 * nq * text_tokens * cw
    out["mlp"] = 2 * nm * d * act.mlp * a.mlp_hidden
    norm1 = (nq + (0.0 if act.kv_tokens is None else nk)) if act.heads > 0 else 0.0
    norm2 = nm if act.mlp > 0 else 0.0
    out["norm"] = LAYERNORM_OPS * d * (norm1 + norm2)
    for name, macs in act.extra.items():
        out[name] = out.get(name, 0.0) + macs
    return out


def count(
    model: str | Mapping | Arch,
    image_size: int | tuple[int, int],
    activity: Sequence[BlockActivity | None] | None = None,
    *,
    vae_downsample: int = 8,
    text_tokens: int | None = None,
    extra: Mapping[str, float] | None = None,
    **model_kwargs,
) -> FlopsReport:
    """Count the MACs of one forward pass of `model` on one `image_size` image.

    model: a registry name ("DiT-XL/2", "PixArt-XL/2", "debug"), a mapping of registry keys (with
        "family": "dit" | "pixart" | "pixart_ms"), or an `Arch`.
    image_size: pixels, an int or (height, width); the latent is image_size / vae_downsample.
    activity: one `BlockActivity` (or None = full) per block; None = the static model.
    text_tokens: caption tokens the cross-attention attends to (PixArt with a mask drops padding);
        default `model_max_length`. The caption projection always runs on `model_max_length` tokens.
    extra: named model-level MACs (e.g. a token-density predictor), added as components.
    model_kwargs: constructor keywords (mlp_ratio, in_channels, learn_sigma/pred_sigma,
        caption_channels, model_max_length); unknown ones are an error.
    """
    a = resolve_arch(model, **model_kwargs)
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    step = vae_downsample * a.patch_size
    if h <= 0 or w <= 0 or h % step or w % step:
        raise ValueError(
            f"image_size {image_size} must be positive and divisible by vae_downsample * patch_size = {step}"
        )
    if activity is None:
        activity = [None] * a.depth
    if len(activity) != a.depth:
        raise ValueError(f"activity has {len(activity)} entries; the model has depth {a.depth}")
    text = a.model_max_length if text_tokens is None else text_tokens
    d, n = a.hidden_size, (h // step) * (w // step)
    pixart = a.family != "dit"

    comp: dict[str, float] = {
        "patch_embed": n * d * a.in_channels * a.patch_size**2,  # conv k=p, stride p
        "t_embedder": mlp_macs(1, FREQ_EMBED, d, d),
        # DiT: class-label lookup (free); PixArt: caption MLP over every caption token
        "y_embedder": mlp_macs(a.model_max_length, a.caption_channels, d, d) if pixart else 0.0,
    }
    if pixart:
        comp["t_block"] = mlp_macs(1, d, 6 * d)  # adaLN-single, shared by all blocks
    if a.family == "pixart_ms":  # csize_embedder (height, width) and ar_embedder, D/3 per scalar
        comp["size_embedder"] = 3 * mlp_macs(1, FREQ_EMBED, d // 3, d // 3)
    per_block = [block_macs(a, n, act or BlockActivity(), text) for act in activity]
    for block in per_block:
        for name, macs in block.items():
            comp[name] = comp.get(name, 0.0) + macs
    final = mlp_macs(n, d, a.patch_size**2 * a.out_channels)
    comp["final_layer"] = final if pixart else final + mlp_macs(1, d, 2 * d)  # PixArt: scale_shift_table
    comp["norm"] = comp["norm"] + LAYERNORM_OPS * n * d  # norm_final
    for name, macs in (extra or {}).items():
        comp[name] = comp.get(name, 0.0) + macs
    name = model if isinstance(model, str) else f"{a.family}(depth={a.depth}, hidden_size={d})"
    return FlopsReport(model=name, image_size=(h, w), num_tokens=n, by_component=comp, per_block=per_block)


def summary_table(sizes: Sequence[int] = (256, 512)) -> str:
    """Markdown table of every DiT variant and PixArt-XL/2 at the given image sizes, in GFLOPs."""
    names = [m for m in DIT_ARCHS if m != "debug"] + [m for m in PIXART_ARCHS if m == "PixArt-XL/2"]
    lines = ["| model | " + " | ".join(f"{s}x{s}" for s in sizes) + " |", "| --- |" + " ---: |" * len(sizes)]
    for m in names:
        lines.append(f"| {m} | " + " | ".join(f"{count(m, s).gflops:.2f}" for s in sizes) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="DiT-XL/2", help="a name in dydit_dist.models.registry")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--per-block", action="store_true", help="also print every block")
    parser.add_argument("--all", action="store_true", help="every DiT variant and PixArt-XL/2 at 256 and 512")
    args = parser.parse_args(argv)
    if args.all:
        print(summary_table())
    else:
        print(count(args.model, args.image_size).table(per_block=args.per_block))


if __name__ == "__main__":
    main()
