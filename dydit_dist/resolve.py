"""The inputs a job needs, one `Input` per config key, each resolved in seconds without reading anything heavy.

`preflight` collects them per job; each function here answers for one kind of input: a file or URL
that must exist, the data source, a Hugging Face id (local folder, local cache, or the Hub when it
answers), a checkpoint or run folder (a safetensors header's keys and shapes against the network
built on the meta device), the samples of an earlier job, a reference, the feature extractor's
weights, and whether `storage.root` takes writes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch
from braceexpand import braceexpand

from dydit_dist import pipeline, pretrained, storage
from dydit_dist.accel.options import load_table, parse_eps_scale
from dydit_dist.config import Config
from dydit_dist.data import DataError, sources
from dydit_dist.dynamic import ROUTER_KEYS, added_key_patterns
from dydit_dist.dynamic.flexdit_schedule import parse_layout
from dydit_dist.eval import digits, extractors, features
from dydit_dist.eval.metrics import EvalInputError
from dydit_dist.models import read_metadata, read_shapes
from dydit_dist.models.registry import sdxl_mismatches
from dydit_dist.network import build_network, read_ema_pointer
from dydit_dist.paths import ema_pointer
from dydit_dist.sample import SamplesManifest
from dydit_dist.sample.plan import PromptsError, parse_prompts
from dydit_dist.shardset import MARKERS, manifest_url

log = logging.getLogger(__name__)
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")
HUB_TIMEOUT_S = 5.0
HEADER_BLOCK = 1 << 18  # bytes a remote checkpoint fetches per read: its header or pickle, not its tensors


@dataclass
class Input:
    """One input: its config key and value, what was found (`note`) or what is wrong (`problem`)."""

    key: str
    value: object
    note: str = ""
    problem: str | None = None



def exists(key: str, url: str | None, expected: str) -> Input:
    if not url:
        return Input(key, url, problem=f"unset; expected {expected}")
    try:
        found = storage.exists(url)
    except OSError as err:
        return Input(key, url, problem=f"{err}; expected {expected}")
    return Input(key, url, note="exists") if found else Input(key, url, problem=f"not found; expected {expected}")


def prompts(key: str, url: str | None, expected: str) -> Input:
    """A prompts file that exists and parses (`sample.plan.parse_prompts`: the line of a malformed one)."""
    found = exists(key, url, expected)
    if found.problem:
        return found
    try:
        count = len(parse_prompts(url, storage.read_bytes(url)))
    except (OSError, PromptsError) as err:
        return Input(key, url, problem=str(err))
    return Input(key, url, note=f"{count:,} prompts")


def eb_cache_table(cfg: Config) -> Input:
    """sample.eb_cache.schedule given as a calibration table: it exists, is one, and is of sample.steps steps."""
    key, url, expected = "sample.eb_cache.schedule", cfg.sample.eb_cache.schedule, "an EB-Cache table (python -m jobs.calibrate)"
    found = exists(key, url, expected)
    if found.problem:
        return found
    try:
        cfg.sample.eb_cache.schedule_for(cfg.sample.steps)
        table = load_table(url)
    except (OSError, ValueError) as err:
        return Input(key, url, problem=str(err))  # names the step counts and the calibration job
    # The schedule was chosen along one trajectory: another sampler (other timesteps), guidance or
    # correction makes it a schedule of another run.
    s = cfg.sample
    differences = [f"{name} {table[name]!r} there, {value!r} here" for name, value in
                   (("model", cfg.model.name), ("image_size", cfg.model.image_size), ("sampler", s.sampler),
                    ("cfg_scale", s.cfg_scale), ("guidance_channels", s.guidance_channels),
                    ("eps_scale", s.eb_cache.eps_scale))
                   if name in table and table[name] != value]
    factors = [list(k) for k in parse_eps_scale(s.eb_cache.eps_scale)]
    recorded = table.get("eps_scale_factors", factors if table.get("eps_scale") != "paper" else None)
    if recorded != factors:
        why = " (none recorded: `paper` multiplied by b(t) then)" if recorded is None else ""
        differences.append(f"eps_scale factors {recorded} there{why}, {factors} here")
    if differences:
        return Input(key, url, problem=f"calibrated for another trajectory ({'; '.join(differences)}); calibrate "
                                       "one with these settings (python -m jobs.calibrate)")
    # A schedule of other weights is still a schedule (the released table is used on any DiT-XL/2), but
    # one a user rarely means: said in the plan.
    others = [f"{name} {table[name]!r} there, {value!r} here" for name, value in
              (("method", cfg.model.method), ("precision", s.precision)) if name in table and table[name] != value]
    if "checkpoint" in table and table["checkpoint"] is None and cfg.model.checkpoint:
        others.append("calibrated on random weights (--random-init), sampled with model.checkpoint")
    elif table.get("checkpoint") != cfg.model.checkpoint and "checkpoint" in table:
        others.append(f"calibrated on {table['checkpoint']}, sampled with {cfg.model.checkpoint}")
    return Input(key, url, note=f"a calibration table of {cfg.sample.steps} steps"
                                + (f"; NOT of this network: {'; '.join(others)}" if others else ""))


def source(cfg: Config, builtin_ok: bool) -> Input:
    d = cfg.data
    if d.source in pipeline.BUILTIN_SOURCES:
        if builtin_ok:
            return Input("data.source", d.source, note="built in, materialized by the reproduce job")
        return Input("data.source", d.source, problem="a built-in source only jobs.reproduce materializes")
    expected = {"imagefolder": "a folder with one subfolder of images per class",
                "captions": "a .csv or .jsonl file of image paths and captions",
                "webdataset": "tar files (a URL, a brace pattern or a glob)"}[d.source_format]
    if not d.source:
        return Input("data.source", None, problem=f"unset; expected {expected}")
    if d.source_format == "captions":
        if not d.source.endswith((".csv", ".jsonl")):
            return Input("data.source", d.source, problem=f"not a .csv or .jsonl name; expected {expected} (an image "
                                                          "folder is data.source_format=imagefolder)")
        return exists("data.source", d.source, expected)
    if d.source_format == "imagefolder":
        try:  # two listings: the class folders against model.num_classes, as the job checks before listing
            folders = sources.class_folders(d.source, cfg.model.num_classes)  # them all, and the first one's images
            first = sources.first_class_images(d.source, folders)
        except (DataError, OSError) as err:
            return Input("data.source", d.source, problem=f"{err}; expected {expected}")
        if not first:
            return Input("data.source", d.source, problem=f"its first class folder {folders[0]} holds no images "
                                                          f"({', '.join(sources.IMAGE_EXTENSIONS)}); expected {expected}")
        return Input("data.source", d.source, note=f"{len(folders)} class folders, {first} images in the first")
    patterns = list(braceexpand(d.source))
    try:  # the first and last of a brace pattern: a listing of 1,000 tars is not seconds on S3
        missing = [u for u in {patterns[0], patterns[-1]} if not storage.glob(u)]
    except OSError as err:
        return Input("data.source", d.source, problem=f"{err}; expected {expected}")
    if missing:
        return Input("data.source", d.source, problem=f"matches no .tar files ({', '.join(sorted(missing))}); "
                                                       f"expected {expected}")
    return Input("data.source", d.source, note=f"{len(patterns)} pattern(s), first and last found")


def hf_model(key: str, value: str | None, root: str) -> Input:
    """A diffusers / transformers model (`dydit_dist.pretrained`): `none` (data.vae), a local folder, a
    folder on object storage, or a Hugging Face id already mirrored under `root`, in the local Hugging
    Face cache, or on a Hub that answers (then mirrored once by the job)."""
    if value == "none":
        return Input(key, value, note="none (pixel space)")
    if not value:
        return Input(key, value, problem="unset; expected a Hugging Face id, a local folder or a storage folder")
    expected = "a folder as save_pretrained writes it (with config.json)"
    if pretrained.is_storage_folder(value):
        if value.startswith("file://") and os.path.isdir(value.removeprefix("file://")):
            return Input(key, value, note="local folder")
        found = exists(key, storage.join(value, "config.json"), expected)
        if found.problem:
            return Input(key, value, problem=f"{found.value}: {found.problem}")
        return Input(key, value, note="storage folder (copied once to each node)")
    if os.path.isdir(value):
        return Input(key, value, note="local folder")
    if not pretrained.is_hub_id(value):
        return Input(key, value, problem="no such local folder (and not a Hugging Face id: org/name)")
    mirror = pretrained.mirror_url(value, root)
    if quietly(storage.exists, storage.join(mirror, pretrained.COMPLETE)):
        return Input(key, value, note=f"mirrored at {mirror}")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(value, "config.json"), str):
        return Input(key, value, note=f"in the local Hugging Face cache; mirrored to {mirror} when the job starts")
    unreachable = _hub_unreachable(value)
    if unreachable:
        return Input(key, value, problem=f"not in the local Hugging Face cache and {unreachable}; download it where "
                                         "there is internet (huggingface-cli download), or give a local or storage folder")
    return Input(key, value, note=f"on the Hugging Face Hub; mirrored to {mirror} when the job starts")


def _hub_unreachable(repo: str) -> str | None:
    """None when the Hub answers for `repo`; otherwise why not."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    try:
        HfApi().model_info(repo, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return None  # exists; the job's credentials decide
    except RepositoryNotFoundError:
        return "the Hub has no such repository"
    except Exception as err:  # noqa: BLE001 - any failure to reach the Hub is reported with its type
        return f"the Hub is unreachable ({type(err).__name__})"
    return None


def weights(key: str, source: str, cfg: Config, allow_missing=(), sampling: bool = False) -> Input:
    """A weights file or a run folder with an EMA pointer (`network.resolve_weights`); the file's keys
    and shapes (a safetensors header, or a `.pt` pickle loaded onto the meta device: a few KB read) are
    checked against the network of `cfg.model` (strict but `allow_missing`). `sampling`: an export's recorded
    model settings that differ from `cfg.model` are named in the note and logged as a warning."""
    expected = "a weights file (.pt, .pth, .safetensors) or a run folder with checkpoints/ema-latest.json"
    try:
        url = source
        if not source.endswith(WEIGHT_SUFFIXES) and storage.exists(ema_pointer(source)):
            url = read_ema_pointer(ema_pointer(source))["url"]
        if not storage.exists(url):
            where = f" (named by {ema_pointer(source)})" if url != source else ""
            return Input(key, source, problem=f"{url}{where} not found; expected {expected}")
        if url == source and not source.endswith(WEIGHT_SUFFIXES) and storage.is_folder(source):
            return Input(key, source, problem=f"a folder without checkpoints/ema-latest.json (a run that exported no "
                                              f"EMA weights yet?); expected {expected}")
        with storage.open_file(url, "rb", block_size=HEADER_BLOCK) as f:
            shapes = read_shapes(f, url)
            f.seek(0)
            recorded = read_metadata(f, url).get("model")
        unfit = _unfit_keys(shapes, cfg, allow_missing)
    except (OSError, ValueError, KeyError) as err:
        return Input(key, source, problem=f"{type(err).__name__}: {err}; expected {expected}")
    if unfit is None:
        return Input(key, source, note=f"{url} exists (keys checked when it loads)")
    if unfit:
        return Input(key, source, problem=f"{url} does not fit {cfg.model.name} ({cfg.model.method}, "
                                          f"{cfg.model.image_size}px): {unfit}")
    note = f"{url}: every key and shape fits the network"
    if sampling and (differ := _other_model_settings(recorded, cfg)):
        note += f"; BUT it was exported with other model settings ({differ}): the weights were trained for those"
        log.warning("%s=%s: %s", key, source, note)
    return Input(key, source, note=note)


# the model settings an export records that change what sampling computes without changing a tensor's shape
# (which the keys and shapes check already compares); DyDiT's options shape its training, not its sampling
_SAMPLING_RELEVANT = {"static": ("image_size", "vae_downsample", "lewei_scale", "model_max_length")}
_SAMPLING_RELEVANT |= {"dydit": _SAMPLING_RELEVANT["static"], "flexdit": (*_SAMPLING_RELEVANT["static"], "flexdit")}


def _other_model_settings(recorded: str | None, cfg: Config) -> str:
    """`model.key: exported -> now` for the model settings (`_SAMPLING_RELEVANT`) an export (safetensors
    metadata "model", written by `train.checkpoints.write_ema`) recorded otherwise than `cfg` has them: PixArt's
    image_size and lewei_scale and FlexDiT's schedule change no tensor's shape, so such an export would load
    silently."""
    try:
        before = json.loads(recorded) if recorded else None
    except ValueError:
        return ""
    if not isinstance(before, dict):
        return ""
    now = json.loads(json.dumps(cfg.to_dict()["model"]))  # tuples as lists, as the export wrote them

    def leaves(values: dict, prefix: str = "model.") -> dict:
        out = {}
        for key, value in values.items():
            out |= leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
        return out

    keys = _SAMPLING_RELEVANT.get(cfg.model.method, ())
    old, new = leaves({k: before[k] for k in keys if k in before}), leaves({k: now[k] for k in keys})
    changes = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(old) if k in new and old[k] != new[k]]
    return "; ".join(changes[:4]) + (f"; ... ({len(changes)} in all)" if len(changes) > 4 else "")


def sampling_weights(cfg: Config, made_by: str | None, allow_random: bool) -> Input:
    """model.checkpoint of a sampling network: unset is an error but for the tiny *debug models."""
    checkpoint = cfg.model.checkpoint
    if made_by:
        return Input("model.checkpoint", checkpoint, note=f"made by the {made_by} stage")
    if checkpoint:
        return weights("model.checkpoint", checkpoint, cfg, sampling=True)
    if allow_random:
        return Input("model.checkpoint", None, note="unset: random weights (--random-init)")
    if cfg.model.name.endswith("debug"):
        return Input("model.checkpoint", None, note=f"unset: random weights (allowed for the tiny {cfg.model.name} model)")
    return Input("model.checkpoint", None, problem=f"unset; sampling {cfg.model.name} without weights is an error "
                                                   "(only the debug models may): expected a weights file or a run folder")


def added_keys(cfg: Config, depth: int) -> set[str]:
    """The tensors model.method adds to the static network of `depth` blocks: DyDiT's routers on every block,
    FlexDiT's W1 / W2 on each R block of its layout."""
    m = cfg.model
    if m.method == "dydit":
        return {f"blocks.{i}.{key}" for i in range(depth) for key in ROUTER_KEYS}
    if m.method == "flexdit":
        return {f"blocks.{i}.merged_layer{j}.{w}" for i, role in enumerate(parse_layout(m.flexdit.layout, depth))
                if role == "R" for j in (1, 2) for w in ("weight", "bias")}
    return set()


def _unfit_keys(shapes: dict[str, list[int]], cfg: Config, allow_missing) -> str | None:
    """'' when `shapes` fits the network of `cfg.model` (as `models.load_into` would load it); else the
    differences; None when the network cannot be built on the meta device. The static keys are checked
    against the static network (DyDiT and FlexDiT keep them); the added tensors (routers, FlexDiT
    modules) by name (`added_keys`): all of them, or with `allow_missing` naming their patterns none."""
    added = added_key_patterns(cfg.model.method)
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialization cost
            static = build_network(dataclasses.replace(cfg.model, method="static"))
            recomputed = set(getattr(static, "RECOMPUTED_KEYS", ()))  # not read from the file (`load_into`)
            own = {k: list(v.shape) for k, v in static.state_dict().items() if k not in recomputed}
            shapes = {k: v for k, v in shapes.items() if k not in recomputed}
    except (RuntimeError, NotImplementedError, ValueError):  # an initializer that needs real values
        return None
    missing = [k for k in own if k not in shapes and not any(fnmatch.fnmatchcase(k, p) for p in allow_missing)]
    # The added modules (not on the meta device: built from the static network's values) by name: every one,
    # unless the caller allows them missing (a static checkpoint to fine-tune: then none or all of them).
    expected = added_keys(cfg, len(static.blocks)) if added else set()
    present = {k for k in shapes if any(fnmatch.fnmatchcase(k, p) for p in added)}
    if not (present == set() and all(p in allow_missing for p in added)):
        missing += sorted(expected - present)
    unexpected = [k for k in shapes if k not in own and k not in expected]
    mismatched = [f"{k} {shapes[k]} vs {v}" for k, v in own.items() if k in shapes and shapes[k] != v]
    parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for what, keys in
             (("mismatched shapes", mismatched), ("missing keys", missing), ("unexpected keys", unexpected)) if keys]
    return "; ".join(parts)


def quietly(done: Callable[..., bool], *args) -> bool:
    """Whether a stage is done; False when storage cannot tell (the storage.root check reports why)."""
    try:
        return bool(done(*args))
    except (OSError, ValueError, KeyError):
        return False


def samples_count(url: str, planned: bool = False) -> int | None:
    """The samples a folder's manifest records (`planned`: the count its sampling job makes, when done)."""
    try:
        manifest = storage.read_json(manifest_url(url))
        return int(manifest["settings"]["num_samples"] if planned else manifest["num_samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def holds_samples(url: str) -> bool:
    """Whether a samples folder holds samples: recorded in its manifest, or done-markers beside it (of a
    sampling driver that died before recording them)."""
    return bool(samples_count(url)) or quietly(
        lambda: any(u.endswith(".json") for u in storage.listdir(storage.join(url, MARKERS))))


def samples(url: str, cfg: Config) -> Input:
    key = "eval.samples"  # default: the run's samples folder
    try:
        manifest = SamplesManifest.read(url)
    except FileNotFoundError:
        return Input(key, url, problem="no samples manifest; expected the samples folder of a finished sample job")
    except (OSError, ValueError) as err:
        return Input(key, url, problem=f"{err}; expected a samples folder")
    if not manifest.complete:
        return Input(key, url, problem=f"{len(manifest.shards)} of {manifest.num_shards} shards done; rerun the "
                                       "sample job to finish them")
    settings = manifest.settings
    if not settings.get("checkpoint") and not str(settings.get("model", "")).endswith("debug"):
        return Input(key, url, problem=f"made by {settings.get('model')} without weights (model.checkpoint unset); "
                                       "evaluating them is an error outside the debug models")
    return Input(key, url, note=f"{manifest.num_samples} samples of {settings.get('checkpoint') or 'random weights'}")


def captions_count(source: str | None) -> int | None:
    """Rows of a captions .csv / .jsonl (None when it cannot be read)."""
    try:
        text = storage.read_bytes(source).decode("utf-8")
    except (OSError, TypeError, ValueError):
        return None
    rows = sum(1 for line in text.splitlines() if line.strip())
    return rows - 1 if source.endswith(".csv") else rows


def reference(reference: str | None, sample_size: int | None = None) -> Input:
    """eval.reference: there, and of images of the samples' resolution (`sample_size` px) when it holds any."""
    expected = "an ADM reference batch (.npz), a samples folder or a pixel-space data folder"
    if not reference:
        return Input("eval.reference", None, problem=f"unset (needed for FID and precision/recall); expected {expected}")
    if not reference.endswith(".npz") and storage.exists(reference) and not storage.exists(manifest_url(reference)):
        return Input("eval.reference", reference, problem=f"there, but neither an .npz nor a folder with a "
                                                          f"manifest.json; expected {expected}")
    found = exists("eval.reference", reference if reference.endswith(".npz") else manifest_url(reference), expected)
    if found.problem:
        return Input("eval.reference", reference, found.note, found.problem)
    try:
        problem = features.size_problem(reference, sample_size)
    except EvalInputError as err:  # no readable .npz, or no manifest of samples or data
        problem = str(err)
    return Input("eval.reference", reference, found.note, problem)


def extractor(cfg: Config, made: bool) -> Input:
    e = cfg.eval
    if e.feature_extractor == extractors.INCEPTION:
        if not e.inception_weights:
            path = extractors.hub_inception_path()
            if os.path.isfile(path):
                return Input("eval.inception_weights", None, note=f"unset: torch hub's cache has {path}")
            return Input("eval.inception_weights", None, problem=extractors.inception_missing_message())
        if e.inception_weights.startswith(("http://", "https://")):
            return Input("eval.inception_weights", e.inception_weights, note="an http(s) URL, downloaded when used")
        return exists("eval.inception_weights", e.inception_weights, "torch-fidelity's Inception-v3 weights (.pth)")
    extractors.register_extractors()
    if e.feature_extractor not in extractors.FEATURE_EXTRACTORS_REGISTRY:
        return Input("eval.feature_extractor", e.feature_extractor,
                     problem=f"not registered with torch-fidelity; registered: "
                             f"{', '.join(extractors.FEATURE_EXTRACTORS_REGISTRY)}")
    if made:
        return Input("eval.feature_extractor_weights", None, note=f"{e.feature_extractor}: trained by the reproduce job")
    if not e.feature_extractor_weights:
        if e.feature_extractor == digits.NAME:
            return Input("eval.feature_extractor_weights", None,
                         problem=f"unset; {digits.NAME} needs its weights (dydit_dist.eval.digits.train_digits_classifier)")
        return Input("eval.feature_extractor_weights", None, note=f"unset: {e.feature_extractor}'s own")
    return exists("eval.feature_extractor_weights", e.feature_extractor_weights, "the feature extractor's weights")


PROBE_BYTES = 64 * 1024  # what the local probe writes


def writable(root: str, key: str = "storage.root") -> Input:
    """`key`'s folder `root` can be written: a probe object written and deleted (locally, in the nearest
    existing folder, so that a dry run creates nothing)."""
    try:
        if "://" not in root or root.startswith("file://"):
            folder = os.path.abspath(root.removeprefix("file://"))
            while not os.path.exists(folder):
                folder = os.path.dirname(folder)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".preflight-") as probe:
                probe.write(bytes(PROBE_BYTES))  # blocks, not only an inode: an empty probe fits on a full disk
                probe.flush()
                os.fsync(probe.fileno())
                linked = f"{probe.name}.link"
                try:  # `storage.create` places files with a hard link (create-only, as O_EXCL)
                    os.link(probe.name, linked)
                except OSError as err:
                    return Input(key, root, problem=f"{folder} has no hard links ({type(err).__name__}: {err}), which "
                                                    "this job's create-only writes (shards, the lease) need; use a "
                                                    "POSIX file system (not a FUSE mount of a bucket) or s3://")
                os.remove(linked)
            free = shutil.disk_usage(folder).free
            return Input(key, root, note=f"writable (probe written and deleted; {free / 2**30:.1f} GiB free)")
        else:
            probe = storage.join(root, f".preflight-{uuid.uuid4().hex}")
            storage.write_bytes(probe, b"preflight probe")
            conditional = not storage.create(probe, b"a second probe")  # a store that ignores If-None-Match: True
            storage.remove(probe)
            if not conditional:
                return Input(key, root, note="writable, but its store ignores If-None-Match (a create-only PUT "
                                             "overwrote the probe): the run's lease is advisory only, and a worker "
                                             "taken for lost that still writes can replace a shard")
    except OSError as err:
        return Input(key, root, problem=f"not writable ({type(err).__name__}: {err}); expected a folder or bucket "
                                        "this job may write")
    return Input(key, root, note="writable (probe written and deleted)")


def sdxl_pipeline(cfg: Config) -> Input:
    """model.checkpoint of model.family sdxl: a StableDiffusionXLPipeline folder (local, on storage, or a
    Hugging Face id mirrored, cached or on the Hub) with model_index.json and a unet/config.json that
    matches the registry's model.name."""
    key, value, root = "model.checkpoint", cfg.model.checkpoint, cfg.storage.root
    if not value:
        return Input(key, value, problem="unset; model.family sdxl samples from a StableDiffusionXLPipeline folder "
                                         "(a local or storage folder, or a Hugging Face id)")
    folder = value
    if pretrained.is_hub_id(value):
        folder = pretrained.mirror_url(value, root)
        if not quietly(storage.exists, storage.join(folder, pretrained.COMPLETE)):
            from huggingface_hub import try_to_load_from_cache

            if isinstance(try_to_load_from_cache(value, "model_index.json"), str):
                return Input(key, value, note=f"in the local Hugging Face cache; mirrored to {folder} when the job starts")
            unreachable = _hub_unreachable(value)
            if unreachable:
                return Input(key, value, problem=f"not mirrored, not in the local Hugging Face cache and {unreachable}")
            return Input(key, value, note=f"on the Hub; mirrored to {folder} when the job starts")
    missing = [name for name in ("model_index.json", "unet/config.json")
               if not quietly(storage.exists, storage.join(folder, name))]
    if missing:
        return Input(key, value, problem=f"not a StableDiffusionXLPipeline folder: no {', '.join(missing)}")
    mismatches = sdxl_mismatches(cfg.model.name, storage.read_json(storage.join(folder, "unet/config.json")))
    if mismatches:
        return Input(key, value, problem=f"its unet/config.json is not {cfg.model.name}'s: {'; '.join(mismatches)}")
    return Input(key, value, note="StableDiffusionXLPipeline folder")
