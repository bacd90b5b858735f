"""AT-EDM (attention-driven training-free efficient diffusion) on a DiT: token pruning ranked by G-WPR.

1. Blocks 0 .. s-1 (s = `score_layer`) run on every token.
2. A pruning block computes its self-attention head by head with an explicit softmax and averages
   the maps over heads (every other block keeps fused attention). Generalized weighted PageRank on
   that map ranks the tokens it carries: scores start at 1/N and iterate `s_j <- sum_i A(i -> j) s_i`
   (A row-stochastic: row i = query i's attention over the keys). After its FFN each sample keeps its
   top-K tokens (K fixed per batch, so shapes stay dense; each row is ranked on its own, so rows stay
   independent).
   variant "per_layer" (the paper's): every block s .. depth-R-2 is a pruning block, each ranking on
   its own map, and the DSAP plan (`accel.dsap`) says how many tokens each drops at each step.
   variant "single": block s alone prunes, `ratio` of the tokens; s+1 .. depth-R-1 run on the rest.
3. The pruned tokens are put back before the last R = `dense_last` blocks, the last dropped first
   ("copy": each takes the current features of the kept token most similar to it (cosine) where it
   was dropped; "freeze": it keeps the features it had there), and the last R blocks and the final
   layer run on every token.

A step with nothing to prune runs the plain network, unchanged. Token counts come from the plan on
the host, so pruning adds no host sync.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from dydit_dist.dynamic import FastBranches
from dydit_dist.models import Branches, block_forward, run_blocks
from dydit_dist.models.layers import modulate
from dydit_dist.precision import exact_fp32

from .backend import Backend
from .base import Runner
from .dsap import build_plan, dit_early_unpruned, dit_layout
from .options import ATEDMOptions


@contextlib.contextmanager
def _full_fp32(x: torch.Tensor):
    """Full fp32 on the device of `x`: autocast off, and on CUDA TF32 off too (its 10-bit mantissa swaps
    near-tied ranks as bf16 does, less often). A meta tensor, whose FLOPs are counted, has neither."""
    kind = x.device.type
    with (torch.autocast(kind, enabled=False) if kind in ("cpu", "cuda") else contextlib.nullcontext(),
          exact_fp32(x.device)):
        yield


def gwpr(attn_map: torch.Tensor, iterations: int) -> torch.Tensor:
    """Generalized weighted PageRank: attn_map (B, N, N), rows = queries -> token scores (B, N).

    s starts at 1/N; each iteration s_j <- sum_i A[i, j] s_i (the attention a token receives,
    weighted by the score of the tokens attending to it). Row-stochastic maps keep sum(s) = 1.
    In full fp32 (`_full_fp32`): under bf16 autocast the scores, all near 1/N, collapse to a few values,
    and the ranking's ties would keep the first tokens in raster order.
    """
    b, n, _ = attn_map.shape
    with _full_fp32(attn_map):
        attn = attn_map if attn_map.dtype in (torch.float32, torch.float64) else attn_map.float()
        scores = attn.new_full((b, n), 1.0 / n)
        for _ in range(iterations):
            scores = torch.bmm(scores.unsqueeze(1), attn).squeeze(1)
    return scores


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), idx (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def nearest_kept(features: torch.Tensor, keep_idx: torch.Tensor, drop_idx: torch.Tensor) -> torch.Tensor:
    """features (B, N, D), keep_idx (B, K), drop_idx (B, N-K) -> (B, N-K): for each dropped token the index
    (into keep_idx) of the kept token most cosine-similar to it. In full fp32, as `gwpr`."""
    with _full_fp32(features):
        unit = F.normalize(features if features.dtype in (torch.float32, torch.float64) else features.float(), dim=-1)
        similarity = torch.bmm(_take(unit, drop_idx), _take(unit, keep_idx).transpose(1, 2))  # (B, N-K, K)
    return similarity.argmax(dim=-1)


def restore(kept: torch.Tensor, keep_idx: torch.Tensor, drop_idx: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """kept (B, K, D) at positions keep_idx (B, K), dropped (B, N-K, D) at drop_idx -> (B, N, D)."""
    b, k, d = kept.shape
    full = kept.new_empty(b, k + drop_idx.shape[1], d)
    full.scatter_(1, keep_idx.unsqueeze(-1).expand(-1, -1, d), kept)
    return full.scatter_(1, drop_idx.unsqueeze(-1).expand(-1, -1, d), dropped)


def recover(features: torch.Tensor, kept: torch.Tensor, keep_idx: torch.Tensor, drop_idx: torch.Tensor,
            mode: str) -> torch.Tensor:
    """Put every token back in place.

    features (B, N, D): the tokens where some were dropped; kept (B, K, D): the kept tokens now;
    keep_idx (B, K), drop_idx (B, N-K): their positions. "freeze": dropped tokens keep `features`;
    "copy": each dropped token takes `kept[j]` for the kept j most cosine-similar in `features`.
    """
    if mode == "freeze":
        return restore(kept, keep_idx, drop_idx, _take(features, drop_idx))
    return restore(kept, keep_idx, drop_idx, _take(kept, nearest_kept(features, keep_idx, drop_idx)))


class ScoringBranches(Branches):
    """The scoring layer's branches: its self-attention computed head by head with an explicit softmax,
    keeping the map averaged over the (active) heads in `attn_map` (B, N, N), rows = queries. Only one
    head's (B, N, N) probabilities live at a time besides the running mean."""

    def __init__(self, inner: Branches):
        self.inner = inner
        self.attn_map: torch.Tensor | None = None

    def attn(self, i, block, tokens, mod):
        attn = block.attn
        h = modulate(block.norm1(tokens), mod.shift_msa, mod.scale_msa)
        if isinstance(self.inner, FastBranches):
            s = self.inner.slices[i]
            qkv_w, qkv_b, proj_w, heads = s.qkv_w, s.qkv_b, s.proj_w, s.num_heads
        else:
            qkv_w, qkv_b, proj_w, heads = attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.num_heads
        B, N, _ = h.shape
        q, k, v = F.linear(h, qkv_w, qkv_b).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
        scale_qk = 1.0 / math.sqrt(q.shape[-1])
        outs, mean = [], None
        for head in range(heads):
            probs = torch.softmax((q[:, head] @ k[:, head].transpose(1, 2)) * scale_qk, dim=-1)  # (B, N, N)
            outs.append(probs @ v[:, head])
            mean = probs if mean is None else mean + probs
        out = torch.stack(outs, dim=2).reshape(B, N, -1)  # (B, N, heads * hd), heads in order
        self.attn_map = mean / heads
        return F.linear(out, proj_w, attn.proj.bias)

    def cross(self, i, block, tokens, inp):
        return self.inner.cross(i, block, tokens, inp)

    def mlp(self, i, block, tokens, mod):
        return self.inner.mlp(i, block, tokens, mod)

    def mlp_update(self, i, block, tokens, mod):
        return self.inner.mlp_update(i, block, tokens, mod)


class PruningRunner(Runner):
    """AT-EDM token pruning over any backend (static DiT / PixArt, or a DyDiT's fast path)."""

    method = "at_edm"
    needs_steps = True

    def __init__(self, backend: Backend, options: ATEDMOptions):
        options.check_depth(backend.depth)
        super().__init__(backend)
        self.options = options
        self._rates: list[list[float]] = []

    def reset(self) -> None:
        self._rates = self.prune_rates(self.num_steps)

    def prune_rates(self, num_steps: int) -> list[list[float]]:
        """[step][block]: the fraction of the tokens it carries that the block drops after its FFN."""
        o, depth = self.options, self.backend.depth
        if o.variant == "single":
            return [[o.ratio_at(i, num_steps) if b == o.score_layer else 0.0 for b in range(depth)]
                    for i in range(num_steps)]
        layout = dit_layout(depth, o.score_layer, o.dense_last, 1, 1)  # one segment: the weights cancel
        plan = build_plan(layout, o.ratio, num_steps, o.early_steps(num_steps), dit_early_unpruned(layout, o.dsap_layers))
        return [[0.0] * o.score_layer + list(step[0]) + [0.0] * o.dense_last for step in plan.rates]

    def token_counts(self, num_tokens: int, step: int) -> list[int]:
        """Tokens each block carries at `step` (the same for every row), block 0 first."""
        counts, n = [], num_tokens
        for rate in self._rates[step]:
            counts.append(n)
            n = max(n - round(rate * n), 1)
        first_dense = self.backend.depth - self.options.dense_last
        return counts[:first_dense] + [num_tokens] * self.options.dense_last

    def forward(self, x, t, cond):
        o, backend, model = self.options, self.backend, self.model
        # 1. Input
        inp = model.embed(x, t, **cond)
        branches = backend.branches(self.timestep)
        n, d = inp.tokens.shape[1], inp.tokens.shape[2]
        # The token counts come from the plan (host ints, per step and block), never from device values:
        # pruning adds no host sync (the budget allows one per step and pruning layer; this uses none).
        counts = self.token_counts(n, self.step)
        if min(counts) == n:
            tokens = run_blocks(model.blocks, inp, branches)
            return model.head(tokens, inp), [backend.record(i, branches) for i in range(backend.depth)]
        # 2. Blocks up to the dense tail; a block that drops tokens ranks them on its own attention map
        first_dense = backend.depth - o.dense_last
        tokens, dropped, records = inp.tokens, [], []
        for i in range(first_dense):
            keep = counts[i + 1] if i + 1 < first_dense else counts[i]
            if keep == counts[i]:
                tokens = block_forward(model.blocks[i], i, tokens, inp, branches)
                records.append(backend.record(i, branches, tokens=counts[i] / n))
                continue
            scoring = ScoringBranches(branches)
            tokens = block_forward(model.blocks[i], i, tokens, inp, scoring)
            order = gwpr(scoring.attn_map, o.iterations).argsort(dim=1, descending=True, stable=True)
            keep_idx, drop_idx = order[:, :keep], order[:, keep:]
            extra = {"gwpr": o.iterations * counts[i] ** 2}
            if o.recovery == "copy":
                fill = nearest_kept(tokens, keep_idx, drop_idx)  # (B, P) into the kept tokens
                extra["recovery"] = (counts[i] - keep) * keep * d  # the similarity matmul
            else:
                fill = _take(tokens, drop_idx)  # (B, P, D) the features they keep
            dropped.append((keep_idx, drop_idx, fill))
            tokens = _take(tokens, keep_idx)
            records.append(backend.record(i, branches, tokens=counts[i] / n, extra=extra))
        # 3. Recovery, the last dropped first, then the dense tail and the output
        for keep_idx, drop_idx, fill in reversed(dropped):
            tokens = restore(tokens, keep_idx, drop_idx, _take(tokens, fill) if o.recovery == "copy" else fill)
        tokens = run_blocks(model.blocks, inp, branches, tokens=tokens, start=first_dense)
        records += [backend.record(i, branches) for i in range(first_dense, backend.depth)]
        return model.head(tokens, inp), records
