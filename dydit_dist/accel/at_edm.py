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

import torch
import torch.nn.functional as F

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
        o, backend = self.options, self.backend
        # 1. Input
        tokens, ctx = backend.embed(x, t, cond)
        w = backend.step_weights(self.timestep)
        n = tokens.shape[1]
        pruned = self.num_pruned(n, self.step)
        acts = []

        def dense(i, tokens):
            tokens, keep = backend.block(i, tokens, ctx, w)
            acts.append(backend.activity(i, w, keep=keep))
            return tokens

        if pruned == 0:
            for i in range(backend.depth):
                tokens = dense(i, tokens)
            return backend.head(tokens, ctx), acts
        # 2. Dense blocks, then the scoring layer with an explicit attention map
        s, first_dense = o.score_layer, backend.depth - o.dense_last
        for i in range(s):
            tokens = dense(i, tokens)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = backend.modulation(s, ctx)
        attn, attn_map = backend.attn_with_map(s, tokens, shift_msa, scale_msa, w)
        tokens = tokens + gate_msa * attn
        cross = backend.cross(s, tokens, ctx)
        if cross is not None:
            tokens = tokens + cross
        mlp, keep = backend.mlp(s, tokens, shift_mlp, scale_mlp, w)
        tokens = tokens + gate_mlp * mlp
        acts.append(backend.activity(s, w, keep=keep, extra={"gwpr": o.iterations * n * n}))
        # 3. Rank per sample; the middle blocks see each sample's top-K tokens only
        order = gwpr(attn_map, o.iterations).argsort(dim=1, descending=True, stable=True)
        keep_idx, drop_idx = order[:, : n - pruned], order[:, n - pruned :]
        features = tokens
        kept = _take(tokens, keep_idx)
        frac = (n - pruned) / n
        for i in range(s + 1, first_dense):
            kept, keep = backend.block(i, kept, ctx, w)
            acts.append(backend.activity(i, w, tokens=frac, keep=keep))
        # 4. Recovery, last dense blocks, output
        tokens = recover(features, kept, keep_idx, drop_idx, o.recovery)
        if o.recovery == "copy":
            acts[-1]["extra"]["recovery"] = pruned * (n - pruned) * tokens.shape[-1]  # similarity matmul
        for i in range(first_dense, backend.depth):
            tokens = dense(i, tokens)
        return backend.head(tokens, ctx), acts
