"""One shard of generated samples: a plain tar of PNG images with their conditions.

Members of sample k (key `{k:08d}`):

    {key}.png     the image, 8-bit L, RGB or RGBA (1, 3 or 4 channels, as the model makes them)
    {key}.cls     class index as ASCII text (class-conditional models)
    {key}.txt     the prompt, UTF-8 (text-to-image models)
    {key}.json    {"index": k, "seed": 64-bit seed, "class": c} or {..., "prompt": p, "prompt_index": i}

Shards are built in memory with fixed member metadata (the same samples give the same bytes) and
written whole by the caller; readers stream them, one sample at a time.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dydit_dist import storage

PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclass
class GeneratedSample:
    """image: (H, W, C) uint8; meta: the `.json` member (index, seed, class or prompt)."""

    index: int
    image: np.ndarray
    meta: dict

    def rgb(self) -> np.ndarray:
        """(H, W, 3) uint8: grey replicated, alpha dropped (what image metrics expect)."""
        return to_rgb(self.image)


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


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def pack(samples: list[GeneratedSample]) -> bytes:
    """The bytes of a shard holding `samples` (in the given order)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            key = f"{s.index:08d}"
            _add(tar, f"{key}.png", png_bytes(s.image))
            if "class" in s.meta:
                _add(tar, f"{key}.cls", str(int(s.meta["class"])).encode())
            if "prompt" in s.meta:
                _add(tar, f"{key}.txt", s.meta["prompt"].encode("utf-8"))
            _add(tar, f"{key}.json", json.dumps(s.meta, sort_keys=True).encode())
    return buf.getvalue()


def _group(members: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(name, bytes) members in tar order -> (key, {extension: bytes}) per sample."""
    key, files = None, {}
    for name, data in members:
        stem, _, ext = name.partition(".")
        if stem != key and key is not None:
            yield key, files
            files = {}
        key = stem
        files[ext] = data
    if key is not None:
        yield key, files


def _decode(key: str, files: dict[str, bytes], where: str) -> GeneratedSample:
    if "png" not in files or "json" not in files:
        raise ValueError(f"{where}: sample {key} lacks its .png or .json member (has {sorted(files)})")
    meta = json.loads(files["json"])
    return GeneratedSample(int(meta["index"]), decode_png(files["png"], f"{where}:{key}.png"), meta)


def unpack(data: bytes, where: str = "shard") -> list[GeneratedSample]:
    """Every sample of a shard held in memory."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    except tarfile.TarError as err:
        raise ValueError(f"{where}: not a readable tar ({err})") from err
    return [_decode(k, f, where) for k, f in _group(iter(members))]


def iter_shard(url: str) -> Iterator[GeneratedSample]:
    """Stream the samples of a shard object (any storage URL) without holding it in memory."""
    with storage.open_file(url, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                members = ((m.name, tar.extractfile(m).read()) for m in tar if m.isfile())
                for key, files in _group(members):
                    yield _decode(key, files, url)
        except tarfile.TarError as err:
            raise ValueError(f"{url}: not a readable tar ({err})") from err
