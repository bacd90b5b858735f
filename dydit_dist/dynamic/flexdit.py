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
(`blocks.{i}.merged_layer1` / `merged_layer2` of each R block, the released code's names) are added,
so a static checkpoint loads with only those missing (`FLEXDIT_KEY_PATTERNS`). PixArt keeps its
cross-attention to the caption in every block, on whichever tokens the block carries.

The sparse grid g of each sample comes from its timestep (`GridSchedule`); a batch whose samples
need different grids runs in one group per grid. Exact reorderings make it cheaper than the paper's
op order without changing the math: the Poolingformer projects the mean token (mean commutes with
the V and output projections), and W1 is applied to the sparse tokens before upsampling.

    model = FlexDiT.from_static(dit, FlexOptions())       # shares the static weights
    out = model(x, t, y)                                  # (B, C_out, H, W)
    runner = FlexDiTRunner(model.eval())                  # sampling-job method, FLOPs recorded
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dydit_dist.models.dit import DiT
from dydit_dist.models.layers import modulate
from dydit_dist.models.pixart import PixArt, PixArtMS

from .flexdit_schedule import PAPER_GRID_SIZES, GridSchedule

FLEXDIT_KEY_PATTERNS = ("blocks.*.merged_layer1.*", "blocks.*.merged_layer2.*")  # fnmatch: the added keys
_LAYOUT_RE = re.compile(r"P*D*(CS*RD*)*")


def default_layout(depth: int) -> str:
    """Paper-shaped layout for `depth` blocks: ~1/14 Poolingformer at the bottom, as many dense at the
    top, the rest in SDTMs of ~6 blocks (C, S..., R, D). depth 28 -> "PP" + "CSSSRD" * 4 + "DD"."""
    pool = round(depth / 14)
    middle = depth - 2 * pool
    modules = max(1, round(middle / 6))
    if middle < 3 * modules:
        raise ValueError(f"depth {depth} is too shallow for a FlexDiT layout (an SDTM needs at least C, R, D)")
    sizes = [middle // modules + (k < middle % modules) for k in range(modules)]
    return "P" * pool + "".join("C" + "S" * (s - 3) + "RD" for s in sizes) + "D" * pool


def parse_layout(layout: str | None, depth: int) -> str:
    """Validated layout string of length `depth` (None: `default_layout(depth)`)."""
    if layout is None:
        return default_layout(depth)
    layout = layout.replace(" ", "").upper()
    if len(layout) != depth:
        raise ValueError(f"FlexDiT layout {layout!r} has {len(layout)} blocks; the model has depth {depth}")
    if not _LAYOUT_RE.fullmatch(layout):
        raise ValueError(f"FlexDiT layout {layout!r} must read P* D* (C S* R D*)*: Poolingformers at the bottom, "
                         "then sparse-dense modules, each opened by C and closed by R; D dense blocks anywhere after")
    return layout


@dataclass(frozen=True)
class FlexOptions:
    """The FlexDiT part of a model: block layout and the timestep schedule of the sparse grid."""

    layout: str | None = None
    grid_sizes: tuple[int, ...] = PAPER_GRID_SIZES
    r_min: float | None = None
    r_max: float | None = None
    ramp_start: float = 0.25
    num_intervals: int = 5
    num_timesteps: int = 1000

    @classmethod
    def from_config(cls, flex, num_timesteps: int = 1000) -> FlexOptions:
        """From a `config.FlexDiTConfig`."""
        return cls(flex.layout, tuple(flex.grid_sizes), flex.r_min, flex.r_max, flex.ramp_start,
                   flex.num_intervals, num_timesteps)

    def schedule(self, token_grid: int) -> GridSchedule:
        return GridSchedule(token_grid, self.grid_sizes, self.r_min, self.r_max, self.ramp_start,
                            self.num_intervals, self.num_timesteps)


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
    ids = torch.arange(g * g, dtype=torch.float64).reshape(1, 1, g, g)
    return F.interpolate(ids, size=(h, w), mode="nearest").reshape(-1).long().to(device)


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


class _FlexMixin:
    """Layout, W1/W2 attachment and the forward pass, shared by FlexDiT and FlexPixArt.

    Subclasses provide `_embed(x, t, **cond) -> (tokens, ctx, grid)`, `_mods(block, ctx)` -> six
    (B, D) tensors, `_between(block, tokens, ctx)` (PixArt's caption cross-attention) and `_head`.
    """

    def _setup_flex(self, options: FlexOptions) -> None:
        self.flex_options = options
        self.layout = parse_layout(options.layout, len(self.blocks))
        token_grid = self.input_size // self.patch_size
        self.schedule = options.schedule(token_grid)
        for i in self.recovery_blocks:
            block = self.blocks[i]
            d = block.attn.proj.weight.shape[0]
            block.merged_layer1 = nn.Linear(d, d)  # W1, on the upsampled sparse tokens: starts at 0
            block.merged_layer2 = nn.Linear(d, d)  # W2, on the dense tokens: starts at the identity
            nn.init.zeros_(block.merged_layer1.weight)
            nn.init.zeros_(block.merged_layer1.bias)
            nn.init.eye_(block.merged_layer2.weight)
            nn.init.zeros_(block.merged_layer2.bias)

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

    def _flex_forward(self, x: torch.Tensor, t: torch.Tensor, grid: int | None, **cond) -> torch.Tensor:
        grids = self.grids_for(t, grid)
        sizes = grids.unique().tolist()
        if len(sizes) == 1:
            return self._forward_grid(x, t, sizes[0], **cond)
        # Samples needing different grids run as one group per grid, then go back in order.
        b, outs, order = x.shape[0], [], []
        for g in sizes:
            idx = (grids == g).nonzero().squeeze(1).to(x.device)
            sub = {k: v[idx] if torch.is_tensor(v) and v.ndim and v.shape[0] == b else v for k, v in cond.items()}
            outs.append(self._forward_grid(x[idx], t[idx], g, **sub))
            order.append(idx)
        return torch.cat(outs)[torch.argsort(torch.cat(order))]

    def _forward_grid(self, x, t, g: int, **cond) -> torch.Tensor:
        """All samples on sparse grid g: x (B, C, H, W) -> (B, C_out, H, W)."""
        # 1. Input
        tokens, ctx, grid = self._embed(x, t, **cond)  # (B, N, D)
        # 2. Blocks; `dense` holds the tokens that entered the current sparse-dense module
        dense = None
        for i in range(len(self.blocks)):
            tokens, dense = self.flex_block(i, tokens, dense, ctx, grid, g)
        # 3. Output
        return self._head(tokens, ctx)

    def flex_block(self, i: int, tokens, dense, ctx, grid: tuple[int, int], g: int):
        """Block i in its role: (tokens, dense) -> (tokens, dense). tokens (B, N or M, D); dense (B, N, D)
        is set by C (the SDTM's input) and consumed by R; ctx is `_embed`'s context."""
        block, role = self.blocks[i], self.layout[i]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._mods(block, ctx)
        if role == "P":
            branch = pooled_attention(block.attn, modulate(block.norm1(tokens), shift_msa, scale_msa))  # (B, D)
            tokens = tokens + block_drop(block, (gate_msa * branch).unsqueeze(1))
        elif role == "C":
            dense, tokens = tokens, pool_tokens(tokens, grid, g)  # sparse tokens (B, M, D)
            q = modulate(block.norm1(tokens), shift_msa, scale_msa)
            kv = modulate(block.norm1(dense), shift_msa, scale_msa)
            tokens = tokens + block_drop(block, gate_msa.unsqueeze(1) * attend(block.attn, q, kv))
        elif role == "R":
            merged = upsample_tokens(block.merged_layer1(tokens), grid) + block.merged_layer2(dense)  # (B, N, D)
            q = modulate(block.norm1(merged), shift_msa, scale_msa)
            kv = modulate(block.norm1(tokens), shift_msa, scale_msa)
            tokens = merged + block_drop(block, gate_msa.unsqueeze(1) * attend(block.attn, q, kv))
            dense = None
        else:  # S on the sparse tokens, D on the dense ones: the pretrained block as it is
            branch = block.attn_branch(tokens, shift_msa, scale_msa)
            tokens = tokens + block_drop(block, gate_msa.unsqueeze(1) * branch)
        tokens = self._between(block, tokens, ctx)
        branch = block.mlp_branch(tokens, shift_mlp, scale_mlp)
        return tokens + block_drop(block, gate_mlp.unsqueeze(1) * branch), dense


def block_drop(block: nn.Module, branch: torch.Tensor) -> torch.Tensor:
    """PixArt's stochastic depth on a gated branch (the identity for DiT and at inference)."""
    drop = getattr(block, "drop_path", None)
    return branch if drop is None else drop(branch)


class FlexDiT(_FlexMixin, DiT):
    """DiT with FlexDiT token density. Same constructor keywords as `DiT` plus `flexdit=FlexOptions(...)`.

    forward(x (B, C, H, W), t (B,), y (B,), grid=None) -> (B, C_out, H, W); `grid` forces one sparse
    grid for every sample (default: the schedule's grid of each t). `static_forward` is the pretrained
    DiT on the same weights.
    """

    def __init__(self, *args, flexdit: FlexOptions | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_flex(flexdit or FlexOptions())

    @classmethod
    def from_static(cls, static: DiT, options: FlexOptions | None = None) -> FlexDiT:
        """FlexDiT on a static DiT's own parameters (shared, not copied); W1 / W2 freshly initialized."""
        return _adopt(cls, static, options)

    def static_forward(self, x, t, y):
        return DiT.forward(self, x, t, y)

    def forward(self, x, t, y, grid: int | None = None):
        return self._flex_forward(x, t, grid, y=y)

    def _embed(self, x, t, y):
        tokens, c, _ = self.embed(x, t, y)
        g = self.input_size // self.patch_size
        return tokens, c, (g, g)

    def _mods(self, block, c):
        return block.modulation(c)

    def _between(self, block, tokens, c):
        return tokens

    def _head(self, tokens, c):
        return self.head(tokens, c)


class FlexPixArt(_FlexMixin, PixArt):
    """PixArt-alpha with FlexDiT token density; every block keeps its cross-attention to the caption.

    forward(x, timestep, y (B, 1, L, C), mask (B, L) | None, grid=None) -> (B, C_out, H, W).
    """

    def __init__(self, *args, flexdit: FlexOptions | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(self, PixArtMS):
            raise ValueError("FlexDiT needs a fixed square token grid; PixArtMS is multi-scale")
        self._setup_flex(flexdit or FlexOptions())

    @classmethod
    def from_static(cls, static: PixArt, options: FlexOptions | None = None) -> FlexPixArt:
        if isinstance(static, PixArtMS):
            raise ValueError("FlexDiT needs a fixed square token grid; PixArtMS is multi-scale")
        return _adopt(cls, static, options)

    def static_forward(self, x, timestep, y, mask=None):
        return PixArt.forward(self, x, timestep, y, mask)

    def forward(self, x, timestep, y, mask=None, grid: int | None = None):
        return self._flex_forward(x, timestep, grid, y=y, mask=mask)

    def _embed(self, x, t, y, mask=None):
        inp = self.embed(x, t, y, mask)
        return inp.tokens, inp, inp.grid

    def _mods(self, block, inp):
        return block.modulation(inp.t0)

    def _between(self, block, tokens, inp):
        return tokens + block.cross_attn_branch(tokens, inp.cond, inp.cond_mask)

    def _head(self, tokens, inp):
        return self.head(tokens, inp.t_emb, inp.grid)


def flexdit_from_static(static: nn.Module, options: FlexOptions | None = None) -> FlexDiT | FlexPixArt:
    """FlexDiT or FlexPixArt, whichever fits the static model."""
    if isinstance(static, PixArt):
        return FlexPixArt.from_static(static, options)
    if isinstance(static, DiT):
        return FlexDiT.from_static(static, options)
    raise ValueError(f"FlexDiT converts a DiT or PixArt model, got {type(static).__name__}")


def _adopt(cls, static: nn.Module, options: FlexOptions | None):
    """Build `cls` on the meta device, then give it the static model's own parameters (shared, not copied)."""
    options = options or FlexOptions()
    with torch.device("meta"):
        model = cls(**static.constructor_kwargs(), flexdit=options)
    _, unexpected = model.load_state_dict(static.state_dict(keep_vars=True), strict=False, assign=True)
    if unexpected:
        raise ValueError(f"static model has keys the FlexDiT lacks: {unexpected[:5]}")
    reference = next(static.parameters())
    with torch.device(reference.device):
        model._setup_flex(options)  # fresh W1 / W2, built off the meta device
    for i in model.recovery_blocks:
        for name in ("merged_layer1", "merged_layer2"):
            getattr(model.blocks[i], name).to(reference.dtype)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    still_meta += [n for n, b in model.named_buffers() if b.is_meta]
    if still_meta:
        raise ValueError(f"keys not provided by the static model: {still_meta[:5]}")
    return model.train(static.training)
