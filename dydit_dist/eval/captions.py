"""The reference of a text-to-image evaluation (`eval.protocol: coco`): real images and their captions,
in the ADM evaluator's format, with the captions file the sample job draws from.

    prepare_caption_reference(cfg)   # data.source (.csv/.jsonl of image + caption) ->
                                     #   eval.reference (.npz) and sample.prompts (.txt or .jsonl)

The `.npz` holds `arr_0` (N, H, W, 3) uint8: the images center-cropped to model.image_size as ADM's
evaluator crops its reference batches (`REFERENCE_CROP`; the prepare job's caption data is resized
PixArt's way instead); `captions` (N,): caption k of image k; `mu`, `sigma` (FID) and `mu_s`,
`sigma_s` (sFID) of the configured feature extractor, named in `feature_extractor` (its weights' sha256 in
`feature_extractor_weights_sha256`: an evaluation with other weights is refused); `settings`, JSON of
what it was made from (`reference_settings`: the source and its listing's digest, the subset, size and
crop), which reproduce compares before it reuses a reference (`reference_changes`). Row order is the
source's listing order (of a fixed random subset of `eval.reference_images` rows when set, as
COCO-30k takes 30,000 of val2014's), and the captions file holds the same captions in the same order, so sample k
(caption `k % N`, `sample.plan`) is drawn from the caption of real image k. Captions are written on one
line each (whitespace runs, newlines included, become one space), in the `.npz` and the file alike.

Images and features are made in one streaming pass; the `.npz` is written locally under a temporary
name (`dydit-reference-{pid}-*.npz` in the temp folder: one that a killed job left is removed by the
next) and uploaded whole. A reference needs at least 2 images (a covariance); the published protocols
take thousands (FID from fewer images than the feature width is biased high).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import zipfile

import numpy as np
import torch

from dydit_dist import storage
from dydit_dist.data.shards import DataError
from dydit_dist.data.sources import Chunk, iter_chunk, load_image, plan_captions
from dydit_dist.faults import process_alive
from dydit_dist.sample.export import npz_keys, read_npz_small

from .extractors import SPATIAL, resolve_extractor
from .features import extract_features, npz_images_shape
from .metrics import EvalInputError, statistics

log = logging.getLogger(__name__)
REFERENCE_SEED = 0  # the subset of eval.reference_images: fixed, so every lab draws the same rows
REFERENCE_CROP = "adm"  # `sources.load_image`'s crop of the real images
MIN_IMAGES = 2  # a covariance needs two
TEMP_PREFIX = "dydit-reference-"


def reference_settings(cfg, inputs_digest: str) -> dict:
    """What a caption reference of `cfg` is made from (`inputs_digest`: of data.source's listing)."""
    return {"source": cfg.data.source, "inputs_digest": inputs_digest, "reference_images": cfg.eval.reference_images,
            "subset_seed": REFERENCE_SEED, "image_size": cfg.model.image_size, "crop": REFERENCE_CROP}


def reference_changes(cfg) -> list[str]:
    """How the caption reference at eval.reference differs from the one `cfg` would make ("key: there vs
    now"). One made before its settings were recorded is compared by what it holds: its captions (those of
    the subset `cfg` takes, in order) and its image size."""
    url = cfg.eval.reference
    plan = plan_captions(cfg.data.source, shard_size=1 << 30)
    if "settings" in npz_keys(url):
        made = json.loads(str(read_npz_small(url, "settings")))
        expected = reference_settings(cfg, plan.digest)
        return [f"{k}: {made.get(k)!r} there vs {v!r} now" for k, v in expected.items() if made.get(k) != v]
    items = sorted((it for chunk in plan.chunks for it in chunk.items), key=lambda it: it.key)
    captions = [one_line(it.caption) for it in subset(items, cfg.eval.reference_images, cfg.data.source)]
    changes = []
    if [str(c) for c in read_npz_small(url, "captions")] != captions:
        changes.append(f"captions: not those of the {len(captions)} images of data.source={cfg.data.source} "
                       f"(eval.reference_images={cfg.eval.reference_images})")
    shape = npz_images_shape(url)
    size = None if shape is None else shape[1]
    if size != cfg.model.image_size:
        changes.append(f"image_size: {size} there vs {cfg.model.image_size} now")
    if not changes:
        log.warning("%s: a caption reference made before its settings were recorded; its captions and image size are "
                    "this config's, so it is used", url)
    return changes


def _remove_abandoned_temporaries() -> None:
    """Temporary .npz files of reference jobs that were killed (a SIGTERM ends a job without its clean-up):
    a COCO-30k one at 256 px is ~6 GB of the driver's disk."""
    folder = tempfile.gettempdir()
    for name in os.listdir(folder):
        if not (name.startswith(TEMP_PREFIX) and name.endswith(".npz")):
            continue
        path, pid = os.path.join(folder, name), name[len(TEMP_PREFIX):].split("-", 1)[0]
        with contextlib.suppress(OSError):  # gone meanwhile, or another user's in a shared /tmp: left alone
            if pid.isdigit() and os.stat(path).st_uid == os.getuid() and not process_alive(int(pid)):
                os.remove(path)
                log.info("removed %s, left by a reference job that was stopped", name)


def one_line(caption: str) -> str:
    return " ".join(caption.split())


def write_captions(url: str, captions: list[str]) -> None:
    """A prompts file `sample.plan.load_prompts` reads back as `captions`: `.jsonl` or one per line."""
    if url.lower().endswith(".jsonl"):
        text = "".join(json.dumps({"caption": c}) + "\n" for c in captions)
    else:
        text = "".join(c + "\n" for c in captions)
    storage.write_bytes(url, text.encode("utf-8"))


def _write_array(zf: zipfile.ZipFile, key: str, value: np.ndarray) -> None:
    with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)


def subset(items: list, count: int, source: str) -> list:
    """`count` of `items` drawn at random with a fixed seed (the same rows on every run and machine), in
    their listing order; all of them when `count` is 0. COCO-30k: 30,000 of val2014's image-caption rows."""
    if count == 0:
        return items
    if count > len(items):
        raise DataError(f"eval.reference_images={count}: data.source={source} lists only {len(items)} images")
    chosen = np.sort(np.random.default_rng(REFERENCE_SEED).choice(len(items), count, replace=False))
    return [items[i] for i in chosen]


def caption_reference_problems(cfg) -> dict[str, tuple[object, str]]:
    """{key: (value, problem)} of the inputs jobs.reference cannot work with (its dry run lists them too)."""
    e, s, d = cfg.eval, cfg.sample, cfg.data
    problems = {}
    if d.source_format != "captions":
        problems["data.source_format"] = (d.source_format, "a caption reference is made from a .csv or .jsonl of "
                                                           "image paths and captions (data.source_format=captions)")
    if not e.reference or not e.reference.endswith(".npz"):
        problems["eval.reference"] = (e.reference, "not a .npz name; give the ADM-format .npz to write the caption "
                                                   "reference to")
    if not s.prompts or not s.prompts.lower().endswith((".txt", ".jsonl")):
        problems["sample.prompts"] = (s.prompts, "not a .txt or .jsonl name; give the captions file to write, as "
                                                 "the sample job reads them")
    return problems


def prepare_caption_reference(cfg) -> dict:
    """Write eval.reference and sample.prompts from data.source (see the module docstring); returns
    {"reference", "prompts", "num_images", "feature_extractor"}."""
    e, s = cfg.eval, cfg.sample
    # 1. Validate inputs
    if problems := caption_reference_problems(cfg):
        raise EvalInputError("; ".join(f"{key}={value}: {problem}" for key, (value, problem) in problems.items()))
    plan = plan_captions(cfg.data.source, shard_size=1 << 30, seed=0)
    items = sorted((it for chunk in plan.chunks for it in chunk.items), key=lambda it: it.key)  # listing order
    items = subset(items, e.reference_images, cfg.data.source)
    if len(items) < MIN_IMAGES:
        raise EvalInputError(f"data.source={cfg.data.source} (eval.reference_images={e.reference_images}) gives "
                             f"{len(items)} image; a reference needs at least {MIN_IMAGES} (a covariance), the "
                             "published protocols thousands")
    captions = [one_line(it.caption) for it in items]
    size = cfg.model.image_size
    # 2. Images streamed into arr_0 and through the extractor, in one pass
    extractor = resolve_extractor(e)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = extractor.create(device, ["fid", "sfid"])
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(items), size, size, 3)}
    _remove_abandoned_temporaries()
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".npz")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as arr:
                np.lib.format.write_array_header_1_0(arr, header)

                def batches():
                    batch = []
                    for item, data, error in iter_chunk(Chunk(0, tuple(items)), "caption"):
                        if error is not None:
                            raise DataError(f"data.source={cfg.data.source}: {item.url}: {error}")
                        batch.append(load_image(data, size, crop=REFERENCE_CROP))
                        if len(batch) == e.batch_size:
                            yield np.stack(batch)
                            batch = []
                    if batch:
                        yield np.stack(batch)

                def written(images):
                    for batch in images:
                        arr.write(np.ascontiguousarray(batch).tobytes())
                        yield batch

                feats = extract_features(written(batches()), module, device, len(items), desc="reference",
                                         spatial=extractor.spatial)
            # 3. Statistics beside the images, as in an ADM reference batch
            fid, spatial = statistics(feats[extractor.layer("fid")]), statistics(feats[SPATIAL])
            _write_array(zf, "mu", fid["mu"])
            _write_array(zf, "sigma", fid["sigma"])
            _write_array(zf, "mu_s", spatial["mu"])
            _write_array(zf, "sigma_s", spatial["sigma"])
            _write_array(zf, "captions", np.array(captions))
            _write_array(zf, "feature_extractor", np.array(extractor.name))
            _write_array(zf, "feature_extractor_weights_sha256", np.array(extractor.weights_sha256()))
            _write_array(zf, "settings", np.array(json.dumps(reference_settings(cfg, plan.digest), sort_keys=True)))
        storage.upload(tmp, e.reference)
    finally:
        os.remove(tmp)
    write_captions(s.prompts, captions)
    log.info("caption reference of %d images at %s, captions at %s", len(items), e.reference, s.prompts)
    return {"reference": e.reference, "prompts": s.prompts, "num_images": len(items),
            "feature_extractor": extractor.name}
