"""Encoders of the prepare job: images -> stored latents (VAE or pixels), captions -> T5 features.

`ImageEncoder("none", ...)` is the pixel-space path (`data.vae: none`): images become float arrays
in [-1, 1] of shape (C, H, W), the "latent" of a pixel-space model (C = 1, 3 or 4: L, RGB or RGBA).
Otherwise diffusers' `AutoencoderKL.from_pretrained(data.vae)` (a hub id or a local folder) encodes
RGB images in [-1, 1]; the posterior mean and std (`mean_std`) or one sample of it (`sample`) is
stored *unscaled*: the scale factor is recorded in the manifest and applied once, by the reader.
A stored sample is drawn with noise seeded by (data.seed, sample index), so a rerun writes the same bytes.
"""

from __future__ import annotations

import numpy as np
import torch

PIXEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def vae_properties(vae: str) -> dict:
    """Latent channels, downsampling factor and scaling factor of a VAE, from its config alone."""
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(vae)
    return {
        "latent_channels": config.get("latent_channels", 4),
        "downsample": 2 ** (len(config.get("block_out_channels", (0,))) - 1),
        "scaling_factor": config.get("scaling_factor", 0.18215),
    }


def text_properties(text_encoder: str) -> dict:
    """Width of a T5 encoder's features, from its config alone."""
    from transformers import AutoConfig

    return {"text_dim": AutoConfig.from_pretrained(text_encoder).d_model}


class ImageEncoder:
    """uint8 images (B, H, W, C) -> stored latents (B, *stored_shape) as numpy arrays of `dtype`."""

    def __init__(self, vae: str, channels: int, storage: str, dtype: str = "float16", seed: int = 0,
                 device: str | None = None):
        if vae == "none" and channels not in PIXEL_MODES:
            raise ValueError(f"pixel-space data needs model.in_channels in {sorted(PIXEL_MODES)}, got {channels}")
        self.device = device or default_device()
        self.storage = "pixels" if vae == "none" else storage
        self.dtype = np.dtype(dtype)
        self.seed = seed
        self.mode = PIXEL_MODES[channels] if vae == "none" else "RGB"
        self.vae = None
        if vae != "none":
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(vae).to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, indices: list[int], flipped: bool = False) -> np.ndarray:
        """`indices` (global input indices) seed the posterior sample of each image."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, C, H, W)
        if self.vae is None:
            return x.numpy().astype(self.dtype)
        posterior = self.vae.encode(x.to(self.device)).latent_dist
        mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()  # (B, c, h, w)
        if self.storage == "mean_std":
            return torch.stack([mean, std], dim=1).numpy().astype(self.dtype)  # (B, 2, c, h, w)
        noise = np.stack([
            np.random.default_rng([self.seed, int(i), int(flipped)]).standard_normal(mean.shape[1:], np.float32)
            for i in indices
        ])
        return (mean + std * torch.from_numpy(noise)).numpy().astype(self.dtype)


def clean_captions(captions: list[str]) -> list[str]:
    """PixArt-alpha's caption cleaning, which its T5 features were trained and are sampled with: the
    official `T5Embedder.text_preprocessing` (diffusion/model/t5.py, `use_text_preprocessing=True` in
    scripts/inference.py and tools/extract_features.py) runs `clean_caption` twice: lower case, URLs,
    HTML, CJK, punctuation runs, ... T5's tokenizer is case-sensitive, so a raw "A man riding" is other
    tokens than the checkpoint saw. Done by diffusers' copy of it (`PixArtAlphaPipeline`), which needs
    beautifulsoup4 and ftfy (installed with this package; without them diffusers would only lowercase)."""
    import bs4  # noqa: F401 - required: diffusers falls back to lower() without them
    import ftfy  # noqa: F401
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import PixArtAlphaPipeline

    cleaner = object.__new__(PixArtAlphaPipeline)  # its text methods only: no weights, no __init__
    return cleaner._text_preprocessing(list(captions), clean_caption=True)


class TextEncoder:
    """Captions -> T5 features of the real tokens and the attention mask (PixArt-alpha's recipe).

    Captions are cleaned first (`clean_captions`, as the official T5Embedder). The tokenizer pads and
    truncates to `max_length` tokens (120 for PixArt-alpha); features are
    `T5EncoderModel(...).last_hidden_state`. Only the first n = mask.sum() rows are stored; the reader
    pads them back to `max_length` with zeros (PixArt attends only to the real tokens).
    """

    def __init__(self, text_encoder: str, tokenizer: str | None, max_length: int, device: str | None = None,
                 dtype: torch.dtype | None = None):
        """dtype: T5's weights; default bf16 on a GPU (as the official feature extraction for training,
        tools/extract_features.py), fp32 on CPU. Sampling passes fp32, as the official scripts/inference.py."""
        from transformers import AutoTokenizer, T5EncoderModel

        self.device = device or default_device()
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or text_encoder)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = T5EncoderModel.from_pretrained(text_encoder, dtype=dtype).to(self.device).eval()
        self.dim = self.model.config.d_model

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """Returns features [(n_i, C) float16] and masks (B, L) uint8."""
        tokens = self.tokenizer(clean_captions(captions), max_length=self.max_length, padding="max_length", truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        features = self.model(input_ids=tokens.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        features, mask = features.float().cpu().numpy(), mask.cpu().numpy().astype(np.uint8)
        return [f[: int(m.sum())].astype(np.float16) for f, m in zip(features, mask, strict=True)], mask
