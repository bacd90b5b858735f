"""The tensors a dynamic method adds to the static network, by name: what a static checkpoint lacks when
it starts a fine-tune, and what a checkpoint of the method must hold. Torch-free: the preflight reads
them before anything is built.
"""

from __future__ import annotations

ROUTER_KEY_PATTERNS = ("blocks.*.attn_rate.*", "blocks.*.mlp_rate.*", "blocks.*.token_selection.*")  # fnmatch
# every block's router tensors (the official names, /work/shared/reference/dydit_xl2_256_router_keys.tsv)
ROUTER_KEYS = ("attn_rate.router.weight", "attn_rate.router.bias", "mlp_rate.router.weight", "mlp_rate.router.bias",
               "token_selection.mlp_head.0.weight", "token_selection.mlp_head.0.bias",
               "token_selection.mlp_head.2.weight", "token_selection.mlp_head.2.bias")
FLEXDIT_KEY_PATTERNS = ("blocks.*.merged_layer1.*", "blocks.*.merged_layer2.*")  # fnmatch: W1 / W2 of the R blocks


def added_key_patterns(method: str) -> tuple[str, ...]:
    """fnmatch patterns of the tensors `method` adds to the static network; () for static and the
    training-free methods."""
    return {"dydit": ROUTER_KEY_PATTERNS, "flexdit": FLEXDIT_KEY_PATTERNS}.get(method, ())
