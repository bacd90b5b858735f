"""Denoising-steps-aware pruning (DSAP) plans for AT-EDM: which layers prune how much at each step.

A network prunes in *segments*: runs of consecutive attention layers between two recoveries (an
SD-XL attention block between two ResNet blocks; on a DiT, the pruned blocks between the first
ranking block and the dense tail). Inside a segment every layer but the last may prune after its
FFN: it ranks its own tokens (G-WPR on its own self-attention map) and drops `rate` of them, so
the next layer carries fewer. A `Plan` gives that rate per step, segment and layer:

    plan = build_plan(dit_layout(...), ratio=0.5, num_steps=50, early_steps=10, early_unpruned=...)
    plan.rates[step][segment][layer]      # fraction of its current tokens the layer drops

The budget of a step is the fraction of tokens pruned, averaged over the layers that can carry
fewer tokens (every layer of a segment but its first), weighted by each layer's linear-layer cost
(tokens x width^2, the MACs that pruning scales). `build_plan` keeps the mean budget over the steps
equal to `ratio`: DSAP leaves `early_unpruned` layers unpruned in the first `early_steps` steps and
raises the rate of the later steps by what the early ones did not prune. Everything here is host
arithmetic on a handful of floats, computed once per sampling run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """`layers` consecutive attention layers on `tokens` tokens of width `width`, recovered after the last."""

    name: str
    layers: int
    tokens: int
    width: int

    @property
    def weight(self) -> float:
        """Linear-layer MACs per layer at full tokens, up to a constant (the budget's weight)."""
        return float(self.tokens) * self.width**2


Mask = tuple[tuple[bool, ...], ...]  # [segment][layer]: the layer prunes after its FFN


@dataclass(frozen=True)
class Plan:
    """rates[step][segment][layer]: fraction of its current tokens a layer drops after its FFN."""

    rates: tuple[tuple[tuple[float, ...], ...], ...]


def all_pruning(layout: Sequence[Segment]) -> Mask:
    """Every layer of every segment but the last prunes (pruning after the last saves nothing)."""
    return tuple(tuple(j < s.layers - 1 for j in range(s.layers)) for s in layout)


def carried(active: Sequence[bool], rate: float) -> list[float]:
    """Fraction of the segment's tokens each layer carries when the `active` layers drop `rate` of theirs."""
    out, keep = [], 1.0
    for prunes in active:
        out.append(keep)
        if prunes:
            keep *= 1.0 - rate
    return out


def budget(layout: Sequence[Segment], mask: Mask, rate: float) -> float:
    """Cost-weighted fraction of tokens pruned over the layers that can carry fewer (each segment's 2nd on)."""
    pruned = total = 0.0
    for seg, active in zip(layout, mask, strict=True):
        keep = carried(active, rate)[1:]
        pruned += seg.weight * sum(1.0 - k for k in keep)
        total += seg.weight * len(keep)
    return pruned / total if total else 0.0


def solve_rate(layout: Sequence[Segment], mask: Mask, target: float) -> float:
    """The per-layer rate whose budget is `target` (bisection; the budget grows with the rate)."""
    if target <= 0.0:
        return 0.0
    hi = 1.0 - 1e-9
    if budget(layout, mask, hi) < target:
        raise ValueError(f"a pruning budget of {target:.3f} is out of reach: pruning every token after the "
                         f"active layers prunes only {budget(layout, mask, hi):.3f}")
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if budget(layout, mask, mid) < target else (lo, mid)
    return (lo + hi) / 2


def build_plan(layout: Sequence[Segment], ratio: float, num_steps: int, early_steps: int,
               early_unpruned: frozenset[tuple[int, int]]) -> Plan:
    """The DSAP plan with a mean budget of `ratio` over `num_steps` steps.

    Without DSAP every pruning layer drops the same rate q in every step (budget `ratio`). The
    first `early_steps` steps keep q but leave the (segment, layer) pairs in `early_unpruned`
    unpruned; the later steps prune at the rate that brings the mean budget back to `ratio`.
    """
    full = all_pruning(layout)
    early = tuple(tuple(p and (k, j) not in early_unpruned for j, p in enumerate(m)) for k, m in enumerate(full))
    q = solve_rate(layout, full, ratio)
    if early_steps == 0 or early == full:
        return Plan(tuple(_rates(full, q) for _ in range(num_steps)))
    if early_steps >= num_steps:
        raise ValueError(f"DSAP's {early_steps} early steps leave no later step of the {num_steps} to move "
                         "the pruning budget to; lower dsap_fraction")
    late_target = (num_steps * ratio - early_steps * budget(layout, early, q)) / (num_steps - early_steps)
    q_late = solve_rate(layout, full, late_target)
    return Plan(tuple(_rates(early, q) if i < early_steps else _rates(full, q_late) for i in range(num_steps)))


def plan_budgets(layout: Sequence[Segment], plan: Plan) -> list[float]:
    """The budget of each step of a plan (what `build_plan` conserves on average)."""
    out = []
    for step in plan.rates:
        pruned = total = 0.0
        for seg, rates in zip(layout, step, strict=True):
            keep, kept = [], 1.0
            for rate in rates:
                keep.append(kept)
                kept *= 1.0 - rate
            pruned += seg.weight * sum(1.0 - k for k in keep[1:])
            total += seg.weight * (len(keep) - 1)
        out.append(pruned / total if total else 0.0)
    return out


def _rates(mask: Mask, rate: float) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(rate if p else 0.0 for p in m) for m in mask)


# SD-XL's UNet at 1024 px (128 x 128 latents): its 11 attention blocks (Transformer2DModel, each a run
# of BasicTransformerBlocks between two ResNet blocks) in execution order. Widths and layer counts
# are those of the released config (transformer_layers_per_block [1, 2, 10], block_out_channels
# [320, 640, 1280]; the first down and last up stage have no attention).
SDXL_LAYOUT: tuple[Segment, ...] = (
    *(Segment(f"down_blocks.1.attentions.{i}", 2, 64 * 64, 640) for i in range(2)),
    *(Segment(f"down_blocks.2.attentions.{i}", 10, 32 * 32, 1280) for i in range(2)),
    Segment("mid_block.attentions.0", 10, 32 * 32, 1280),
    *(Segment(f"up_blocks.0.attentions.{i}", 10, 32 * 32, 1280) for i in range(3)),
    *(Segment(f"up_blocks.1.attentions.{i}", 2, 64 * 64, 640) for i in range(3)),
)
# The SD-XL reference plan's early phase (see ATEDMOptions): the four down-stage attention blocks
# stay unpruned in the first fifth of the steps. Which blocks and how many steps are this project's
# reading, not numbers printed in the paper (see the options docstring).
SDXL_EARLY_FRACTION = 0.2
SDXL_EARLY_UNPRUNED = frozenset((k, j) for k in range(4) for j in range(SDXL_LAYOUT[k].layers))


def sdxl_reference_plan(ratio: float, num_steps: int = 50) -> Plan:
    """The SD-XL plan this project takes as DSAP's reference (50 steps, the SD-XL default)."""
    return build_plan(SDXL_LAYOUT, ratio, num_steps, round(SDXL_EARLY_FRACTION * num_steps), SDXL_EARLY_UNPRUNED)


def unet_layout(config: Mapping, latent_size: int) -> tuple[Segment, ...]:
    """The attention blocks of a diffusers `UNet2DConditionModel` (its `config`, as `config.json` holds
    it) on `latent_size` x `latent_size` latents, in execution order: down stages, the mid block, up
    stages. Each Transformer2DModel is one segment (its BasicTransformerBlocks lie between two ResNet
    blocks); a stage runs at latent_size / 2**stage per side (every down stage but the last halves it,
    every up stage but the last doubles it). The released SD-XL config at 128 gives `SDXL_LAYOUT`."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    channels = list(config["block_out_channels"])
    stages = len(down)
    if len(up) != stages or len(channels) != stages:
        raise ValueError(f"UNet config: {stages} down_block_types, {len(up)} up_block_types and {len(channels)} "
                         "block_out_channels must be as many")
    if latent_size % 2 ** (stages - 1):
        raise ValueError(f"latent size {latent_size} is not divisible by 2**{stages - 1} (the UNet's down stages)")
    per_block = _per_stage(config.get("layers_per_block", 2), stages, "layers_per_block")
    layers = _per_stage(config.get("transformer_layers_per_block", 1), stages, "transformer_layers_per_block")
    reverse = config.get("reverse_transformer_layers_per_block")
    up_layers = list(reverse) if reverse is not None else layers[::-1]
    out: list[Segment] = []

    def add(prefix: str, count: int, depth, stage: int) -> None:
        side = latent_size // 2**stage
        for i in range(count):
            n = depth[i] if isinstance(depth, list | tuple) else depth
            out.append(Segment(f"{prefix}.attentions.{i}", int(n), side * side, channels[stage]))

    for s, kind in enumerate(down):
        if kind.startswith("CrossAttn"):
            add(f"down_blocks.{s}", per_block[s], layers[s], s)
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid == "UNetMidBlock2DCrossAttn":
        add("mid_block", 1, layers[-1], stages - 1)
    elif mid is not None:
        raise ValueError(f"UNet config: mid_block_type {mid!r} is not supported (UNetMidBlock2DCrossAttn or none)")
    for i, kind in enumerate(up):
        if kind.startswith("CrossAttn"):
            add(f"up_blocks.{i}", per_block[::-1][i] + 1, up_layers[i], stages - 1 - i)
    return tuple(out)


def _per_stage(value, stages: int, key: str) -> list:
    if isinstance(value, int):
        return [value] * stages
    if len(value) != stages:
        raise ValueError(f"UNet config: {key} has {len(value)} entries for {stages} stages")
    return list(value)


def unet_early_unpruned(layout: Sequence[Segment], fraction: float) -> frozenset[tuple[int, int]]:
    """The UNet's layers DSAP leaves unpruned in the early steps: the first `fraction` of its pruning
    layers in execution order (those nearest the input: the down stage first), as on the DiT. The
    released SD-XL's four down-stage blocks (`SDXL_EARLY_UNPRUNED`) are its first 20 of 59."""
    pruning = [(k, j) for k, seg in enumerate(layout) for j in range(seg.layers - 1)]
    return frozenset(pruning[: round(fraction * len(pruning))])


def dit_layout(depth: int, first_layer: int, dense_last: int, tokens: int, width: int) -> tuple[Segment, ...]:
    """A DiT's one segment: blocks first_layer .. depth - dense_last - 1 (recovery before the dense tail)."""
    return (Segment(f"blocks.{first_layer}-{depth - dense_last - 1}", depth - dense_last - first_layer, tokens, width),)


def dit_early_unpruned(layout: Sequence[Segment], fraction: float) -> frozenset[tuple[int, int]]:
    """The DiT counterpart of SD-XL's unpruned early blocks: the first `fraction` of the pruning layers
    (those nearest the input, as the down stage is on SD-XL)."""
    pruning = layout[0].layers - 1
    return frozenset((0, j) for j in range(round(fraction * pruning)))
