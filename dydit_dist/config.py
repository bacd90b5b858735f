"""Typed configuration: one dataclass per component, merged from a preset (or YAML file) and a dotlist.

    cfg = load("debug", ["train.max_steps=10", "model.name=DiT-S/2"])

A preset is a YAML file in `dydit_dist/configs/` (or any path). It may name another preset in
`_base_`, whose values it overrides. Overrides use omegaconf's dotlist syntax. Every key is checked
against the schema: an unknown key, a wrong type or a value outside its choices raises `ConfigError`
naming the key and the valid choices; cross-field rules are checked once, in `Config.validate`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf

from dydit_dist import storage
from dydit_dist.accel import ATEDMOptions, EBCacheOptions, FORAOptions
from dydit_dist.accel.methods import METHODS
from dydit_dist.dynamic import DyDiTOptions, FlexOptions
from dydit_dist.dynamic.flexdit import parse_layout
from dydit_dist.models.registry import arch

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration key or value that does not fit the schema."""


SampleMethod = Literal[tuple(METHODS)]  # the sampling methods of `accel.methods.METHODS`


# ----------------------------------------------------------------------------- components


@dataclass
class ModelConfig:
    name: str = "debug"  # a name in dydit_dist.models.registry
    method: Literal["static", "dydit", "flexdit"] = "static"  # the network: static, with DyDiT routers, or FlexDiT
    image_size: int = 256  # pixels
    vae_downsample: int = 8  # latent = image / vae_downsample; 1 for pixel-space models
    in_channels: int = 4
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    caption_channels: int = 4096  # PixArt: T5 feature width
    model_max_length: int = 120  # PixArt: caption tokens
    lewei_scale: float = 1.0  # PixArt: positional-embedding scale
    checkpoint: str | None = None  # official file, fsspec URL or exported EMA weights
    dynamic: DyDiTOptions = field(default_factory=DyDiTOptions)  # model.method=dydit: routers + objective
    flexdit: FlexOptions = field(default_factory=FlexOptions)  # model.method=flexdit: layout + grid schedule

    @property
    def input_size(self) -> int:
        """Side of the network input (latent) in pixels of that input."""
        return self.image_size // self.vae_downsample


@dataclass
class DiffusionConfig:
    num_timesteps: int = 1000
    beta_schedule: Literal["linear"] = "linear"
    timestep_sampling: Literal["uniform", "stratified"] = "uniform"


@dataclass
class DataConfig:
    uri: str | None = None  # folder of shards + manifest.json (file://, s3://, memory://)
    source: str | None = None  # prepare: input images (folder, tar glob, csv/jsonl)
    source_format: Literal["imagefolder", "webdataset", "captions"] = "imagefolder"
    vae: str = "stabilityai/sd-vae-ft-ema"
    vae_scale_factor: float = 0.18215
    latent_storage: Literal["mean_std", "sample"] = "mean_std"
    flip: bool = False
    text_encoder: str = "DeepFloyd/t5-v1_1-xxl"
    tokenizer: str | None = None  # defaults to text_encoder
    latent_dtype: Literal["float16", "float32"] = "float16"  # prepare: how latents are stored
    seed: int = 0  # prepare: the order samples are written in, and the noise of stored posterior samples
    encode_batch_size: int = 32  # prepare: images per VAE / T5 forward
    prepare_workers: int = 0  # prepare: encoder actors; 0 = one per GPU (ray.use_gpu) or per CPU share
    shard_size: int = 1000
    shuffle_buffer: int = 1000
    num_workers: int = 2  # reader: DataLoader worker processes per rank
    on_error: Literal["raise", "skip"] = "raise"  # reader: a corrupt or missing shard


@dataclass
class TrainConfig:
    max_steps: int = 1000
    global_batch_size: int = 256
    micro_batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0  # AdamW
    adam_eps: float = 1e-8  # AdamW epsilon (PixArt-alpha: 1e-10)
    warmup_steps: int = 0  # linear lr warm-up over these optimizer steps, then constant
    grad_clip: float | None = 1.0  # global gradient-norm clipping; None: no clipping (DiT, DyDiT, FlexDiT)
    skip_grad_norm: float | None = None  # skip the update when the global gradient norm reaches this (DyDiT)
    ema_decay: float = 0.9999
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    seed: int = 0
    init_from: str | None = None  # static checkpoint or a previous run
    checkpoint_every: int = 1000
    log_every: int = 50
    caption_dropout: float = 0.1  # PixArt: captions replaced by the null caption
    record_batches: bool = False  # write each rank's sample indices per step to {run}/batches/ (tests)


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass
class SampleConfig:
    num_samples: int = 50_000
    shard_size: int = 1000
    batch_size: int = 64
    sampler: Literal["ddpm", "ddim", "dpm-solver++"] = "ddpm"
    steps: int = 250
    cfg_scale: float = 1.5
    guidance_channels: int | None = 3  # DiT guides only the first 3 channels; None = all
    seed: int = 0
    method: SampleMethod = "static"  # how the network runs (accel.methods); its options are the section below
    prompts: str | None = None  # text-to-image: a file of prompts
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_actors: int = 0  # sampling actors; 0 = one per GPU share, or one per CPU share without GPUs
    gpus_per_actor: float = 1.0  # fractions pack several actors on one GPU
    cpus_per_actor: float = 1.0  # also the actor's torch threads
    shards_in_flight: int = 2  # shards queued per actor (the next one starts without a round trip)
    export_npz: str | None = None  # after sampling: the ADM evaluator's .npz (arr_0, N x H x W x 3), local path
    fora: FORAOptions = field(default_factory=FORAOptions)  # sample.method=fora
    eb_cache: EBCacheOptions = field(default_factory=EBCacheOptions)  # sample.method=eb_cache
    at_edm: ATEDMOptions = field(default_factory=ATEDMOptions)  # sample.method=at_edm

    @property
    def method_options(self):
        """The options dataclass of `method` (its section above), or None for a method without options."""
        return getattr(self, self.method) if METHODS[self.method].options is not None else None


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=lambda: ["fid", "isc", "prc"])
    reference: str | None = None  # ADM reference batch (.npz) or a shard folder
    inception_weights: str | None = None
    feature_extractor: str = "inception-v3-compat"
    feature_extractor_weights: str | None = None  # weights of a feature extractor other than Inception
    samples: str | None = None  # samples folder to evaluate; default {run}/samples
    batch_size: int = 64  # images per feature-extractor forward
    isc_splits: int = 10
    prc_neighborhood: int = 3
    fidelity_cache: str | None = None  # torch-fidelity's local statistics cache; default its own
    methods: list[str] = field(default_factory=lambda: ["static", "dydit"])  # reproduce: compared methods
    pretrain_config: str | None = None  # reproduce: preset of a from-scratch static run to start from


@dataclass
class RayConfig:
    address: str | None = None  # None: start or join a local instance
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 3
    num_to_keep: int = 2


@dataclass
class StorageConfig:
    root: str = "file://./outputs"
    run: str = "default"
    endpoint_url: str | None = None
    region: str | None = None
    retries: int = 5  # retries of a transient error (timeout, throttling, 5xx), with backoff
    timeout_s: float = 60.0  # deadline of one S3 operation, retries included (`storage`)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> Config:
        """Cross-field rules; raises ConfigError naming the keys and the numbers."""
        m, s = self.model, self.sample
        try:
            patch, depth = arch(m.name)["patch_size"], arch(m.name)["depth"]
        except ValueError as err:
            raise ConfigError(f"model.name: {err}") from None
        if m.image_size % (m.vae_downsample * patch) != 0:
            raise ConfigError(
                f"model.image_size={m.image_size} must be divisible by model.vae_downsample x patch size "
                f"= {m.vae_downsample} x {patch} = {m.vae_downsample * patch}"
            )
        t = self.train
        per_step = self.ray.num_workers * t.micro_batch_size
        if t.global_batch_size % per_step != 0:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} must be a multiple of ray.num_workers x "
                f"train.micro_batch_size = {self.ray.num_workers} x {t.micro_batch_size} = {per_step}"
            )
        networks = METHODS[s.method].networks
        if m.method not in networks:
            raise ConfigError(f"sample.method={s.method!r} runs a network with model.method in {list(networks)}, "
                              f"got model.method={m.method!r}")
        if m.method == "flexdit":
            try:
                parse_layout(m.flexdit.layout, depth)
                m.flexdit.schedule(m.input_size // patch)
            except ValueError as err:
                raise ConfigError(f"model.flexdit: {err}") from None
            if self.diffusion.num_timesteps != 1000:
                raise ConfigError("model.flexdit: the grid schedule is defined over diffusion.num_timesteps=1000, "
                                  f"got {self.diffusion.num_timesteps}")
        if s.num_samples < 1 or s.shard_size < 1:
            raise ConfigError("sample.num_samples and sample.shard_size must be positive")
        if s.method == "eb_cache" and not s.eb_cache.schedule.endswith(".json") and len(s.eb_cache.schedule) != s.steps:
            raise ConfigError(f"sample.eb_cache.schedule has {len(s.eb_cache.schedule)} steps but sample.steps={s.steps}; "
                              "calibrate one for this step count (python -m jobs.calibrate)")
        if s.method == "at_edm":
            try:
                s.at_edm.check_depth(depth)
            except ValueError as err:
                raise ConfigError(f"sample.at_edm: {err}") from None
        return self

    @property
    def grad_accumulation(self) -> int:
        """global batch = workers x micro-batch x accumulation."""
        return self.train.global_batch_size // (self.ray.num_workers * self.train.micro_batch_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))


# ----------------------------------------------------------------------------- building


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_preset(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(
                f"config {name_or_path!r} is neither a YAML file nor a preset; presets: {', '.join(presets())}"
            )
    if str(path) in seen:
        raise ConfigError(f"config {path} inherits from itself through _base_: {' -> '.join(seen)}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    base = raw.pop("_base_", None)
    if base is None:
        return raw
    return _merge(_read_preset(base, seen + (str(path),)), raw)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; ints become floats where a float is expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of the valid choices {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r} fits none of {tp}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r} must be a list")
        item_tp = typing.get_args(tp)[0]  # list[T] or tuple[T, ...]
        return origin(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {[f.name for f in dataclasses.fields(tp)]}")
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        hint = f" (quote a string of digits: {key}='...')" if tp is str and isinstance(value, int | float) else ""
        raise ConfigError(f"{key}={value!r} must be of type {tp.__name__}, got {type(value).__name__}{hint}")
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            where = f"section {prefix!r}" if prefix else "the top level"
            raise ConfigError(f"unknown config key {full!r}; valid keys in {where}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except ValueError as err:  # a section's own checks (`__post_init__`), e.g. model.dynamic, sample.eb_cache
        raise ConfigError(f"{prefix or 'config'}: {err}") from None


def from_dict(values: dict) -> Config:
    """A validated Config from a plain dict (what a Ray worker receives)."""
    return _build(Config, values).validate()


def load(name_or_path: str = "debug", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Preset or YAML path, then the dotlist overrides, as a validated typed Config."""
    values = _read_preset(name_or_path)
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        dot = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=True)
        values = _merge(values, dot)
    return from_dict(values)


def save(cfg: Config, url: str) -> None:
    """Write the resolved config next to a job's outputs (an atomic, whole-object write)."""
    storage.write_bytes(url, cfg.to_yaml().encode())
