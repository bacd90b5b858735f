"""Inputs of the prepare job, listed and split into chunks (one output shard per chunk) before any work.

`data.source_format`:
- `imagefolder`: `data.source` is a folder with one subfolder per class (torchvision's ImageFolder:
  class index = position of the folder name in sorted order, images found recursively).
- `captions`: `data.source` is a `.csv` (header row) or `.jsonl` file with an image column (`path`,
  `image` or `file_name`; relative to the file's folder, or a URL) and a caption column
  (`caption` or `text`).
- `webdataset`: `data.source` is a tar URL, a brace pattern (`.../train-{000000..000146}.tar`), a glob,
  or a folder of `.tar` files; each sample has an image (`jpg`, `png`, ...) and `cls` or a caption
  (`txt`, `caption`, or `json["caption"]`). One output shard per input tar.

Order: imagefolder and captions items are written in a random permutation seeded by `data.seed`
(`default_rng(seed).permutation`), not in listing order, which for an ImageFolder is class order:
each shard holds a random draw of the classes, so the reader's shard shuffle and shuffle buffer give
batches of about as many classes as an i.i.d. draw. The same listing and seed give the same chunks.
A webdataset source keeps its input's order (one output shard per input tar, samples as they come):
class-sorted input tars give class-sorted shards, which the prepare job reports.

Images are center-cropped and resized as each model's reference does (`CROPS`): DiT's training script
uses ADM's `center_crop_arr`; PixArt-alpha's (`diffusion/data/transforms.py`, `tools/extract_features.py`)
torchvision's `Resize(n)` (bilinear) then `CenterCrop(n)`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from braceexpand import braceexpand
from PIL import Image

from dydit_dist import storage
from dydit_dist.data.shards import DataError
from dydit_dist.shardset import ShardError, unpack

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "gif", "tif", "tiff")
_PATH_COLUMNS = ("path", "image", "file_name")
_CAPTION_COLUMNS = ("caption", "text")


@dataclass(frozen=True)
class Item:
    key: str  # unique, no dots: the sample key in the shard
    url: str
    label: int | None = None
    caption: str | None = None


@dataclass(frozen=True)
class Chunk:
    index: int  # output shard index
    items: tuple[Item, ...] = ()  # imagefolder / captions
    tar: str | None = None  # webdataset: one input tar
    prefix: str = ""  # webdataset: its samples' keys are `{prefix}-{j:06d}`; "": the tar's name (`key_prefix`)

    @property
    def key_prefix(self) -> str:
        return self.prefix or _stem(self.tar or "")

    @property
    def size_hint(self) -> int:
        return len(self.items) if self.tar is None else 0


@dataclass(frozen=True)
class SourcePlan:
    chunks: tuple[Chunk, ...]
    num_inputs: int  # images (imagefolder, captions) or tars (webdataset)
    digest: str  # sha256 of the listing: a changed source cannot resume into old shards
    classes: tuple[str, ...] = ()


def _stem(tar: str) -> str:
    """A tar's file name as a key prefix (no dots: they split a sample's key from its members' names)."""
    return tar.rsplit("/", 1)[-1].removesuffix(".tar").replace(".", "_")


def _digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _is_image(url: str) -> bool:
    return url.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def chunk_items(items: list[Item], shard_size: int, seed: int) -> tuple[Chunk, ...]:
    """The items in a random order seeded by `seed`, `shard_size` per chunk (keys stay the listing's)."""
    items = [items[i] for i in np.random.default_rng(seed).permutation(len(items)).tolist()]
    return tuple(Chunk(i, tuple(items[s : s + shard_size])) for i, s in enumerate(range(0, len(items), shard_size)))


def class_folders(source: str, num_classes: int) -> list[str]:
    """The sorted class folder names of an ImageFolder source, from one listing (the preflight's check
    too); DataError for a missing source, a file, images beside the class folders or a folder count other
    than `num_classes`."""
    if not storage.exists(source):
        raise DataError(f"data.source={source} does not exist")
    if not storage.is_folder(source):
        raise DataError(f"data.source={source} is a file; data.source_format=imagefolder reads a folder with one "
                        "subfolder of images per class (a .csv / .jsonl of captions is data.source_format=captions)")
    entries = storage.entries(source)
    folders = sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")
    stray = [e["name"] for e in entries if e["type"] != "directory" and _is_image(e["name"])]
    if stray:
        raise DataError(
            f"data.source={source} has images outside class folders (e.g. {stray[0]}); the imagefolder "
            "layout is one subfolder per class"
        )
    if not folders:
        raise DataError(f"data.source={source} has no class folders; the imagefolder layout is one subfolder of "
                        "images per class")
    if len(folders) != num_classes:  # before listing them: ImageNet's are 1,000 listings
        raise DataError(
            f"data.source={source} has {len(folders)} class folders but model.num_classes={num_classes}; "
            f"folders: {', '.join(folders[:10])}{' ...' if len(folders) > 10 else ''}"
        )
    return folders


def first_class_images(source: str, folders: list[str]) -> int:
    """How many images the first class folder holds (one listing: what the preflight checks of the rest)."""
    return sum(1 for u in storage.find(storage.join(source, folders[0])) if _is_image(u))


def plan_imagefolder(source: str, num_classes: int, shard_size: int, seed: int = 0) -> SourcePlan:
    """One item per image, labels from sorted class folder names, chunked in a seeded random order;
    DataError for a bad layout."""
    folders = class_folders(source, num_classes)
    listings = _list_images([storage.join(source, name) for name in folders], f"list {source}")
    items, empty = [], []
    for label, (name, urls) in enumerate(zip(folders, listings, strict=True)):
        if not urls:
            empty.append(name)
        items += [Item(f"{len(items) + i:09d}", u, label=label) for i, u in enumerate(urls)]
    if not items:
        raise DataError(f"data.source={source} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders")
    if empty:
        raise DataError(f"data.source={source}: class folders without images: {', '.join(empty)}")
    digest = _digest([f"{it.url}\t{it.label}" for it in items])
    return SourcePlan(chunk_items(items, shard_size, seed), len(items), digest, tuple(folders))


def _list_images(folders: list[str], desc: str, threads: int = 16) -> list[list[str]]:
    """The image URLs under each folder (recursive, sorted by `storage.find`), listed `threads` at a time
    with a progress bar: ImageNet's 1,000 class folders on S3 are about 2,000 LIST pages, minutes one at a time."""
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=threads) as pool, \
            tqdm(total=len(folders), unit="folder", desc=desc, mininterval=2.0, disable=len(folders) < 50) as bar:
        def images(folder: str) -> list[str]:
            urls = [u for u in storage.find(folder) if _is_image(u)]
            bar.update(1)
            return urls

        return list(pool.map(images, folders))


def _column(row: dict, names: tuple[str, ...], source: str, line: int) -> str:
    for name in names:
        if row.get(name) not in (None, ""):
            return str(row[name])
    raise DataError(f"{source} line {line}: needs one of the columns {list(names)}, got {sorted(row)}")


def plan_captions(source: str, shard_size: int, seed: int = 0) -> SourcePlan:
    """One item per row of a CSV or JSONL file of image path + caption, chunked in a seeded random order."""
    try:
        text = storage.read_bytes(source).decode("utf-8-sig")  # a byte-order mark (Excel's CSVs) is no column name
    except FileNotFoundError:
        raise DataError(f"data.source={source} does not exist") from None
    except UnicodeDecodeError as err:
        raise DataError(f"data.source={source} is not UTF-8 text ({err}); expected a .csv or .jsonl file") from None
    if source.endswith(".jsonl"):
        rows = []  # (line number, row)
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise DataError(f"{source} line {number}: not a JSON object ({err.msg})") from None
    elif source.endswith(".csv"):
        rows = [(i + 2, row) for i, row in enumerate(csv.DictReader(io.StringIO(text)))]  # line 1: the header
    else:
        raise DataError(f"data.source={source}: captions must be a .csv or .jsonl file")
    folder = source.rsplit("/", 1)[0] if "/" in source else "."
    items = []
    for i, (number, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source} line {number}: expected an object with an image and a caption, got "
                            f"{type(row).__name__}")
        path = _column(row, _PATH_COLUMNS, source, number)
        url = path if "://" in path or path.startswith("/") else storage.join(folder, path)
        if "://" not in url:  # a relative source: absolute, as the encoder tasks run in other working directories
            url = os.path.abspath(url)
        try:
            storage.check_url(url)
        except storage.StorageError as err:
            raise DataError(f"{source} line {number}: {err}") from None
        items.append(Item(f"{i:09d}", url, caption=_column(row, _CAPTION_COLUMNS, source, number)))
    if not items:
        raise DataError(f"data.source={source} lists no images")
    digest = _digest([f"{it.url}\t{it.caption}" for it in items])
    return SourcePlan(chunk_items(items, shard_size, seed), len(items), digest)


def plan_webdataset(source: str) -> SourcePlan:
    """One chunk per input tar (brace patterns, globs and folders expanded, sorted)."""
    urls: list[str] = []
    missing: list[str] = []  # tars named in full (a brace pattern) that are not there
    for pattern in braceexpand(source):
        if pattern.endswith(".tar") and not any(c in pattern for c in "*?["):
            (urls if storage.exists(pattern) else missing).append(pattern)
        elif any(c in pattern for c in "*?["):
            urls += storage.glob(pattern)
        else:
            urls += [u for u in storage.listdir(pattern) if u.endswith(".tar")]
    urls = sorted(set(urls))
    if not urls:
        raise DataError(f"data.source={source} matches no .tar files")
    if missing:  # a partial prepare would be refused later as other settings, once they are uploaded
        raise DataError(f"data.source={source}: {len(missing)} of the tars it names do not exist: "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    stems = [_stem(u) for u in urls]
    if len(set(stems)) < len(stems):  # tars of one name in several folders: keys (and noise seeds) must differ
        stems = [f"{i:06d}_{stem}" for i, stem in enumerate(stems)]
    chunks = tuple(Chunk(i, tar=u, prefix=stem) for i, (u, stem) in enumerate(zip(urls, stems, strict=True)))
    return SourcePlan(chunks, len(urls), _digest(urls))


def plan_source(cfg, conditioning: str) -> SourcePlan:
    """The chunks of `cfg.data.source`; DataError when it is empty or does not fit the model."""
    d = cfg.data
    if not d.source:
        raise DataError("data.source is not set: give the input images (folder, tar pattern, csv/jsonl)")
    if d.source_format == "imagefolder":
        if conditioning != "class":
            raise DataError(f"data.source_format=imagefolder gives class labels; model.name={cfg.model.name} "
                            "needs captions (data.source_format=captions)")
        return plan_imagefolder(d.source, cfg.model.num_classes, d.shard_size, d.seed)
    if d.source_format == "captions":
        if conditioning != "caption":
            raise DataError(f"data.source_format=captions gives captions; model.name={cfg.model.name} "
                            "needs class labels (data.source_format=imagefolder)")
        return plan_captions(d.source, d.shard_size, d.seed)
    return plan_webdataset(d.source)


def iter_chunk(chunk: Chunk, conditioning: str) -> Iterator[tuple[Item, bytes | None, str | None]]:
    """(item, image bytes or None, error or None) for every input of a chunk, in order."""
    if chunk.tar is None:
        for item in chunk.items:
            try:
                yield item, storage.read_bytes(item.url), None
            except (FileNotFoundError, PermissionError) as err:
                yield item, None, str(err)
            except storage.StorageError as err:
                if not isinstance(err.__cause__, PermissionError):  # the store failing: stop, a rerun goes on
                    raise
                yield item, None, str(err)  # access denied to this one object: a bad input, skipped and listed
        return
    try:
        samples = unpack(storage.read_bytes(chunk.tar), chunk.tar)
    except ShardError as err:
        raise DataError(f"data.source: the input tar {chunk.tar} is not a readable tar ({err.__cause__ or err}); "
                        "replace it with a readable copy under the same name and run again (finished shards are "
                        "kept)") from None
    for j, sample in enumerate(samples):
        files = {name.lower(): value for name, value in sample.items()}  # `.JPEG` is jpeg, as webdataset reads it
        url = f"{chunk.tar}#{files['__key__'].decode()}"
        image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
        label, caption, error = None, None, None
        try:
            if conditioning == "class":
                label = int(files["cls"])
            else:
                caption = next((files[e].decode() for e in ("txt", "caption") if e in files), None)
                caption = caption or json.loads(files["json"])["caption"]
                if not isinstance(caption, str) or not caption.strip():  # img2dataset: "" and null when none
                    error = f"no caption (got {caption!r})"
        except (KeyError, ValueError, TypeError) as err:
            error = f"no {'cls' if conditioning == 'class' else 'caption'} ({type(err).__name__}: {err})"
        if image is None:
            error = f"no image member (one of {', '.join(IMAGE_EXTENSIONS)})"
        yield Item(f"{chunk.key_prefix}-{j:06d}", url, label, caption), image, error


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's center crop (guided-diffusion image_datasets.py), as in the DiT training script."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def resize_center_crop(pil_image: Image.Image, image_size: int) -> Image.Image:
    """PixArt-alpha's training crop: `T.Resize(image_size)` (shorter side, bilinear) then `T.CenterCrop`."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    return TF.center_crop(TF.resize(pil_image, image_size, interpolation=InterpolationMode.BILINEAR), image_size)


CROPS = {"adm": center_crop_arr, "resize-center": resize_center_crop}  # the data settings' "crop" -> function


def load_image(data: bytes, image_size: int, mode: str = "RGB", crop: str = "adm") -> np.ndarray:
    """Decoded, converted to `mode` ('RGB', 'L' or 'RGBA'), center-cropped by `CROPS[crop]`: uint8 (H, W, C)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        image = image.convert(mode)
    arr = np.asarray(CROPS[crop](image, image_size))
    return arr[:, :, None] if arr.ndim == 2 else arr
