"""The ADM evaluator's format (openai/guided-diffusion `evaluations/`): an `.npz` whose `arr_0` is
uint8 (N, H, W, 3), written and read as a stream, never held in memory whole.

    export_adm_npz("s3://bucket/runs/x/samples", "/data/x_samples.npz")   # 50k x 256 x 256 x 3 = 9.8 GB
    for batch in iter_npz_array("VIRTUAL_imagenet256_labeled.npz", "arr_0", 500): ...

Grey images are replicated to 3 channels and alpha is dropped, as the evaluator expects RGB.
"""

from __future__ import annotations

import os
import re
import uuid
import zipfile
from collections.abc import Iterator

import numpy as np

from dydit_dist import storage

from .manifest import SamplesError, SamplesManifest
from .shards import iter_shard, to_rgb


def iter_samples(samples_url: str, require_complete: bool = True):
    """Every sample of a samples folder in index order, one at a time (shards streamed in turn, each
    checked against the sha256 of its manifest record: a ShardError at the end of a shard that differs)."""
    manifest = SamplesManifest.read(samples_url)
    if require_complete and not manifest.complete:
        raise SamplesError(f"{samples_url}: {len(manifest.shards)} of {manifest.num_shards} shards are done; "
                           "finish the sampling job first (rerun it: it makes only the missing shards)")
    expected = 0
    for record in manifest.records():
        if record["start"] != expected:
            raise SamplesError(f"{samples_url}: samples {expected}..{record['start'] - 1} are missing")
        yield from iter_shard(storage.join(samples_url, record["name"]), record)  # its indices checked
        expected += record["count"]


def export_problem(path: str) -> str | None:
    """Why `path` is no local .npz file name to export to (a URL would land in a local folder named `s3:`; a
    folder fails only after the whole write), or None."""
    if "://" in path and not path.startswith("file://"):
        return "a local path (the .npz is written on the driver's disk; copy it to object storage afterwards)"
    local = os.path.abspath(path.removeprefix("file://"))
    if not local.endswith(".npz") or os.path.isdir(local):
        return "expected the path of a .npz file to write, not a folder"
    folder = os.path.dirname(local)
    while not os.path.exists(folder):  # the folders the export creates: their nearest existing parent decides
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is a file, not a folder to write the .npz in"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable by this user"
    return None


def export_path(path: str) -> str:
    """The absolute local path an export of `path` writes; SamplesError naming it when it is none (`export_problem`)."""
    if (problem := export_problem(path)) is not None:
        raise SamplesError(f"sample.export_npz={path}: {problem}")
    return os.path.abspath(path.removeprefix("file://"))


def export_adm_npz(samples_url: str, path: str) -> int:
    """Write every sample of a complete samples folder into a local `.npz` (`arr_0`, N x H x W x 3
    uint8, in index order); returns N. The file appears whole: written under a temporary name, synced
    to disk, then renamed. Temporary files an earlier export of `path` left (a killed one: ~10 GB at
    50k x 256px) are removed first."""
    target = path
    path = export_path(path)
    try:
        return _export(samples_url, path)
    except storage.StorageError:
        raise
    except OSError as err:  # the local file: a full disk, permissions changed since the preflight
        raise SamplesError(f"sample.export_npz={target}: the export failed ({type(err).__name__}: {err}); the "
                           "samples are kept: a rerun makes none again and exports them") from err


def _export(samples_url: str, path: str) -> int:
    manifest = SamplesManifest.read(samples_url)
    count = manifest.num_samples
    samples = iter_samples(samples_url)
    first = next(samples)
    height, width = first.image.shape[:2]
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (count, height, width, 3)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale_temporaries(path)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # the pattern `remove_stale_temporaries` knows
    written = 0
    try:
        with open(tmp, "wb") as out:
            with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_1_0(f, header)
                    for s in _chain(first, samples):
                        if s.image.shape[:2] != (height, width):
                            raise SamplesError(f"{samples_url}: sample {s.index} is {s.image.shape[:2]}, "
                                               f"not {(height, width)} like sample 0")
                        f.write(np.ascontiguousarray(to_rgb(s.image)).tobytes())
                        written += 1
            out.flush()
            os.fsync(out.fileno())  # else a crash after the rename can leave `path` whole in name only
        if written != count:
            raise SamplesError(f"{samples_url}: the manifest counts {count} samples, the shards hold {written}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return count


def remove_stale_temporaries(path: str) -> list[str]:
    """Remove the temporary files `{path}.{32 hex digits}.tmp` of earlier exports of `path` that were
    killed before their rename, and nothing else; returns their paths. (An export of the same path
    running at this moment loses its file, and fails at its rename.)"""
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(name) + r"\.[0-9a-f]{32}\.tmp")
    stale = sorted(os.path.join(folder, f) for f in os.listdir(folder) if pattern.fullmatch(f))
    for f in stale:
        os.remove(f)
    return stale


def _chain(first, rest):
    yield first
    yield from rest


def npz_keys(url: str) -> list[str]:
    with storage.open_file(url, "rb") as f, zipfile.ZipFile(f) as zf:
        return [n.removesuffix(".npy") for n in zf.namelist()]


def read_npz_small(url: str, key: str) -> np.ndarray:
    """One (small) array of an `.npz`, without pickles."""
    with storage.open_file(url, "rb") as f, np.load(f, allow_pickle=False) as npz:
        if key not in npz.files:
            raise KeyError(f"{url} has no array {key!r} (arrays: {', '.join(npz.files)})")
        return npz[key]


def iter_npz_array(url: str, key: str, batch: int) -> Iterator[np.ndarray]:
    """Batches of the first axis of one array of an `.npz`, streamed from any storage URL."""
    with storage.open_file(url, "rb") as f, zipfile.ZipFile(f) as zf:
        name = f"{key}.npy"
        if name not in zf.namelist():
            raise KeyError(f"{url} has no array {key!r} (arrays: {', '.join(n.removesuffix('.npy') for n in zf.namelist())})")
        with zf.open(name) as member:
            version = np.lib.format.read_magic(member)
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in readers:
                raise ValueError(f"{url}:{key}: .npy format version {version} is not supported")
            shape, fortran, dtype = readers[version](member)
            if fortran or dtype.hasobject:
                raise ValueError(f"{url}:{key}: expected a C-ordered array of plain numbers")
            row = int(np.prod(shape[1:])) * dtype.itemsize
            for start in range(0, shape[0], batch):
                rows = min(batch, shape[0] - start)
                data = member.read(rows * row)
                if len(data) != rows * row:
                    raise ValueError(f"{url}:{key}: truncated at row {start}")
                yield np.frombuffer(bytearray(data), dtype).reshape((rows, *shape[1:]))
