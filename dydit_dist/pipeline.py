"""The reproduce pipeline: prepare -> (pretrain) -> finetune -> sample -> evaluate -> report, as one Ray job.

Every stage is skipped when its outputs exist (a complete data manifest, an EMA export at the last
step, a complete samples manifest, a metrics.json), so a rerun after a crash does only what is
missing. Outputs are reused only for the settings they were made with: a data set this config would
prepare otherwise (`data_done`), a finished or resumable fine-tune whose config differs in a key that
decides its weights (`run_config.WEIGHTS`), or samples made with other sampling settings or weights, stop
the job before stage 1 with `OutputsDiffer` / `SamplesError` naming each change (another storage.run, or
removing that folder, starts over); metrics of other samples (by their shards' sha256s) or evaluation
settings are computed again. report.md is removed when the job starts and written when its last stage is
done: one that is there describes a run that finished. For `storage.run=R`, each stage is a run of its own, laid out as `RunPaths` says:

    storage.run                     what it holds
    R                               the data folder (unless data.uri is set), report.md with plots/
    R/pretrain                      eval.pretrain_config's static run from scratch (the demo only)
    R/finetune                      the DyDiT fine-tune (model.method=dydit), from the static weights
    R/finetune-flexdit              the FlexDiT fine-tune (model.method=flexdit), from the static weights
    R/{method}                      samples/ and metrics.json of every method in eval.methods

The static weights are the pretrain run's, else model.checkpoint, else train.init_from (the official
checkpoint a preset fine-tunes from). The methods that are trained ("dydit", "flexdit": TRAINED_METHODS)
sample their fine-tuned weights; the others (static and the training-free methods) the static weights.
The presets name their comparison in eval.methods (static against the paper's method). The data are
prepared only when a stage needs them: a training stage, or the reference when eval.reference is unset.
A text-to-image comparison that trains nothing (`eval.protocol: coco`, e.g. AT-EDM on SD-XL: `--config
at_edm_sdxl_1024`) starts instead with the reference stage: data.source (image paths and captions, e.g.
COCO) -> eval.reference and sample.prompts, as `jobs.reference` makes them, skipped when both exist.
`data.source: sklearn:digits` materializes scikit-learn's digits as an image folder first;
`eval.feature_extractor: digits-cnn` without weights trains that classifier first (offline demo; it is
not Inception, and the report says so).
"""

from __future__ import annotations

import dataclasses
import time

from dydit_dist import config as config_lib
from dydit_dist import run_config, storage
from dydit_dist.capacity import connect_ray
from dydit_dist.config import Config
from dydit_dist.data import prepare
from dydit_dist.data.pipeline import config_settings
from dydit_dist.eval import digits, evaluate, write_report
from dydit_dist.eval.captions import prepare_caption_reference, reference_changes
from dydit_dist.eval.evaluate import evaluation_settings
from dydit_dist.lease import Lease, acquire_for_job
from dydit_dist.network import read_ema_pointer
from dydit_dist.paths import RunPaths
from dydit_dist.sample import SamplesManifest, run_sampling, sampling_settings
from dydit_dist.sample.plan import plan_shards
from dydit_dist.sample.pool import absolute_root, sampling_config
from dydit_dist.shardset import manifest_url
from dydit_dist.train import checkpoints, launcher

BUILTIN_SOURCES = {"sklearn:digits": digits.write_digits_imagefolder}
# The methods whose network is fine-tuned from the static weights (model.method = the method), and the run
# of that fine-tune below the pipeline's (DyDiT's `finetune` predates FlexDiT; runs on storage keep the name).
TRAINED_METHODS = {"dydit": "finetune", "flexdit": "finetune-flexdit"}


class OutputsDiffer(ValueError):
    """A stage's outputs exist but were made with other settings than this run's (named in the message)."""


def with_values(cfg: Config, **sections) -> Config:
    """`cfg` with fields of its sections replaced: `with_values(cfg, storage={"run": "x"})`."""
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)
                                       for name, values in sections.items()})


_START = time.monotonic()


def data_done(cfg: Config) -> bool:
    """Whether the data folder of `cfg` (data.uri, else the run's) holds a complete manifest; OutputsDiffer
    when `cfg` would prepare it (data.source set) with other settings than it was (those that follow from the
    config: `data.pipeline.config_settings`, a key its manifest lacks counting as a change, as for the prepare
    job, which checks the source's listing too). A data set given without data.source is taken as it is."""
    uri = RunPaths(cfg).data
    url = manifest_url(uri)
    if not storage.exists(url):
        return False
    manifest = storage.read_json(url)
    if not manifest.get("complete", False):
        return False
    if cfg.data.source:
        source = cfg.data.source
        if source in BUILTIN_SOURCES:  # as prepare_stage materializes it
            source = RunPaths(cfg).source(source.split(":", 1)[1])
        made = manifest.get("settings", {})
        expected = config_settings(with_values(cfg, data={"source": source}))
        changes = [f"{k}: {made.get(k)!r} there vs {v!r} now" for k, v in expected.items() if made.get(k) != v]
        if changes:  # a key the manifest lacks too (made before it was recorded), as jobs.prepare counts it
            raise OutputsDiffer(f"{uri} holds a data set prepared with other settings ({'; '.join(changes)}); use "
                                "another storage.run (or data.uri), remove that folder, or set data.source=null "
                                "to use it as it is")
    return True


def static_weights(cfg: Config) -> str | None:
    """The static row's weights unless a pretrain run makes them: model.checkpoint, else train.init_from."""
    return cfg.model.checkpoint or cfg.train.init_from


def finetune_config(cfg: Config, static: str | None, method: str = "dydit") -> Config:
    """The fine-tune of the trained `method` (run `{run}/{TRAINED_METHODS[method]}`) from `static` (the
    static row's weights), else train.init_from: the rows of a report compare a fine-tuned network with
    the one it started from."""
    return with_values(cfg, model={"method": method}, sample={"method": method},  # a sampling method of that network
                       storage={"run": f"{cfg.storage.run}/{TRAINED_METHODS[method]}"},
                       train={"init_from": static or cfg.train.init_from}).validate()


def trained_methods(cfg: Config) -> list[str]:
    """The methods of eval.methods that are fine-tuned, in their order."""
    return [m for m in cfg.eval.methods if m in TRAINED_METHODS]


def finetune_note(cfg: Config, weights: str) -> str:
    """The report's line on a fine-tune (`cfg`: its config). Where and how it ran (workers, ZeRO stage: no
    change to the weights, so a reused fine-tune may have run otherwise) is read from the config it last ran
    with (`config.finetune.yaml`)."""
    m = cfg.model
    ran = run_config.previous(cfg, "finetune") or {}
    workers = ran.get("ray", {}).get("num_workers", cfg.ray.num_workers)
    zero = ran.get("deepspeed", {}).get("zero_stage", cfg.deepspeed.zero_stage)
    what = (f"at lambda {m.dynamic.target_lambda}" if m.method == "dydit" else
            f"(layout {m.flexdit.layout}, token grids {list(m.flexdit.grid_sizes)})")
    return (f"{'DyDiT' if m.method == 'dydit' else 'FlexDiT'} weights: the static ones fine-tuned "
            f"{cfg.train.max_steps} more steps {what} on {workers} workers, ZeRO-{zero} ({weights}).")


def method_config(cfg: Config, method: str, static: str | None, trained: dict[str, str]) -> Config:
    """The sample + evaluate run of one method of eval.methods (run `{run}/{method}`): its fine-tuned
    weights (`trained`: method -> run) for the methods in TRAINED_METHODS, the static ones otherwise;
    the reference is eval.reference, else the data folder. ConfigError when the method does not fit the
    config (an EB-Cache schedule of another step count, AT-EDM on too few blocks)."""
    fine_tuned = method in TRAINED_METHODS
    return with_values(cfg, sample={"method": method}, storage={"run": f"{cfg.storage.run}/{method}"},
                       model={"method": method if fine_tuned else "static",
                              "checkpoint": trained[method] if fine_tuned else static},
                       eval={"reference": cfg.eval.reference or RunPaths(cfg).data}).validate()


def _stage(name: str, skipped: bool) -> None:
    elapsed = time.monotonic() - _START
    print(f"[reproduce +{elapsed:.0f}s] {name}: {'outputs exist, skipped' if skipped else 'running'}", flush=True)


def prepare_stage(cfg: Config) -> Config:
    """Built-in source materialized, data prepared; returns `cfg` with data.source and data.uri pinned."""

    paths = RunPaths(cfg)
    source = cfg.data.source
    if source in BUILTIN_SOURCES:
        source = paths.source(source.split(":", 1)[1])
        BUILTIN_SOURCES[cfg.data.source](source)
    cfg = with_values(cfg, data={"source": source, "uri": paths.data})
    done = data_done(cfg)
    _stage(f"prepare {cfg.data.uri}", done)
    if not done:  # under the data folder's lease, as jobs.prepare: runs sharing a data.uri prepare it once
        with acquire_for_job(paths.data_lease, "reproduce", cfg.storage):
            if not data_done(cfg):
                prepare(cfg)
    return cfg


def trains(cfg: Config) -> bool:
    """Whether the pipeline of `cfg` trains a network (a pretrain run, or a method of TRAINED_METHODS)."""
    return bool(cfg.eval.pretrain_config) or bool(trained_methods(cfg))


def needs_data(cfg: Config) -> bool:
    """Whether the pipeline of `cfg` prepares the data folder: to train on, or as the reference of an
    evaluation without eval.reference (a caption reference is made by `reference_stage` instead)."""
    return trains(cfg) or (not cfg.eval.reference and cfg.eval.protocol != "coco")


def makes_caption_reference(cfg: Config) -> bool:
    """Whether the pipeline of `cfg` makes its caption reference from data.source: a text-to-image
    comparison that trains nothing (when it trains, data.source is the training data)."""
    return cfg.eval.protocol == "coco" and not trains(cfg)


def reference_done(cfg: Config) -> bool:
    """Whether eval.reference and sample.prompts (the reference stage's outputs) both exist; OutputsDiffer
    when that reference was made from other settings than `cfg` makes one (`captions.reference_changes`)."""
    e, s = cfg.eval, cfg.sample
    if not (e.reference and s.prompts and storage.exists(e.reference) and storage.exists(s.prompts)):
        return False
    if changes := reference_changes(cfg):
        raise OutputsDiffer(f"{e.reference} is a caption reference made from other settings ({'; '.join(changes)}); "
                            f"remove it and {s.prompts}, or set eval.reference and sample.prompts to other names")
    return True


def reference_stage(cfg: Config) -> None:
    """data.source (image paths and captions) -> eval.reference and sample.prompts, unless both exist."""
    done = reference_done(cfg)
    _stage(f"reference {cfg.data.source} -> {cfg.eval.reference}, {cfg.sample.prompts}", done)
    if not done:
        made = prepare_caption_reference(cfg)
        print(f"reference: {made['num_images']} images with captions, {made['feature_extractor']} statistics",
              flush=True)


def trained_to_end(cfg: Config) -> bool:
    """Whether the fine-tuning run of `cfg` exported EMA weights at train.max_steps."""
    pointer = RunPaths(cfg).ema_pointer
    return storage.exists(pointer) and read_ema_pointer(pointer)["step"] >= cfg.train.max_steps


def finetune_changes(cfg: Config) -> list[str]:
    """`key: old -> new` for each key that decides the weights (`run_config.WEIGHTS`, the micro-batch split
    and the loader workers aside: the same recipe) the fine-tuning run of `cfg` last ran with otherwise."""
    return run_config.weights_changes(run_config.previous(cfg, "finetune"), cfg,
                                      ignore=("train.micro_batch_size", "data.num_workers"))


def finetune_done(cfg: Config) -> bool:
    """Whether the fine-tuning run of `cfg` is finished with these settings; OutputsDiffer when it finished
    with others (its weights are not the ones asked for)."""
    if not trained_to_end(cfg):
        return False
    changes = finetune_changes(cfg)
    if changes:
        url = RunPaths(cfg).url
        raise OutputsDiffer(f"{url} finished training with other settings ({'; '.join(changes)}); use another "
                            f"storage.run, or remove {url} to train again")
    return True


def stage_lease(cfg: Config) -> Lease:
    """The lease of a stage's own run folder (`{run}/{method}`, `{run}/pretrain`), held while the stage
    writes it, as the single job (jobs.finetune, jobs.sample) holds it: a job started on that folder by
    itself meanwhile is refused, not let write beside this one."""
    return acquire_for_job(RunPaths(cfg).lease, "reproduce", cfg.storage)


def train_stage(cfg: Config, name: str) -> str:
    """Run the fine-tuning job of `cfg` unless it reached train.max_steps; returns the run's URL."""
    run = RunPaths(cfg).url
    done = finetune_done(cfg)
    _stage(f"{name} {run} ({cfg.model.method}, {cfg.train.max_steps} steps)", done)
    if not done:
        with stage_lease(cfg):  # removing uncommitted checkpoints is safe only while no one else trains there
            if not finetune_done(cfg):
                _train(cfg, run)
    return run


def _train(cfg: Config, run: str) -> None:
    launcher.preflight(cfg)
    launcher.check_settings(cfg)
    launcher.preflight_cluster(cfg)
    run_config.save(cfg, "finetune")
    checkpoints.remove_uncommitted(RunPaths(cfg).checkpoints)
    launcher.fit(launcher.build_trainer(cfg), cfg.ray.capacity_timeout_s)
    if not trained_to_end(cfg):
        raise config_lib.JobFailed(f"{run}: training ended without an EMA export at train.max_steps="
                                   f"{cfg.train.max_steps} ({RunPaths(cfg).ema_pointer}); a rerun resumes it")


def samples_done(cfg: Config) -> bool:
    """Whether the samples folder of `cfg` is complete, every recorded shard there at its recorded size (a
    missing or truncated one is made again, as the sample job does), and its manifest says so (done-markers
    of a sampling driver that died before its last manifest write: the sample job writes it, making
    nothing); SamplesError when it holds samples of other settings or weights (as the sample job says when
    it resumes one)."""
    url = RunPaths(cfg).samples
    if not storage.exists(manifest_url(url)):
        return False
    settings = sampling_settings(sampling_config(cfg))
    num_shards = len(plan_shards(cfg.sample.num_samples, cfg.sample.shard_size))
    manifest = SamplesManifest.resume(url, settings, num_shards, drop_missing=True)
    return manifest.complete and manifest.is_stored(url)


def metrics_done(cfg: Config) -> bool:
    """Whether the run's metrics.json is of its samples as they are now (their shards' sha256s: samples made
    again with the same settings, e.g. of weights trained again to the same step, are others), evaluated with
    these settings. A metrics.json of before the digest was recorded is computed again, once."""
    paths = RunPaths(cfg)
    if not storage.exists(paths.metrics):
        return False
    record, samples = storage.read_json(paths.metrics), SamplesManifest.read(paths.samples)
    return (record.get("sampling") == samples.settings and record.get("num_samples") == samples.num_samples
            and record.get("samples_digest") == samples.content_digest()
            and record.get("evaluation") == evaluation_settings(cfg.eval))


def pretrain_config(cfg: Config) -> Config:
    """`eval.pretrain_config` with this job's storage, Ray address and data (data.flip too: the data are
    prepared with this job's, and a fine-tune refuses data prepared with another)."""
    s = cfg.storage
    overrides = [f"storage.root={s.root}", f"storage.run={s.run}/pretrain",
                 f"data.uri={cfg.data.uri}", f"data.source={cfg.data.source}", f"data.flip={str(cfg.data.flip).lower()}"]
    base = config_lib.load(cfg.eval.pretrain_config, overrides)
    shared = {k: v for k, v in dataclasses.asdict(s).items() if k != "run"}  # endpoint, retries, deadline, lease
    return with_values(base, storage=shared, ray={"address": cfg.ray.address})


def feature_extractor_stage(cfg: Config) -> Config:
    """Train the digits classifier when it is the extractor and has no weights."""
    if cfg.eval.feature_extractor != digits.NAME or cfg.eval.feature_extractor_weights:
        return cfg
    url = RunPaths(cfg).weights(digits.NAME)
    done = storage.exists(url)
    _stage(f"feature extractor {url} (a digits classifier, NOT Inception)", done)
    if not done:
        digits.train_digits_classifier(url)
    return with_values(cfg, eval={"feature_extractor_weights": url})


def reproduce(cfg: Config) -> str:
    """Run every stage (see the module docstring); returns the report's URL."""
    connect_ray(cfg.ray.address)
    cfg = absolute_root(cfg)
    # 0. An earlier run's report describes what this run may make again: it is written anew at the end
    report = RunPaths(cfg).report
    if storage.exists(report):
        storage.remove(report)
        print(f"reproduce: {report}, an earlier run's report, removed; written again once every stage is done",
              flush=True)
    # 1. Data (or the caption reference, for a comparison that trains nothing)
    if needs_data(cfg):
        cfg = prepare_stage(cfg)
    if makes_caption_reference(cfg):
        cfg = feature_extractor_stage(cfg)
        reference_stage(cfg)
    # 2. Weights: static (pretrained here, or given), then the fine-tune of each trained method
    static = static_weights(cfg)
    notes = [f"Static weights: {static}."]
    training = {}  # the report's training curves: label -> TensorBoard folder
    if cfg.eval.pretrain_config:
        pretrain = pretrain_config(cfg)
        static = train_stage(pretrain, "pretrain")
        notes = [f"Static weights: trained from scratch for {pretrain.train.max_steps} steps ({static})."]
        training["static (pretrain)"] = RunPaths(pretrain).tensorboard
    trained = {}
    for method in trained_methods(cfg):
        finetune = finetune_config(cfg, static, method)
        trained[method] = train_stage(finetune, TRAINED_METHODS[method])
        notes.append(finetune_note(finetune, trained[method]))
        training[method] = RunPaths(finetune).tensorboard
    # 3. Samples and metrics of every method
    cfg = feature_extractor_stage(cfg)
    records = []
    for method in cfg.eval.methods:
        m_cfg = method_config(cfg, method, static, trained)
        m_paths = RunPaths(m_cfg)
        done = samples_done(m_cfg)
        _stage(f"sample {method} -> {m_paths.samples}", done)
        if not done:
            with stage_lease(m_cfg):
                run_config.save(m_cfg, "sample")
                run_sampling(m_cfg)  # makes only the missing shards
        done = metrics_done(m_cfg)
        _stage(f"evaluate {method} -> {m_paths.metrics}", done)
        if done:
            records.append(storage.read_json(m_paths.metrics))
        else:
            with stage_lease(m_cfg):
                run_config.save(m_cfg, "evaluate")  # as jobs.evaluate records it beside metrics.json
                records.append(evaluate(m_cfg))
    # 4. Report
    title = f"{cfg.model.name} at {cfg.model.image_size}px: {', '.join(cfg.eval.methods)}"
    return write_report(RunPaths(cfg), records, title, notes, training)
