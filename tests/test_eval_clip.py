"""Text-to-image evaluation (eval.protocol=coco): the CLIP score of a tiny random CLIP against a direct
computation, caption k for sample k, the caption reference, and the evaluation end to end."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from eval_util import tiny_clip, write_caption_samples
from PIL import Image
from sampling_util import tiny_config

from dydit_dist import storage
from dydit_dist.data import DataError
from dydit_dist.eval.captions import prepare_caption_reference
from dydit_dist.eval.clip import ClipScorer
from dydit_dist.eval.digits import DigitsNet
from dydit_dist.eval.evaluate import evaluate
from dydit_dist.eval.extractors import file_sha256
from dydit_dist.eval.metrics import EvalInputError
from dydit_dist.eval.report import write_report
from dydit_dist.network import save_weights
from dydit_dist.paths import RunPaths
from dydit_dist.sample.conditions import CaptionConditioner
from dydit_dist.sample.plan import load_prompts

CAPTIONS = ["a red cat on a mat", "two dogs", "a bowl of\nsoup", "the sky at night", "a tree", "an old boat"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return tiny_clip(str(tmp_path_factory.mktemp("clip") / "tiny-clip"))


def direct_clip_score(folder: str, images: np.ndarray, captions: list[str]) -> np.ndarray:
    """100 x max(cos, 0) from CLIPModel's forward, whose image_embeds and text_embeds are normalised."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=captions, images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cosine = (out.image_embeds.double() * out.text_embeds.double()).sum(-1).numpy()
    return np.maximum(100 * cosine, 0)


def test_clip_score_matches_a_direct_computation(clip_folder):
    images = np.random.default_rng(0).integers(0, 256, (6, 40, 48, 3), dtype=np.uint8)
    ours = ClipScorer.load(clip_folder, None)(images, CAPTIONS).numpy()
    direct = direct_clip_score(clip_folder, images, CAPTIONS)
    np.testing.assert_allclose(ours, direct, rtol=1e-5, atol=1e-4)
    assert ours.shape == (6,) and (ours >= 0).all() and (ours <= 100).all()
    assert (ours > 0).any() and (ours == 0).any()  # the random CLIP gives both signs: the clamp is exercised
    # From a storage folder (copied to the node's cache), the same model and the same scores.
    again = ClipScorer.load(f"file://{clip_folder}", None)(images, CAPTIONS).numpy()
    np.testing.assert_array_equal(again, ours)
    with pytest.raises(ValueError, match="6 images and 5 captions"):
        ClipScorer.load(clip_folder, None)(images, CAPTIONS[:5])


def test_caption_per_index_is_deterministic(tmp_path):
    """Sample k draws caption k % P whatever the batch it is in; the captions file the reference job
    writes reads back as the same captions, one per line."""
    from dydit_dist.eval.captions import one_line, write_captions

    url = f"file://{tmp_path}/captions.txt"
    write_captions(url, [one_line(c) for c in CAPTIONS])
    prompts = load_prompts(url)
    assert prompts == [" ".join(c.split()) for c in CAPTIONS]
    cond = CaptionConditioner(prompts, text_encoder=None, null_caption=torch.zeros(4, 8))
    whole = cond.meta(range(9))
    assert [m["prompt_index"] for m in whole] == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert cond.meta([7, 3]) == [whole[7], whole[3]] and whole[2]["prompt"] == "a bowl of soup"
    write_captions(f"file://{tmp_path}/captions.jsonl", prompts)
    assert load_prompts(f"file://{tmp_path}/captions.jsonl") == prompts


def _caption_source(folder) -> tuple[str, np.ndarray]:
    """A .csv of PNG images (24 x 32, center-cropped to 16 x 16 by the reference job) and CAPTIONS."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (len(CAPTIONS), 24, 32, 3), dtype=np.uint8)
    rows = ["path,caption"]
    for i, (image, caption) in enumerate(zip(images, CAPTIONS, strict=True)):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        storage.write_bytes(f"file://{folder}/img/{i}.png", buf.getvalue())
        rows.append(f'img/{i}.png,"{caption}"')
    storage.write_bytes(f"file://{folder}/captions.csv", "\n".join(rows).encode())
    return f"file://{folder}/captions.csv", images


def test_coco_protocol_end_to_end(tmp_path, clip_folder, monkeypatch):
    """jobs.reference's work (real images + captions -> .npz with statistics, and the captions file), then
    an evaluation of samples drawn from those captions: FID, sFID, IS, precision/recall and CLIP score."""
    torch.set_num_threads(1)
    save_weights(DigitsNet(), str(tmp_path / "digits.safetensors"))
    source, _ = _caption_source(tmp_path / "coco")
    root = f"file://{tmp_path}"
    overrides = ["eval.feature_extractor=digits-cnn", f"eval.feature_extractor_weights={tmp_path / 'digits.safetensors'}",
                 f"eval.fidelity_cache={tmp_path / 'fc'}", "data.source_format=captions", f"data.source={source}",
                 f"eval.reference={root}/refs/coco.npz", f"sample.prompts={root}/refs/coco.txt", "model.image_size=16",
                 "eval.protocol=coco", "eval.metrics=[fid,sfid,isc,prc,clip]", f"eval.clip_model={clip_folder}",
                 "eval.isc_splits=2", "eval.prc_neighborhood=2", "eval.batch_size=4"]
    cfg = tiny_config(root, *overrides)
    made = prepare_caption_reference(cfg)
    assert made["num_images"] == len(CAPTIONS) and load_prompts(f"{root}/refs/coco.txt")[2] == "a bowl of soup"
    with np.load(tmp_path / "refs/coco.npz") as ref:
        assert ref["arr_0"].shape == (6, 16, 16, 3) and list(ref["captions"]) == load_prompts(f"{root}/refs/coco.txt")
        assert ref["mu"].shape == (64,) and ref["sigma_s"].shape == (448, 448)
        assert str(ref["feature_extractor"]) == "digits-cnn"
        assert str(ref["feature_extractor_weights_sha256"]) == file_sha256(str(tmp_path / "digits.safetensors"))
        real = ref["arr_0"]
    # Samples drawn from the captions file: here the real images themselves, then a noisier copy.
    prompts = load_prompts(cfg.sample.prompts)
    write_caption_samples(f"{root}/runs/t/samples", real, prompts)
    record = evaluate(cfg)
    m = record["metrics"]
    assert set(m) == {"fid", "sfid", "isc_mean", "isc_std", "precision", "recall", "f_score", "clip_score"}
    assert abs(m["fid"]) < 1e-6 and abs(m["sfid"]) < 1e-6 and m["precision"] == m["recall"] == 1.0
    assert m["clip_score"] == pytest.approx(direct_clip_score(clip_folder, real, prompts).mean(), rel=1e-5)
    assert record["protocol"] == "coco" and record["clip_model"] == clip_folder
    # A Hugging Face id is mirrored once by the evaluation's driver; the scorer reads the mirror (offline pods).
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, allow_patterns, local_dir: (
        calls.append(repo), shutil.copytree(clip_folder, local_dir, dirs_exist_ok=True))[-1])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = evaluate(tiny_config(root, *overrides, "eval.clip_model=org/tiny-clip"), out=f"{root}/runs/t/hub.json")
    assert calls == ["org/tiny-clip"] and storage.exists(f"{root}/pretrained/org--tiny-clip/.complete")
    assert hub["metrics"]["clip_score"] == pytest.approx(m["clip_score"], rel=1e-6)
    noisy = np.clip(real.astype(int) + np.random.default_rng(2).integers(-60, 60, real.shape), 0, 255).astype(np.uint8)
    write_caption_samples(f"{root}/runs/t/noisy", noisy, prompts)
    other = evaluate(cfg, samples=f"{root}/runs/t/noisy", out=f"{root}/runs/t/noisy-metrics.json")
    assert other["metrics"]["fid"] > 100 * abs(m["fid"]) and other["metrics"]["sfid"] > 100 * abs(m["sfid"])
    # Statistics of the same extractor with other weights are not the reference's: refused by their sha256.
    torch.manual_seed(1)
    save_weights(DigitsNet(), str(tmp_path / "other.safetensors"))
    with pytest.raises(EvalInputError, match=r"coco.npz: its statistics are of digits-cnn with other weights"):
        evaluate(tiny_config(root, *overrides, f"eval.feature_extractor_weights={tmp_path / 'other.safetensors'}"))
    # The report puts sFID and the CLIP score beside the other numbers.
    text = storage.read_bytes(write_report(RunPaths(cfg), [record, {**other, "label": "noisy"}])).decode()
    assert "| FID [digits-cnn] | sFID [digits-cnn] | IS [digits-cnn] | precision [digits-cnn] | recall [digits-cnn] | CLIP score | samples |" in text
    # eval.reference_images: a fixed subset, in listing order, the same on every run; more than listed is refused.
    small = tiny_config(root, *overrides, "eval.reference_images=4", f"eval.reference={root}/refs/four.npz",
                        f"sample.prompts={root}/refs/four.txt")
    assert prepare_caption_reference(small)["num_images"] == 4
    four = load_prompts(f"{root}/refs/four.txt")
    assert len(four) == 4 and four == [c for c in prompts if c in four]  # a subsequence: listing order kept
    with np.load(tmp_path / "refs/four.npz") as ref:
        assert [bytes(row).hex() for row in ref["arr_0"]] == [bytes(real[prompts.index(c)]).hex() for c in four]
    assert prepare_caption_reference(small)["num_images"] == 4 and load_prompts(f"{root}/refs/four.txt") == four
    with pytest.raises(DataError, match="eval.reference_images=7: data.source=.* lists only 6 images"):
        prepare_caption_reference(tiny_config(root, *overrides, "eval.reference_images=7"))
    # A sample drawn from another caption than its reference image's is refused, naming both.
    write_caption_samples(f"{root}/runs/t/shifted", real, prompts[1:] + prompts[:1])
    with pytest.raises(ValueError, match="sample 0 was drawn from 'two dogs'"):
        evaluate(cfg, samples=f"{root}/runs/t/shifted", out=f"{root}/runs/t/x.json")


def test_a_caption_reference_records_what_it_was_made_from(tmp_path, monkeypatch):
    """reproduce reuses a caption reference only when it was made from the same source listing, subset, size
    and crop (`reference_changes`, compared by `pipeline.reference_done`); a reference of one image is refused
    before any work, and the temporary .npz a killed reference job left is removed by the next."""
    import json
    import os
    import tempfile

    from dydit_dist import pipeline
    from dydit_dist.eval.captions import TEMP_PREFIX, reference_changes

    save_weights(DigitsNet(), str(tmp_path / "digits.safetensors"))
    source, _ = _caption_source(tmp_path / "coco")
    root = f"file://{tmp_path}"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    dead = subprocess_pid_that_ended()
    (tmp_path / "tmp" / f"{TEMP_PREFIX}{dead}-abc.npz").write_bytes(b"left by a killed job")
    (tmp_path / "tmp" / f"{TEMP_PREFIX}{os.getpid()}-live.npz").write_bytes(b"a running job's")
    overrides = ["eval.feature_extractor=digits-cnn", f"eval.feature_extractor_weights={tmp_path / 'digits.safetensors'}",
                 "data.source_format=captions", f"data.source={source}", f"eval.reference={root}/refs/r.npz",
                 f"sample.prompts={root}/refs/r.txt", "model.image_size=16", "eval.protocol=coco",
                 "eval.reference_images=4", "eval.batch_size=4"]
    cfg = tiny_config(root, *overrides)
    assert not pipeline.reference_done(cfg)
    prepare_caption_reference(cfg)
    assert sorted(os.listdir(tmp_path / "tmp")) == [f"{TEMP_PREFIX}{os.getpid()}-live.npz"]
    with np.load(tmp_path / "refs/r.npz") as ref:
        assert json.loads(str(ref["settings"]))["reference_images"] == 4
    assert reference_changes(cfg) == [] and pipeline.reference_done(cfg)
    other = tiny_config(root, *overrides, "eval.reference_images=5")
    assert reference_changes(other) == ["reference_images: 4 there vs 5 now"]
    with pytest.raises(pipeline.OutputsDiffer, match=r"r.npz is a caption reference made from other settings "
                                                     r"\(reference_images: 4 there vs 5 now\); remove it and"):
        pipeline.reference_done(other)
    listing = (tmp_path / "coco" / "captions.csv").read_text()
    (tmp_path / "coco" / "captions.csv").write_text(listing + "\nimg/0.png,x")  # one row more
    assert [c.split(":")[0] for c in reference_changes(cfg)] == ["inputs_digest"]  # the source's listing changed
    # one made before its settings were recorded: judged by what it holds (captions, size)
    legacy = dict(np.load(tmp_path / "refs/r.npz"))
    del legacy["settings"]
    np.savez(tmp_path / "refs/r.npz", **legacy)
    (tmp_path / "coco" / "captions.csv").write_text(listing)
    assert reference_changes(cfg) == [] and pipeline.reference_done(cfg)
    assert reference_changes(tiny_config(root, *overrides, "model.image_size=8")) == ["image_size: 16 there vs 8 now"]
    assert reference_changes(other) == ["captions: not those of the 5 images of data.source=" + source +
                                        " (eval.reference_images=5)"]
    with pytest.raises(EvalInputError, match=r"eval.reference_images=1\) gives 1 image; a reference needs at least 2"):
        prepare_caption_reference(tiny_config(root, *overrides[:-2], "eval.reference_images=1",
                                              f"eval.reference={root}/refs/one.npz"))
    assert not (tmp_path / "refs" / "one.npz").exists()


def subprocess_pid_that_ended() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_clip_needs_the_coco_protocol(tmp_path):
    from dydit_dist.eval.metrics import check_metrics

    with pytest.raises(ValueError, match="eval.protocol=coco"):
        check_metrics(["fid", "clip"], "adm")
    check_metrics(["fid", "clip"], "coco")
