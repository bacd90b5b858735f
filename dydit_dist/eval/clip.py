"""CLIP score of text-to-image samples: 100 x the cosine of CLIP's image and text embeddings of each
sample and its caption, each clamped at 0 (Hessel et al. 2021's CLIPScore with w = 100), averaged over the
samples. torchmetrics clamps the mean instead; the two agree whenever every cosine is positive, as CLIP's
are for real image-caption pairs (the PixArt / AT-EDM tables report this score).

    scorer = ClipScorer.load(eval_cfg.clip_model, storage_root, device)
    scores = scorer(images, captions)          # uint8 (B, H, W, 3), B captions -> (B,)

The model is a `transformers` CLIPModel folder with its processor (as `save_pretrained` writes them):
a local folder, a storage folder (copied to this node once) or a Hugging Face id (`pretrained.local`).
Captions longer than the text encoder's context are truncated, as CLIP was trained.
"""

from __future__ import annotations

import numpy as np
import torch

from dydit_dist import pretrained


class ClipScorer:
    """CLIP score per image-caption pair of a CLIPModel and its CLIPProcessor."""

    def __init__(self, model, processor, device: str | torch.device = "cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.processor = processor
        self.device = device
        self.max_length = model.config.text_config.max_position_embeddings

    @classmethod
    def load(cls, source: str, root: str | None, device: str | torch.device = "cpu") -> ClipScorer:
        from transformers import CLIPModel, CLIPProcessor

        path = pretrained.local(source, root)
        return cls(CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path), device)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, captions: list[str]) -> torch.Tensor:
        """uint8 (B, H, W, 3) images and their B captions -> (B,) float32 scores in [0, 100]."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images and {len(captions)} captions")
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]  # (B, 3, S, S)
        text = self.processor(text=list(captions), return_tensors="pt", padding=True, truncation=True,
                              max_length=self.max_length)
        image_embeds = _projected(self.model.get_image_features(pixel_values=pixels.to(self.device)))  # (B, P)
        text_embeds = _projected(self.model.get_text_features(input_ids=text["input_ids"].to(self.device),
                                                              attention_mask=text["attention_mask"].to(self.device)))
        cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        return (100 * cosine).clamp(min=0).cpu()


def _projected(out) -> torch.Tensor:
    """The projected embeddings of get_*_features: a tensor (transformers 4), or the output's
    pooler_output (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
