"""A tiny random Stable Diffusion XL pipeline written to a folder offline, as `save_pretrained` writes one.

The UNet is the registry's `SDXL-debug` (16 x 16 latents); the VAE downsamples by 2 (32 px images);
the two CLIP text encoders are 2 layers of width 32 (features 32 + 32 = the UNet's cross-attention
width 64, pooled 32 + 6 x 8 time ids = its added-embedding width 80), with the character-level
tokenizer of `eval_util.tiny_clip`.
"""

from __future__ import annotations

import json
import os

import torch

from dydit_dist.accel.sdxl_synthetic import random_unet

LETTERS = "abcdefghijklmnopqrstuvwxyz"
IMAGE_SIZE, VAE_DOWNSAMPLE = 32, 2


def tiny_unet(name: str = "SDXL-debug", seed: int = 0):
    """The registry's `name` UNet with random weights (`accel.sdxl_synthetic.random_unet`)."""
    return random_unet(name, seed)


def _tokenizer(folder: str):
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS)]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=16)


def tiny_sdxl(folder: str, seed: int = 0) -> str:
    """Write the tiny pipeline (model_index.json, unet/, vae/, text_encoder{,_2}/, tokenizer{,_2}/,
    scheduler/) under `folder`; returns it."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    os.makedirs(folder, exist_ok=True)
    tokenizer = _tokenizer(os.path.join(folder, "tokenizer"))  # save_pretrained rewrites the folder whole
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                pad_token_id=1, projection_dim=32)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=[8, 16], latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=8, sample_size=IMAGE_SIZE).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=tiny_unet(seed=seed),
                                     scheduler=scheduler)
    pipe.save_pretrained(folder)
    # the released scheduler_config.json's keys of the DDIM / PNDM family, which diffusers hands on to
    # another scheduler class built from it (set_alpha_to_one false: DDIM's last step would keep noise)
    config_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False, sample_max_value=1.0)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return folder
