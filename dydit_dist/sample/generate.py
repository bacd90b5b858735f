"""Making the samples of one shard in one process: network, method, sampler and decoder loaded once.

    gen = ShardGenerator(cfg, device="cuda")      # what one sampling actor holds
    samples, timing = gen.generate(ShardSpec(3, 3000, 4000))

Batches are cut from the shard in order (`sample.batch_size`), so a shard is made of the same batches
on every actor. Within a batch, sample k's noise is its own: with `sample.noise: counter` (default) a
Philox stream keyed by (sample seed, draw) computed on the sampling device (`diffusion.noise`), with
`generator` a CPU `torch.Generator` per sample (see `plan`; the stream of earlier runs).

Precision (`sample.precision`): the network runs under autocast in bf16 / fp16, or in fp32; the
state x, the noise and the sampler's arithmetic stay fp32 in every case. On CUDA `sample.tf32` lets
the fp32 matmuls use TF32. The VAE decodes in `sample.vae_precision`. `sample.compile` wraps the
network in `torch.compile` (`accel.Runner.compile`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import numpy as np
import torch

from dydit_dist import pretrained
from dydit_dist.config import Config
from dydit_dist.data.encoders import TextEncoder
from dydit_dist.diffusion import CounterNoise, cfg_model_fn, draw_noise, sample, stream_kind
from dydit_dist.dynamic import DyDiT, DyPixArt, FastPath
from dydit_dist.models import family
from dydit_dist.network import sampling_network
from dydit_dist.precision import set_tf32

from .conditions import CaptionConditioner, ClassConditioner
from .methods import build_method
from .plan import ShardSpec, load_prompts, sample_generators, sample_seed
from .shards import GeneratedSample

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ImageDecoder:
    """Model outputs (B, C, h, w) -> uint8 images (B, H, W, C'): the VAE's decoder, or pixels as they are.

    Pixel-space models make images in [-1, 1] directly (C = 1, 3 or 4: L, RGB, RGBA); a latent model's
    output is divided by the VAE scale factor and decoded. Quantization follows DiT's sampler:
    clamp(127.5 x + 128, 0, 255), truncated to uint8 (the inverse of the data's x = p / 127.5 - 1).
    """

    def __init__(self, vae: str | torch.nn.Module, scale_factor: float, device: str | torch.device,
                 dtype: torch.dtype | None = None):
        """vae: a folder `AutoencoderKL.from_pretrained` reads, "none" for pixels, or a loaded VAE (as a
        diffusers pipeline holds it); it runs on `device` in `dtype` (default fp32; a loaded VAE: its own)."""
        self.vae = None
        self.scale_factor = scale_factor
        if isinstance(vae, torch.nn.Module):
            vae = vae if dtype is None or dtype == vae.dtype else vae.to(dtype)
            self.vae = vae.to(device).eval().requires_grad_(False)
        elif vae != "none":
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(vae).to(device, dtype or torch.float32).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        if self.vae is not None:
            x = self.vae.decode(x.to(self.vae.dtype) / self.scale_factor).sample
        return torch.clamp(127.5 * x.float() + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


def conditioner(cfg: Config, model, device) -> ClassConditioner | CaptionConditioner:
    """The conditions of the samples of `cfg`: their classes (DiT), or `sample.prompts` through the T5 encoder
    of `data.text_encoder` (already mirrored under storage.root when a Hub id: `pretrained.mirror`)."""
    if family(cfg.model.name) == "dit":
        return ClassConditioner(cfg.model.num_classes, cfg.sample.labels, cfg.sample.seed)
    if not cfg.sample.prompts:
        raise ValueError(f"sample.prompts: a text-to-image model ({cfg.model.name}) needs a prompts file")
    d, root = cfg.data, cfg.storage.root
    tokenizer = pretrained.local(d.tokenizer, root) if d.tokenizer else None
    encoder = TextEncoder(pretrained.local(d.text_encoder, root), tokenizer, cfg.model.model_max_length, str(device),
                          dtype=torch.float32)  # as the official inference (scripts/inference.py); `text_encoder_dtype`
    return CaptionConditioner(load_prompts(cfg.sample.prompts), encoder, model.y_embedder.y_embedding)


def sample_noise(kind: str, seed: int, indices: list[int], device: torch.device) -> CounterNoise | list[torch.Generator]:
    """The noise source of each sample (`sample.noise` = kind), one row per index: the counter stream on
    `device` keyed by the sample's seed, or the sample's own CPU generator."""
    if kind == "counter":
        return CounterNoise.from_seeds([sample_seed(seed, k) for k in indices], device)
    return sample_generators(seed, indices)


def sampling_autocast(precision: str, device: torch.device):
    """The network's autocast of `sample.precision` on `device` (none for fp32)."""
    dtype = DTYPES[precision]
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


class ShardGenerator:
    """Everything one worker needs to turn shard specs into samples (see the module docstring)."""

    def __init__(self, cfg: Config, device: str | torch.device = "cpu"):
        start = time.perf_counter()
        self.cfg = cfg
        self.device = torch.device(device)
        s = cfg.sample
        set_tf32(self.device, s.tf32)
        self.model = sampling_network(cfg, self.device)
        self.runner = build_method(cfg, self.model)
        if s.compile:
            self.runner.compile()
        self.conditioner = conditioner(cfg, self.model, self.device)
        self.decoder = ImageDecoder(pretrained.local(cfg.data.vae, cfg.storage.root), cfg.data.vae_scale_factor,
                                    self.device, DTYPES[s.vae_precision])
        self.noise_stream = stream_kind(s.noise, self.device)  # what the samples' records name
        self.timesteps: list[float] = []  # the original timesteps the sampler visits, in order (fractional: dpm-solver)
        self._unit_flops: list[tuple[float, int]] = []  # (MACs per forward of one row, rows) per batch of a unit
        self.load_seconds = time.perf_counter() - start

    def _autocast(self):
        return sampling_autocast(self.cfg.sample.precision, self.device)

    def _step_callback(self, i: int, t: float) -> None:
        if len(self.timesteps) == i:
            self.timesteps.append(t)
        self.runner.step_callback(i, t)

    def noise(self, indices: list[int]) -> CounterNoise | list[torch.Generator]:
        """Each sample's own noise source (`sample.noise`), one row per index."""
        return sample_noise(self.cfg.sample.noise, self.cfg.sample.seed, indices, self.device)

    @torch.no_grad()
    def latents(self, indices: list[int]) -> torch.Tensor:
        """(B, C, h, w) samples x_0 of the network for sample indices (one batch)."""
        s, m = self.cfg.sample, self.cfg.model
        noise = self.noise(indices)
        shape = (len(indices), m.in_channels, m.input_size, m.input_size)
        z = draw_noise(noise, 0, shape, self.device)  # (B, C, h, w) initial noise, fp32
        kwargs = self.conditioner.model_kwargs(indices, self.device)
        model_fn, generator = self.runner, noise
        if s.cfg_scale != 1.0:
            z, kwargs = self.conditioner.doubled(z, kwargs)
            model_fn = cfg_model_fn(self.runner, s.cfg_scale, s.guidance_channels)
            # row b and row B + b both draw sample b's noise
            generator = noise.repeat(2) if isinstance(noise, CounterNoise) else noise + noise
        self.runner.begin(s.steps)
        with self._autocast():
            x = sample(model_fn, z.shape, s.sampler, s.steps, generator=generator, noise=z,
                       model_kwargs=kwargs, step_callback=self._step_callback)
        self._unit_flops.append((self.runner.mean_flops(), len(indices)))  # SDT's token count varies per batch
        return x[: len(indices)]

    def generate(self, shard: ShardSpec) -> tuple[list[GeneratedSample], dict]:
        """The samples of `shard` in index order, and their timing (`shard_samples`)."""
        self._unit_flops = []
        return shard_samples(shard, self.cfg.sample, lambda indices: self.decoder(self.latents(indices)),
                             self.conditioner.meta, self.noise_stream, self.device)

    def gflops(self) -> float:
        """GFLOPs per network forward of one image, the mean over the images of the last unit."""
        if self._unit_flops:
            macs = sum(f * n for f, n in self._unit_flops) / sum(n for _, n in self._unit_flops)
        else:
            macs = self.runner.mean_flops()
        return float(macs) / 1e9

    def stats(self) -> dict:
        """What the report needs of the method: `gflops`, and for a DyDiT the active width per timestep
        (fractions of heads and MLP groups, mean over blocks)."""
        out = {"gflops": self.gflops()}
        if isinstance(self.model, DyDiT | DyPixArt) and self.timesteps:
            plan = FastPath(self.model).plan  # routers only: cheap
            widths = []
            for t in self.timesteps:
                fractions = plan(t).active_fractions(self.model.num_heads)
                widths.append({"t": t, "heads": float(np.mean([h for h, _ in fractions])),
                               "mlp": float(np.mean([g for _, g in fractions]))})
            out["width_by_timestep"] = widths
        return out


def shard_samples(shard: ShardSpec, s, images: Callable[[list[int]], np.ndarray],
                  metas: Callable[[list[int]], list[dict]], noise_stream: str,
                  device: torch.device) -> tuple[list[GeneratedSample], dict]:
    """The samples of `shard` in index order, made `s.batch_size` indices at a time: `images(indices)` ->
    uint8 (B, H, W, 3), `metas(indices)` -> each sample's conditioning record. Returns them with
    {"sample_s": seconds of sampling and decoding, "sample_cpu_s": CPU seconds this process spent on them
    (less than sample_s when starved)}."""
    start, cpu_start = time.perf_counter(), time.process_time()
    out = []
    for first in range(shard.start, shard.stop, s.batch_size):
        indices = list(range(first, min(first + s.batch_size, shard.stop)))
        for k, image, meta in zip(indices, images(indices), metas(indices), strict=True):
            record = {"index": k, "seed": sample_seed(s.seed, k), "noise": noise_stream, **meta}
            out.append(GeneratedSample(k, image, record))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, {"sample_s": time.perf_counter() - start, "sample_cpu_s": time.process_time() - cpu_start}
