"""`{data.uri}/manifest.json`: what a folder of shards holds, and the checks against a model config.

    {
      "format": "dydit_dist.latents/1",
      "complete": true,                 # false while prepare is still running (or was interrupted)
      "settings": {                     # everything that decides the bytes of a shard
        "conditioning": "class" | "caption",
        "latent_shape": [C, h, w],      # what the model sees
        "stored_shape": [2, C, h, w],   # [mean, std] for mean_std storage, else [C, h, w]
        "latent_dtype": "float16", "latent_storage": "mean_std" | "sample" | "pixels",
        "vae": "stabilityai/sd-vae-ft-ema" | "none", "scale_factor": 0.18215 (1.0 for pixels),
        "flip": false, "image_size": 256, "seed": 0,
        "num_classes": 1000, "classes": [...],                      # class-conditional
        "text_encoder": ..., "tokenizer": ..., "text_len": 120, "text_dim": 4096,   # captions
        "caption_preprocessing": "pixart-clean-caption-x2", "crop": "resize-center",  # captions (class: ADM crop)
        "source": url, "source_format": ..., "num_inputs": N, "inputs_digest": sha256, "shard_size": ...,
        "sample_order": "permuted" | "input"   # seeded permutation (imagefolder, captions), or the input tars'
      },
      "num_shards": S,                  # planned
      "shards": [{"index": 0, "name": "shard-000000.tar", "count": 1000, "sha256": ..., "bytes": ...,
                  "bad": [{"source": url, "error": "..."}],
                  "classes": {"0": 3, "7": 1, ...}}, ...],   # class-conditional: samples per label
      "bad_inputs": 3                   # unreadable inputs, each listed under its shard's "bad"
    }

The latent is stored unscaled and `scale_factor` is recorded once; the reader multiplies by it, so
it is never applied twice. `data.vae: none` means pixel-space data: images as float arrays in
[-1, 1] of shape (C, H, W), scale factor 1, yielded unchanged.

A data set prepared before samples were permuted has no `sample_order` (its imagefolder shards are
in class order) and no `classes` histograms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from dydit_dist.data.shards import DataError
from dydit_dist.models.registry import family
from dydit_dist.shardset import ShardManifest, manifest_url, stored_sizes


class ManifestError(DataError):
    """A missing or incomplete manifest, or one that does not match the model config."""


CLASS_SORTED_BELOW = 0.5  # Manifest.class_mixing under which the shards count as class-sorted


@dataclass
class Manifest(ShardManifest):
    """A data folder's manifest; `complete` is set by the prepare job once every shard is written."""

    FORMAT: ClassVar[str] = "dydit_dist.latents/1"
    error: ClassVar[type[ValueError]] = ManifestError
    ELSEWHERE: ClassVar[str] = "use another data.uri"

    complete: bool = False

    @property
    def bad_inputs(self) -> int:
        return sum(len(s["bad"]) for s in self.shards.values())

    def class_mixing(self) -> float | None:
        """How mixed the classes of the shards are: the distinct labels of all shards, summed, over what
        i.i.d. draws of the same sizes from the data set's class frequencies p would hold on average
        (sum_k 1 - (1 - p_k)^n for a shard of n). About 1 (a little more) when shards are random draws,
        far below 1 when they are class-sorted. None without histograms (caption data, or shards
        prepared before histograms were recorded)."""
        histograms = [r.get("classes") for r in self.records()]
        if not histograms or any(h is None for h in histograms):
            return None
        labels = sorted({label for h in histograms for label in h})
        counts = np.array([[h.get(label, 0) for label in labels] for h in histograms], dtype=np.float64)  # (S, K)
        if counts.sum() == 0:
            return None
        p = counts.sum(0) / counts.sum()  # (K,)
        expected = (1 - (1 - p)[None, :] ** counts.sum(1)[:, None]).sum()
        return float((counts > 0).sum() / expected)

    def class_order(self) -> str | None:
        """Why the shards' classes are not mixed (class labels only), or None: prepared in class order
        before samples were permuted, or `class_mixing` below CLASS_SORTED_BELOW."""
        s = self.settings
        if s["conditioning"] != "class" or self.num_shards < 2:
            return None
        advice = ("the reader's batches will hold far fewer classes than i.i.d. draws; prepare it again into "
                  "another data.uri (or remove that folder)")
        if "sample_order" not in s and s["source_format"] == "imagefolder":
            return f"shards are in class order (prepared before samples were permuted): {advice}"
        mixing = self.class_mixing()
        if mixing is None or mixing >= CLASS_SORTED_BELOW:
            return None
        hint = "; a webdataset source keeps its input's order: shuffle the input tars" \
            if s["source_format"] == "webdataset" else ""
        return (f"shards are class-sorted (they hold {100 * mixing:.0f}% of the distinct classes of random draws "
                f"of their size): {advice}{hint}")

    def _extra_json(self) -> dict:
        return {"bad_inputs": self.bad_inputs}

    @classmethod
    def _extra_fields(cls, value: dict) -> dict:
        return {"complete": value["complete"]}


def read_manifest(uri: str, require_complete: bool = True) -> Manifest:
    """The manifest under a data folder URL; ManifestError naming the URL when absent or incomplete."""
    try:
        manifest = Manifest.read(uri)
    except FileNotFoundError:
        raise ManifestError(f"{manifest_url(uri)} not found: prepare the data first (python -m jobs.prepare ...)") from None
    if require_complete and not manifest.complete:
        raise ManifestError(
            f"{manifest_url(uri)} is incomplete ({len(manifest.shards)} of {manifest.num_shards} shards): "
            "rerun the prepare job with the same config to finish it"
        )
    return manifest


def conditioning(model_name: str) -> str:
    """'class' for DiT-family models, 'caption' for PixArt-family models."""

    return "class" if family(model_name) == "dit" else "caption"


def expected_latent_shape(model_cfg) -> list[int]:
    return [model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size]


# What `encoders.TextEncoder` does to a caption before the tokenizer (`encoders.clean_captions`); the data
# and sampling settings record it.
CAPTION_PREPROCESSING = "pixart-clean-caption-x2"


def verify_manifest(uri: str, model_cfg, data_cfg) -> Manifest:
    """The complete manifest under `uri`, checked against a `ModelConfig` and `DataConfig`.

    Raises ManifestError listing every mismatch: conditioning (class labels for DiT, T5 features for
    PixArt), latent shape (in_channels, image_size / vae_downsample), VAE id and scale factor, flip
    augmentation, number of classes, text encoder id, caption length, width and preprocessing.
    """
    manifest = read_manifest(uri)
    s, m = manifest.settings, model_cfg
    problems = []
    cond = conditioning(m.name)
    if s["conditioning"] != cond:
        problems.append(f"conditioning {s['conditioning']!r} != {cond!r} needed by model.name={m.name!r}")
    want = expected_latent_shape(m)
    if list(s["latent_shape"]) != want:
        problems.append(
            f"latent shape {s['latent_shape']} != {want} from model.in_channels={m.in_channels}, "
            f"model.image_size={m.image_size} / model.vae_downsample={m.vae_downsample}"
        )
    if s["vae"] != data_cfg.vae:
        problems.append(f"VAE {s['vae']!r} != data.vae={data_cfg.vae!r}")
    scale = 1.0 if data_cfg.vae == "none" else data_cfg.vae_scale_factor
    if not math.isclose(s["scale_factor"], scale, rel_tol=1e-6):
        problems.append(f"scale factor {s['scale_factor']} != data.vae_scale_factor={scale}")
    # The reader flips as the manifest says (the flipped latents exist only when prepared with data.flip), so a
    # config that says otherwise would train with another augmentation than it records (run_config.WEIGHTS)
    if bool(s.get("flip")) != data_cfg.flip:
        prepared, wanted = str(bool(s.get("flip"))).lower(), str(data_cfg.flip).lower()
        problems.append(f"prepared with flip={prepared} != data.flip={wanted} (prepare again with data.flip={wanted} "
                        f"into another data.uri, or set data.flip={prepared})")
    if cond == "class" and s["conditioning"] == "class" and s["num_classes"] != m.num_classes:
        problems.append(f"{s['num_classes']} classes != model.num_classes={m.num_classes}")
    if cond == "caption" and s["conditioning"] == "caption":
        if s["text_encoder"] != data_cfg.text_encoder:
            problems.append(f"text encoder {s['text_encoder']!r} != data.text_encoder={data_cfg.text_encoder!r}")
        if s["text_dim"] != m.caption_channels:
            problems.append(f"T5 width {s['text_dim']} != model.caption_channels={m.caption_channels}")
        if s["text_len"] != m.model_max_length:
            problems.append(f"caption length {s['text_len']} != model.model_max_length={m.model_max_length}")
        if s.get("caption_preprocessing") != CAPTION_PREPROCESSING:
            problems.append(f"captions encoded with preprocessing {s.get('caption_preprocessing')!r}, not PixArt's "
                            f"{CAPTION_PREPROCESSING!r} (prepared before the captions were cleaned: prepare again)")
    if problems:
        raise ManifestError(f"{manifest_url(uri)} does not match the model config: " + "; ".join(problems))
    check_shards(uri, manifest)
    return manifest


def check_shards(uri: str, manifest: Manifest, shown: int = 10) -> None:
    """Every shard of the manifest is stored at its recorded size (`bytes`; one listing of the folder, no
    download): ManifestError naming each missing or truncated shard (the first `shown` of them) before
    a worker would find it in the middle of training."""
    records = manifest.records()
    bad = []
    for record, size in zip(records, stored_sizes(uri, records), strict=True):
        if size is None:
            bad.append(f"{record['name']} missing")
        elif "bytes" in record and size != record["bytes"]:
            bad.append(f"{record['name']} has {size} bytes, the manifest {record['bytes']}")
    if bad:
        more = f", and {len(bad) - shown} more" if len(bad) > shown else ""
        raise ManifestError(f"{uri}: {len(bad)} of {len(records)} shards are missing or not of their recorded size "
                            f"({'; '.join(bad[:shown])}{more}); rerun the prepare job with the same config to remake them")
