"""`jobs.reproduce` for a text-to-image comparison that trains nothing (AT-EDM on SD-XL, the preset
`at_edm_sdxl_1024` on a tiny random pipeline): the caption reference from data.source instead of the
prepare stage, the samples of the unpruned UNet and of AT-EDM on a local Ray, their FID and CLIP score,
the report; a rerun skips every stage; an SD-XL comparison asking for a trained method is refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from eval_util import tiny_clip
from PIL import Image
from sdxl_util import IMAGE_SIZE, VAE_DOWNSAMPLE, tiny_sdxl

from dydit_dist import config, pipeline, preflight, storage
from dydit_dist.eval.digits import DigitsNet
from dydit_dist.network import save_weights
from dydit_dist.sample.plan import load_prompts

pytestmark = pytest.mark.slow
CAPTIONS = ["a red square", "a blue circle", "green on grey", "a small boat", "the night sky", "an old tree"]


def caption_source(folder) -> str:
    """A .csv of random PNG images (40 x 48, center-cropped to the model's size) and CAPTIONS."""
    rng = np.random.default_rng(0)
    rows = ["path,caption"]
    for i, caption in enumerate(CAPTIONS):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
        storage.write_bytes(f"file://{folder}/img/{i}.png", buf.getvalue())
        rows.append(f"img/{i}.png,{caption}")
    storage.write_bytes(f"file://{folder}/captions.csv", "\n".join(rows).encode())
    return f"file://{folder}/captions.csv"


def tiny_comparison(tmp_path, *overrides) -> config.Config:
    """at_edm_sdxl_1024 with the tiny pipeline, 6 samples of 3 steps, digits-cnn features (NOT Inception)."""
    save_weights(DigitsNet(), str(tmp_path / "digits.safetensors"))
    return config.load("at_edm_sdxl_1024", [
        f"storage.root=file://{tmp_path}/bucket", "storage.run=sdxl", "model.name=SDXL-debug",
        f"model.checkpoint={tiny_sdxl(str(tmp_path / 'sdxl'))}", f"model.image_size={IMAGE_SIZE}",
        f"model.vae_downsample={VAE_DOWNSAMPLE}", "ray.use_gpu=false", "ray.address=null",
        "sample.steps=3", "sample.num_samples=6", "sample.shard_size=3", "sample.batch_size=3",
        "sample.num_actors=1", "sample.precision=fp32", "sample.vae_precision=fp32", "sample.at_edm.ratio=0.5",
        f"data.source={caption_source(tmp_path / 'coco')}", "eval.reference_images=6",
        f"eval.reference=file://{tmp_path}/bucket/refs/coco.npz", f"sample.prompts=file://{tmp_path}/bucket/refs/coco.txt",
        "eval.feature_extractor=digits-cnn", f"eval.feature_extractor_weights={tmp_path / 'digits.safetensors'}",
        f"eval.clip_model={tiny_clip(str(tmp_path / 'clip'))}", "eval.num_actors=0", "eval.batch_size=3",
        *overrides])


def test_reproduce_compares_at_edm_with_the_unpruned_unet(tmp_path, ray_local, capsys):
    torch.set_num_threads(1)
    cfg = tiny_comparison(tmp_path)
    assert cfg.eval.methods == ["static", "at_edm"]  # the preset's comparison
    plan = preflight.plan(cfg, "reproduce")
    assert not plan.problems, plan.text()
    assert [s.name for s in plan.stages] == ["reference", "sample static", "evaluate static", "sample at_edm",
                                             "evaluate at_edm", "report"]
    resolved = {i.key for i in plan.inputs}  # the reference stage's outputs are read after it writes them
    assert {"data.source", "eval.reference", "sample.prompts", "model.checkpoint", "eval.clip_model"} <= resolved

    report = pipeline.reproduce(cfg)
    root = f"file://{tmp_path}/bucket"
    assert load_prompts(cfg.sample.prompts) == CAPTIONS
    with np.load(tmp_path / "bucket/refs/coco.npz") as ref:
        assert ref["arr_0"].shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3) and list(ref["captions"]) == CAPTIONS
    assert not storage.exists(f"{root}/data/sdxl")  # nothing trains: no prepare stage, no latents
    records = {m: storage.read_json(f"{root}/runs/sdxl/{m}/metrics.json") for m in ("static", "at_edm")}
    for method, record in records.items():
        assert set(record["metrics"]) == {"fid", "clip_score"}, method
        assert all(np.isfinite(v) for v in record["metrics"].values()), record
        assert record["num_samples"] == 6 and record["protocol"] == "coco"
    # AT-EDM is a different sampler of the same captions: other images, fewer FLOPs per sample
    assert records["static"]["metrics"] != records["at_edm"]["metrics"]
    assert 0 < records["at_edm"]["gflops"] < records["static"]["gflops"]
    text = storage.read_bytes(report).decode()
    assert "| static |" in text and "| at_edm |" in text and "CLIP score" in text
    out = capsys.readouterr().out
    assert "reference file://" in out and ": running" in out

    # A rerun finds every stage done: nothing is sampled, evaluated or referenced again
    assert pipeline.reproduce(cfg) == report
    out = capsys.readouterr().out
    stages = [line for line in out.splitlines() if line.startswith("[reproduce")]
    assert len(stages) == 5 and all(line.endswith("outputs exist, skipped") for line in stages), out
    assert all(s.work == "outputs exist, skipped" for s in preflight.plan(cfg, "reproduce").stages[:-1])


def test_sdxl_comparison_refuses_a_trained_method(tmp_path):
    cfg = tiny_comparison(tmp_path, "eval.methods=[static,dydit]")
    problems = preflight.plan(cfg, "reproduce").problems
    assert [(i.key, i.problem) for i in problems] == [
        ("eval.methods", "model.family sdxl (SDXL-debug) compares static and at_edm, which train nothing")]

