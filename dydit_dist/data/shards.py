"""The members of one latent sample in a data shard (`dydit_dist.shardset` packs, groups and reads shards).

Members of a sample (all written by `sample_files`, read back by `decode_sample`):

    {key}.latent.npy       the model input before scaling: (C, h, w) for `sample` and pixel storage,
                           (2, C, h, w) = [mean, std] of the VAE posterior for `mean_std` storage
    {key}.latent_flip.npy  the same for the horizontally flipped image (only with `data.flip`)
    {key}.cls              class index as ASCII text (class-conditional data)
    {key}.t5.npy           T5 features of the caption's real tokens, (n, C) with n = mask.sum()
    {key}.t5mask.npy       the tokenizer's attention mask, (L,) uint8 (L = model_max_length)
    {key}.json             where the sample came from: {"source": url, "caption": ...}

Arrays are `.npy` (never pickles).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from dydit_dist.shardset import ShardError


class DataError(ValueError):
    """Input data that does not fit what was asked for; the message names the input."""


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple, bool]] = {}  # header bytes -> (dtype, shape, fortran)


def load_npy(data: bytes) -> np.ndarray:
    """An `.npy` payload as a (read-only) array; headers seen before are not parsed again."""
    if data[:8] != b"\x93NUMPY\x01\x00":
        return np.load(io.BytesIO(data), allow_pickle=False)
    end = 10 + int.from_bytes(data[8:10], "little")
    header = bytes(data[:end])
    meta = _NPY_HEADERS.get(header)
    if meta is None:
        stream = io.BytesIO(data)
        np.lib.format.read_magic(stream)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        meta = (dtype, shape, fortran)
        if len(_NPY_HEADERS) < 1024:
            _NPY_HEADERS[header] = meta
    dtype, shape, fortran = meta
    count = int(np.prod(shape))
    if len(data) - end != count * dtype.itemsize:
        raise ValueError(f"npy payload of {len(data) - end} bytes, expected {count * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape, order="F" if fortran else "C")


def sample_files(
    key: str,
    latent: np.ndarray,
    *,
    latent_flip: np.ndarray | None = None,
    label: int | None = None,
    t5: np.ndarray | None = None,
    t5_mask: np.ndarray | None = None,
    meta: dict | None = None,
) -> dict[str, bytes]:
    """The members of one sample, extension -> bytes. `key` must not contain a dot."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
    files = {"latent.npy": npy_bytes(latent)}
    if latent_flip is not None:
        files["latent_flip.npy"] = npy_bytes(latent_flip)
    if label is not None:
        files["cls"] = str(int(label)).encode()
    if t5 is not None:
        assert t5_mask is not None, "T5 features need their mask"
        files["t5.npy"] = npy_bytes(t5)
        files["t5mask.npy"] = npy_bytes(t5_mask.astype(np.uint8))
    files["json"] = json.dumps(meta or {}, sort_keys=True).encode()
    return {"__key__": key.encode(), **files}


@dataclass
class Decoded:
    """A sample's arrays as stored (before sampling, flipping or scaling)."""

    latent: np.ndarray  # (C, h, w) or (2, C, h, w)
    latent_flip: np.ndarray | None
    label: int | None
    t5: np.ndarray | None  # (n, C_text)
    t5_mask: np.ndarray | None  # (L,)


def decode_sample(files: dict[str, bytes], url: str) -> Decoded:
    """Arrays of one sample's members; ShardError naming the shard and key when one is unreadable."""
    key = files.get("__key__", b"?").decode()
    try:
        return Decoded(
            latent=load_npy(files["latent.npy"]),
            latent_flip=load_npy(files["latent_flip.npy"]) if "latent_flip.npy" in files else None,
            label=int(files["cls"]) if "cls" in files else None,
            t5=load_npy(files["t5.npy"]) if "t5.npy" in files else None,
            t5_mask=load_npy(files["t5mask.npy"]) if "t5mask.npy" in files else None,
        )
    except (KeyError, ValueError, OSError, EOFError) as err:
        raise ShardError(f"corrupt shard {url}: sample {key!r} unreadable ({type(err).__name__}: {err})") from err



def nonfinite(**arrays: np.ndarray | None) -> list[str]:
    """The names of `arrays` holding NaN or inf (None: absent, passed)."""
    return [name for name, array in arrays.items() if array is not None and not np.isfinite(array).all()]


def check_sample(sample: Decoded, settings: dict, url: str, key: str) -> None:
    """ShardError naming the shard and the sample when `sample` is not what the manifest's `settings`
    describe: the latent's shape and dtype (`stored_shape`, `latent_dtype`; the flipped one too with `flip`),
    the class label for class conditioning (in [0, num_classes)), the T5 features and mask for captions,
    and finite latents and T5 features (one NaN or inf, e.g. a float16 overflow, would make every weight NaN
    under ZeRO-0, or have ZeRO-1/2 drop each step it is in).
    A sample that fails here would otherwise fail as a stacking error with no name, or train silently on
    arrays of another shape; as a ShardError, `data.on_error=skip` can skip its shard."""
    problems = []

    def check_latent(name: str, array: np.ndarray | None) -> None:
        if array is None:
            problems.append(f"no {name}.npy")
        elif list(array.shape) != list(settings["stored_shape"]) or array.dtype != np.dtype(settings["latent_dtype"]):
            problems.append(f"{name} {array.dtype.name} {list(array.shape)}, the manifest says "
                            f"{settings['latent_dtype']} {list(settings['stored_shape'])}")

    check_latent("latent", sample.latent)
    if settings["flip"]:
        check_latent("latent_flip", sample.latent_flip)
    if settings["conditioning"] == "class":
        if sample.label is None:
            problems.append("no class label (.cls)")
        elif not 0 <= sample.label < settings["num_classes"]:
            problems.append(f"class {sample.label} outside [0, {settings['num_classes']})")
    elif sample.t5 is None or sample.t5_mask is None:
        problems.append("no T5 features (.t5.npy and .t5mask.npy)")
    else:
        length, width = settings["text_len"], settings["text_dim"]
        if sample.t5_mask.shape != (length,):
            problems.append(f"T5 mask of shape {list(sample.t5_mask.shape)}, the manifest says [{length}]")
        elif sample.t5.ndim != 2 or sample.t5.shape[1] != width or sample.t5.shape[0] != int(sample.t5_mask.sum()):
            problems.append(f"T5 features of shape {list(sample.t5.shape)}, expected [{int(sample.t5_mask.sum())}, "
                            f"{width}] (the mask's tokens x text_dim)")
    broken = nonfinite(latent=sample.latent, latent_flip=sample.latent_flip if settings["flip"] else None,
                       t5=sample.t5)
    if broken:
        problems.append(f"{' and '.join(broken)} holding NaN or inf, expected finite values")
    if problems:
        raise ShardError(f"corrupt shard {url}: sample {key!r}: {'; '.join(problems)}")
