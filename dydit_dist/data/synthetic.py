"""Shards from arrays, without images or encoders: for tests, benchmarks and the demo.

    random_dataset("memory://d", cfg, num_samples=64)   # fits cfg.model / cfg.data: verify_manifest passes
    write_dataset(uri, latents, labels=labels, shard_size=16, vae="none", scale_factor=1.0, num_classes=10)

They write the same shard format and manifest as the prepare job (the settings describe arrays,
not a source: `source_format` is "arrays").
"""

from __future__ import annotations

import numpy as np

from dydit_dist.data.manifest import CAPTION_PREPROCESSING, Manifest, conditioning, expected_latent_shape
from dydit_dist.data.shards import sample_files
from dydit_dist.shardset import pack, write_shard


def write_dataset(uri: str, latents: np.ndarray, *, labels: np.ndarray | None = None,
                  t5: list[np.ndarray] | None = None, t5_masks: np.ndarray | None = None,
                  latent_flips: np.ndarray | None = None, shard_size: int = 1000, vae: str = "none",
                  scale_factor: float = 1.0, latent_storage: str = "pixels", num_classes: int | None = None,
                  text_encoder: str | None = None) -> Manifest:
    """Shards + a complete manifest of `latents` (N, *stored_shape) with labels (N,) or T5 (N x (n, C), (N, L))."""
    n = len(latents)
    stored = list(latents.shape[1:])
    settings = {
        "conditioning": "class" if labels is not None else "caption",
        "latent_shape": stored[1:] if latent_storage == "mean_std" else stored, "stored_shape": stored,
        "latent_dtype": str(latents.dtype), "latent_storage": latent_storage, "vae": vae,
        "scale_factor": scale_factor, "flip": latent_flips is not None, "image_size": None, "seed": 0,
        "source": None, "source_format": "arrays", "num_inputs": n, "inputs_digest": None, "shard_size": shard_size,
    }
    if labels is not None:
        settings.update(num_classes=int(num_classes or labels.max() + 1), classes=[])
    else:
        settings.update(caption_preprocessing=CAPTION_PREPROCESSING, text_encoder=text_encoder, tokenizer=text_encoder,
                        text_len=int(t5_masks.shape[1]),
                        text_dim=int(t5[0].shape[1]))
    starts = range(0, n, shard_size)
    manifest = Manifest(settings, len(starts))
    for index, start in enumerate(starts):
        samples = [
            sample_files(f"{i:09d}", latents[i], label=None if labels is None else int(labels[i]),
                         latent_flip=None if latent_flips is None else latent_flips[i],
                         t5=None if t5 is None else t5[i], t5_mask=None if t5_masks is None else t5_masks[i])
            for i in range(start, min(start + shard_size, n))
        ]
        record = write_shard(uri, index, pack(samples), len(samples), replace=True)
        manifest.add({**record, "bad": [], "inputs": len(samples)})
    manifest.complete = True
    manifest.write(uri)
    return manifest


def random_dataset(uri: str, cfg, num_samples: int, shard_size: int | None = None, seed: int = 0,
                   dtype: str = "float16") -> Manifest:
    """Random data shaped for `cfg` (a Config): pixels in [-1, 1] for `data.vae: none`, else latent samples;
    with `data.flip`, their mirror images as the flipped latents (as prepare stores them)."""
    rng = np.random.default_rng(seed)
    shape = expected_latent_shape(cfg.model)
    pixels = cfg.data.vae == "none"
    if pixels:
        latents = rng.uniform(-1, 1, size=(num_samples, *shape))
    else:
        latents = rng.standard_normal((num_samples, *shape)) / cfg.data.vae_scale_factor
    kwargs: dict = {"shard_size": shard_size or cfg.data.shard_size, "vae": cfg.data.vae,
                    "scale_factor": 1.0 if pixels else cfg.data.vae_scale_factor,
                    "latent_storage": "pixels" if pixels else "sample"}
    if cfg.data.flip:
        kwargs["latent_flips"] = latents[..., ::-1].astype(dtype)
    if conditioning(cfg.model.name) == "class":
        kwargs.update(labels=rng.integers(0, cfg.model.num_classes, size=num_samples),
                      num_classes=cfg.model.num_classes)
    else:
        length, dim = cfg.model.model_max_length, cfg.model.caption_channels
        lengths = rng.integers(1, length + 1, size=num_samples)
        kwargs.update(t5=[rng.standard_normal((k, dim)).astype(np.float16) for k in lengths],
                      t5_masks=(np.arange(length)[None] < lengths[:, None]).astype(np.uint8),
                      text_encoder=cfg.data.text_encoder)
    return write_dataset(uri, latents.astype(dtype), **kwargs)
