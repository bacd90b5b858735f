"""Making the samples of one shard with Stable Diffusion XL (model.family sdxl) through diffusers.

    gen = SDXLShardGenerator(cfg, device="cuda")    # a StableDiffusionXLPipeline from model.checkpoint
    samples, timing = gen.generate(ShardSpec(3, 3000, 4000))

The same contract as `generate.ShardGenerator`, so the sampling pool, the shards and `jobs.evaluate`
take it unchanged: sample k uses prompt k % P of `sample.prompts` (recorded with its index) and its own
initial latents (`sample.noise`: the counter stream keyed by the sample's seed, or its CPU generator),
drawn here and handed to the pipeline, so a sample does not depend on its batch companions. The
sampler is deterministic after that: `sample.sampler` ddim (DDIMScheduler, eta 0, ending at sigma 0: for
SD-XL's scheduler config the same update as its default Euler scheduler) or dpm-solver++
(DPMSolverMultistepScheduler), built from the folder's scheduler config (`SCHEDULERS`). `sample.cfg_scale` is the
pipeline's guidance_scale (the unconditional row is SD-XL's zero embedding).

The UNet and text encoders hold fp32 weights and run under autocast in `sample.precision` (the
latents, the guidance mix of the UNet's outputs and the scheduler's arithmetic stay fp32), as the DiT path does; the VAE decodes in
`sample.vae_precision`. `sample.method: at_edm` wraps the UNet's attention blocks
(`accel.at_edm_unet.UNetPruner`); the pipeline's step callback tells it the step.
"""

from __future__ import annotations

import os
import time

import torch

from dydit_dist import pretrained
from dydit_dist.accel.at_edm_unet import UNetPruner, unet_inputs, unet_macs
from dydit_dist.config import Config
from dydit_dist.diffusion import draw_noise, stream_kind
from dydit_dist.precision import set_tf32

from .conditions import prompt_meta
from .generate import DTYPES, ImageDecoder, sample_noise, sampling_autocast, shard_samples
from .plan import ShardSpec, load_prompts
from .shards import GeneratedSample

# `sample.sampler` -> the diffusers scheduler and what it takes besides the folder's scheduler config. SD-XL's
# released config (an EulerDiscreteScheduler's) carries `set_alpha_to_one: false`, with which DDIM's last step
# lands at alphas_cumprod[0] (sigma 0.029: noise left in the image) where Euler's ends at sigma 0; both end
# at sigma 0 here (DPM-Solver++ does by default). What is set here is part of the samples folder's settings
# (`pool.sampling_settings`).
SCHEDULERS = {"ddim": ("DDIMScheduler", {"set_alpha_to_one": True}),
              "dpm-solver++": ("DPMSolverMultistepScheduler", {})}


def _fp32_output(module, args, output):
    """The UNet's noise prediction in fp32 under autocast: diffusers' pipeline mixes the guidance
    (uncond + scale * (text - uncond)) in the dtype the UNet returns, which would be bf16."""
    if isinstance(output, tuple):
        return (output[0].float(), *output[1:])
    output.sample = output.sample.float()
    return output


def check_pipeline_folder(folder: str) -> list[str]:
    """What a StableDiffusionXLPipeline folder lacks (empty when it has model_index.json and unet/config.json)."""
    return [name for name in ("model_index.json", os.path.join("unet", "config.json"))
            if not os.path.exists(os.path.join(folder, name))]


class SDXLShardGenerator:
    """Everything one sampling worker needs for SD-XL (see the module docstring)."""

    def __init__(self, cfg: Config, device: str | torch.device = "cpu"):
        import diffusers

        start = time.perf_counter()
        self.cfg, self.device = cfg, torch.device(device)
        s, m = cfg.sample, cfg.model
        set_tf32(self.device, s.tf32)
        # 1. The pipeline folder
        if not m.checkpoint:
            raise ValueError(f"model.checkpoint: {m.name} samples from a StableDiffusionXLPipeline folder (local, "
                             "s3://..., or a Hugging Face id); none is set")
        folder = pretrained.local(m.checkpoint, cfg.storage.root)
        if os.path.isdir(folder) and check_pipeline_folder(folder):
            raise ValueError(f"model.checkpoint={m.checkpoint}: not a StableDiffusionXLPipeline folder (no "
                             f"{' or '.join(check_pipeline_folder(folder))})")
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32)
        name, overrides = SCHEDULERS[s.sampler]
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        # 2. Size, method, decoder
        self.latent_size = m.image_size // pipe.vae_scale_factor
        if self.latent_size * pipe.vae_scale_factor != m.image_size:
            raise ValueError(f"model.image_size={m.image_size} is not a multiple of the pipeline's VAE factor "
                             f"{pipe.vae_scale_factor}")
        self.pruner = UNetPruner(pipe.unet, s.at_edm, self.latent_size) if s.method == "at_edm" else None
        pipe.unet.register_forward_hook(_fp32_output)  # the pipeline mixes the guidance in the UNet's output dtype
        self.decoder = ImageDecoder(_vae(pipe, s.vae_precision), pipe.vae.config.scaling_factor, self.device)
        self.prompts = load_prompts(s.prompts) if s.prompts else None
        if self.prompts is None:
            raise ValueError(f"sample.prompts: a text-to-image model ({m.name}) needs a prompts file")
        self.noise_stream = stream_kind(s.noise, self.device)
        self._gflops: float | None = None
        self.load_seconds = time.perf_counter() - start

    def _autocast(self):
        return sampling_autocast(self.cfg.sample.precision, self.device)

    def initial_latents(self, indices: list[int]) -> torch.Tensor:
        """(B, C, h, w) fp32 initial noise of the samples `indices`, row k a function of (seed, k) alone."""
        s = self.cfg.sample
        shape = (len(indices), self.pipe.unet.config.in_channels, self.latent_size, self.latent_size)
        return draw_noise(sample_noise(s.noise, s.seed, indices, self.device), 0, shape, self.device)

    @torch.no_grad()
    def latents(self, indices: list[int]) -> torch.Tensor:
        """(B, C, h, w) final latents (before the VAE) of the samples `indices`."""
        s, size = self.cfg.sample, self.cfg.model.image_size
        prompts = [meta["prompt"] for meta in prompt_meta(self.prompts, indices)]
        callback = None
        if self.pruner is not None:
            self.pruner.begin(s.steps)
            callback = self.pruner.on_step_end
        with self._autocast():
            out = self.pipe(prompt=prompts, height=size, width=size, num_inference_steps=s.steps,
                            guidance_scale=s.cfg_scale, latents=self.initial_latents(indices), output_type="latent",
                            callback_on_step_end=callback)
        return out.images.float()

    def generate(self, shard: ShardSpec) -> tuple[list[GeneratedSample], dict]:
        """The samples of `shard` in index order and their timing, as `ShardGenerator.generate`."""
        return shard_samples(shard, self.cfg.sample, lambda indices: self.decoder(self.latents(indices)),
                             lambda indices: prompt_meta(self.prompts, indices), self.noise_stream, self.device)

    def gflops(self) -> float:
        """The UNet's GFLOPs (multiply-accumulates, `unet_macs`) per image forward, averaged over the steps' plans."""
        if self._gflops is None:
            self._gflops = self._count_gflops()
        return self._gflops

    def stats(self) -> dict:
        return {"gflops": self.gflops()}

    def _count_gflops(self) -> float:
        unet, steps = self.pipe.unet, self.cfg.sample.steps
        inputs = unet_inputs(unet, self.latent_size, device=self.device, generator=torch.Generator().manual_seed(0))
        if self.pruner is None:
            return unet_macs(unet, **inputs) / 1e9
        rates = self.pruner.plan(steps)
        counted: dict[str, float] = {}
        self.pruner.begin(steps)
        for i in range(steps):  # one count per distinct plan step (DSAP has two)
            self.pruner.step = i
            key = repr(rates[i])
            if key not in counted:
                counted[key] = unet_macs(unet, **inputs)
        return sum(counted[repr(r)] for r in rates) / steps / 1e9


def _vae(pipe, precision: str):
    """The pipeline's VAE in `precision`; fp16 is refused for a VAE whose config asks to be upcast (SD-XL's
    overflows in fp16), and a VAE with latents_mean / latents_std is not handled by this decoder."""
    vae = pipe.vae
    if precision == "fp16" and vae.config.get("force_upcast", False):
        raise ValueError("sample.vae_precision=fp16: this VAE's config asks for upcasting (force_upcast; SD-XL's VAE "
                         "overflows in fp16); use bf16 or fp32")
    if vae.config.get("latents_mean") is not None:
        raise ValueError("the pipeline's VAE has latents_mean / latents_std, which this decoder does not apply")
    dtype = DTYPES[precision]
    return vae if vae.dtype == dtype else vae.to(dtype)
