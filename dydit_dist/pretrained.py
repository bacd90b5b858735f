"""Pretrained Hugging Face components (the VAE, the T5 encoder, its tokenizer) where every node can read them.

    pretrained.mirror(cfg)                          # the driver, once per job, before any worker starts
    AutoencoderKL.from_pretrained(pretrained.local(cfg.data.vae, cfg.storage.root))   # any worker

A component is named by one of:

    a local folder          /models/sd-vae-ft-ema: read as it is (a mounted volume, the image)
    a storage folder        s3://bucket/models/sd-vae-ft-ema: copied once per node into a local cache
    a Hugging Face id       stabilityai/sd-vae-ft-ema: `mirror` downloads it once per job (from the Hub,
                            or the driver's Hugging Face cache when offline) into
                            {storage.root}/pretrained/<org>--<name>/, and every worker copies that
                            folder, so 32 actors never make 32 Hub downloads

The config keeps the name the user gave (data manifests and sample settings record it); only
loading goes through `local`. A folder is complete when its `.complete` object exists (written
last), so a half-finished copy or mirror is never read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile

from dydit_dist import storage
from dydit_dist.models.registry import family

log = logging.getLogger(__name__)

COMPLETE = ".complete"
# What from_pretrained reads: configs, weights, tokenizer files. `*.bin` only when a repo has no safetensors.
FILES = ["*.json", "*.safetensors", "*.model", "*.txt"]
LEGACY_WEIGHTS = ["*.bin"]
# A diffusers pipeline (model.family sdxl): model_index.json and each component's config, tokenizer files
# and full-precision safetensors; not the repo's single-file checkpoints or its fp16 variants.
PIPELINE_FILES = ["model_index.json", "*/*.json", "*/*.txt", "*/diffusion_pytorch_model.safetensors",
                  "*/model.safetensors"]


def is_hub_id(value: str | None) -> bool:
    """`org/name`, not a local folder, not a URL, not `none`."""
    if not value or value == "none" or "://" in value or os.path.isdir(value):
        return False
    return not value.startswith((".", "/", "~")) and value.count("/") == 1


def is_storage_folder(value: str | None) -> bool:
    return bool(value) and "://" in value


def mirror_url(repo: str, root: str) -> str:
    """`{root}/pretrained/<org>--<name>`, a local root made an absolute file:// URL (one name per place)."""
    if "://" not in root:
        root = "file://" + os.path.abspath(root)
    return storage.join(root, "pretrained", repo.replace("/", "--"))


def mirror(cfg, captions: bool, vae: bool = True) -> list[str]:
    """Copy the Hugging Face ids among `cfg.data.vae` (and with `captions`, `data.text_encoder` and
    `data.tokenizer`) into object storage, skipping what is there; the mirrors' URLs. The driver
    calls this once per job, before its workers start. For model.family sdxl the one component is
    `model.checkpoint`, a whole StableDiffusionXLPipeline (its VAE and text encoders inside)."""
    if family(cfg.model.name) == "sdxl":
        value = cfg.model.checkpoint
        return [mirror_repo(value, cfg.storage.root, PIPELINE_FILES)] if is_hub_id(value) else []
    keys = (("vae",) if vae else ()) + (("text_encoder", "tokenizer") if captions else ())
    return [mirror_repo(v, cfg.storage.root) for v in (getattr(cfg.data, k) for k in keys) if is_hub_id(v)]


def mirror_clip(cfg) -> str | None:
    """`eval.clip_model` mirrored like `mirror`'s components when it is a Hugging Face id and `clip` is among
    eval.metrics (the evaluation driver, once, before its actors load it); its URL, else None."""
    e = cfg.eval
    if "clip" not in e.metrics or not is_hub_id(e.clip_model):
        return None
    return mirror_repo(e.clip_model, cfg.storage.root)


def mirror_repo(repo: str, root: str, patterns: list[str] | None = None) -> str:
    """`repo` (a Hugging Face id) as a folder under `{root}/pretrained/`; its URL. `patterns`: the files
    to take (default `FILES`, with `*.bin` when the repo has no safetensors)."""
    url = mirror_url(repo, root)
    if storage.exists(storage.join(url, COMPLETE)):
        return url
    from huggingface_hub import snapshot_download

    log.info("mirroring %s into %s (once; every worker reads it from there)", repo, url)
    with tempfile.TemporaryDirectory(prefix="dydit-mirror-") as tmp:
        folder = snapshot_download(repo, allow_patterns=patterns or FILES, local_dir=tmp)
        files = _files(folder)
        if patterns is None and not any(f.endswith(".safetensors") for f in files):
            folder = snapshot_download(repo, allow_patterns=FILES + LEGACY_WEIGHTS, local_dir=tmp)
            files = _files(folder)
        for name in files:
            storage.upload(os.path.join(folder, name), storage.join(url, name))
        storage.write_json(storage.join(url, COMPLETE), {"source": repo, "files": files})
    return url


def local(value: str, root: str | None = None) -> str:
    """What `from_pretrained` should read for `value`: a local folder or `none` as given; a storage
    folder copied into this node's cache; a Hugging Face id's mirror under `root` when `mirror` made
    one (copied into the cache), else the id itself (from_pretrained's own Hub download and cache)."""
    if is_hub_id(value) and root is not None:
        url = mirror_url(value, root)
        return _cached(url) if storage.exists(storage.join(url, COMPLETE)) else value
    if is_storage_folder(value):
        if not any(storage.exists(storage.join(value, name)) for name in (COMPLETE, "config.json", "model_index.json")):
            raise FileNotFoundError(f"{value}: no config.json; expected a folder of a pretrained model (as "
                                    "save_pretrained writes it), or of a diffusers pipeline (with model_index.json)")
        return _cached(value)
    return value


def cache_dir() -> str:
    return os.environ.get("DYDIT_PRETRAINED_CACHE", os.path.expanduser("~/.cache/dydit_dist/pretrained"))


def _cached(url: str) -> str:
    """A storage folder copied to this node once: one process copies (a file lock), the others wait
    and reuse it; the copy is renamed into place only when complete."""
    target = os.path.join(cache_dir(), hashlib.sha256(url.encode()).hexdigest()[:16])
    if os.path.exists(os.path.join(target, COMPLETE)):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(target, COMPLETE)):
            return target
        tmp = tempfile.mkdtemp(prefix=".copy-", dir=cache_dir())
        try:
            _, base = storage.filesystem(url)
            names = [posixpath.relpath(u.split("://", 1)[1], base.rstrip("/")) for u in storage.find(url)]
            for name in names:
                os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
                storage.download(storage.join(url, name), os.path.join(tmp, name))
            with open(os.path.join(tmp, COMPLETE), "w") as f:
                json.dump({"source": url, "files": names}, f)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("copied %s to %s", url, target)
    return target


def _files(folder: str) -> list[str]:
    """Relative paths of the files under `folder`, without huggingface_hub's own bookkeeping."""
    names = []
    for path, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        names += [os.path.relpath(os.path.join(path, f), folder) for f in files if not f.startswith(".")]
    return sorted(names)
