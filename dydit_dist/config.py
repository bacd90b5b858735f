"""Typed configuration: one dataclass per component, merged from a preset (or YAML file) and a dotlist.

    cfg = load("debug", ["train.max_steps=10", "model.name=DiT-S/2"])

A preset is a YAML file in `dydit_dist/configs/` (or any path). It may name another preset in
`_base_`, whose values it overrides. Overrides use omegaconf's dotlist syntax, except that a string field
keeps the text it is given (`storage.run=2024` is the string '2024'). Every key is checked
against the schema: an unknown key, a wrong type, a value outside its choices or a number outside
its range raises `ConfigError` naming the key and the valid choices or range; cross-field rules are
checked once, in `Config.validate`. The checks against the annotations are `config_types.build`.

Every number declares its range with the field, as an interval in the field's metadata ("range"):
`bounded(32, "[1, inf)")` here, `field(default=..., metadata={"range": ...})` in the option sections
that live below this module (`DyDiTOptions`, `FlexOptions`, the sampling methods' options).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dydit_dist import storage
from dydit_dist.accel import ATEDMOptions, EBCacheOptions, FORAOptions
from dydit_dist.accel.dsap import build_plan, unet_early_unpruned, unet_layout
from dydit_dist.accel.methods import METHODS
from dydit_dist.config_files import (  # noqa: F401 - PRESET_DIR, presets, JobFailed: re-exported, config is where they are used
    PRESET_DIR,
    ConfigError,
    JobFailed,
    merge,
    presets,
    read_preset,
    refuse_interpolations,
)
from dydit_dist.config_types import accepts, bounded, build, field_type
from dydit_dist.dynamic import DyDiTOptions, FlexOptions
from dydit_dist.dynamic.flexdit_schedule import parse_layout
from dydit_dist.models.registry import arch, family

SDXL_SAMPLERS = ("ddim", "dpm-solver++")  # diffusers schedulers of model.family sdxl (sample/sdxl.py)
SDXL_METHODS = ("static", "at_edm")
SampleMethod = Literal[tuple(METHODS)]  # the sampling methods of `accel.methods.METHODS`
Metric = Literal["fid", "sfid", "isc", "prc", "clip"]  # eval.metrics: FID, sFID, Inception Score, precision/recall, CLIP score
# ----------------------------------------------------------------------------- components


@dataclass
class ModelConfig:
    name: str = "debug"  # a name in dydit_dist.models.registry
    method: Literal["static", "dydit", "flexdit"] = "static"  # the network: static, with DyDiT routers, or FlexDiT
    image_size: int = bounded(256, "[1, inf)")  # pixels
    vae_downsample: int = bounded(8, "[1, inf)")  # latent = image / vae_downsample; 1 for pixel-space models
    in_channels: int = bounded(4, "[1, inf)")
    num_classes: int = bounded(1000, "[0, inf)")
    class_dropout_prob: float = bounded(0.1, "[0, 1]")
    learn_sigma: bool = True
    caption_channels: int = bounded(4096, "[1, inf)")  # PixArt: T5 feature width
    model_max_length: int = bounded(120, "[1, inf)")  # PixArt: caption tokens
    lewei_scale: float = bounded(1.0, "(0, inf)")  # PixArt: positional-embedding scale
    checkpoint: str | None = None  # official file, fsspec URL or exported EMA weights
    dynamic: DyDiTOptions = field(default_factory=DyDiTOptions)  # model.method=dydit: routers + objective
    flexdit: FlexOptions = field(default_factory=FlexOptions)  # model.method=flexdit: layout + grid schedule

    @property
    def input_size(self) -> int:
        """Side of the network input (latent) in pixels of that input."""
        return self.image_size // self.vae_downsample


@dataclass
class DiffusionConfig:
    num_timesteps: int = bounded(1000, "[1, inf)")
    beta_schedule: Literal["linear"] = "linear"
    timestep_sampling: Literal["uniform", "stratified"] = "uniform"


@dataclass
class DataConfig:
    uri: str | None = None  # folder of shards + manifest.json (file://, s3://, memory://)
    source: str | None = None  # prepare: input images (folder, tar glob, csv/jsonl)
    source_format: Literal["imagefolder", "webdataset", "captions"] = "imagefolder"
    vae: str = "stabilityai/sd-vae-ft-ema"
    vae_scale_factor: float = bounded(0.18215, "(0, inf)")
    latent_storage: Literal["mean_std", "sample"] = "mean_std"
    flip: bool = False
    text_encoder: str = "DeepFloyd/t5-v1_1-xxl"
    tokenizer: str | None = None  # defaults to text_encoder
    latent_dtype: Literal["float16", "float32"] = "float16"  # prepare: how latents are stored
    seed: int = bounded(0, "[0, inf)")  # prepare: the order samples are written in, and the noise of stored posterior samples
    encode_batch_size: int = bounded(32, "[1, inf)")  # prepare: images per VAE / T5 forward
    prepare_workers: int = bounded(0, "[0, inf)")  # prepare: encoder tasks at once; 0 = ray.num_workers
    shard_size: int = bounded(1000, "[1, inf)")
    shuffle_buffer: int = bounded(1000, "[0, inf)")
    num_workers: int = bounded(2, "[0, inf)")  # reader: DataLoader worker processes per rank
    on_error: Literal["raise", "skip"] = "raise"  # reader: a corrupt or missing shard
    # prepare: more unusable inputs than this fraction is an error; reader with on_error=skip: so is one reader
    # skipping more than this fraction of the data set's samples in an epoch (reader.py)
    max_bad_fraction: float = bounded(0.01, "[0, 1]")


@dataclass
class TrainConfig:
    # 0: not given (a preset whose recipe has no length for your data, PixArt's): a fine-tune refuses it
    max_steps: int = bounded(1000, "[0, inf)")
    global_batch_size: int = bounded(256, "[1, inf)")
    micro_batch_size: int = bounded(32, "[1, inf)")
    lr: float = bounded(1e-4, "(0, inf)")  # at train.lr_base_batch when train.lr_scaling is not "none"
    # PixArt-alpha's auto_lr (diffusion/utils/optimizer.py:17): the optimizer runs at lr * (global_batch_size /
    # lr_base_batch) ** 0.5 ("sqrt") or ** 1 ("linear"); "none": at lr whatever the batch (the DiT-based presets)
    lr_scaling: Literal["none", "sqrt", "linear"] = "none"
    lr_base_batch: int = bounded(256, "[1, inf)")
    weight_decay: float = bounded(0.0, "[0, inf)")  # AdamW
    adam_eps: float = bounded(1e-8, "(0, inf)")  # AdamW epsilon (PixArt-alpha: 1e-10)
    warmup_steps: int = bounded(0, "[0, inf)")  # linear lr warm-up over these optimizer steps, then constant
    grad_clip: float | None = bounded(1.0, "(0, inf)")  # global gradient-norm clipping; None: no clipping (DiT, DyDiT, FlexDiT)
    skip_grad_norm: float | None = bounded(None, "(0, inf)")  # skip the update when the global gradient norm reaches this (DyDiT)
    # DyDiT's stage-1 steps with train.skip_grad_norm: "official" is DyDiT train.py:284-287, a step with the raw
    # gradient whatever its norm, then the same step again when the norm is below skip_grad_norm; "skip": stage
    # 2's rule (train_without_completemodel.py) throughout. Other methods and stage 2 always skip.
    stage1_update: Literal["skip", "official"] = "skip"
    ema_decay: float = bounded(0.9999, "[0, 1)")
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    seed: int = bounded(0, "[0, inf)")
    init_from: str | None = None  # static checkpoint or a previous run
    checkpoint_every: int = bounded(1000, "[1, inf)")
    keep_checkpoints: int = bounded(2, "[1, inf)")  # resumable checkpoints (and EMA exports) kept on storage; older ones are deleted
    async_checkpoint: bool = True  # upload checkpoints and write EMA exports while training goes on; false: training waits
    log_every: int = bounded(50, "[1, inf)")
    caption_dropout: float = bounded(0.1, "[0, 1]")  # PixArt: captions replaced by the null caption
    record_batches: bool = False  # write each rank's sample indices per step to {run}/batches/ (tests)
    allow_changed_settings: bool = False  # resume although what decides the weights changed (run_config.WEIGHTS)

    @property
    def scaled_lr(self) -> float:
        """The learning rate the optimizer runs at: `lr` scaled to `global_batch_size` by `lr_scaling`."""
        return scale_lr(self.lr, self.lr_scaling, self.global_batch_size, self.lr_base_batch)


def scale_lr(lr: float, scaling: str, global_batch_size: int, base_batch: int) -> float:
    """`lr` at `base_batch` scaled to `global_batch_size` by the rule `scaling` ("none", "sqrt", "linear")."""
    ratio = global_batch_size / base_batch
    return lr * {"none": 1.0, "sqrt": ratio ** 0.5, "linear": ratio}[scaling]


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    overlap_comm: bool = False  # overlap gradient reduction (ZeRO-1/2) or parameter gathering (ZeRO-3) with compute
    reduce_bucket_size: int = bounded(500_000_000, "[1, inf)")  # elements reduced per collective
    allgather_bucket_size: int = bounded(500_000_000, "[1, inf)")  # elements gathered per collective (ZeRO-1/2)


@dataclass
class SampleConfig:
    num_samples: int = bounded(50_000, "[1, inf)")
    shard_size: int = bounded(128, "[1, inf)")  # samples per shard: the unit an actor pulls, samples and writes as one object
    batch_size: int = bounded(64, "[1, inf)")
    # dpm-solver: the authors' DPM-Solver++(2M), as PixArt-alpha samples; dpm-solver++: diffusers' scheduler
    sampler: Literal["ddpm", "ddim", "dpm-solver", "dpm-solver++"] = "ddpm"
    steps: int = bounded(250, "[1, inf)")
    cfg_scale: float = bounded(1.5, "[0, inf)")
    guidance_channels: int | None = bounded(3, "[1, inf)")  # DiT guides only the first 3 channels; None = all
    seed: int = bounded(0, "[0, inf)")
    # class of sample k: "random" draws it uniformly from (seed, k), as DiT's sample_ddp.py draws labels at
    # random (the published FID-50K); "balanced" is k % num_classes, exactly 50 per class at 50k (lower FID)
    labels: Literal["random", "balanced"] = "random"
    method: SampleMethod = "static"  # how the network runs (accel.methods); its options are the section below
    prompts: str | None = None  # text-to-image: a file of prompts
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # the network's autocast dtype; x, noise and sampler math stay fp32
    tf32: bool = True  # on CUDA, TF32 for the fp32 matmuls left (all of them with precision=fp32); false: strict fp32
    vae_precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # dtype of the VAE decode
    noise: Literal["counter", "generator"] = "counter"  # counter: Philox on the device; generator: CPU, per sample
    compile: bool = False  # torch.compile the network's forward (DyDiT fast path: its branches, SDT token counts bucketed)
    num_actors: int = bounded(1, "[1, inf)")  # sampling actors; the job waits for them (`ray.capacity_timeout_s`)
    gpus_per_actor: float = bounded(1.0, "(0, inf)")  # fractions pack several actors on one GPU
    cpus_per_actor: float = bounded(1.0, "(0, inf)")  # also the actor's torch threads
    speculate: bool = True  # once no shard is left to start, idle actors also make the oldest running ones
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
    metrics: list[Metric] = field(default_factory=lambda: ["fid", "sfid", "isc", "prc"])
    protocol: Literal["adm", "coco"] = "adm"  # coco: text-to-image, sample k from caption k of sample.prompts (eval.evaluate)
    reference: str | None = None  # ADM reference batch (.npz) or a shard folder; coco: made by jobs.reference
    reference_images: int = bounded(0, "[0, inf)")  # jobs.reference: a fixed random subset of this many rows; 0: all
    clip_model: str | None = None  # metric clip: transformers CLIPModel + CLIPProcessor (local/storage folder, HF id)
    inception_weights: str | None = None
    feature_extractor: str = "inception-v3-compat"
    feature_extractor_weights: str | None = None  # weights of a feature extractor other than Inception
    samples: str | None = None  # samples folder to evaluate; default {run}/samples
    batch_size: int = bounded(64, "[1, inf)")  # images per feature-extractor forward
    num_actors: int = bounded(1, "[0, inf)")  # feature actors (ray.cpus/gpus_per_worker each); 0: in this process
    isc_splits: int = bounded(10, "[1, inf)")
    prc_neighborhood: int = bounded(3, "[1, inf)")
    fidelity_cache: str | None = None  # torch-fidelity's local statistics cache; default its own
    methods: list[SampleMethod] = field(default_factory=lambda: ["static", "dydit"])  # reproduce: compared methods
    pretrain_config: str | None = None  # reproduce: preset of a from-scratch static run to start from


@dataclass
class RayConfig:
    address: str | None = None  # None: start or join a local instance
    num_workers: int = bounded(1, "[1, inf)")
    use_gpu: bool = False
    cpus_per_worker: float = bounded(1.0, "[0, inf)")
    gpus_per_worker: float = bounded(1.0, "[0, inf)")
    max_failures: int = bounded(3, "[0, inf)")
    # training: restarts after a node drained by a preemption or a pod deleted (Ray counts them apart from
    # max_failures); bounded, so that a pod evicted again after each restart cannot hold the cluster forever
    max_preemptions: int = bounded(20, "[0, inf)")
    capacity_timeout_s: float = bounded(900.0, "(0, inf)")  # how long a job waits for its workers / actors (`capacity`)
    # a sampling or evaluation actor whose call runs this many times the median finished call (at least 5 min)
    # is taken for stuck (a hung kernel): killed and replaced, its work requeued (0: never; `faults.StallWatch`);
    # so is one still loading on its node this many times the median load of the pool's others (at least 30 min),
    # and a prepare task running this many times the median finished one (at least 30 min: it may load the encoders)
    stall_factor: float = bounded(10.0, "[0, inf)")
    # training: a collective (NCCL / gloo) waiting longer ends its worker (a hung or dead rank), and Ray Train
    # restarts the group from the last checkpoint (Ray's default; a recurring hang costs this per restart)
    collective_timeout_s: float = bounded(1800.0, "[1, inf)")


@dataclass
class StorageConfig:
    root: str = "file://./outputs"
    run: str = "default"
    endpoint_url: str | None = None
    region: str | None = None
    retries: int = bounded(5, "[0, inf)")  # retries of a transient error (timeout, throttling, 5xx), with backoff
    timeout_s: float = bounded(60.0, "(0, inf)")  # deadline of one S3 operation, retries included (`storage`)
    lease_ttl_s: float = bounded(120.0, "(0, inf)")  # a run's lease expires this long after its holder's last heartbeat; >= 2 x timeout_s
    # a job that finds its run held waits up to this for the holder to release it or stop renewing it, then
    # exits 2 (0: at once); the RayJobs set it: a KubeRay retry starts while the lost attempt's driver still renews
    lease_wait_s: float = bounded(0.0, "[0, inf)")


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
        self._check_locations()
        st = self.storage
        if st.lease_ttl_s < 2 * st.timeout_s:  # a beat starts at ttl/4, the fence is at 3/4 (dydit_dist/lease.py)
            raise ConfigError(f"storage.lease_ttl_s={st.lease_ttl_s:g} must be at least twice storage.timeout_s="
                              f"{st.timeout_s:g}: a renewal starts a quarter of the ttl after the last one and must "
                              "be stored by three quarters, when the holder stops itself (dydit_dist/lease.py); the "
                              "half between must fit one whole storage operation")
        if not self.eval.metrics:
            raise ConfigError(f"eval.metrics is empty; name at least one of {list(typing.get_args(Metric))}")
        try:
            fam = family(m.name)
        except ValueError as err:
            raise ConfigError(f"model.name: {err}") from None
        if fam == "pixart_ms":  # the network (models.PixArtMS) loads its weights; the jobs would need more
            raise ConfigError(f"model.name={m.name!r}: multi-scale PixArt (1024 px) is not supported by the jobs: its "
                              "sampling needs per-sample image size and aspect-ratio conditions, which neither the "
                              "sampler nor the training data pass; PixArt-XL/2 (256 and 512 px) is")
        if fam == "sdxl":
            self._check_sdxl()
        patch, depth = (1, None) if fam == "sdxl" else (arch(m.name)["patch_size"], arch(m.name)["depth"])
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
        if s.method == "eb_cache" and not s.eb_cache.schedule.endswith(".json") and len(s.eb_cache.schedule) != s.steps:
            raise ConfigError(f"sample.eb_cache.schedule has {len(s.eb_cache.schedule)} steps but sample.steps={s.steps}; "
                              "calibrate one for this step count (python -m jobs.calibrate)")
        if s.method == "at_edm" and depth is not None:
            try:
                s.at_edm.check_depth(depth)
            except ValueError as err:
                raise ConfigError(f"sample.at_edm: {err}") from None
        return self

    def _check_sdxl(self) -> None:
        """model.family sdxl (a diffusers UNet sampled through StableDiffusionXLPipeline): what runs on it."""
        m, s = self.model, self.sample
        if m.method != "static":
            raise ConfigError(f"model.family sdxl ({m.name}) runs model.method static (DyDiT and FlexDiT are DiT "
                              f"networks), got model.method={m.method!r}")
        if s.method not in SDXL_METHODS:
            raise ConfigError(f"model.family sdxl supports sample.method static or at_edm, got sample.method={s.method!r}")
        if s.sampler not in SDXL_SAMPLERS:
            raise ConfigError(f"sample.sampler={s.sampler!r}: model.family sdxl samples deterministically after its "
                              f"initial noise, with one of {list(SDXL_SAMPLERS)} (ddim is SD-XL's Euler update)")
        unet = arch(m.name)
        factor = m.vae_downsample * 2 ** (len(unet["block_out_channels"]) - 1)
        if m.image_size % factor:
            raise ConfigError(f"model.image_size={m.image_size} must be divisible by model.vae_downsample x 2**(UNet "
                              f"stages - 1) = {factor} for {m.name}")
        if s.method == "at_edm" and s.at_edm.ratio > 0:
            layout = unet_layout(unet, m.input_size)
            try:
                if s.at_edm.variant == "per_layer":
                    build_plan(layout, s.at_edm.ratio, s.steps, s.at_edm.early_steps(s.steps),
                               unet_early_unpruned(layout, s.at_edm.dsap_layers))
                if all(seg.layers < 2 for seg in layout):
                    raise ValueError(f"{m.name} has no attention block of 2 or more layers to prune in")
            except ValueError as err:
                raise ConfigError(f"sample.at_edm: {err}") from None

    def _check_locations(self) -> None:
        """Storage URLs that parse (`s3:/bucket` is a scheme typo, not a local folder), an endpoint without
        credentials in it and a run name that stays inside `{root}/runs/`."""
        for key, url in (("storage.root", self.storage.root), ("data.uri", self.data.uri)):
            if url is not None:
                try:
                    storage.check_url(url)
                except storage.StorageError as err:
                    raise ConfigError(f"{key}: {err}") from None
        if "@" in (self.storage.endpoint_url or ""):  # not echoed; any @: a secret may hold a /
            raise ConfigError("storage.endpoint_url holds credentials (user:password@ before the host); give the "
                              "endpoint without them and put the keys in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                              "(on Kubernetes, in the dydit-s3 Secret), not in the URL")
        run = self.storage.run
        # "/" joins names: the reproduce pipeline keeps each stage in `{run}/{stage}`
        if run.startswith("/") or "\\" in run or any(part in ("", ".", "..") for part in run.split("/")):
            raise ConfigError(f"storage.run={run!r} must be a plain name (or names joined by '/'), with no empty, "
                              "'.' or '..' part: the run's folder is {storage.root}/runs/{storage.run}")

    @property
    def grad_accumulation(self) -> int:
        """global batch = workers x micro-batch x accumulation."""
        return self.train.global_batch_size // (self.ray.num_workers * self.train.micro_batch_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))


# ----------------------------------------------------------------------------- building


def from_dict(values: dict) -> Config:
    """A validated Config from a plain dict (what a Ray worker receives)."""
    return build(Config, values).validate()


def load(name_or_path: str = "debug", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Preset or YAML path, then the dotlist overrides, as a validated typed Config."""
    values = read_preset(name_or_path)
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        for item in overrides:
            values = merge(values, _override(item))
    refuse_interpolations(values)
    return from_dict(values)


def _override(item: str) -> dict:
    """One dotlist override `key=text` as nested values. YAML types the text, except for a key whose field is
    a string: there the text is taken as typed (`storage.run=2024`, `sample.eb_cache.schedule=0202`, which
    YAML reads as the octal int 130); quotes still make YAML's string (`key='0202'`)."""
    try:
        values = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        reason = " ".join(str(err).split())
        raise ConfigError(f"override {item!r}: its value is no YAML ({reason}); quote a string that holds "
                          "YAML's characters, e.g. key='a, b'") from None
    key, _, text = item.partition("=")
    tp = field_type(Config, key)
    if tp is None:  # not a field of the schema: `_build` names the valid keys
        return values
    *sections, leaf = key.split(".")
    inner = values
    for section in sections:
        inner = inner[section]
    if text == "" and not accepts(tp, type(None)):
        raise ConfigError(f"{key} must not be empty (got {item!r})")
    if isinstance(inner[leaf], int | float) and accepts(tp, str):  # bool is an int too
        inner[leaf] = text
    return values


def save(cfg: Config, url: str) -> None:
    """Write the resolved config next to a job's outputs (an atomic, whole-object write)."""
    storage.write_bytes(url, cfg.to_yaml().encode())
