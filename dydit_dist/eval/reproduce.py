"""prepare -> (pretrain) -> finetune -> sample -> evaluate -> report, as one Ray job.

Every stage is skipped when its outputs exist (a complete data manifest, an EMA export at the last
step, a complete samples manifest, a metrics.json), so a rerun after a crash does only what is
missing. Where things go, for `storage.run=R`:

    {root}/data/R                   prepared shards (or data.uri)
    {root}/runs/R/pretrain          eval.pretrain_config's static run from scratch (the demo only)
    {root}/runs/R/finetune          the DyDiT fine-tune (model.method=dydit), from the pretrain run
                                    or model.checkpoint
    {root}/runs/R/{method}          samples/ and metrics.json of every method in eval.methods
    {root}/runs/R/report.md         the comparison, with plots/

The methods that need trained routers ("dydit") sample the fine-tuned weights; the others the static
weights (the pretrain run, or model.checkpoint). `data.source: sklearn:digits` materializes
scikit-learn's digits as an image folder first; `eval.feature_extractor: digits-cnn` without weights
trains that classifier first (offline demo; it is not Inception, and the report says so).
"""

from __future__ import annotations

import dataclasses
import time

from dydit_dist import cli, storage
from dydit_dist import config as config_lib
from dydit_dist.config import Config
from dydit_dist.sample import read_manifest, run_sampling
from dydit_dist.sample.manifest import manifest_url
from dydit_dist.sample.pool import absolute_root

from . import digits
from .evaluate import evaluate
from .report import write_report

BUILTIN_SOURCES = {"sklearn:digits": digits.write_digits_imagefolder}
TRAINED_METHODS = ("dydit",)  # sample the fine-tuned dynamic network


def _with(cfg: Config, **sections) -> Config:
    """`cfg` with fields of its sections replaced: `_with(cfg, storage={"run": "x"})`."""
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)
                                       for name, values in sections.items()})


_START = time.monotonic()


def _stage(name: str, skipped: bool) -> None:
    elapsed = time.monotonic() - _START
    print(f"[reproduce +{elapsed:.0f}s] {name}: {'outputs exist, skipped' if skipped else 'running'}", flush=True)


def prepare_stage(cfg: Config) -> Config:
    """Built-in source materialized, data prepared; returns `cfg` with data.source and data.uri pinned."""
    from dydit_dist.data import prepare
    from dydit_dist.data.manifest import manifest_url as data_manifest_url

    source = cfg.data.source
    if source in BUILTIN_SOURCES:
        source = storage.join(cfg.storage.root, "sources", source.split(":", 1)[1])
        BUILTIN_SOURCES[cfg.data.source](source)
    cfg = _with(cfg, data={"source": source, "uri": cli.data_url(cfg)})
    url = data_manifest_url(cfg.data.uri)
    done = storage.exists(url) and storage.read_json(url).get("complete", False)
    _stage(f"prepare {cfg.data.uri}", done)
    if not done:
        prepare(cfg)
    return cfg


def _trained_to_end(cfg: Config) -> bool:
    from dydit_dist.train.network import EMA_POINTER

    pointer = cli.run_url(cfg, "checkpoints", EMA_POINTER)
    return storage.exists(pointer) and storage.read_json(pointer)["step"] >= cfg.train.max_steps


def train_stage(cfg: Config, name: str) -> str:
    """Run the fine-tuning job of `cfg` unless it reached train.max_steps; returns the run's URL."""
    import ray

    from dydit_dist.train import launcher

    done = _trained_to_end(cfg)
    _stage(f"{name} {cli.run_url(cfg)} ({cfg.model.method}, {cfg.train.max_steps} steps)", done)
    if not done:
        launcher.preflight(cfg)
        launcher.preflight_cluster(cfg, ray.cluster_resources())
        cli.save_resolved_config(cfg, "finetune")
        launcher.build_trainer(cfg).fit()
    return cli.run_url(cfg)


def pretrain_config(cfg: Config) -> Config:
    """`eval.pretrain_config` with this job's storage, Ray address and data."""
    s = cfg.storage
    overrides = [f"storage.root={s.root}", f"storage.run={s.run}/pretrain", f"storage.retries={s.retries}",
                 f"data.uri={cfg.data.uri}", f"data.source={cfg.data.source}"]
    base = config_lib.load(cfg.eval.pretrain_config, overrides)
    return _with(base, storage={"endpoint_url": s.endpoint_url, "region": s.region},
                 ray={"address": cfg.ray.address})


def feature_extractor_stage(cfg: Config) -> Config:
    """Train the digits classifier when it is the extractor and has no weights."""
    if cfg.eval.feature_extractor != digits.NAME or cfg.eval.feature_extractor_weights:
        return cfg
    url = cli.run_url(cfg, f"{digits.NAME}.safetensors")
    done = storage.exists(url)
    _stage(f"feature extractor {url} (a digits classifier, NOT Inception)", done)
    if not done:
        digits.train_digits_classifier(url)
    return _with(cfg, eval={"feature_extractor_weights": url})


def reproduce(cfg: Config) -> str:
    """Run every stage (see the module docstring); returns the report's URL."""
    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.ray.address)
    cfg = absolute_root(cfg)
    run = cfg.storage.run
    # 1. Data
    cfg = prepare_stage(cfg)
    # 2. Weights: static (pretrained here, or model.checkpoint), then the DyDiT fine-tune
    static_weights = cfg.model.checkpoint
    notes = [f"Static weights: {static_weights}."]
    if cfg.eval.pretrain_config:
        pretrain = pretrain_config(cfg)
        static_weights = train_stage(pretrain, "pretrain")
        notes = [f"Static weights: trained from scratch for {pretrain.train.max_steps} steps ({static_weights})."]
    dynamic_weights = None
    if any(m in TRAINED_METHODS for m in cfg.eval.methods):
        finetune = _with(cfg, model={"method": "dydit"}, storage={"run": f"{run}/finetune"},
                         train={"init_from": cfg.train.init_from or static_weights})
        dynamic_weights = train_stage(finetune, "finetune")
        notes.append(f"DyDiT weights: the static ones fine-tuned {finetune.train.max_steps} more steps at "
                     f"lambda {finetune.model.dynamic.target_lambda} on {finetune.ray.num_workers} workers, "
                     f"ZeRO-{finetune.deepspeed.zero_stage} ({dynamic_weights}).")
    # 3. Samples and metrics of every method
    cfg = feature_extractor_stage(cfg)
    reference = cfg.eval.reference or cfg.data.uri
    records = []
    for method in cfg.eval.methods:
        trained = method in TRAINED_METHODS
        m_cfg = _with(cfg, sample={"method": method}, storage={"run": f"{run}/{method}"},
                      model={"method": "dydit" if trained else "static",
                             "checkpoint": dynamic_weights if trained else static_weights},
                      eval={"reference": reference})
        samples = cli.run_url(m_cfg, "samples")
        done = storage.exists(manifest_url(samples)) and read_manifest(samples).complete
        _stage(f"sample {method} -> {samples}", done)
        if not done:
            cli.save_resolved_config(m_cfg, "sample")
            run_sampling(m_cfg)  # makes only the missing shards
        metrics_url = cli.run_url(m_cfg, "metrics.json")
        done = storage.exists(metrics_url)
        _stage(f"evaluate {method} -> {metrics_url}", done)
        records.append(storage.read_json(metrics_url) if done else evaluate(m_cfg))
    # 4. Report
    title = f"{cfg.model.name} at {cfg.model.image_size}px: {', '.join(cfg.eval.methods)}"
    return write_report(cli.run_url(cfg), records, title, notes)
