"""The members of one generated sample in a samples shard (`dydit_dist.shardset` packs and reads shards).

Members of sample k (key `{k:08d}`):

    {key}.png     the image, 8-bit L, RGB or RGBA (1, 3 or 4 channels, as the model makes them)
    {key}.cls     class index as ASCII text (class-conditional models)
    {key}.txt     the prompt, UTF-8 (text-to-image models)
    {key}.json    {"index": k, "seed": 64-bit seed, "class": c} or {..., "prompt": p, "prompt_index": i}

Readers stream the shards, one sample at a time, checking each against its manifest record's sha256.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dydit_dist import shardset
from dydit_dist.shardset import Sample, ShardError

from .manifest import SamplesError

PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
MEMBER_MODE = 0o644  # the permission bits of a samples shard's members


@dataclass
class GeneratedSample:
    """image: (H, W, C) uint8; meta: the `.json` member (index, seed, class or prompt)."""

    index: int
    image: np.ndarray
    meta: dict


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(..., H, W, C) uint8 with C in 1, 3, 4 -> (..., H, W, 3)."""
    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 4:
        return image[..., :3]
    raise ValueError(f"images must have 1, 3 or 4 channels, got {channels}")


def png_bytes(image: np.ndarray) -> bytes:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in PIL_MODES:
        raise ValueError(f"expected an (H, W, 1|3|4) uint8 image, got {image.dtype} {image.shape}")
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image, PIL_MODES[image.shape[-1]])
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes, where: str) -> np.ndarray:
    try:
        pil = Image.open(io.BytesIO(data))
        pil.load()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for a bad file; the cause is kept
        raise ValueError(f"{where}: not a readable PNG ({type(err).__name__}: {err})") from err
    array = np.asarray(pil)
    return array[..., None] if array.ndim == 2 else array


def sample_files(sample: GeneratedSample) -> Sample:
    """The members of one generated sample (key `{index:08d}`)."""
    files = {"__key__": f"{sample.index:08d}".encode(), "png": png_bytes(sample.image)}
    if "class" in sample.meta:
        files["cls"] = str(int(sample.meta["class"])).encode()
    if "prompt" in sample.meta:
        files["txt"] = sample.meta["prompt"].encode("utf-8")
    files["json"] = json.dumps(sample.meta, sort_keys=True).encode()
    return files


def decode_sample(files: Sample, where: str) -> GeneratedSample:
    key = files["__key__"].decode()
    if "png" not in files or "json" not in files:
        raise ShardError(f"{where}: sample {key} lacks its .png or .json member "
                         f"(has {sorted(k for k in files if k != '__key__')})")
    meta = json.loads(files["json"])
    return GeneratedSample(int(meta["index"]), decode_png(files["png"], f"{where}:{key}.png"), meta)


def pack(samples: list[GeneratedSample]) -> bytes:
    """The bytes of a shard holding `samples` (in the given order)."""
    return shardset.pack((sample_files(s) for s in samples), mode=MEMBER_MODE)


def unpack(data: bytes, where: str = "shard") -> list[GeneratedSample]:
    """Every sample of a shard held in memory."""
    return [decode_sample(files, where) for files in shardset.unpack(data, where)]


def iter_shard(url: str, record: dict) -> Iterator[GeneratedSample]:
    """Stream the samples of a shard object (any storage URL) without holding it in memory, checked
    against its manifest `record`: a SamplesError when they are not samples start .. start + count - 1
    in order (a sample twice or one missing would count as another sample set), a ShardError after
    the last sample when its bytes are not the record's."""
    start, count = record["start"], record["count"]
    expected = start
    for files in shardset.stream(url, record):
        try:
            sample = decode_sample(files, url)
        except (ShardError, ValueError) as err:  # content that makes no sense: corrupt bytes say so first
            corrupt = shardset.corruption(url, record)
            if corrupt is not None:
                raise corrupt from err
            raise
        if sample.index != expected or expected >= start + count:
            raise SamplesError(f"{url}: sample {sample.index} where {expected} was expected (its manifest record: "
                               f"samples {start}..{start + count - 1})")
        expected += 1
        yield sample
    if expected != start + count:
        raise SamplesError(f"{url}: {expected - start} samples, its manifest record counts {count}")
