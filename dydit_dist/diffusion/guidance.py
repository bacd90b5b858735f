"""Classifier-free guidance, as DiT's ``forward_with_cfg`` and PixArt-alpha's sampling do it.

Sampling runs on a doubled batch: rows [0, B) are conditional, rows [B, 2B) unconditional. The
wrapper feeds the conditional half of x to both halves (the unconditional half of x is ignored),
combines eps = uncond + s * (cond - uncond) and returns the doubled batch, so the samplers need no
knowledge of guidance; keep ``samples[:B]``.

With per-sample generators, pass ``generators + generators`` for the doubled batch: row b and row
B + b then both draw from generator b, and row b still depends on nothing but generator b::

    gens = [torch.Generator().manual_seed(seed) for seed in seeds]            # B of them
    z = randn_per_sample((B, 4, 32, 32), gens)
    x2, y2 = cfg_class_batch(z, labels, num_classes=1000)
    out = sample(cfg_model_fn(model, 1.5), x2.shape, noise=x2, generator=gens + gens,
                 model_kwargs={"y": y2})[:B]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["cfg_caption_batch", "cfg_class_batch", "cfg_model_fn"]


def cfg_model_fn(
    model: Callable[..., torch.Tensor], cfg_scale: float, guidance_channels: int | None = 3
) -> Callable[..., torch.Tensor]:
    """Wrap ``model(x, t, **kw) -> (N, C or 2C, ...)`` into a guided model on doubled batches.

    Args:
        cfg_scale: guidance scale s (1 = conditional model).
        guidance_channels: how many leading output channels are guided. DiT guides only the first 3
            of its 4 eps channels (its official code's quirk; 3 reproduces its FIDs); None guides all C
            eps channels (PixArt-alpha). Unguided channels, including the variance values, are kept
            from the model output of each half.

    Returns:
        ``fn(x, t, **kw)``: x (2B, C, ...), t (2B,), kw already doubled (cond first) ->
        (2B, C or 2C, ...) with identical guided channels in both halves.
    """
    if guidance_channels is not None and guidance_channels < 1:
        raise ValueError(f"guidance_channels must be >= 1 or None, got {guidance_channels}")

    def forward_with_cfg(x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        if x.shape[0] % 2:
            raise ValueError(f"classifier-free guidance needs a doubled (even) batch, got {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        model_out = model(torch.cat([half, half], dim=0), t, **model_kwargs)
        guided = x.shape[1] if guidance_channels is None else guidance_channels
        if guided > model_out.shape[1]:
            raise ValueError(f"guidance_channels={guided} exceeds the {model_out.shape[1]} output channels")
        eps, rest = model_out[:, :guided], model_out[:, guided:]
        cond_eps, uncond_eps = torch.chunk(eps, 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    return forward_with_cfg


def cfg_class_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Doubled batch for class-conditional models: x (B, C, ...), y (B,) -> x (2B, ...), y (2B,).

    The unconditional half uses the null class id ``num_classes`` (DiT's label-dropout embedding).
    """
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if ((y < 0) | (y >= num_classes)).any():
        raise ValueError(f"class labels must lie in [0, {num_classes})")
    return torch.cat([x, x], dim=0), torch.cat([y, torch.full_like(y, num_classes)], dim=0)


def cfg_caption_batch(
    x: torch.Tensor,
    caption: torch.Tensor,
    null_caption: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Doubled batch for caption-conditional models (PixArt-alpha).

    Args:
        x: (B, C, ...) latents.
        caption: (B, ..., L, D) caption features (PixArt: (B, 1, 120, 4096) T5 features).
        null_caption: the learned null caption, broadcastable to one row of ``caption`` (PixArt:
            ``y_embedder.y_embedding``, (120, 4096)).
        mask: (B, L) caption attention mask, or None.

    Returns:
        x (2B, ...), caption (2B, ..., L, D) with the null caption in the second half, and mask
        (2B, L) repeated for both halves (PixArt masks the null caption with the prompt's mask).
    """
    if caption.shape[0] != x.shape[0]:
        raise ValueError(f"caption batch {caption.shape[0]} != latent batch {x.shape[0]}")
    try:
        null = null_caption.to(caption.dtype).expand_as(caption)
    except RuntimeError:
        raise ValueError(
            f"null caption {tuple(null_caption.shape)} does not broadcast to {tuple(caption.shape)}"
        ) from None
    doubled_mask = None if mask is None else torch.cat([mask, mask], dim=0)
    return torch.cat([x, x], dim=0), torch.cat([caption, null], dim=0), doubled_mask
