"""Shared fixtures: an S3 server (moto, on 127.0.0.1), a local Ray instance, tiny encoders, test images.

- `s3_endpoint` (session): the moto server's URL; fake AWS credentials are in the environment.
- `s3_bucket`: a fresh, empty bucket (`s3://...`) with `storage` pointed at the server.
- `ray_local` (session): `ray.init(address="local")` in its own short temp dir (never joins another
  instance), 2 CPUs, no dashboard; shut down at the end of the session.
- `tiny_vae` / `tiny_t5` (session): local folders of a random 4-block `AutoencoderKL` (downsamples
  by 8, 4 latent channels) and a random 1-layer T5 encoder (width 32) with a word-level tokenizer
  built from `CAPTION_WORDS`; pass them as `data.vae` / `data.text_encoder`.
- every test starts from the same global random state (torch, numpy, random seeded 0), so one that
  builds a model with torch's default initialisation sees the same weights whichever tests ran before.
- `image_source` (session): a folder in ImageFolder layout (3 classes x 16 PNGs of varied size) plus
  two unreadable files, and `captions.csv` listing the same images with captions.
- `benchmarks/` is on sys.path, as when a benchmark script runs (its sibling `stamp` imports), for the tests
  that load a script, whichever of them runs first or alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
CAPTION_WORDS = ["a", "red", "green", "blue", "square", "circle", "on", "the", "noisy", "background", "small", "big"]
NUM_CLASSES, PER_CLASS = 3, 16


@pytest.fixture(autouse=True)
def _same_random_state_in_every_test():
    import random

    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def _fake_aws_env() -> None:
    """Fake credentials, set before any S3 client or Ray process starts (Ray workers inherit them)."""
    for key, value in FAKE_AWS.items():
        os.environ.setdefault(key, value)


_fake_aws_env()  # at import: a Ray instance a job under test starts itself (then shared) inherits them too


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    _fake_aws_env()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    from dydit_dist import storage

    storage.configure(endpoint_url=s3_endpoint)
    name = f"test-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.filesystem(f"s3://{name}")
    fs.mkdir(name)
    yield f"s3://{name}"
    storage.configure()


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if ray.is_initialized():  # started by another fixture or test module: share it
        yield ray
        return
    _fake_aws_env()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(address="local", num_cpus=2, _temp_dir=temp_dir, include_dashboard=False,
             object_store_memory=256 * 2**20, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> str:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4, sample_size=32,
    )
    path = tmp_path_factory.mktemp("tiny-vae")
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> str:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {tok: i for i, tok in enumerate(["<pad>", "</s>", "<unk>", *CAPTION_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    path = tmp_path_factory.mktemp("tiny-t5")
    T5EncoderModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_images(root: Path, num_classes: int = NUM_CLASSES, per_class: int = PER_CLASS, seed: int = 0) -> list[str]:
    """Class folders of random PNGs (sizes around 32x32); returns their paths relative to `root`."""
    rng = np.random.default_rng(seed)
    paths = []
    for c in range(num_classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(32, 48, size=2)
            image = np.clip(rng.normal(60 + 60 * c, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
            from PIL import Image

            Image.fromarray(image).save(root / f"class_{c}" / f"img_{i:02d}.png")
            paths.append(f"class_{c}/img_{i:02d}.png")
    return paths


@pytest.fixture(scope="session")
def image_source(tmp_path_factory) -> dict:
    """{'folder': ImageFolder root, 'captions': CSV path, 'bad': [unreadable files], 'good': 48}."""
    root = tmp_path_factory.mktemp("images")
    paths = write_images(root)
    good = (root / paths[0]).read_bytes()
    (root / "class_1" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "class_2" / "not_an_image.png").write_bytes(b"this is text, not a PNG")
    rng = np.random.default_rng(1)
    rows = ["path,caption"] + [f"{p},{' '.join(rng.choice(CAPTION_WORDS, size=rng.integers(2, 7)))}" for p in paths]
    rows.append("class_1/truncated.png,a broken image")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return {"folder": str(root), "captions": str(root / "captions.csv"),
            "bad": ["class_1/truncated.png", "class_2/not_an_image.png"], "good": len(paths)}


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank process group and one torch thread (the CI machine has 2 shared cores); DeepSpeed's
    rank variables are restored afterwards, so that later Ray workers do not inherit them."""
    import torch

    from dydit_dist.train.deepspeed_setup import init_single_process

    threads = torch.get_num_threads()
    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    torch.set_num_threads(1)
    init_single_process("gloo")
    yield
    torch.set_num_threads(threads)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Random debug checkpoints: the static network and DyDiT (routers drawn at random too)."""
    from sampling_util import random_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {"static": random_checkpoint(str(root / "static.safetensors")),
            "dydit": random_checkpoint(str(root / "dydit.safetensors"), "model.method=dydit")}
