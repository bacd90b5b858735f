"""FlexDiT (arXiv 2412.06028; code changsn/SparseDiT): token density that changes with depth and timestep.

The pretrained blocks are used one to one, in order; a layout string gives each block a role:

    P  Poolingformer: no queries or keys; every token gets proj(mean over tokens of V) (gated, adaLN)
    C  opens a sparse-dense token module (SDTM): sparse tokens = AdaptiveAvgPool2d(g) of the dense
       tokens; cross-attention with the g*g sparse queries and the dense keys / values
    S  an ordinary block on the sparse tokens
    R  closes the SDTM: merged = up(sparse) @ W1 + dense @ W2 (nearest-neighbour upsampling; W1 = 0,
       W2 = I at init), then cross-attention with dense queries (merged) and sparse keys / values
    D  an ordinary block on the dense tokens

The DiT-XL/2 layout is "PP" + "CSSSRD" * 4 + "DD" (`default_layout(28)`). Queries, keys and values
come from the pretrained `qkv` split in three; the static keys are unchanged and only W1 and W2
(`blocks.{i}.merged_layer1` / `merged_layer2` of each R block: the released code's leaf names) are added,
so a static checkpoint loads with only those missing (`keys.FLEXDIT_KEY_PATTERNS`). The released code nests its
blocks (`dumbbell_blocks.{k}.token_recover_blocks.0...`, q / kv split): a checkpoint of it would need a key
converter, which nothing here has, since no FlexDiT checkpoint is published. PixArt keeps its
cross-attention to the caption in every block, on whichever tokens the block carries.

The sparse grid g of each sample comes from its timestep (`GridSchedule`); a batch whose samples
need different grids runs in one group per grid. Exact reorderings make it cheaper than the paper's
op order without changing the math: the Poolingformer projects the mean token (mean commutes with
the V and output projections), and W1 is applied to the sparse tokens before upsampling.

    model = FlexDiT.from_static(dit, FlexOptions())       # shares the static weights
    out = model(x, t, y)                                  # (B, C_out, H, W)
    runner = build_runner("flexdit", model.eval())        # the sampling method (accel), FLOPs recorded
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from dydit_dist.models import Branches, DiT, PixArt, PixArtMS, run_blocks
from dydit_dist.models.layers import modulate

from .adopt import adopt
from .flexdit_schedule import FlexOptions, parse_layout
from .flexdit_schedule import default_layout as default_layout  # the layout grammar lives with FlexOptions


def pool_tokens(tokens: torch.Tensor, grid: tuple[int, int], g: int) -> torch.Tensor:
    """AdaptiveAvgPool2d(g) over the token grid: (B, h*w, D) -> (B, g*g, D); the identity when g == h == w."""
    h, w = grid
    if (g, g) == (h, w):
        return tokens
    b, _, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, h, w)
    return F.adaptive_avg_pool2d(x, g).flatten(2).transpose(1, 2)


@functools.lru_cache(maxsize=64)
def _upsample_index(g: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """(h*w,) index of the sparse token each dense token copies under F.interpolate(mode="nearest")."""
    ids = torch.arange(g * g, dtype=torch.float32, device=device).reshape(1, 1, g, g)  # exact below 2^24; no copy
    return F.interpolate(ids, size=(h, w), mode="nearest").reshape(-1).long()


def upsample_tokens(sparse: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of a g x g token grid to h x w: (B, g*g, D) -> (B, h*w, D)."""
    g = math.isqrt(sparse.shape[1])
    return sparse[:, _upsample_index(g, *grid, sparse.device)]


def attend(attn: nn.Module, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The pretrained self-attention used as cross-attention: q from `queries` (B, Nq, D), k and v from
    `keys` (B, Nk, D), `qkv` split in three. -> (B, Nq, D); equals `attn(x)` when queries is keys is x."""
    b, nq, d = queries.shape
    nk, heads = keys.shape[1], attn.num_heads
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(queries, weight[:d], None if bias is None else bias[:d])
    kv = F.linear(keys, weight[d:], None if bias is None else bias[d:])
    q = q.reshape(b, nq, heads, -1).transpose(1, 2)  # (B, H, Nq, Dh)
    k, v = kv.reshape(b, nk, 2, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, Nk, Dh) each
    out = F.scaled_dot_product_attention(q, k, v)
    return attn.proj(out.transpose(1, 2).reshape(b, nq, d))


def pooled_attention(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Poolingformer branch: proj(mean over tokens of V), (B, N, D) -> (B, D), one token's projections.

    mean_n(h_n W_v + b_v) = (mean_n h_n) W_v + b_v, so V and proj run on the mean token only.
    """
    d = h.shape[-1]
    bias = attn.qkv.bias
    v = F.linear(h.mean(dim=1), attn.qkv.weight[2 * d:], None if bias is None else bias[2 * d:])
    return attn.proj(v)


class FlexBranches(Branches):
    """A FlexDiT forward pass on sparse grid g: each block's role changes its tokens and its attention.

    C pools the tokens it receives to the g x g sparse grid (remembering the dense ones) and lets the
    sparse queries attend to the dense keys; R merges the sparse tokens back into the dense ones and
    lets the merged queries attend to the sparse keys; P attends through the mean of V; S and D are
    the pretrained blocks as they are. Cross-attention and MLP are the blocks' own.
    """

    def __init__(self, layout: str, grid: tuple[int, int], g: int):
        self.layout, self.grid, self.g = layout, grid, g
        self.dense: torch.Tensor | None = None  # (B, N, D): the tokens that entered the open SDTM
        self.keys: torch.Tensor | None = None  # (B, M, D): R's keys and values, the sparse tokens

    def enter(self, i, block, tokens, mod):
        role = self.layout[i]
        if role == "C":
            self.dense = tokens
            return pool_tokens(tokens, self.grid, self.g)  # the sparse tokens (B, M, D)
        if role == "R":
            self.keys = tokens
            merged = upsample_tokens(block.merged_layer1(tokens), self.grid) + block.merged_layer2(self.dense)
            self.dense = None
            # the residual stream stays in its dtype (fp32 under autocast, as the static DiT's): the two
            # Linear outputs are bf16 there, and every block after R would accumulate in bf16
            return merged.to(tokens.dtype)  # (B, N, D)
        return tokens

    def attn(self, i, block, tokens, mod):
        role = self.layout[i]
        q = modulate(block.norm1(tokens), mod.shift_msa, mod.scale_msa)
        if role == "P":
            return pooled_attention(block.attn, q).unsqueeze(1)  # (B, 1, D), the same for every token
        if role == "C":
            return attend(block.attn, q, modulate(block.norm1(self.dense), mod.shift_msa, mod.scale_msa))
        if role == "R":
            return attend(block.attn, q, modulate(block.norm1(self.keys), mod.shift_msa, mod.scale_msa))
        return block.attn(q)


class FlexModel:
    """FlexDiT's layout, its added W1 / W2 and its forward pass on any model of the block protocol
    (`FlexDiT`, `FlexPixArt`).

    forward(x, t, *cond, grid=None) -> (B, C_out, H, W); `grid` forces one sparse grid for every sample
    (default: the schedule's grid of each t). `static_forward` is the pretrained network on the same weights.
    """

    def __init__(self, *args, flexdit: FlexOptions | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._attach(flexdit=flexdit or FlexOptions())

    def _attach(self, flexdit: FlexOptions) -> list[nn.Module]:
        """Layout, schedule and fresh W1 / W2 on every recovery block; returns the added layers."""
        self.flex_options = flexdit
        self.layout = parse_layout(flexdit.layout, len(self.blocks))
        token_grid = self.input_size // self.patch_size
        self.schedule = flexdit.schedule(token_grid)
        added = []
        for i in self.recovery_blocks:
            block = self.blocks[i]
            d = block.attn.proj.weight.shape[0]
            block.merged_layer1 = nn.Linear(d, d)  # W1, on the upsampled sparse tokens: starts at 0
            block.merged_layer2 = nn.Linear(d, d)  # W2, on the dense tokens: starts at the identity
            nn.init.zeros_(block.merged_layer1.weight)
            nn.init.zeros_(block.merged_layer1.bias)
            nn.init.eye_(block.merged_layer2.weight)
            nn.init.zeros_(block.merged_layer2.bias)
            added += [block.merged_layer1, block.merged_layer2]
        return added

    @classmethod
    def from_static(cls, static: nn.Module, options: FlexOptions | None = None):
        """The FlexDiT of a static model, on its own parameters (shared, not copied); W1 / W2 fresh."""
        return adopt(cls, static, flexdit=options or FlexOptions())

    @property
    def recovery_blocks(self) -> list[int]:
        return [i for i, role in enumerate(self.layout) if role == "R"]

    def merge_parameters(self) -> list[nn.Parameter]:
        """W1 and W2 of every recovery block: the only parameters the static model lacks."""
        return [p for i in self.recovery_blocks for layer in ("merged_layer1", "merged_layer2")
                for p in getattr(self.blocks[i], layer).parameters()]

    def grids_for(self, t: torch.Tensor, grid: int | None = None) -> torch.Tensor:
        """(B,) long sparse grid of each sample: the schedule's, or `grid` for all."""
        if grid is None:
            return self.schedule.grid(t)
        if not 1 <= grid <= self.schedule.token_grid:
            raise ValueError(f"grid={grid} must be in 1..{self.schedule.token_grid} (the dense token grid)")
        return torch.full((t.shape[0],), int(grid), dtype=torch.long)

    def static_forward(self, x, t, *cond, **kwargs):
        return super().forward(x, t, *cond, **kwargs)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *cond, grid: int | None = None, **kwargs) -> torch.Tensor:
        grids = self.grids_for(t, grid)
        sizes = grids.unique().tolist()
        if len(sizes) == 1:
            return self.forward_grid(x, t, sizes[0], *cond, **kwargs)
        # Samples needing different grids run as one group per grid, then go back in order.
        b, outs, order = x.shape[0], [], []
        pick = lambda v, idx: v[idx] if torch.is_tensor(v) and v.ndim and v.shape[0] == b else v  # noqa: E731
        for g in sizes:
            idx = (grids == g).nonzero().squeeze(1).to(x.device)
            sub_args = [pick(v, idx) for v in cond]
            sub_kwargs = {k: pick(v, idx) for k, v in kwargs.items()}
            outs.append(self.forward_grid(x[idx], t[idx], g, *sub_args, **sub_kwargs))
            order.append(idx)
        return torch.cat(outs)[torch.argsort(torch.cat(order))]

    def forward_grid(self, x, t, g: int, *cond, **kwargs) -> torch.Tensor:
        """All samples on sparse grid g: x (B, C, H, W) -> (B, C_out, H, W)."""
        # 1. Input
        inp = self.embed(x, t, *cond, **kwargs)  # tokens (B, N, D)
        # 2. Blocks, each in its role
        tokens = run_blocks(self.blocks, inp, FlexBranches(self.layout, inp.grid, g))
        # 3. Output
        return self.head(tokens, inp)


class FlexDiT(FlexModel, DiT):
    """DiT with FlexDiT token density. Same constructor keywords as `DiT` plus `flexdit=FlexOptions(...)`;
    forward(x (B, C, H, W), t (B,), y (B,), grid=None) -> (B, C_out, H, W)."""


class FlexPixArt(FlexModel, PixArt):
    """PixArt-alpha with FlexDiT token density; every block keeps its cross-attention to the caption.

    forward(x, timestep, y (B, 1, L, C), mask (B, L) | None, grid=None) -> (B, C_out, H, W).
    """

    @classmethod
    def from_static(cls, static: PixArt, options: FlexOptions | None = None) -> FlexPixArt:
        if isinstance(static, PixArtMS):
            raise ValueError("FlexDiT needs a fixed square token grid; PixArtMS is multi-scale")
        return super().from_static(static, options)


def flexdit_from_static(static: nn.Module, options: FlexOptions | None = None) -> FlexDiT | FlexPixArt:
    """FlexDiT or FlexPixArt, whichever fits the static model."""
    if isinstance(static, PixArt):
        return FlexPixArt.from_static(static, options)
    if isinstance(static, DiT):
        return FlexDiT.from_static(static, options)
    raise ValueError(f"FlexDiT converts a DiT or PixArt model, got {type(static).__name__}")
