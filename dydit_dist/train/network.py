"""The network a config describes, and its initial weights.

    network = build_network(cfg.model)            # DiT / PixArt, or DyDiT / DyPixArt with routers
    init_weights(network, cfg)                    # train.init_from, else model.checkpoint, else random

The sampler rebuilds the same network and loads the exported EMA weights into it:

    network = build_network(cfg.model)
    load_into(network, latest_ema(run_url))       # strict: every key, no router key missing
"""

from __future__ import annotations

import logging

from torch import nn

from dydit_dist import storage
from dydit_dist.config import ModelConfig
from dydit_dist.dynamic import ROUTER_KEY_PATTERNS, DyDiT, DyPixArt, RouterOptions
from dydit_dist.dynamic.flexdit import FLEXDIT_KEY_PATTERNS, FlexOptions, flexdit_from_static
from dydit_dist.models import LoadResult, build_model, family, load_into, load_state_dict_file

log = logging.getLogger(__name__)

EMA_POINTER = "ema-latest.json"  # in {run}/checkpoints/: {"step", "file", "url"} of the newest export


def build_network(model_cfg: ModelConfig) -> nn.Module:
    """Static DiT / PixArt for `method: static`; the same with DyDiT routers for `method: dydit`."""
    m = model_cfg
    fam = family(m.name)
    if fam == "pixart_ms":
        raise ValueError(f"model.name={m.name!r}: multi-scale PixArt needs per-sample sizes the data does not carry; "
                         "fine-tune PixArt-XL/2 (or PixArt-debug)")
    kwargs = dict(input_size=m.input_size, in_channels=m.in_channels, class_dropout_prob=m.class_dropout_prob)
    if fam == "dit":
        kwargs.update(num_classes=m.num_classes, learn_sigma=m.learn_sigma)
    else:
        kwargs.update(pred_sigma=m.learn_sigma, caption_channels=m.caption_channels,
                      model_max_length=m.model_max_length, lewei_scale=m.lewei_scale)
    static = build_model(m.name, **kwargs)
    if m.method == "static":
        return static
    if m.method == "dydit":
        cls = DyDiT if fam == "dit" else DyPixArt
        return cls.from_static(static, RouterOptions.from_config(m.dynamic))
    if m.method == "flexdit":
        return flexdit_from_static(static, FlexOptions.from_config(m.flexdit))
    raise ValueError(f"model.method={m.method!r} cannot be fine-tuned by this job yet; use 'static', 'dydit' or 'flexdit'")


def resolve_weights(source: str) -> str:
    """A weights file URL for `source`: a file, or a previous run's folder (its newest EMA export)."""
    pointer = storage.join(source, "checkpoints", EMA_POINTER)
    if not source.endswith((".pt", ".pth", ".safetensors", ".bin")) and storage.exists(pointer):
        return storage.read_json(pointer)["url"]
    return source


def latest_ema(run: str) -> str:
    """URL of the newest exported EMA weights of a run folder (`{root}/runs/{run}`)."""
    pointer = storage.join(run, "checkpoints", EMA_POINTER)
    try:
        return storage.read_json(pointer)["url"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{pointer}: no EMA weights exported yet (no checkpoint written by this run)") from None


def init_weights(network: nn.Module, cfg) -> LoadResult | None:
    """Load `train.init_from` (else `model.checkpoint`) into `network`; None when neither is set.

    A static checkpoint loads into a dynamic network with only the router keys missing (they keep
    their all-on initialization); any other missing key, extra key or shape is a ValueError naming
    the file.
    """
    source = cfg.train.init_from or cfg.model.checkpoint
    if source is None:
        log.warning("no train.init_from or model.checkpoint: fine-tuning from random weights")
        return None
    url = resolve_weights(source)
    allow = {"dydit": ROUTER_KEY_PATTERNS, "flexdit": FLEXDIT_KEY_PATTERNS}.get(cfg.model.method, ())
    result = load_into(network, load_state_dict_file(url), allow_missing=allow, source=url)
    if result.missing:
        log.info("initialized from %s; %d added tensors (routers, FlexDiT W1 / W2) start fresh", url, len(result.missing))
    else:
        log.info("initialized from %s (every key)", url)
    return result
