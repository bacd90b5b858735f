"""Every input of a job resolved in seconds, and its plan, before any work starts.

    plan = check(cfg, "sample")     # prints the plan; PreflightError listing EVERY unresolved input

`cli.run_job` runs `check` before a job touches Ray; `--dry-run` stops after it (exit 0), an
unresolved input exits 2. Nothing heavy is read: a checkpoint's keys and shapes (a safetensors
header, or a `.pt` pickle loaded onto the meta device) against the network built on the meta device,
manifests. What each job resolves:

    prepare     data.source; data.vae; data.text_encoder / tokenizer (caption data)
    finetune    data.uri's manifest fits the model (with the batch and DeepSpeed checks of
                `train.launcher.preflight`); train.init_from or model.checkpoint exists and fits
    sample      model.checkpoint exists and fits (unset: an error but for the tiny *debug models);
                data.vae (decoding); PixArt: sample.prompts, data.text_encoder; an EB-Cache table
    evaluate    the samples folder is complete, made with weights; eval.reference; the feature
                extractor's weights (eval.inception_weights or torch hub's cache, or
                eval.feature_extractor_weights); eval.protocol=coco: sample.prompts, eval.clip_model
    reference   data.source (captions); the feature extractor's weights
    calibrate   model.checkpoint as for sample (unset allowed with --random-init)
    reproduce   all of the above for every stage it will run, before stage 1; what an earlier stage
                makes (the data, the pretrain and fine-tune weights, the digits classifier) is planned
    every job   storage.root writable (a probe object written and deleted)

A pretrained component (data.vae, data.text_encoder, data.tokenizer; see `dydit_dist.pretrained`)
resolves when it is a local folder, a storage folder with its config.json, or a Hugging Face id that
is mirrored under storage.root, in the local Hugging Face cache, or answered for by the Hub (not with
HF_HUB_OFFLINE set); the job mirrors an id once before its workers start.

The plan lists the stages with their sample and step counts and an **estimate** of GPU-hours from
the analytic FLOPs at an assumed sustained rate (`dydit_dist.estimate`), as in the README's cost table;
not a measurement. An SD-XL pipeline folder resolves in `resolve.sdxl_pipeline`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dydit_dist import pipeline, resolve, storage
from dydit_dist.accel.methods import METHODS
from dydit_dist.config import SDXL_METHODS, Config, ConfigError
from dydit_dist.data import DataError
from dydit_dist.dynamic import added_key_patterns
from dydit_dist.estimate import (
    INCEPTION_FLOP,
    SUSTAINED_FLOPS,
    format_flop,
    format_macs,
    network_macs,
    routed_share,
    training_flop,
)
from dydit_dist.eval import digits, extractors
from dydit_dist.eval.captions import caption_reference_problems
from dydit_dist.eval.metrics import needs_reference
from dydit_dist.models import CheckpointError, family
from dydit_dist.paths import RunPaths
from dydit_dist.resolve import Input
from dydit_dist.sample import SamplesError
from dydit_dist.sample.export import export_path, export_problem
from dydit_dist.sample.plan import PromptsError
from dydit_dist.sample.pool import absolute_root
from dydit_dist.train import launcher
from dydit_dist.train.checkpoints import exported_step, has_checkpoint


class PreflightError(ValueError):
    """Inputs of a job that do not resolve; the message lists each by config key, value and what was expected."""


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
    options: calibrate's `allow_random`, `num_samples` and `out`."""
    result = plan(cfg, job, **options)
    print(result.text(), flush=True)
    if result.problems:
        raise result.error()
    return result


def plan(cfg: Config, job: str, **options) -> Plan:
    """The stages and inputs of `job` (see the module docstring), without raising for a problem."""
    builders: dict[str, Callable[..., None]] = {
        "prepare": _prepare, "finetune": _finetune, "sample": _sample, "evaluate": _evaluate,
        "calibrate": _calibrate, "reproduce": _reproduce, "reference": _reference,
    }  # fmt: skip
    if job not in builders:
        raise ValueError(f"no preflight for job {job!r}; jobs: {', '.join(builders)}")
    cfg = absolute_root(cfg)
    result = Plan(job, RunPaths(cfg).url)
    builders[job](result, cfg, **options)
    result.add(resolve.writable(cfg.storage.root))
    return result


# ----------------------------------------------------------------------------- the jobs


def _prepare(p: Plan, cfg: Config, builtin_ok: bool = False) -> None:
    d = cfg.data
    latents = "pixels" if d.vae == "none" else f"{d.vae} latents"
    captions = d.source_format == "captions"
    p.stages.append(Stage("prepare", f"{d.source} ({d.source_format}) -> {latents}{' + T5 features' if captions else ''}"
                                     f" in shards of {d.shard_size} at {RunPaths(cfg).data}"))
    p.add(resolve.source(cfg, builtin_ok))
    p.add(resolve.hf_model("data.vae", d.vae, cfg.storage.root))
    if captions:
        p.add(resolve.hf_model("data.text_encoder", d.text_encoder, cfg.storage.root))
        if d.tokenizer:
            p.add(resolve.hf_model("data.tokenizer", d.tokenizer, cfg.storage.root))


def _finetune(p: Plan, cfg: Config, name: str = "finetune", data_ready: bool = True,
              init_made_by: str | None = None, init_key: str | None = None) -> bool:
    """Returns whether the stage trains (False: reproduce finds it done, or it cannot run)."""
    m, t = cfg.model, cfg.train
    if family(m.name) == "sdxl":
        p.stages.append(Stage(name, f"{m.name}: not run"))
        p.add(Input("model.name", m.name, problem="model.family sdxl is sampled through diffusers' "
                                                  "StableDiffusionXLPipeline (the sample and evaluate jobs), not fine-tuned"))
        return False
    done, differ = _done(pipeline.finetune_done, cfg) if p.job == "reproduce" else (False, None)
    if p.job == "reproduce" and not done and not differ:  # a resumable run: refused now, not when its stage starts
        try:
            launcher.check_settings(cfg)
        except ConfigError as err:
            differ = str(err)
        except CheckpointError as err:  # a lost or cut Ray snapshot (`checkpoints.has_checkpoint`)
            p.add(Input("storage.run", RunPaths(cfg).checkpoints, problem=str(err)))
        except OSError:  # storage trouble: the storage.root check reports it
            pass
    trained = RunPaths(cfg).checkpoints
    if init_made_by and resolve.quietly(lambda: exported_step(trained) >= 0 or has_checkpoint(trained)):
        differ = (f"holds a {name} of earlier {init_key or 'train.init_from'} weights, and the {init_made_by} "
                  "stage makes new ones; use another storage.run, or remove that folder")
    if differ:
        p.stages.append(Stage(name, "outputs exist, made with other settings"))
        p.add(Input("storage.run", RunPaths(cfg).url, problem=differ))
        return False
    if t.max_steps == 0:
        p.stages.append(Stage(name, "train.max_steps is not set"))
        p.add(Input("train.max_steps", 0, problem="the preset gives no training length (its recipe's length depends "
                                                  "on data it does not give): set train.max_steps=N"))
        return False
    stage1 = 0
    if m.method == "dydit" and m.dynamic.stage == 1:  # stage 1 adds the complete model's forward + backward
        stage1 = t.max_steps if m.dynamic.stage1_steps is None else min(m.dynamic.stage1_steps, t.max_steps)
    macs = network_macs(m)
    flop = (t.max_steps + stage1) * t.global_batch_size * training_flop(m)
    work = (f"{m.name} {m.method} at {m.image_size}px, {t.max_steps:,} steps x {t.global_batch_size} images x "
            f"3 (forward + backward) x {format_macs(macs)} x 2"
            + (f", + {stage1:,} steps of the complete model (DyDiT stage 1)" if stage1 else "")
            + f" = {format_flop(flop)} on {cfg.ray.num_workers} workers, ZeRO-{cfg.deepspeed.zero_stage} -> {RunPaths(cfg).url}")
    p.stages.append(Stage(name, "outputs exist, skipped" if done else work, None if done else flop))
    if done:
        return False
    if data_ready:
        try:
            order = launcher.preflight(cfg).class_order()  # data prepared by an older version, in class order
            p.add(Input("data.uri", RunPaths(cfg).data, note="complete manifest, fits the model"
                        + (f"; WARNING: {order}" if order else "")))
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
        allow = added_key_patterns(m.method)
        p.add(resolve.weights(key, source, cfg, allow))
    return True


def _sample(p: Plan, cfg: Config, weights_made_by: str | None = None, prompts_by: str | None = None) -> None:
    m, s = cfg.model, cfg.sample
    sdxl = family(m.name) == "sdxl"
    samples = RunPaths(cfg).samples
    done, problem = _samples_state(cfg, weights_made_by)
    done = done and p.job == "reproduce"
    if problem:
        p.add(Input("storage.run", samples, problem=problem))
    guidance = 2 if s.cfg_scale != 1.0 else 1
    macs = network_macs(m)
    scale, how = 1.0, "the static network's MACs" + (f" (an upper bound for {s.method})" if s.method != "static" else "")
    if s.method == "dydit":  # lambda is the ratio of the routed layers only (PixArt's cross-attention stays whole)
        share = routed_share(m)
        scale = 1.0 - share * (1.0 - m.dynamic.target_lambda)
        how = (f"x {scale:.3f}: lambda {m.dynamic.target_lambda} of the routed self-attention + MLP, {share:.1%} of "
               "the MACs (FLOPs-ideal)")
    flop = s.num_samples * s.steps * guidance * macs * scale * 2
    work = (f"{s.num_samples:,} samples x {s.steps} {s.sampler} steps x {guidance} (guidance) x {format_macs(macs)} "
            f"x 2 = {format_flop(flop)}, {how}; {m.name} {m.method} at {m.image_size}px, sample.method={s.method} "
            f"-> {samples}")
    p.stages.append(Stage(f"sample {s.method}", "outputs exist, skipped" if done else work, None if done else flop))
    if done:
        return
    if sdxl:  # the pipeline folder holds the VAE and the text encoders
        p.add(resolve.sdxl_pipeline(cfg))
    else:
        p.add(resolve.sampling_weights(cfg, weights_made_by, allow_random=False))
        p.add(resolve.hf_model("data.vae", cfg.data.vae, cfg.storage.root))
    if family(m.name) != "dit":
        p.add(_made("sample.prompts", s.prompts, prompts_by)
              or resolve.prompts("sample.prompts", s.prompts, "a prompts file (.txt or .jsonl)"))
    if family(m.name) not in ("dit", "sdxl"):
        _text_encoder(p, cfg)
    if s.method == "eb_cache" and s.eb_cache.schedule.endswith(".json"):
        p.add(resolve.eb_cache_table(cfg))
    if s.method == "eb_cache" and s.eb_cache.eps_scale == "released" and (
            cfg.model.name != "DiT-XL/2" or cfg.model.image_size != 256 or cfg.model.method != "static"
            or s.sampler != "ddpm" or s.steps != 50):
        p.add(Input("sample.eb_cache.eps_scale", "released", note="eps / 0.965: the released code's constant for a "
                    "static DiT-XL/2 at 256 px and 50 DDPM steps, untuned here; set none, paper or const:X for another"))
    if p.job == "sample" and s.export_npz:
        problem = export_problem(s.export_npz)
        p.add(Input("sample.export_npz", s.export_npz, problem=problem) if problem else
              Input("sample.export_npz", s.export_npz, note=f"written after sampling: {export_path(s.export_npz)}"))


def _text_encoder(p: Plan, cfg: Config) -> None:
    p.add(resolve.hf_model("data.text_encoder", cfg.data.text_encoder, cfg.storage.root))
    if cfg.data.tokenizer:
        p.add(resolve.hf_model("data.tokenizer", cfg.data.tokenizer, cfg.storage.root))


def _samples_state(cfg: Config, weights_made_by: str | None) -> tuple[bool, str | None]:
    """(whether the samples folder of `cfg` is complete, why it cannot be sampled into: it holds samples
    of other settings or weights, or of weights the stage `weights_made_by` of this job replaces)."""
    samples = RunPaths(cfg).samples
    if weights_made_by:
        if resolve.holds_samples(samples):
            return False, (f"holds samples of earlier weights, and the {weights_made_by} stage makes new ones; use "
                           "another storage.run, or remove that folder")
        return False, None
    return _done(pipeline.samples_done, cfg)


def _done(check: Callable[[Config], bool], cfg: Config) -> tuple[bool, str | None]:
    """(a stage's done `check`, why its outputs cannot be reused: made with other settings); storage trouble
    or weights that do not resolve read as not done (their own checks report them)."""
    try:
        return check(cfg), None
    except PromptsError:  # the prompts file itself, which its own input (`resolve.prompts`) reports
        return False, None
    except (pipeline.OutputsDiffer, SamplesError) as err:
        return False, str(err)
    except (OSError, ValueError, KeyError):
        return False, None


def _made(key: str, value, by: str | None) -> Input | None:
    """The input `key`, written by the stage `by` of this job before it is read; None when no stage writes it."""
    return Input(key, value, note=f"made by the {by} stage") if by else None


def _evaluate(p: Plan, cfg: Config, samples_made: bool = False, reference_by: str | None = None,
              extractor_made: bool = False, prompts_by: str | None = None, reference: Input | None = None) -> None:
    """`reference`: eval.reference as the caller resolved it (reproduce: a data folder that cannot be one)."""
    e = cfg.eval
    paths = RunPaths(cfg)
    samples = e.samples or paths.samples
    done = p.job == "reproduce" and resolve.quietly(pipeline.metrics_done, cfg)
    inception = e.feature_extractor == extractors.INCEPTION
    count = cfg.sample.num_samples if samples_made else resolve.samples_count(samples)
    flop = (count or 0) * INCEPTION_FLOP if inception else None
    work = (f"{', '.join(e.metrics)} of {samples} against {e.reference} with {e.feature_extractor}"
            + (f": {count or '?'} images x {format_flop(INCEPTION_FLOP)}" if inception else " (not estimated)"))
    name = f"evaluate {cfg.sample.method}" if p.job == "reproduce" else "evaluate"
    p.stages.append(Stage(name, "outputs exist, skipped" if done else work, None if done else flop))
    if done:
        return
    if not samples_made:
        p.add(resolve.samples(samples, cfg))
    total = cfg.sample.num_samples if samples_made else resolve.samples_count(samples, planned=True)
    if "isc" in e.metrics and total is not None and e.isc_splits > total:  # of the whole folder, once complete
        p.add(Input("eval.isc_splits", e.isc_splits, problem=f"more splits than the {total} samples; the Inception "
                                                             "Score takes at least one sample per split"))
    if needs_reference(e.metrics):
        p.add(reference or _made("eval.reference", e.reference, reference_by)
              or resolve.reference(e.reference, cfg.model.image_size))
    p.add(resolve.extractor(cfg, extractor_made))
    if e.protocol == "coco":
        p.add(_made("sample.prompts", cfg.sample.prompts, prompts_by)
              or resolve.exists("sample.prompts", cfg.sample.prompts, "the captions file made with eval.reference"))
    if "clip" in e.metrics:
        p.add(resolve.hf_model("eval.clip_model", e.clip_model, cfg.storage.root))


def _reference(p: Plan, cfg: Config, extractor_made: bool = False) -> None:
    """jobs.reference: real images of data.source with their captions -> eval.reference, sample.prompts."""
    count = f"{resolve.captions_count(cfg.data.source) or '?'} images"
    p.stages.append(Stage("reference", f"{count} of {cfg.data.source} -> {cfg.eval.reference} (statistics of "
                                       f"{cfg.eval.feature_extractor}) and captions -> {cfg.sample.prompts}"))
    problems = caption_reference_problems(cfg)  # what prepare_caption_reference refuses
    for key, (value, problem) in problems.items():
        p.add(Input(key, value, problem=problem))
    if "data.source_format" not in problems:
        p.add(resolve.source(cfg, builtin_ok=False))
    for key, value, suffixes, what in (
            ("eval.reference", cfg.eval.reference, (".npz",), "the ADM-format .npz to write"),
            ("sample.prompts", cfg.sample.prompts, (".txt", ".jsonl"), "the captions file to write")):
        if key not in problems:
            p.add(_destination(key, value, suffixes, what))
    p.add(resolve.extractor(cfg, made=extractor_made))


def _data_reference(cfg: Config) -> Input | None:
    """eval.reference of a reproduce that leaves it unset: the prepared data folder, which works as a
    reference only when it holds images (data.vae none) and the protocol is not coco (captions)."""
    e = cfg.eval
    if e.reference or pipeline.makes_caption_reference(cfg) or not needs_reference(e.metrics):
        return None
    data = RunPaths(cfg).data
    if e.protocol == "coco":
        return Input("eval.reference", data, problem="eval.reference unset, so the reference would be the prepared data "
                                                     "folder, which has no captions; a coco evaluation needs a caption "
                                                     "reference: make one with python -m jobs.reference and set "
                                                     "eval.reference and sample.prompts")
    if cfg.data.vae != "none":
        return Input("eval.reference", data, problem=f"eval.reference unset, so the reference would be the prepared "
                                                     f"data folder, which holds {cfg.data.vae} latents, not images; set "
                                                     "eval.reference to an ADM reference batch (.npz)")
    return None


def _calibrate(p: Plan, cfg: Config, allow_random: bool = False, num_samples: int = 8, out: str | None = None) -> None:
    m, s = cfg.model, cfg.sample
    if out:  # checked first: the table is written after the whole calibration
        p.add(_destination("--out", out, (".json",), "the table's name (sample.eb_cache.schedule reads a .json "
                                                      "name as a calibration table)"))
    if family(m.name) == "sdxl":
        p.add(Input("model.name", m.name, problem="model.family sdxl has no EB-Cache calibration (its sample.method "
                                                  "is static or at_edm)"))
        return
    networks = METHODS["eb_cache"].networks
    if m.method not in networks:
        p.add(Input("model.method", m.method, problem=f"sample.method=eb_cache samples a network with model.method in "
                                                      f"{list(networks)}: a table of this one would be of no use"))
        return
    macs = network_macs(m)
    guidance = 2 if s.cfg_scale != 1.0 else 1
    flop = num_samples * s.steps * guidance * macs * 2 * 4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p.stages.append(Stage("calibrate", f"EB-Cache table of {m.name} for {s.sampler} {s.steps} steps on this process's "
                                       f"{'GPU' if device == 'cuda' else 'CPU'}: {num_samples} samples x {s.steps} x "
                                       f"{guidance} x {format_macs(macs)} x 2 x 4 (no cache and the three cached states, "
                                       f"at most) = {format_flop(flop)}", flop))
    if not m.checkpoint and not allow_random:  # even the debug models: random weights make a meaningless table
        p.add(Input("model.checkpoint", None, problem="unset: calibrating random weights gives a meaningless table "
                                                      "(pass --random-init to do it anyway)"))
        return
    p.add(resolve.sampling_weights(cfg, None, allow_random))
    if family(m.name) != "dit":  # a PixArt table is calibrated on the run's first prompts, as the sample job's
        p.add(resolve.prompts("sample.prompts", s.prompts, "a prompts file (.txt or .jsonl)"))
        _text_encoder(p, cfg)


def _destination(key: str, value: str, suffixes: tuple[str, ...], what: str) -> Input:
    """An object the job writes at its end, checked before the work: a supported URL, named with one of
    `suffixes` (`what` says why), in a folder that can be written."""
    try:
        url = storage.check_url(value)
    except storage.StorageError as err:
        return Input(key, value, problem=str(err))
    if not url.lower().endswith(suffixes):
        return Input(key, value, problem=f"not a {' or '.join(suffixes)} name; expected {what}")
    folder = resolve.writable(url.rsplit("/", 1)[0], key)
    if folder.problem:
        return Input(key, value, problem=f"its folder is {folder.problem}")
    return Input(key, value, note="written by the job (its folder is writable)")


def _reproduce(p: Plan, cfg: Config) -> None:
    """The stages of `pipeline.reproduce`, each checked with what the stages before it make."""
    if family(cfg.model.name) == "sdxl" and set(cfg.eval.methods) - set(SDXL_METHODS):
        p.add(Input("eval.methods", cfg.eval.methods, problem=f"model.family sdxl ({cfg.model.name}) compares "
                                                              f"{' and '.join(SDXL_METHODS)}, which train nothing"))
        return
    extractor_made = cfg.eval.feature_extractor == digits.NAME and not cfg.eval.feature_extractor_weights
    if cfg.eval.samples:
        p.add(Input("eval.samples", cfg.eval.samples, problem="reproduce samples each method of eval.methods into "
                                                              "{run}/{method}/samples and evaluates those; unset it"))
    bad_reference = _data_reference(cfg)
    # 1. Data, or the caption reference of a text-to-image comparison that trains nothing
    data = pipeline.with_values(cfg, data={"uri": RunPaths(cfg).data})
    needs_data = pipeline.needs_data(cfg)
    data_ready, differ = _done(pipeline.data_done, data) if needs_data else (False, None)
    if data_ready:
        p.stages.append(Stage("prepare", "outputs exist, skipped"))
    elif differ:
        p.stages.append(Stage("prepare", "outputs exist, made with other settings"))
        p.add(Input("storage.run", RunPaths(data).data, problem=differ))
    elif needs_data:
        if cfg.data.uri and not cfg.data.source:
            p.add(Input("data.uri", cfg.data.uri, problem="no complete data set there (a manifest.json with "
                                                           "complete: true) and no data.source to prepare one; point "
                                                           "it at the prepare job's output, or set data.source"))
        _prepare(p, data, builtin_ok=True)
    reference_by = None if cfg.eval.reference or data_ready else "prepare"
    prompts_by = None
    if pipeline.makes_caption_reference(cfg):
        reference_ready, differ = _done(pipeline.reference_done, cfg)
        if reference_ready:
            p.stages.append(Stage("reference", "outputs exist, skipped"))
        elif differ:
            p.stages.append(Stage("reference", "outputs exist, made with other settings"))
            p.add(Input("eval.reference", cfg.eval.reference, problem=differ))
        else:
            _reference(p, cfg, extractor_made)
            reference_by = prompts_by = "reference"
    # 2. Weights (`*_by`: the stage of this job that makes them, when it runs)
    static, static_by = pipeline.static_weights(cfg), None
    if cfg.eval.pretrain_config:
        pretrain = pipeline.pretrain_config(data)
        static = RunPaths(pretrain).url
        static_by = "pretrain" if _finetune(p, pretrain, "pretrain", data_ready) else None
    trained, trained_by = {}, {}
    for method in pipeline.trained_methods(cfg):
        name = pipeline.TRAINED_METHODS[method]
        try:
            finetune = pipeline.finetune_config(data, static, method)
        except ConfigError as err:
            p.add(Input("eval.methods", cfg.eval.methods, problem=f"the {name} stage ({method}): {err}"))
            continue
        init_key = "model.checkpoint" if cfg.eval.pretrain_config or cfg.model.checkpoint else "train.init_from"
        if _finetune(p, finetune, name, data_ready, static_by, init_key):
            trained_by[method] = name
        trained[method] = RunPaths(finetune).url
    # 3. Samples and metrics of every method (evaluated with the digits classifier's weights as
    # `pipeline.feature_extractor_stage` sets them, which metrics.json records)
    if extractor_made:
        data = pipeline.with_values(data, eval={"feature_extractor_weights": RunPaths(cfg).weights(digits.NAME)})
    for method in cfg.eval.methods:
        if method in pipeline.TRAINED_METHODS and method not in trained:
            continue  # its fine-tune does not fit the config (reported above)
        try:
            m_cfg = pipeline.method_config(data, method, static, trained)
        except ConfigError as err:
            p.add(Input("eval.methods", cfg.eval.methods, problem=f"sample.method={method}: {err}"))
            continue
        made_by = trained_by.get(method) if method in pipeline.TRAINED_METHODS else static_by
        _sample(p, m_cfg, made_by, prompts_by)
        _evaluate(p, m_cfg, samples_made=True, reference_by=reference_by, extractor_made=extractor_made,
                  prompts_by=prompts_by, reference=bad_reference)
    # 4. Report
    p.stages.append(Stage("report", RunPaths(cfg).report))
