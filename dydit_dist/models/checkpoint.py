"""Loading and saving weights: official DiT / PixArt checkpoints, our safetensors exports.

Nothing is unpickled beyond tensors and plain containers (`torch.load(weights_only=True)`), and a
checkpoint that does not fit the model is refused with the file named and the differences listed.
Checkpoints are parsed from bytes, binary file objects or local paths; URLs (`s3://`, `memory://`)
are read and written by `dydit_dist.network` (`read_weights`, `load_weights`, `save_weights`).
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

import safetensors.torch
import torch
from torch import nn

# Official containers, in order of preference: PixArt `.pth` files hold {"state_dict": ...};
# DiT training checkpoints hold {"model", "ema", "opt", "args"}, of which DiT samples with "ema";
# DeepSpeed's `mp_rank_00_model_states.pt` holds {"module": ...}.
_CONTAINER_KEYS = ("state_dict", "ema", "model", "module")
# Prefixes of every key of a state dict saved from a wrapper: DDP / DeepSpeed (`module.`), torch.compile
# (`_orig_mod.`). Stripped when every key has one.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 10  # how many keys of each kind an error lists


class CheckpointError(ValueError):
    """A checkpoint whose content is wrong (not a checkpoint, not a state dict, another model's keys or
    shapes): reading it again gives the same error, so a job stops instead of retrying."""


def parse_state_dict(data: bytes | BinaryIO, name: str) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict, on CPU, from a checkpoint's bytes (or a binary file object).

    A `.safetensors` name or a safetensors header is read with safetensors, anything else with
    `torch.load(weights_only=True)`. Official containers (`{"state_dict": ...}`,
    `{"ema": ...}`, `{"model": ...}`) are unwrapped. Raises CheckpointError naming `name`.
    """
    if isinstance(data, bytes) and _safetensors_named_or_shaped(name, data[:9]):
        obj = _safetensors(safetensors.torch.load, data, name=name)
    elif not isinstance(data, bytes) and _safetensors_named_or_shaped(name, _peek(data)):
        obj = _safetensors(safetensors.torch.load, data.read(), name=name)
    else:
        obj = _torch_load(io.BytesIO(data) if isinstance(data, bytes) else data, name)
    return _unwrap(obj, name)


def load_state_dict_file(path: str | os.PathLike, name: str | None = None) -> dict[str, torch.Tensor]:
    """`parse_state_dict` of a local file (a `.safetensors` file is mapped, not read whole).

    `name` is how errors call the file (default: the path). Raises FileNotFoundError or CheckpointError
    naming it; a URL is a ValueError (`dydit_dist.network.read_weights` reads those).
    """
    local = os.fspath(path)
    name = name or local
    if "://" in local:
        raise ValueError(f"{name}: a URL; models read local files only (dydit_dist.network.read_weights reads URLs)")
    if not os.path.isfile(local):
        raise FileNotFoundError(f"{name}: no such checkpoint file")
    with open(local, "rb") as f:
        head = f.read(9)
    if _safetensors_named_or_shaped(local, head):
        return _unwrap(_safetensors(safetensors.torch.load_file, local, device="cpu", name=name), name)
    return _unwrap(_torch_load(local, name), name)


def is_safetensors_file(path: str | os.PathLike) -> bool:
    """Whether a local file is read as safetensors: by its name or, whatever its name, its first bytes."""
    with open(path, "rb") as f:
        return _safetensors_named_or_shaped(os.fspath(path), f.read(9))


def read_shapes(f: BinaryIO, name: str) -> dict[str, list[int]]:
    """{key: shape} of a checkpoint file object without reading its tensors: a safetensors header (8-byte
    length, then JSON; the file's size must be the one the header describes), or a PyTorch zip file's pickle loaded onto the meta device (a few KB of a
    multi-GB file; a URL's file object reads by range). Official containers are unwrapped as in
    `parse_state_dict`. Raises CheckpointError naming `name`."""
    if _safetensors_named_or_shaped(name, _peek(f)):
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size < 100_000_000:
            raise CheckpointError(f"{name}: not a safetensors file (header size {size})")
        try:
            header = {k: v for k, v in json.loads(f.read(size)).items() if k != "__metadata__"}
            described = 8 + size + max((int(v["data_offsets"][1]) for v in header.values()), default=0)
            shapes = {k: [int(n) for n in v["shape"]] for k, v in header.items()}
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:  # JSON of another layout
            raise CheckpointError(f"{name}: not a safetensors file (its header: {type(err).__name__}: {err}; "
                                  "expected {tensor name: {dtype, shape, data_offsets}})") from err
        actual = f.seek(0, os.SEEK_END)
        if actual != described:  # a copy cut short (or padded): the header alone cannot tell
            raise CheckpointError(f"{name}: a safetensors file of {actual} bytes whose header describes "
                                  f"{described}; truncated or corrupt")
        return shapes
    return {k: list(v.shape) for k, v in _unwrap(_torch_load(f, name, device="meta"), name).items()}


def read_metadata(f: BinaryIO, name: str) -> dict[str, str]:
    """A safetensors file's `__metadata__` (our exports record `step` and `model` there); {} for other files
    and for a header that does not parse (`read_shapes` says why)."""
    if not _safetensors_named_or_shaped(name, _peek(f)):
        return {}
    try:
        size = int.from_bytes(f.read(8), "little")
        metadata = json.loads(f.read(size)).get("__metadata__") if 0 < size < 100_000_000 else None
    except (ValueError, AttributeError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def _safetensors_named_or_shaped(name: str, head: bytes) -> bool:
    """Whether to read a file as safetensors: its name says so, or its first bytes do (an 8-byte header
    length, then the header's JSON): a safetensors file named `.pt` would otherwise meet torch.load, whose
    error advises weights_only=False. A PyTorch zip ("PK...") or pickle (0x80 ...) never reads so."""
    if name.endswith(".safetensors"):
        return True
    return len(head) == 9 and 0 < int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{"


def _peek(f: BinaryIO) -> bytes:
    """The first 9 bytes of a seekable file object, which is left where it was."""
    where = f.tell()
    head = f.read(9)
    f.seek(where)
    return head


def _safetensors(load, source, name: str, **kwargs) -> dict[str, torch.Tensor]:
    try:
        return load(source, **kwargs)
    except safetensors.SafetensorError as err:  # a truncated or corrupt file
        raise CheckpointError(f"{name}: cannot read as a safetensors file ({err})") from err


# DiT training checkpoints store their argparse Namespace under "args": that one class is allowed to
# weights_only loads (process-wide: torch 2.4, the oldest the GPU check supports, has no per-call list).
torch.serialization.add_safe_globals([argparse.Namespace])


def _torch_load(f, src: str, device: str = "cpu"):
    try:
        return torch.load(f, map_location=device, weights_only=True)
    except Exception as err:  # unpickling errors come in many types; the cause is kept
        raise CheckpointError(
            f"{src}: cannot read as a PyTorch checkpoint with weights_only=True "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err


def _unwrap(obj, src: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{src}: expected a dict of tensors, got {type(obj).__name__}")
    for key in _CONTAINER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{src}: not a state dict; entries that are not tensors: {not_tensors[:_SHOW]} "
            f"(recognized containers: {', '.join(_CONTAINER_KEYS)})"
        )
    for prefix in _WRAPPER_PREFIXES:  # `module._orig_mod.` (compiled, then wrapped) loses both in turn
        if obj and all(isinstance(k, str) and k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


@dataclass
class LoadResult:
    """What `load_into` did: keys allowed to be missing (left as initialized) and ignored extras."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | str | os.PathLike,
    allow_missing: Iterable[str] = (),
    strict: bool = True,
    source: str | None = None,
) -> LoadResult:
    """Copy a checkpoint into `model`, refusing one that belongs to another model or size.

    state_dict: a mapping, or a local path read with `load_state_dict_file`.
    allow_missing: fnmatch patterns of model keys the checkpoint may lack (e.g. `"blocks.*.attn_rate.*"`
      for DyDiT routers on a static checkpoint); those keep their current values.
    strict: if False, other missing keys and unexpected keys are tolerated too (and reported).
    Shape mismatches are always an error, and so are weights that are not finite (NaN or inf: a file
    written from a diverged run). The CheckpointError names `source` (the file) and lists the first missing
    keys, unexpected keys and mismatched shapes (checkpoint vs model).

    A model's `RECOMPUTED_KEYS` (tensors it computes from its settings, such as PixArt's position table)
    are not taken from the checkpoint, whatever it holds for them: the official loaders drop them too.
    """
    if not isinstance(state_dict, Mapping):
        source = source or os.fspath(state_dict)
        state_dict = load_state_dict_file(state_dict)
    source = source or "state dict"
    patterns = tuple(allow_missing)
    recomputed = set(getattr(model, "RECOMPUTED_KEYS", ()))
    state_dict = {k: v for k, v in state_dict.items() if k not in recomputed}
    own = {k: v for k, v in model.state_dict().items() if k not in recomputed}
    missing = [k for k in own if k not in state_dict]
    allowed = [k for k in missing if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    missing = [k for k in missing if k not in allowed]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"{source} does not fit {type(model).__name__}{_describe(model)}:"]
        kinds = (
            ("mismatched shapes", mismatched),
            ("missing keys", missing),
            ("unexpected keys", unexpected),
        )
        for title, keys in kinds:
            if keys:
                more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
                lines.append(f"  {len(keys)} {title}{more}: " + "; ".join(keys[:_SHOW]))
        lines.append("  (a checkpoint of another model family or size, or built with other keywords?)")
        raise CheckpointError("\n".join(lines))
    not_finite = [k for k, v in state_dict.items()
                  if k in own and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not_finite:
        more = f" (+{len(not_finite) - _SHOW} more)" if len(not_finite) > _SHOW else ""
        raise CheckpointError(f"{source}: {len(not_finite)} tensors hold NaN or inf{more}: "
                              f"{'; '.join(not_finite[:_SHOW])} (weights of a diverged run, or a corrupt file?)")
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    return LoadResult(missing=allowed + missing, unexpected=unexpected)


def _describe(model: nn.Module) -> str:
    kwargs = getattr(model, "constructor_kwargs", None)
    if not callable(kwargs):
        return ""
    return "(" + ", ".join(f"{k}={v}" for k, v in kwargs().items()) + ")"


def safetensors_bytes(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Weights as one safetensors object (`dydit_dist.network.save_weights` writes it to a URL)."""
    sd = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, nn.Module)
        else model_or_state_dict
    )
    # Contiguous CPU copies: safetensors refuses views and tensors sharing memory.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    return safetensors.torch.save(tensors, metadata=dict(metadata) if metadata else None)
