"""Images streamed from storage in batches, and their features from a torch-fidelity extractor.

Image sources (uint8 (B, H, W, 3) batches, never the whole set in memory; every shard is checked
against the sha256 its manifest records, so a corrupt or replaced shard stops the evaluation):
- a samples folder of the sampling job (`manifest.json` of format dydit_dist.samples/1);
- a pixel-space data folder of the prepare job (`data.vae: none`; the stored [-1, 1] arrays are
  quantized as the sampler quantizes its outputs, so a prepared image comes back bit for bit);
- an `.npz` in the ADM evaluator's format (`arr_0`, N x H x W x 3 uint8).

Features come from one forward per batch: the torch-fidelity layers of the metrics, and sFID's
spatial features tapped from the same forward by a hook (`extractors.SpatialTap`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from dydit_dist import storage
from dydit_dist.data.manifest import Manifest, read_manifest
from dydit_dist.data.shards import decode_sample
from dydit_dist.precision import exact_fp32
from dydit_dist.sample.export import iter_npz_array, iter_samples
from dydit_dist.sample.manifest import SamplesManifest
from dydit_dist.sample.shards import to_rgb
from dydit_dist.shardset import manifest_url, read_shard, unpack

from .extractors import SPATIAL, SpatialTap
from .metrics import EvalInputError

FEATURE_PRECISION = "fp32 (TF32 off)"  # what `extract_features` computes in on every device
SAMPLES_FORMAT = SamplesManifest.FORMAT
DATA_FORMAT = Manifest.FORMAT


def source_kind(url: str) -> str:
    """'npz', 'samples' or 'data'; ValueError naming the URL for anything else."""
    if url.endswith(".npz"):
        return "npz"
    manifest = manifest_url(url)
    if not storage.exists(manifest):
        raise EvalInputError(f"{url}: expected an ADM .npz file, or a samples or pixel-space data folder with a "
                             "manifest.json")
    try:
        fmt = storage.read_json(manifest).get("format")
    except (ValueError, AttributeError) as err:  # not JSON, or JSON of no object
        raise EvalInputError(f"{manifest}: not a manifest ({err}); expected the manifest.json of a samples or "
                             "pixel-space data folder") from None
    if fmt == SAMPLES_FORMAT:
        return "samples"
    if fmt == DATA_FORMAT:
        return "data"
    raise EvalInputError(f"{manifest}: unknown manifest format {fmt!r} (expected {SAMPLES_FORMAT} or {DATA_FORMAT})")


def count_images(url: str) -> int:
    """How many images a source holds (from its manifest or the .npz header; nothing is decoded)."""
    if source_kind(url) == "npz":
        return _npz_rows(url)
    return int(storage.read_json(manifest_url(url))["num_samples"])


def _npz_rows(url: str) -> int:
    shape = npz_images_shape(url)
    return 0 if shape is None else int(shape[0])


def npz_images_shape(url: str) -> tuple[int, ...] | None:
    """The shape of an .npz's `arr_0` from its header (None without one); EvalInputError naming the file
    when it is no readable .npz (not a zip, cut short, a member that is no .npy)."""
    import zipfile

    try:
        with storage.open_file(url, "rb") as f, zipfile.ZipFile(f) as zf:
            if "arr_0.npy" not in zf.namelist():
                return None
            member = zf.open("arr_0.npy")
            version = np.lib.format.read_magic(member)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return tuple(int(n) for n in read(member)[0])
    except (zipfile.BadZipFile, ValueError, EOFError) as err:
        raise EvalInputError(f"{url}: not a readable .npz ({err}); expected an ADM reference batch (numpy.savez "
                             "with arr_0 images, or mu / sigma statistics)") from None


def size_problem(url: str, sample_size: int | None) -> str | None:
    """Why the reference `url` does not fit samples of `sample_size` px (its images of another resolution: a
    FID across resolutions is not the published metric), or None (fits, holds statistics only, or unknown)."""
    size = image_size(url)
    if size is None or sample_size is None or size == (sample_size, sample_size):
        return None
    return (f"its images are {size[0]}x{size[1]}, the samples {sample_size}x{sample_size}; use the reference of the "
            f"samples' resolution (ADM's VIRTUAL_imagenet{sample_size}_labeled.npz for ImageNet)")


def image_size(url: str) -> tuple[int, int] | None:
    """(H, W) of a reference's images (an .npz's arr_0, a samples or data folder's image_size); None when
    it holds statistics only."""
    if source_kind(url) == "npz":
        shape = npz_images_shape(url)
        return None if shape is None or len(shape) != 4 else (shape[1], shape[2])
    size = storage.read_json(manifest_url(url))["settings"].get("image_size")
    return None if size is None else (int(size), int(size))


def _pixels_to_uint8(x: np.ndarray) -> np.ndarray:
    """(C, H, W) floats in [-1, 1] -> (H, W, C) uint8, as `sample.generate.ImageDecoder` quantizes."""
    return np.clip(127.5 * x.astype(np.float32) + 128.0, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def _iter_data_images(url: str) -> Iterator[np.ndarray]:
    manifest = read_manifest(url)
    if manifest.settings.get("latent_storage") != "pixels":
        raise EvalInputError(f"{url}: holds VAE latents ({manifest.settings.get('vae')}), not images; a reference "
                             "must be images: an ADM .npz, a samples folder or pixel-space data (data.vae=none)")
    for record in manifest.records():
        shard = storage.join(url, record["name"])
        for files in unpack(read_shard(url, record), shard):  # checked against the record's sha256
            yield _pixels_to_uint8(decode_sample(files, shard).latent)


def image_batches(url: str, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches of every image of a source (see the module docstring)."""
    kind = source_kind(url)
    if kind == "npz":
        for batch in iter_npz_array(url, "arr_0", batch_size):
            if batch.ndim != 4 or batch.dtype != np.uint8:
                raise EvalInputError(f"{url}: arr_0 must be uint8 (N, H, W, C), got {batch.dtype} {batch.shape}")
            yield to_rgb(batch)
        return
    images = (s.image for s in iter_samples(url)) if kind == "samples" else _iter_data_images(url)
    batch = []
    for image in images:
        batch.append(to_rgb(image))
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


@torch.no_grad()
def extract_features(batches, module, device: str | torch.device, total: int | None = None,
                     desc: str = "features", spatial: SpatialTap | None = None) -> dict[str, torch.Tensor]:
    """Run a torch-fidelity extractor over uint8 (B, H, W, 3) batches -> {layer: (N, D) float32 on CPU}, in
    full fp32 (TF32 off on a GPU, the CLIP scores a batch generator computes too); with `spatial`, also {SPATIAL: (N, H' * W' * channels)} tapped from the same forward."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in module.features_list}
    hook = None
    if spatial is not None:
        out[SPATIAL] = []

        def tap(_module, _inputs, output):  # (B, C, H', W') -> (B, H' * W' * channels), NHWC order
            out[SPATIAL].append(output[:, : spatial.channels].permute(0, 2, 3, 1).flatten(1).float().cpu())

        hook = module.get_submodule(spatial.module).register_forward_hook(tap)
    try:  # TF32 off on a GPU: the published statistics are of full-fp32 features (TF's Inception graph)
        with exact_fp32(torch.device(device)), \
                tqdm(total=total, unit="img", desc=desc, mininterval=2.0, disable=total is None) as bar:
            for batch in batches:
                x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device)  # (B, 3, H, W)
                for name, value in module.convert_features_tuple_to_dict(module(x)).items():
                    out[name].append(value.float().cpu())
                bar.update(len(batch))
    finally:
        if hook is not None:
            hook.remove()
    if not out[module.features_list[0]]:
        raise EvalInputError("no images to extract features from")
    return {name: torch.cat(values) for name, values in out.items()}
