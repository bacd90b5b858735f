"""Data: images (and captions) -> VAE latents (and T5 features) in WebDataset shards, and back.

- `prepare(cfg)` (the prepare job): sources -> encoders -> `shard-NNNNNN.tar` + `manifest.json`, on Ray.
- `LatentStream(uri, batch_size, rank, world_size, seed, ...)`: the trainer's infinite, resumable batches.
- `verify_manifest(uri, model_cfg, data_cfg)`: fail before training when the data does not fit the model.

`data.vae: none` means pixel-space data (the `debug` preset): images stored as float arrays in
[-1, 1] of shape (C, H, W) in place of latents, scale factor 1, yielded unchanged.
"""

from dydit_dist.data.manifest import Manifest, ManifestError, read_manifest, verify_manifest
from dydit_dist.data.pipeline import PrepareResult, prepare
from dydit_dist.data.reader import LatentStream
from dydit_dist.data.shards import DataError

__all__ = [
    "DataError",
    "LatentStream",
    "Manifest",
    "ManifestError",
    "PrepareResult",
    "prepare",
    "read_manifest",
    "verify_manifest",
]
