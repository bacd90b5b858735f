"""The network a config describes, and its weights on storage.

Fine-tuning builds the network of `cfg.model` and initializes it:

    network = build_network(cfg.model)            # DiT / PixArt, or with DyDiT routers / FlexDiT modules
    init_weights(network, cfg)                    # train.init_from, else model.checkpoint, else random

Sampling builds the same network, with its
checkpoint pinned once per job and loaded strictly:

    cfg = resolve_checkpoint(cfg)                 # a run folder becomes its newest EMA export
    network = sampling_network(cfg, device)       # eval mode; sampling runs it under torch.no_grad

Weights are read from and written to any URL `dydit_dist.storage` knows (`file://`, `s3://`,
`memory://`, local paths); `dydit_dist.models` parses and checks them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from dydit_dist import storage
from dydit_dist.config import Config, ModelConfig
from dydit_dist.dynamic import DyDiT, DyPixArt, added_key_patterns, flexdit_from_static
from dydit_dist.models import (
    CheckpointError,
    LoadResult,
    build_model,
    family,
    load_into,
    load_state_dict_file,
    parse_state_dict,
    safetensors_bytes,
)
from dydit_dist.paths import ema_pointer

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------- the network


def build_network(model_cfg: ModelConfig) -> nn.Module:
    """Static DiT / PixArt for `method: static`; the same with DyDiT routers for `method: dydit`, with
    FlexDiT modules for `method: flexdit`.

    The embedders never drop the conditioning themselves: the training step draws label / caption
    dropout from the step's own generator (`train.step.draw_inputs`), and sampling drops it through
    guidance. The null class / null caption stays in the weights.
    """
    m = model_cfg
    fam = family(m.name)
    kwargs = dict(input_size=m.input_size, in_channels=m.in_channels, class_dropout_prob=m.class_dropout_prob)
    if fam == "dit":
        kwargs.update(num_classes=m.num_classes, learn_sigma=m.learn_sigma)
    else:
        kwargs.update(pred_sigma=m.learn_sigma, caption_channels=m.caption_channels,
                      model_max_length=m.model_max_length, lewei_scale=m.lewei_scale)
    static = build_model(m.name, **kwargs)
    if m.method == "static":
        network = static
    elif m.method == "dydit":
        cls = DyDiT if fam == "dit" else DyPixArt
        network = cls.from_static(static, m.dynamic)
    elif m.method == "flexdit":
        network = flexdit_from_static(static, m.flexdit)
    else:
        raise ValueError(f"model.method={m.method!r} cannot be fine-tuned by this job yet; use 'static', 'dydit' or "
                         "'flexdit'")
    embedder = network.y_embedder
    if hasattr(embedder, "dropout_prob"):  # DiT LabelEmbedder
        embedder.dropout_prob = 0.0
    else:  # PixArt CaptionEmbedder
        embedder.uncond_prob = 0.0
    return network


def sampling_network(cfg: Config, device: str | torch.device = "cpu") -> nn.Module:
    """The fine-tuning network of `cfg.model` (`model.method` chooses the variant; `Config.validate`
    checked that `sample.method` runs on it) with `model.checkpoint` loaded (strict), in eval mode on `device`.

    A missing checkpoint leaves the network as initialized (only sensible for tests and smoke runs)
    and says so in the log; a checkpoint that does not fit the network is a ValueError naming it.

    The parameters keep `requires_grad`: sampling runs under `torch.no_grad`, and autocast caches its
    casts of a weight for the whole autocast region (a batch's every step) only for leaf tensors that
    require grad; without it every weight is cast to bf16 again on every network call.
    """
    model = build_network(cfg.model)
    checkpoint = cfg.model.checkpoint
    if checkpoint:
        load_weights(model, resolve_weights(checkpoint))
    else:
        log.warning("no checkpoint (model.checkpoint is unset): sampling from an initialized %s", cfg.model.name)
    return model.to(device).eval()


# ---------------------------------------------------------------------------- which weights


def read_ema_pointer(pointer: str) -> dict:
    """A run's `ema-latest.json` ({"url", "step", "file", ...}); FileNotFoundError when there is none,
    CheckpointError naming it when it is not such a pointer (cut short, or edited by hand). Its "url" is the
    export `file` beside the pointer, where the pointer names one: a run folder copied elsewhere (another
    bucket, a local disk) names its own export, not the one where it was written."""
    try:
        value = storage.read_json(pointer)
        if not isinstance(value, dict) or not isinstance(value.get("url"), str) or not isinstance(value.get("step"), int):
            raise ValueError(f"expected {{\"url\": str, \"step\": int, ...}}, got {str(value)[:80]}")
    except ValueError as err:  # JSONDecodeError too
        raise CheckpointError(f"{pointer}: not an EMA pointer ({err}); remove it, and a resumed run writes it "
                              "again from its last committed checkpoint") from None
    file = value.get("file")
    if isinstance(file, str) and file and "/" not in file:
        value["url"] = storage.join(pointer.rsplit("/", 1)[0], file)
    return value


def resolve_weights(source: str) -> str:
    """A weights file URL for `source`: a file, or a previous run's folder (its newest EMA export)."""
    pointer = ema_pointer(source)
    if not source.endswith((".pt", ".pth", ".safetensors", ".bin")) and storage.exists(pointer):
        return read_ema_pointer(pointer)["url"]
    return source


def latest_ema(run: str) -> str:
    """URL of the newest exported EMA weights of a run folder (`{root}/runs/{run}`)."""
    pointer = ema_pointer(run)
    try:
        return read_ema_pointer(pointer)["url"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{pointer}: no EMA weights exported yet (no checkpoint written by this run)") from None


def resolve_checkpoint(cfg: Config) -> Config:
    """`cfg` with `model.checkpoint` pinned to a weights file (a run folder becomes its newest EMA
    export now, so that every shard of a job, and of its reruns, comes from the same weights)."""
    if not cfg.model.checkpoint:
        return cfg
    model = dataclasses.replace(cfg.model, checkpoint=resolve_weights(cfg.model.checkpoint))
    return dataclasses.replace(cfg, model=model)


def init_weights(network: nn.Module, cfg: Config) -> LoadResult | None:
    """Load `train.init_from` (else `model.checkpoint`) into `network`; None when neither is set.

    A static checkpoint loads into a dynamic network with only the router keys missing (they keep
    their all-on initialization); a file holding some of the added tensors but not all (a DyDiT export
    that lost routers) is a CheckpointError, and so is any other missing key, extra key or shape, naming
    the file.
    """
    source = cfg.train.init_from or cfg.model.checkpoint
    if source is None:
        log.warning("no train.init_from or model.checkpoint: fine-tuning from random weights")
        return None
    url = resolve_weights(source)
    allow = added_key_patterns(cfg.model.method)
    result = load_weights(network, url, allow_missing=allow)
    added = [k for k in network.state_dict() if any(fnmatch.fnmatchcase(k, p) for p in allow)]
    if 0 < len(result.missing) < len(added):  # a static file has none of them, a dynamic one all
        raise CheckpointError(f"{url} holds {len(added) - len(result.missing)} of the {len(added)} tensors that "
                              f"model.method={cfg.model.method} adds to the static network (missing e.g. "
                              f"{', '.join(result.missing[:3])}): expected a static checkpoint (none of them) or one "
                              f"of this method (all of them)")
    if result.missing:
        log.info("initialized from %s; %d added tensors (routers, FlexDiT W1 / W2) start fresh", url, len(result.missing))
    else:
        log.info("initialized from %s (every key)", url)
    return result


# ---------------------------------------------------------------------------- weights on storage


def _local_path(url: str) -> str | None:
    if "://" not in url:
        return url
    return url.removeprefix("file://") if url.startswith("file://") else None


def read_weights(url: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict on CPU from a checkpoint at a local path or URL (see
    `models.parse_state_dict` for the formats). Raises FileNotFoundError or ValueError naming it."""
    src = os.fspath(url)
    local = _local_path(src)
    if local is not None:  # safetensors maps a local file instead of reading it whole
        return load_state_dict_file(local, name=src)
    return parse_state_dict(storage.read_bytes(src), name=src)


def load_weights(model: nn.Module, url: str | os.PathLike, allow_missing: Iterable[str] = (),
                 strict: bool = True) -> LoadResult:
    """`models.load_into` of the checkpoint at `url`; its errors name `url`."""
    return load_into(model, read_weights(url), allow_missing=allow_missing, strict=strict, source=os.fspath(url))


def save_weights(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], url: str | os.PathLike,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write weights as one safetensors object, whole (temp-and-rename locally, one PUT on S3)."""
    storage.write_bytes(os.fspath(url), safetensors_bytes(model_or_state_dict, metadata))
