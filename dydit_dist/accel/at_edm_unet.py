"""AT-EDM on a diffusers `UNet2DConditionModel` (Stable Diffusion XL): token pruning inside each attention block.

Every Transformer2DModel of the UNet (a run of BasicTransformerBlocks between two ResNet blocks) is one
DSAP segment (`dsap.unet_layout`). At a step where the plan has one of its layers drop tokens:

1. Input: the block's own norm and proj_in, (B, C, H, W) -> (B, N, D).
2. Layers: layer j runs on the n_j tokens it carries. When it drops some, its self-attention (attn1)
   is computed head by head with an explicit softmax and the head-averaged map (B, n_j, n_j) is handed
   back (`SinkAttnProcessor`: a list passed in `cross_attention_kwargs["atedm_map"]`); G-WPR
   (`at_edm.gwpr`) ranks the tokens on it and, after the layer's FFN, each row keeps its top n_{j+1}.
   Cross-attention (attn2) and the FFN run on the kept tokens as they are.
3. Output: before proj_out (the next ResNet block convolves the full grid) the dropped tokens are put
   back, the last dropped first (`at_edm.restore`; "copy" takes the kept token most similar where it
   was dropped, "freeze" keeps its features), then proj_out and the residual, as the block does.

A segment with nothing to drop at a step runs the Transformer2DModel itself, unchanged, so a ratio of 0
gives the unpruned UNet's output exactly. Token counts come from the plan on the host (no host sync).

    pruner = UNetPruner(unet, ATEDMOptions(ratio=0.5), latent_size=128)   # wraps the blocks in place
    pruner.begin(num_steps)                    # the DSAP plan of one sampling run
    pruner.step = i                            # the step whose UNet call comes next (set by the sampler
                                               # loop, e.g. `pruner.on_step_end` as the pipeline callback)

`ATEDMOptions.score_layer` and `dense_last` are the DiT's; on the UNet every attention block prunes and
recovers by itself. variant "single": each block's first layer drops `ratio_at(step)` of the tokens.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .at_edm import _take, gwpr, nearest_kept, restore
from .dsap import build_plan, unet_early_unpruned, unet_layout
from .options import ATEDMOptions


class SinkAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA attention, or, when given a list `atedm_map` (self-attention only), an explicit
    softmax head by head whose head-averaged map (B, N, N), rows = queries, is appended to the list."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 atedm_map: list | None = None) -> torch.Tensor:
        if atedm_map is None or encoder_hidden_states is not None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return explicit_self_attention(attn, hidden_states, atedm_map)


def explicit_self_attention(attn: Attention, hidden_states: torch.Tensor, sink: list) -> torch.Tensor:
    """attn1 of a BasicTransformerBlock on (B, N, D) tokens with an explicit softmax; appends the map
    averaged over heads (B, N, N) to `sink`. Only one head's probabilities live at a time besides the mean."""
    if (hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None
            or attn.norm_q is not None or attn.norm_k is not None or attn.residual_connection):
        raise ValueError("AT-EDM scores plain self-attention on (B, N, D) tokens (no spatial / group / q-k norms, "
                         "no residual inside the attention), as SD-XL's transformer blocks have")
    b, n, _ = hidden_states.shape
    heads = attn.heads
    q, k, v = (f(hidden_states).view(b, n, heads, -1).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
    q = q * attn.scale  # scaled before the product: one pass over (B, N, hd), not over each (B, N, N) map
    outs, total = [], None
    for head in range(heads):
        probs = torch.softmax(q[:, head] @ k[:, head].transpose(1, 2), dim=-1)  # (B, N, N)
        outs.append(probs @ v[:, head])
        total = probs if total is None else total.add_(probs)  # in place: head 0's map is used up
    sink.append(total.div_(heads))
    out = torch.stack(outs, dim=2).reshape(b, n, -1).to(q.dtype)  # (B, N, heads * head_dim), heads in order
    return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


class PrunedTransformer2D(nn.Module):
    """A Transformer2DModel (`inner`, continuous input) that prunes and recovers as the module docstring
    says, with the token counts `pruner.counts(segment, N)` of the current step."""

    def __init__(self, inner: nn.Module, pruner: UNetPruner, segment: int):
        super().__init__()
        if not getattr(inner, "is_input_continuous", False):
            raise ValueError(f"AT-EDM wraps Transformer2DModels on (B, C, H, W) feature maps, got {type(inner).__name__}")
        self.inner = inner
        self.pruner = pruner  # not a module: the plan and the step, set outside forward
        self.segment = segment

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                timestep=None, added_cond_kwargs=None, class_labels=None, cross_attention_kwargs=None,
                attention_mask=None, encoder_attention_mask=None, return_dict: bool = True):
        """hidden_states (B, C, H, W), encoder_hidden_states (B, L, E) -> (B, C, H, W), as the inner block."""
        b, _, h, w = hidden_states.shape
        counts = self.pruner.counts(self.segment, h * w)
        if min(counts) == h * w:
            return self.inner(hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                              added_cond_kwargs=added_cond_kwargs, class_labels=class_labels,
                              cross_attention_kwargs=cross_attention_kwargs, attention_mask=attention_mask,
                              encoder_attention_mask=encoder_attention_mask, return_dict=return_dict)
        if attention_mask is not None or encoder_attention_mask is not None:
            raise ValueError("AT-EDM on the UNet runs without attention masks (SD-XL passes none)")
        o = self.pruner.options
        # 1. Input
        residual = hidden_states
        tokens, inner_dim = self.inner._operate_on_continuous_inputs(hidden_states)  # (B, N, D)
        # 2. Layers; a layer that drops tokens ranks them on its own self-attention map
        blocks, dropped = self.inner.transformer_blocks, []
        for j, block in enumerate(blocks):
            keep = counts[j + 1] if j + 1 < len(blocks) else counts[j]
            sink: list[torch.Tensor] = []
            kwargs = dict(cross_attention_kwargs or {}, **({"atedm_map": sink} if keep < counts[j] else {}))
            tokens = block(tokens, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                           cross_attention_kwargs=kwargs, class_labels=class_labels)
            if not sink:
                continue
            order = gwpr(sink[0], o.iterations).argsort(dim=1, descending=True, stable=True)
            keep_idx, drop_idx = order[:, :keep], order[:, keep:]
            fill = nearest_kept(tokens, keep_idx, drop_idx) if o.recovery == "copy" else _take(tokens, drop_idx)
            dropped.append((keep_idx, drop_idx, fill))
            tokens = _take(tokens, keep_idx)
        # 3. Recovery (the last dropped first), proj_out and the residual
        for keep_idx, drop_idx, fill in reversed(dropped):
            tokens = restore(tokens, keep_idx, drop_idx, _take(tokens, fill) if o.recovery == "copy" else fill)
        out = self.inner._get_output_for_continuous_inputs(tokens, residual, b, h, w, inner_dim)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class UNetPruner:
    """AT-EDM on `unet`: wraps each attention block (Transformer2DModel) in a `PrunedTransformer2D` and
    gives their self-attention a `SinkAttnProcessor`; holds the DSAP plan of a run and its current step.

    latent_size: the side of the latents the plan's layout is built for (the budget's cost weights);
    the plan's rates are fractions, so other sizes run with the same rates.
    """

    def __init__(self, unet: nn.Module, options: ATEDMOptions, latent_size: int):
        self.options = options
        self.layout = unet_layout(unet.config, latent_size)
        if options.ratio > 0 and all(seg.layers < 2 for seg in self.layout):
            raise ValueError("AT-EDM needs an attention block of 2 or more transformer layers to prune in; this UNet's "
                             f"blocks have {[seg.layers for seg in self.layout]}")
        for k, seg in enumerate(self.layout):
            parent_name, _, index = seg.name.rpartition(".")
            parent = unet.get_submodule(parent_name)
            inner = parent[int(index)]
            if len(inner.transformer_blocks) != seg.layers:
                raise ValueError(f"{seg.name} has {len(inner.transformer_blocks)} transformer layers, its config "
                                 f"{seg.layers}")
            for module in inner.modules():
                if isinstance(module, Attention):
                    module.set_processor(SinkAttnProcessor())
            parent[int(index)] = PrunedTransformer2D(inner, self, k)
        self.step = 0
        self._rates: list | None = None

    def plan(self, num_steps: int) -> list[list[list[float]]]:
        """rates[step][segment][layer]: the fraction of its tokens each layer drops after its FFN."""
        o = self.options
        if o.variant == "single":
            return [[[o.ratio_at(i, num_steps) if j == 0 and seg.layers > 1 else 0.0 for j in range(seg.layers)]
                     for seg in self.layout] for i in range(num_steps)]
        plan = build_plan(self.layout, o.ratio, num_steps, o.early_steps(num_steps),
                          unet_early_unpruned(self.layout, o.dsap_layers))
        return [[list(layers) for layers in step] for step in plan.rates]

    def begin(self, num_steps: int) -> None:
        """Start a sampling run of `num_steps` steps: its plan, at step 0."""
        self._rates = self.plan(num_steps)
        self.step = 0

    def on_step_end(self, pipeline, i: int, t, callback_kwargs: dict) -> dict:
        """`callback_on_step_end` of a diffusers pipeline: step i is done, the next UNet call is step i + 1."""
        self.step = i + 1
        return callback_kwargs

    def counts(self, segment: int, num_tokens: int) -> list[int]:
        """Tokens each layer of `segment` carries at the current step (the same for every row)."""
        if self._rates is None:
            raise RuntimeError("UNetPruner.begin(num_steps) must run before the UNet's first call")
        if not 0 <= self.step < len(self._rates):
            raise RuntimeError(f"step {self.step} is outside the plan's {len(self._rates)} steps")
        out, n = [], num_tokens
        for rate in self._rates[self.step][segment]:
            out.append(n)
            n = max(n - round(rate * n), 1)
        return out


def unet_macs(unet: nn.Module, *args, **kwargs) -> float:
    """Multiply-accumulates of one `unet(*args, **kwargs)` call (matmuls, convolutions, attention), what
    the project calls FLOPs for every model (`dydit_dist.flops`, as the DiT papers), independently of any
    plan: torch's FlopCounterMode counts 2 per multiply-accumulate, halved here. Attention runs on the
    math backend: FlopCounterMode does not count the CPU flash kernel."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        unet(*args, **kwargs)
    return float(counter.get_total_flops()) / 2


def unet_inputs(unet: nn.Module, latent_size: int, batch: int = 1, text_tokens: int = 77,
                generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> dict:
    """Random keyword inputs of one SD-XL UNet call: sample (B, C, h, w), timestep, encoder_hidden_states
    (B, L, cross_attention_dim) and the "text_time" added conditioning (pooled text (B, P), time ids (B, 6))."""
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    dtype = unet.dtype

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    return dict(sample=randn(batch, c.in_channels, latent_size, latent_size),
                timestep=torch.tensor(500, device=device),
                encoder_hidden_states=randn(batch, text_tokens, c.cross_attention_dim),
                added_cond_kwargs={"text_embeds": randn(batch, pooled), "time_ids": randn(batch, 6)})
