"""Every input of a job resolved in seconds, and its plan, before any work starts.

    plan = check(cfg, "sample")     # prints the plan; PreflightError listing EVERY unresolved input

`cli.run_job` runs `check` before a job touches Ray; `--dry-run` stops after it (exit 0), an
unresolved input exits 2. Nothing heavy is read: a safetensors checkpoint's header (its keys and
shapes, against the network built on the meta device), a `.pt` file's existence, manifests. What
each job resolves:

    prepare     data.source; data.vae; data.text_encoder / tokenizer (caption data)
    finetune    data.uri's manifest fits the model (with the batch and DeepSpeed checks of
                `train.launcher.preflight`); train.init_from or model.checkpoint exists and fits
    sample      model.checkpoint exists and fits (unset: an error but for the tiny *debug models);
                data.vae (decoding); PixArt: sample.prompts, data.text_encoder; an EB-Cache table
    evaluate    the samples folder is complete, made with weights; eval.reference; the feature
                extractor's weights (eval.inception_weights or torch hub's cache, or
                eval.feature_extractor_weights)
    calibrate   model.checkpoint as for sample (unset allowed with --random-init)
    reproduce   all of the above for every stage it will run, before stage 1; what an earlier stage
                makes (the data, the pretrain and fine-tune weights, the digits classifier) is planned
    every job   storage.root writable (a probe object written and deleted)

A Hugging Face id (data.vae, data.text_encoder) resolves when it is a local folder, is in the local
Hugging Face cache, or the Hub answers for it (not with HF_HUB_OFFLINE set).

The plan lists the stages with their sample and step counts and an **estimate** of GPU-hours from
the analytic FLOPs (`dydit_dist.flops`, 2 FLOPs per multiply-accumulate) at an assumed sustained
400 TFLOP/s (40% of an H100's dense bf16 peak), as in the README's cost table; not a measurement.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from braceexpand import braceexpand

from dydit_dist import flops, pipeline, storage
from dydit_dist.config import Config
from dydit_dist.data import DataError
from dydit_dist.dynamic import FLEXDIT_KEY_PATTERNS, ROUTER_KEY_PATTERNS
from dydit_dist.eval import digits, extractors
from dydit_dist.models import family
from dydit_dist.network import build_network
from dydit_dist.paths import RunPaths, ema_pointer
from dydit_dist.sample import SamplesManifest
from dydit_dist.sample.pool import absolute_root
from dydit_dist.shardset import manifest_url
from dydit_dist.train import launcher

SUSTAINED_FLOPS = 400e12  # FLOP/s assumed sustained on one GPU (40% of an H100's dense bf16 peak)
INCEPTION_FLOP = 6e9  # per image: Inception-v3 at 299 x 299
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")
HUB_TIMEOUT_S = 5.0


class PreflightError(ValueError):
    """Inputs of a job that do not resolve; the message lists each by config key, value and what was expected."""


@dataclass
class Input:
    """One input: its config key and value, what was found (`note`) or what is wrong (`problem`)."""

    key: str
    value: object
    note: str = ""
    problem: str | None = None


@dataclass
class Stage:
    """One stage of the plan: what it does and its estimated FLOPs (None: not estimated)."""

    name: str
    work: str
    flop: float | None = None


@dataclass
class Plan:
    job: str
    run: str
    stages: list[Stage] = field(default_factory=list)
    inputs: list[Input] = field(default_factory=list)

    def add(self, item: Input) -> None:
        if not any((i.key, i.value, i.problem) == (item.key, item.value, item.problem) for i in self.inputs):
            self.inputs.append(item)

    @property
    def problems(self) -> list[Input]:
        return [i for i in self.inputs if i.problem]

    @property
    def gpu_hours(self) -> float:
        return sum(s.flop or 0.0 for s in self.stages) / SUSTAINED_FLOPS / 3600

    def text(self) -> str:
        lines = [f"preflight {self.job} (run {self.run}):", "  stages:"]
        for n, s in enumerate(self.stages, start=1):
            lines.append(f"    {n}. {s.name}: {s.work}")
        lines.append("  inputs:")
        for i in self.inputs:
            status, what = ("UNRESOLVED", i.problem) if i.problem else ("ok", i.note)
            lines.append(f"    {status:<10} {i.key}={i.value}{': ' + what if what else ''}")
        lines.append(f"  estimate: {self.gpu_hours:.3g} GPU-hours (analytic FLOPs at an assumed "
                     f"{SUSTAINED_FLOPS / 1e12:.0f} TFLOP/s sustained; an estimate, not a measurement)")
        return "\n".join(lines)

    def error(self) -> PreflightError:
        listed = "\n".join(f"  {i.key}={i.value}: {i.problem}" for i in self.problems)
        return PreflightError(f"{len(self.problems)} input(s) of the {self.job} job do not resolve:\n{listed}")


def check(cfg: Config, job: str, **options) -> Plan:
    """Resolve every input of `job` for `cfg` and print the plan; PreflightError listing every problem.
    options: calibrate's `allow_random` and `num_samples`."""
    result = plan(cfg, job, **options)
    print(result.text(), flush=True)
    if result.problems:
        raise result.error()
    return result


def plan(cfg: Config, job: str, **options) -> Plan:
    """The stages and inputs of `job` (see the module docstring), without raising for a problem."""
    builders: dict[str, Callable[..., None]] = {
        "prepare": _prepare, "finetune": _finetune, "sample": _sample, "evaluate": _evaluate,
        "calibrate": _calibrate, "reproduce": _reproduce,
    }  # fmt: skip
    if job not in builders:
        raise ValueError(f"no preflight for job {job!r}; jobs: {', '.join(builders)}")
    cfg = absolute_root(cfg)
    result = Plan(job, RunPaths(cfg).url)
    builders[job](result, cfg, **options)
    result.add(_writable(cfg.storage.root))
    return result


# ----------------------------------------------------------------------------- the jobs


def _prepare(p: Plan, cfg: Config, builtin_ok: bool = False) -> None:
    d = cfg.data
    latents = "pixels" if d.vae == "none" else f"{d.vae} latents"
    captions = d.source_format == "captions"
    p.stages.append(Stage("prepare", f"{d.source} ({d.source_format}) -> {latents}{' + T5 features' if captions else ''}"
                                     f" in shards of {d.shard_size} at {RunPaths(cfg).data}"))
    p.add(_source(cfg, builtin_ok))
    p.add(_hf_model("data.vae", d.vae))
    if captions:
        p.add(_hf_model("data.text_encoder", d.text_encoder))
        if d.tokenizer:
            p.add(_hf_model("data.tokenizer", d.tokenizer))


def _finetune(p: Plan, cfg: Config, name: str = "finetune", data_ready: bool = True,
              init_made_by: str | None = None, init_key: str | None = None) -> None:
    m, t = cfg.model, cfg.train
    done = p.job == "reproduce" and _quietly(pipeline.trained_to_end, cfg)
    stage1 = 0
    if m.method == "dydit" and m.dynamic.stage == 1:  # stage 1 adds the complete model's forward + backward
        stage1 = t.max_steps if m.dynamic.stage1_steps is None else min(m.dynamic.stage1_steps, t.max_steps)
    macs = network_macs(m)
    flop = (t.max_steps + stage1) * t.global_batch_size * 3 * macs * 2
    work = (f"{m.name} {m.method} at {m.image_size}px, {t.max_steps:,} steps x {t.global_batch_size} images x "
            f"3 (forward + backward) x {_macs(macs)} x 2"
            + (f", + {stage1:,} steps of the complete model (DyDiT stage 1)" if stage1 else "")
            + f" = {_flop(flop)} on {cfg.ray.num_workers} workers, ZeRO-{cfg.deepspeed.zero_stage} -> {RunPaths(cfg).url}")
    p.stages.append(Stage(name, "outputs exist, skipped" if done else work, None if done else flop))
    if done:
        return
    if data_ready:
        try:
            launcher.preflight(cfg)
            p.add(Input("data.uri", RunPaths(cfg).data, note="complete manifest, fits the model"))
        except (DataError, OSError) as err:
            p.add(Input("data.uri", RunPaths(cfg).data, problem=str(err)))
        except ValueError as err:  # ConfigError: batch arithmetic, DeepSpeed options, storage.root
            p.add(Input("config", f"[{name}]", problem=str(err)))
    key = init_key or ("train.init_from" if t.init_from else "model.checkpoint")
    source = t.init_from or m.checkpoint
    if init_made_by:
        p.add(Input(key, source, note=f"made by the {init_made_by} stage"))
    elif source is None:
        p.add(Input(key, None, note=f"unset: {name} starts from random weights"))
    else:
        allow = {"dydit": ROUTER_KEY_PATTERNS, "flexdit": FLEXDIT_KEY_PATTERNS}.get(m.method, ())
        p.add(_weights(key, source, cfg, allow))


def _sample(p: Plan, cfg: Config, weights_made_by: str | None = None) -> None:
    m, s = cfg.model, cfg.sample
    samples = RunPaths(cfg).samples
    done = p.job == "reproduce" and _samples_complete(samples)
    guidance = 2 if s.cfg_scale != 1.0 else 1
    macs = network_macs(m)
    scale, how = 1.0, "the static network's MACs" + (f" (an upper bound for {s.method})" if s.method != "static" else "")
    if s.method == "dydit":
        scale, how = m.dynamic.target_lambda, f"x lambda {m.dynamic.target_lambda} (FLOPs-ideal)"
    flop = s.num_samples * s.steps * guidance * macs * scale * 2
    work = (f"{s.num_samples:,} samples x {s.steps} {s.sampler} steps x {guidance} (guidance) x {_macs(macs)} "
            f"x 2 = {_flop(flop)}, {how}; {m.name} {m.method} at {m.image_size}px, sample.method={s.method} "
            f"-> {samples}")
    p.stages.append(Stage(f"sample {s.method}", "outputs exist, skipped" if done else work, None if done else flop))
    if done:
        return
    p.add(_sampling_weights(cfg, weights_made_by, allow_random=False))
    p.add(_hf_model("data.vae", cfg.data.vae))
    if family(m.name) != "dit":
        p.add(_exists("sample.prompts", s.prompts, "a prompts file (.txt or .jsonl)"))
        p.add(_hf_model("data.text_encoder", cfg.data.text_encoder))
        if cfg.data.tokenizer:
            p.add(_hf_model("data.tokenizer", cfg.data.tokenizer))
    if s.method == "eb_cache" and s.eb_cache.schedule.endswith(".json"):
        p.add(_exists("sample.eb_cache.schedule", s.eb_cache.schedule, "an EB-Cache table (python -m jobs.calibrate)"))


def _evaluate(p: Plan, cfg: Config, samples_made: bool = False, reference_made: bool = False,
              extractor_made: bool = False) -> None:
    e = cfg.eval
    paths = RunPaths(cfg)
    samples = e.samples or paths.samples
    done = p.job == "reproduce" and _quietly(storage.exists, paths.metrics)
    inception = e.feature_extractor == extractors.INCEPTION
    count = cfg.sample.num_samples if samples_made else _samples_count(samples)
    flop = (count or 0) * INCEPTION_FLOP if inception else None
    work = (f"{', '.join(e.metrics)} of {samples} against {e.reference} with {e.feature_extractor}"
            + (f": {count or '?'} images x {_flop(INCEPTION_FLOP)}" if inception else " (not estimated)"))
    name = f"evaluate {cfg.sample.method}" if p.job == "reproduce" else "evaluate"
    p.stages.append(Stage(name, "outputs exist, skipped" if done else work, None if done else flop))
    if done:
        return
    if not samples_made:
        p.add(_samples(samples, cfg))
    if "fid" in e.metrics or "prc" in e.metrics:
        if reference_made:
            p.add(Input("eval.reference", e.reference, note="made by the prepare stage"))
        else:
            p.add(_reference(e.reference))
    p.add(_extractor(cfg, extractor_made))


def _calibrate(p: Plan, cfg: Config, allow_random: bool = False, num_samples: int = 8) -> None:
    m, s = cfg.model, cfg.sample
    macs = network_macs(m)
    guidance = 2 if s.cfg_scale != 1.0 else 1
    flop = num_samples * s.steps * guidance * macs * 2
    p.stages.append(Stage("calibrate", f"EB-Cache table of {m.name} for {s.sampler} {s.steps} steps: {num_samples} "
                                       f"samples x {s.steps} x {guidance} x {_macs(macs)} x 2 = {_flop(flop)}", flop))
    p.add(_sampling_weights(cfg, None, allow_random))


def _reproduce(p: Plan, cfg: Config) -> None:
    """The stages of `pipeline.reproduce`, each checked with what the stages before it make."""
    # 1. Data
    data = pipeline.with_values(cfg, data={"uri": RunPaths(cfg).data})
    data_ready = _quietly(pipeline.data_done, data)
    if data_ready:
        p.stages.append(Stage("prepare", "outputs exist, skipped"))
    else:
        _prepare(p, data, builtin_ok=True)
    # 2. Weights
    static_weights, static_by = cfg.model.checkpoint, None
    if cfg.eval.pretrain_config:
        pretrain = pipeline.pretrain_config(data)
        _finetune(p, pretrain, "pretrain", data_ready)
        static_weights, static_by = RunPaths(pretrain).url, "pretrain"
    dynamic_weights = None
    if any(m in pipeline.TRAINED_METHODS for m in cfg.eval.methods):
        finetune = pipeline.finetune_config(data, static_weights)
        _finetune(p, finetune, "finetune", data_ready, None if cfg.train.init_from else static_by,
                  "train.init_from" if cfg.train.init_from else "model.checkpoint")
        dynamic_weights = RunPaths(finetune).url
    # 3. Samples and metrics of every method
    extractor_made = cfg.eval.feature_extractor == digits.NAME and not cfg.eval.feature_extractor_weights
    for method in cfg.eval.methods:
        m_cfg = pipeline.method_config(data, method, static_weights, dynamic_weights)
        made_by = "finetune" if method in pipeline.TRAINED_METHODS else static_by
        _sample(p, m_cfg, made_by)
        _evaluate(p, m_cfg, samples_made=True, reference_made=not (cfg.eval.reference or data_ready),
                  extractor_made=extractor_made)
    # 4. Report
    p.stages.append(Stage("report", RunPaths(cfg).report))


# ----------------------------------------------------------------------------- the inputs


def _exists(key: str, url: str | None, expected: str) -> Input:
    if not url:
        return Input(key, url, problem=f"unset; expected {expected}")
    try:
        found = storage.exists(url)
    except OSError as err:
        return Input(key, url, problem=f"{err}; expected {expected}")
    return Input(key, url, note="exists") if found else Input(key, url, problem=f"not found; expected {expected}")


def _source(cfg: Config, builtin_ok: bool) -> Input:
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
    if d.source_format != "webdataset":
        return _exists("data.source", d.source, expected)
    patterns = list(braceexpand(d.source))
    try:  # the first and last of a brace pattern: a listing of 1,000 tars is not seconds on S3
        missing = [u for u in {patterns[0], patterns[-1]} if not storage.glob(u)]
    except OSError as err:
        return Input("data.source", d.source, problem=f"{err}; expected {expected}")
    if missing:
        return Input("data.source", d.source, problem=f"matches no .tar files ({', '.join(sorted(missing))}); "
                                                       f"expected {expected}")
    return Input("data.source", d.source, note=f"{len(patterns)} pattern(s), first and last found")


def _hf_model(key: str, value: str | None) -> Input:
    """A diffusers / transformers model: `none` (data.vae), a local folder or a Hugging Face id available offline."""
    if value == "none":
        return Input(key, value, note="none (pixel space)")
    if not value:
        return Input(key, value, problem="unset; expected a Hugging Face id or a local folder")
    local = value.removeprefix("file://")
    if "://" in local:
        return Input(key, value, problem="from_pretrained reads a local folder or a Hugging Face id, not a URL")
    if os.path.isdir(local):
        return Input(key, value, note="local folder")
    if local.startswith((".", "/", "~")) or local.count("/") != 1:
        return Input(key, value, problem="no such local folder (and not a Hugging Face id: org/name)")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(value, "config.json"), str):
        return Input(key, value, note="in the local Hugging Face cache")
    unreachable = _hub_unreachable(value)
    if unreachable:
        return Input(key, value, problem=f"not in the local Hugging Face cache and {unreachable}; download it where "
                                         "there is internet (huggingface-cli download) or give a local folder")
    return Input(key, value, note="on the Hugging Face Hub (downloaded when the job loads it)")


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


def _weights(key: str, source: str, cfg: Config, allow_missing=()) -> Input:
    """A weights file or a run folder with an EMA pointer (`network.resolve_weights`); a safetensors
    file's keys and shapes are checked against the network of `cfg.model` (strict but `allow_missing`)."""
    expected = "a weights file (.pt, .pth, .safetensors) or a run folder with checkpoints/ema-latest.json"
    try:
        url = source
        if not source.endswith(WEIGHT_SUFFIXES) and storage.exists(ema_pointer(source)):
            url = storage.read_json(ema_pointer(source))["url"]
        if not storage.exists(url):
            where = f" (named by {ema_pointer(source)})" if url != source else ""
            return Input(key, source, problem=f"{url}{where} not found; expected {expected}")
        if not url.endswith(".safetensors"):
            return Input(key, source, note=f"{url} exists (keys checked when it loads)")
        unfit = _unfit_keys(_safetensors_shapes(url), cfg, allow_missing)
    except (OSError, ValueError, KeyError) as err:
        return Input(key, source, problem=f"{type(err).__name__}: {err}; expected {expected}")
    if unfit is None:
        return Input(key, source, note=f"{url} exists (keys checked when it loads)")
    if unfit:
        return Input(key, source, problem=f"{url} does not fit {cfg.model.name} ({cfg.model.method}, "
                                          f"{cfg.model.image_size}px): {unfit}")
    return Input(key, source, note=f"{url}: every key and shape fits the network")


def _sampling_weights(cfg: Config, made_by: str | None, allow_random: bool) -> Input:
    """model.checkpoint of a sampling network: unset is an error but for the tiny *debug models."""
    checkpoint = cfg.model.checkpoint
    if made_by:
        return Input("model.checkpoint", checkpoint, note=f"made by the {made_by} stage")
    if checkpoint:
        return _weights("model.checkpoint", checkpoint, cfg)
    if allow_random:
        return Input("model.checkpoint", None, note="unset: random weights (--random-init)")
    if cfg.model.name.endswith("debug"):
        return Input("model.checkpoint", None, note=f"unset: random weights (allowed for the tiny {cfg.model.name} model)")
    return Input("model.checkpoint", None, problem=f"unset; sampling {cfg.model.name} without weights is an error "
                                                   "(only the debug models may): expected a weights file or a run folder")


def _safetensors_shapes(url: str) -> dict[str, list[int]]:
    """{key: shape} from a safetensors file's header (8-byte length, then JSON); no tensor is read."""
    with storage.open_file(url, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size < 100_000_000:
            raise ValueError(f"{url}: not a safetensors file (header size {size})")
        header = json.loads(f.read(size))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _unfit_keys(shapes: dict[str, list[int]], cfg: Config, allow_missing) -> str | None:
    """'' when `shapes` fits the network of `cfg.model` (as `models.load_into` would load it); else the
    differences; None when the network cannot be built on the meta device. The static keys are checked
    against the static network (DyDiT and FlexDiT keep them); the added tensors (routers, FlexDiT
    modules) only by name pattern."""
    added = {"dydit": ROUTER_KEY_PATTERNS, "flexdit": FLEXDIT_KEY_PATTERNS}.get(cfg.model.method, ())
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialization cost
            static = build_network(dataclasses.replace(cfg.model, method="static"))
            own = {k: list(v.shape) for k, v in static.state_dict().items()}
    except (RuntimeError, NotImplementedError, ValueError):  # an initializer that needs real values
        return None
    missing = [k for k in own if k not in shapes and not any(fnmatch.fnmatchcase(k, p) for p in allow_missing)]
    unexpected = [k for k in shapes if k not in own and not any(fnmatch.fnmatchcase(k, p) for p in added)]
    mismatched = [f"{k} {shapes[k]} vs {v}" for k, v in own.items() if k in shapes and shapes[k] != v]
    parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for what, keys in
             (("mismatched shapes", mismatched), ("missing keys", missing), ("unexpected keys", unexpected)) if keys]
    return "; ".join(parts)


def _quietly(done: Callable[..., bool], *args) -> bool:
    """Whether a stage is done; False when storage cannot tell (the storage.root check reports why)."""
    try:
        return bool(done(*args))
    except (OSError, ValueError, KeyError):
        return False


def _samples_complete(url: str) -> bool:
    return _quietly(lambda: storage.exists(manifest_url(url)) and SamplesManifest.read(url).complete)


def _samples_count(url: str) -> int | None:
    try:
        return int(storage.read_json(manifest_url(url))["num_samples"])
    except (OSError, ValueError, KeyError):
        return None


def _samples(url: str, cfg: Config) -> Input:
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


def _reference(reference: str | None) -> Input:
    expected = "an ADM reference batch (.npz), a samples folder or a pixel-space data folder"
    if not reference:
        return Input("eval.reference", None, problem=f"unset (needed for FID and precision/recall); expected {expected}")
    found = _exists("eval.reference", reference if reference.endswith(".npz") else manifest_url(reference), expected)
    return Input("eval.reference", reference, found.note, found.problem)


def _extractor(cfg: Config, made: bool) -> Input:
    e = cfg.eval
    if e.feature_extractor == extractors.INCEPTION:
        if not e.inception_weights:
            path = extractors.hub_inception_path()
            if os.path.isfile(path):
                return Input("eval.inception_weights", None, note=f"unset: torch hub's cache has {path}")
            return Input("eval.inception_weights", None, problem=extractors.inception_missing_message())
        if e.inception_weights.startswith(("http://", "https://")):
            return Input("eval.inception_weights", e.inception_weights, note="an http(s) URL, downloaded when used")
        return _exists("eval.inception_weights", e.inception_weights, "torch-fidelity's Inception-v3 weights (.pth)")
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
    return _exists("eval.feature_extractor_weights", e.feature_extractor_weights, "the feature extractor's weights")


def _writable(root: str) -> Input:
    """storage.root can be written: a probe object written and deleted (locally, in the nearest existing
    folder, so that a dry run creates nothing)."""
    try:
        if "://" not in root or root.startswith("file://"):
            folder = os.path.abspath(root.removeprefix("file://"))
            while not os.path.exists(folder):
                folder = os.path.dirname(folder)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".preflight-"):
                pass
        else:
            probe = storage.join(root, f".preflight-{uuid.uuid4().hex}")
            storage.write_bytes(probe, b"preflight probe")
            storage.remove(probe)
    except OSError as err:
        return Input("storage.root", root, problem=f"not writable ({type(err).__name__}: {err}); expected a folder "
                                                   "or bucket this job may write")
    return Input("storage.root", root, note="writable (probe written and deleted)")


# ----------------------------------------------------------------------------- the estimate


def network_macs(model_cfg) -> float:
    """Analytic MACs of one forward pass of the static network of a `ModelConfig` on one image."""
    m = model_cfg
    kwargs = dict(in_channels=m.in_channels, learn_sigma=m.learn_sigma)
    if family(m.name) != "dit":
        kwargs.update(caption_channels=m.caption_channels, model_max_length=m.model_max_length)
    return flops.count(m.name, m.image_size, vae_downsample=m.vae_downsample, **kwargs).total


def _macs(macs: float) -> str:
    return f"{macs / 1e9:.2f} GMAC" if macs >= 1e8 else f"{macs / 1e6:.2f} MMAC"


def _flop(flop: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flop >= scale:
            return f"{flop / scale:,.1f} {unit}"
    return f"{flop / 1e6:,.1f} MFLOP"
