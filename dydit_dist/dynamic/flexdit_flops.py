"""FLOPs of FlexDiT through the foundation's counter: per sparse grid, per timestep, averaged over a schedule.

Each block of the layout becomes a `flops.BlockActivity` (N dense tokens, M = g*g sparse tokens):

    P  attention: V and proj on the mean token (2 D^2) + LayerNorm on N   [paper order: V and proj on N]
    C  tokens = M/N queries, kv_tokens = 1 (dense keys / values), MLP on M
    S  tokens = M/N
    R  kv_tokens = M/N (sparse keys / values), MLP on N, merge W1 on M + W2 on N  [paper order: W1 on N]
    D  the full block

"implemented" counts what `FlexDiT` computes; "paper" counts the same network in the op order of the
released code (changsn/SparseDiT), which is what the published numbers describe. Attention scores
(QK^T, attn*V) are counted, as in the 118.69 / 525 G static baselines.

Command line: `python -m dydit_dist.dynamic.flexdit_flops` prints the comparison with the paper.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dydit_dist import flops as flops_lib
from dydit_dist.flops import LAYERNORM_OPS, BlockActivity, mlp_macs

from .flexdit_schedule import GridSchedule, default_layout, parse_layout

OP_ORDERS = ("implemented", "paper")

# Published GFLOPs (FlexDiT / SparseDiT, arXiv 2412.06028): (model, image size, static, FlexDiT).
PAPER = (("DiT-XL/2", 256, 118.69, 68.0), ("DiT-XL/2", 512, 525.0, 235.0), ("PixArt-XL/2", 256, 148.7, 91.6))


def block_activities(layout: str, num_tokens: int, sparse_tokens: int, hidden_size: int,
                     op_order: str = "implemented") -> list[BlockActivity]:
    """One `BlockActivity` per block of `layout` at N = num_tokens dense and M = sparse_tokens sparse tokens."""
    if op_order not in OP_ORDERS:
        raise ValueError(f"op_order must be one of {OP_ORDERS}, got {op_order!r}")
    n, m, d = num_tokens, sparse_tokens, hidden_size
    if not 1 <= m <= n:
        raise ValueError(f"sparse tokens M={m} must be in 1..N={n}")
    paper = op_order == "paper"
    if paper:
        pool = BlockActivity(attn_scores=False)
    else:  # heads=0 drops the counter's attention and its LayerNorm; both are added back as computed
        pool = BlockActivity(heads=0.0, cross_heads=1.0, extra={"attn": 2 * d * d, "norm": LAYERNORM_OPS * n * d})
    merge = mlp_macs(n if paper else m, d, d) + mlp_macs(n, d, d)
    acts = {
        "P": pool,
        "C": BlockActivity(tokens=m / n, kv_tokens=1.0),
        "S": BlockActivity(tokens=m / n),
        "R": BlockActivity(kv_tokens=m / n, extra={"merge": merge}),
        "D": BlockActivity(),
    }
    return [acts[role] for role in layout]


def flexdit_flops(model: str | dict | flops_lib.Arch, image_size: int, grid: int, layout: str | None = None,
                  *, vae_downsample: int = 8, op_order: str = "implemented", **count_kwargs) -> flops_lib.FlopsReport:
    """MACs of one FlexDiT forward of one image on a g x g sparse grid (`flops.count` arguments)."""
    arch = flops_lib.resolve_arch(model)
    layout = parse_layout(layout, arch.depth)
    side = image_size // (vae_downsample * arch.patch_size)
    if not 1 <= grid <= side:
        raise ValueError(f"grid={grid} must be in 1..{side} (the token grid at {image_size}px)")
    acts = block_activities(layout, side * side, grid * grid, arch.hidden_size, op_order)
    return flops_lib.count(arch, image_size, acts, vae_downsample=vae_downsample, **count_kwargs)


def schedule_flops(model, image_size: int, schedule: GridSchedule, timesteps: Sequence[int],
                   layout: str | None = None, **kwargs) -> tuple[list[float], float]:
    """(MACs at each timestep, their mean) of one image when sampling visits `timesteps`."""
    per_grid: dict[int, float] = {}
    per_t = []
    for g in schedule.grid(list(timesteps)).tolist():
        if g not in per_grid:
            per_grid[g] = flexdit_flops(model, image_size, g, layout, **kwargs).total
        per_t.append(per_grid[g])
    return per_t, sum(per_t) / len(per_t)


def respaced_timesteps(steps: int = 250, num_timesteps: int = 1000) -> list[int]:
    """IDDPM's `space_timesteps(T, str(steps))` for one section: round(i * (T-1) / (steps-1))."""
    return [round(i * (num_timesteps - 1) / (steps - 1)) for i in range(steps)]


def model_flops(model, grid: int, op_order: str = "implemented") -> float:
    """MACs of one forward of one sample of a `FlexDiT` / `FlexPixArt` instance on a g x g sparse grid."""

    kw = model.constructor_kwargs()
    acts = block_activities(model.layout, model.schedule.num_tokens, grid * grid, kw["hidden_size"], op_order)
    return flops_lib.count(flops_lib.arch_of(model), kw["input_size"], acts, vae_downsample=1).total


def paper_comparison(steps: int = 250) -> list[dict]:
    """Static and FlexDiT GFLOPs (mean over the respaced steps, both op orders) next to the paper's."""
    rows = []
    for name, size, paper_static, paper_flex in PAPER:
        arch = flops_lib.resolve_arch(name)
        schedule = GridSchedule(token_grid=size // (8 * arch.patch_size))
        row = dict(model=name, image_size=size, layout=default_layout(arch.depth),
                   grids=schedule.intervals(), static=flops_lib.count(name, size).gflops,
                   paper_static=paper_static, paper_flexdit=paper_flex)
        for order in OP_ORDERS:
            _, mean = schedule_flops(name, size, schedule, respaced_timesteps(steps), op_order=order)
            row[order] = mean / 1e9
        row["per_grid"] = {g: flexdit_flops(name, size, g).gflops for _, _, g in schedule.intervals()}
        rows.append(row)
    return rows


def comparison_table(rows: list[dict]) -> str:
    lines = ["| model | px | static (ours / paper) | FlexDiT paper op order | vs paper | FlexDiT as implemented "
             "| vs paper | speedup ideal |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        p = r["paper_flexdit"]
        lines.append(
            f"| {r['model']} | {r['image_size']} | {r['static']:.2f} / {r['paper_static']:.1f} | {r['paper']:.2f} | "
            f"{100 * (r['paper'] / p - 1):+.1f}% | {r['implemented']:.2f} | {100 * (r['implemented'] / p - 1):+.1f}% | "
            f"{r['static'] / r['implemented']:.2f}x |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FlexDiT FLOPs against the published numbers")
    parser.add_argument("--steps", type=int, default=250, help="respaced sampling steps the mean is taken over")
    args = parser.parse_args(argv)
    rows = paper_comparison(args.steps)
    print(comparison_table(rows))
    for r in rows:
        grids = ", ".join(f"t in [{lo}, {hi}): {g}x{g}" for lo, hi, g in r["grids"])
        per = ", ".join(f"{g}x{g} {v:.2f}" for g, v in r["per_grid"].items())
        print(f"\n{r['model']} {r['image_size']}px, layout {r['layout']}\n  schedule: {grids}\n  GFLOPs per grid: {per}")


if __name__ == "__main__":
    main()
