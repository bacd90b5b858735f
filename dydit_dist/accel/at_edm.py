"""AT-EDM (attention-driven training-free efficient diffusion), adapted to a DiT.

1. Blocks 0 .. s-1 run on every token. Block s (the scoring layer) computes its self-attention
   head by head with an explicit softmax and averages the maps over heads; every other block keeps
   fused attention.
2. Generalized weighted PageRank on that map ranks the tokens: scores start at 1/N and iterate
   `s_j <- sum_i A(i -> j) s_i` (A row-stochastic: row i = query i's attention over the keys).
3. Blocks s+1 .. depth-R-1 run on each sample's top-K tokens only (K fixed per batch, so shapes
   stay dense; each row is ranked on its own, so rows stay independent).
4. The pruned tokens are put back ("copy": each takes the current features of the kept token most
   similar to it at the scoring layer (cosine similarity); "freeze": it keeps its scoring-layer
   features), and the last R blocks and the final layer run on every token.

Denoising-steps-aware pruning (DSAP) prunes `dsap_ratio` (default nothing) in the first sampling
steps and `ratio` after them. A step with nothing to prune runs the plain network, unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dydit_dist.dynamic import FastBranches
from dydit_dist.models import Branches, block_forward, run_blocks
from dydit_dist.models.layers import modulate

from .backend import Backend
from .base import Runner
from .options import ATEDMOptions


def gwpr(attn_map: torch.Tensor, iterations: int) -> torch.Tensor:
    """Generalized weighted PageRank: attn_map (B, N, N), rows = queries -> token scores (B, N).

    s starts at 1/N; each iteration s_j <- sum_i A[i, j] s_i (the attention a token receives,
    weighted by the score of the tokens attending to it). Row-stochastic maps keep sum(s) = 1.
    """
    b, n, _ = attn_map.shape
    scores = attn_map.new_full((b, n), 1.0 / n)
    for _ in range(iterations):
        scores = torch.bmm(scores.unsqueeze(1), attn_map).squeeze(1)
    return scores


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), idx (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def recover(features: torch.Tensor, kept: torch.Tensor, keep_idx: torch.Tensor, drop_idx: torch.Tensor,
            mode: str) -> torch.Tensor:
    """Put every token back in place.

    features (B, N, D): the tokens at the scoring layer; kept (B, K, D): the kept tokens now;
    keep_idx (B, K), drop_idx (B, N-K): their positions. "freeze": dropped tokens keep `features`;
    "copy": each dropped token takes `kept[j]` for the kept j most cosine-similar in `features`.
    """
    d = features.shape[-1]
    full = features.scatter(1, keep_idx.unsqueeze(-1).expand(-1, -1, d), kept)
    if mode == "freeze":
        return full
    unit = F.normalize(features, dim=-1)
    similarity = torch.bmm(_take(unit, drop_idx), _take(unit, keep_idx).transpose(1, 2))  # (B, N-K, K)
    source = similarity.argmax(dim=-1)  # (B, N-K) index into the kept tokens
    return full.scatter(1, drop_idx.unsqueeze(-1).expand(-1, -1, d), _take(kept, source))


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

    def num_pruned(self, num_tokens: int, step: int) -> int:
        """Tokens each sample drops at `step` (fixed for the batch)."""
        return round(self.options.ratio_at(step, self.num_steps) * num_tokens)

    def forward(self, x, t, cond):
        o, backend, model = self.options, self.backend, self.model
        # 1. Input
        inp = model.embed(x, t, **cond)
        branches = backend.branches(self.timestep)
        tokens = inp.tokens
        n = tokens.shape[1]
        pruned = self.num_pruned(n, self.step)
        if pruned == 0:
            tokens = run_blocks(model.blocks, inp, branches)
            return model.head(tokens, inp), [backend.record(i, branches) for i in range(backend.depth)]
        # 2. Dense blocks, then the scoring layer with an explicit attention map
        s, first_dense = o.score_layer, backend.depth - o.dense_last
        tokens = run_blocks(model.blocks, inp, branches, stop=s)
        scoring = ScoringBranches(branches)
        tokens = block_forward(model.blocks[s], s, tokens, inp, scoring)
        # 3. Rank per sample; the middle blocks see each sample's top-K tokens only
        order = gwpr(scoring.attn_map, o.iterations).argsort(dim=1, descending=True, stable=True)
        keep_idx, drop_idx = order[:, : n - pruned], order[:, n - pruned :]
        kept = run_blocks(model.blocks, inp, branches, tokens=_take(tokens, keep_idx), start=s + 1, stop=first_dense)
        # 4. Recovery, last dense blocks, output
        tokens = run_blocks(model.blocks, inp, branches, tokens=recover(tokens, kept, keep_idx, drop_idx, o.recovery),
                            start=first_dense)
        frac = (n - pruned) / n
        records = []
        for i in range(backend.depth):
            middle = s < i < first_dense
            extra = {"gwpr": o.iterations * n * n} if i == s else {}
            if i == first_dense - 1 and o.recovery == "copy":
                extra["recovery"] = pruned * (n - pruned) * tokens.shape[-1]  # similarity matmul
            records.append(backend.record(i, branches, tokens=frac if middle else 1.0, extra=extra))
        return model.head(tokens, inp), records
