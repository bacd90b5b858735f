"""Conditions of a batch of samples, and the doubled batch that classifier-free guidance runs on.

    cond = ClassConditioner(num_classes)         # or CaptionConditioner(cfg, prompts, model, device)
    meta = cond.meta(indices)                    # what the shard records per sample
    kwargs = cond.model_kwargs(indices, device)  # {"y": (B,)} or {"y": (B, 1, L, C), "mask": (B, L)}
    x2, kwargs2 = cond.doubled(x, kwargs)         # conditional rows first, unconditional second
"""

from __future__ import annotations

import numpy as np
import torch

from dydit_dist.diffusion import cfg_caption_batch, cfg_class_batch

from .plan import class_label, prompt_index


def prompt_meta(prompts: list[str], indices) -> list[dict]:
    """What a text-to-image shard records per sample: {"prompt", "prompt_index"}, prompt k % P for sample k."""
    return [{"prompt": prompts[p], "prompt_index": p} for p in (prompt_index(k, len(prompts)) for k in indices)]


class ClassConditioner:
    """Class-conditional models (DiT): sample k is of class `plan.class_label(k, ...)` (`sample.labels`)."""

    def __init__(self, num_classes: int, labels: str = "random", seed: int = 0):
        self.num_classes, self.labels, self.seed = num_classes, labels, seed

    def classes(self, indices) -> list[int]:
        return [class_label(k, self.num_classes, self.labels, self.seed) for k in indices]

    def meta(self, indices) -> list[dict]:
        return [{"class": c} for c in self.classes(indices)]

    def model_kwargs(self, indices, device) -> dict:
        return {"y": torch.tensor(self.classes(indices), device=device)}

    def doubled(self, x: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, dict]:
        x2, y2 = cfg_class_batch(x, kwargs["y"], self.num_classes)
        return x2, {"y": y2}


class CaptionConditioner:
    """Text-to-image models (PixArt-alpha): sample k uses prompt k % P, encoded with the T5 encoder.

    text_encoder: a callable captions -> ([(n_i, C) features], (B, L) masks), as
    `dydit_dist.data.encoders.TextEncoder`; null_caption: the model's learned null caption (L, C).
    """

    def __init__(self, prompts: list[str], text_encoder, null_caption: torch.Tensor):
        self.prompts = prompts
        self.text_encoder = text_encoder
        self.null_caption = null_caption

    def meta(self, indices) -> list[dict]:
        return prompt_meta(self.prompts, indices)

    def model_kwargs(self, indices, device) -> dict:
        captions = [m["prompt"] for m in self.meta(indices)]
        features, masks = self.text_encoder(captions)
        length, channels = self.null_caption.shape
        y = np.zeros((len(captions), 1, length, channels), np.float32)  # PixArt attends to real tokens only
        for row, f in enumerate(features):
            y[row, 0, : len(f)] = f
        return {"y": torch.from_numpy(y).to(device), "mask": torch.from_numpy(np.asarray(masks)).to(device)}

    def doubled(self, x: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, dict]:
        x2, y2, mask2 = cfg_caption_batch(x, kwargs["y"], self.null_caption.to(x.device), kwargs["mask"])
        return x2, {"y": y2, "mask": mask2}
