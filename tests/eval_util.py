"""Evaluation fixtures made by code, offline: torch-fidelity's Inception-v3 with random weights, a tiny
random CLIP with its processor, and a text-to-image samples folder written directly."""

from __future__ import annotations

import json
import os
from unittest import mock

import numpy as np
import torch

from dydit_dist.sample import GeneratedSample, pack
from dydit_dist.sample.manifest import SamplesManifest
from dydit_dist.shardset import write_shard


def random_inception_weights(path: str, seed: int = 0) -> str:
    """A state dict of torch-fidelity's FeatureExtractorInceptionV3 (the real architecture) with random
    weights (He-normal convolutions, so activations keep their scale through the depth), saved at `path`."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = os.path.join(os.path.dirname(path), "empty.pt")
    torch.save({}, empty)
    torch.manual_seed(seed)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):  # keep the random init
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    os.remove(empty)
    return path


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_clip(folder: str, seed: int = 0) -> str:
    """A randomly initialised CLIPModel (2 layers, width 32, 32 px images) and its CLIPProcessor (a
    character-level BPE vocabulary of lowercase letters), saved as `save_pretrained` writes them."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", *_LETTERS, *(c + "</w>" for c in _LETTERS)]
    vocab = {t: i for i, t in enumerate(tokens)}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                              model_max_length=16)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(text_config={**small, "vocab_size": len(vocab), "max_position_embeddings": 16,
                                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
                        vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    return folder


def write_caption_samples(url: str, images: np.ndarray, prompts: list[str], shard_size: int = 4) -> None:
    """A complete samples folder of text-to-image samples: sample k is images[k] drawn from prompts[k]."""
    manifest = SamplesManifest({"method": "static", "sampler": "ddpm", "steps": 1, "cfg_scale": 4.5, "seed": 0,
                                "num_samples": len(images)}, (len(images) + shard_size - 1) // shard_size)
    for i, start in enumerate(range(0, len(images), shard_size)):
        samples = [GeneratedSample(k, images[k], {"index": k, "prompt": prompts[k], "prompt_index": k})
                   for k in range(start, min(start + shard_size, len(images)))]
        record = write_shard(url, i, pack(samples), len(samples), replace=True)  # a rewrite replaces
        manifest.add({**record, "start": start, "timing": {"sample_s": 1.0}})
    manifest.write(url)
