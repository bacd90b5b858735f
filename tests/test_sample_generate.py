"""Making shards in one process: per-sample reproducibility, methods, the ADM export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sampling_util import tiny_config, write_samples

from dydit_dist.sample import (
    export_adm_npz,
    iter_npz_array,
    iter_samples,
    pack,
    plan_shards,
)
from dydit_dist.sample.generate import ShardGenerator
from dydit_dist.sample.manifest import SamplesError, SamplesManifest
from dydit_dist.sample.pool import _method_stats


@pytest.mark.parametrize("method", ["static", "dydit"])
def test_sample_does_not_depend_on_its_batch(tmp_path, checkpoints, method):
    torch.set_num_threads(1)
    cfg = tiny_config(str(tmp_path), f"model.method={method}", f"sample.method={method}",
                      f"model.checkpoint={checkpoints[method]}")
    gen = ShardGenerator(cfg)
    batch = gen.latents([0, 1, 2, 3])
    alone = gen.latents([2])
    assert batch.shape == (4, 4, 16, 16)
    torch.testing.assert_close(batch[2:3], alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batch[0], batch[1])
    assert torch.equal(gen.latents([0, 1, 2, 3]), batch)  # same batch, same bits


def test_dydit_reports_width_and_fewer_flops(tmp_path, checkpoints):
    torch.set_num_threads(1)
    stats = {}
    for method in ("static", "dydit"):
        cfg = tiny_config(str(tmp_path), f"model.method={method}", f"sample.method={method}",
                      f"model.checkpoint={checkpoints[method]}")
        gen = ShardGenerator(cfg)
        gen.generate(plan_shards(4, 4)[0])
        stats[method] = gen.stats()
    widths = stats["dydit"]["width_by_timestep"]
    assert len(widths) == 4 and all(0 < w["heads"] <= 1 and 0 < w["mlp"] <= 1 for w in widths)
    assert any(w["heads"] < 1 or w["mlp"] < 1 for w in widths)
    assert stats["dydit"]["gflops"] < stats["static"]["gflops"]
    assert "width_by_timestep" not in stats["static"]


def test_gflops_are_the_mean_over_the_units_images(tmp_path, checkpoints):
    """A unit's GFLOPs weigh each batch by its images (DyDiT's token count, so its FLOPs, vary per batch):
    batches of 2, 2 and 1 images at 1, 2 and 4 GFLOPs are 2.0, not the last batch's 4 or the batches' 2.33."""
    torch.set_num_threads(1)
    cfg = tiny_config(str(tmp_path), f"model.checkpoint={checkpoints['static']}", "sample.batch_size=2",
                      "sample.steps=2")
    gen = ShardGenerator(cfg)
    per_batch = iter([1e9, 2e9, 4e9, 8e9])
    gen.runner.mean_flops = lambda: next(per_batch)
    gen.generate(plan_shards(5, 5)[0])
    assert gen.stats()["gflops"] == pytest.approx(2.0)
    manifest = SamplesManifest({}, 3)
    for index, (count, gflops) in enumerate([(4, 10.0), (4, 20.0), (2, None)]):  # a record from before: no GFLOPs
        manifest.add({"index": index, "name": f"shard-{index:06d}.tar", "count": count, "gflops": gflops})
    assert manifest.gflops() == pytest.approx(15.0)
    assert SamplesManifest({}, 1).gflops() is None
    # the stats take both from the records (the done-markers keep them): shard 0 holds the width per timestep
    width = [{"t": 999, "heads": 0.5, "mlp": 0.25}]
    manifest.shards[0]["width_by_timestep"] = width
    assert _method_stats(manifest) and manifest.stats == {"gflops": pytest.approx(15.0), "width_by_timestep": width}
    assert not _method_stats(manifest)  # nothing new: no manifest write


def test_checkpoint_of_another_model_is_refused(tmp_path, checkpoints):
    cfg = tiny_config(str(tmp_path), f"model.checkpoint={checkpoints['static']}", "model.num_classes=7")
    with pytest.raises(ValueError, match="static.safetensors does not fit"):
        ShardGenerator(cfg)


def test_adm_export_round_trips(tmp_path, checkpoints):
    torch.set_num_threads(1)
    cfg = tiny_config(str(tmp_path), f"model.checkpoint={checkpoints['static']}", "sample.num_samples=10")
    url = str(tmp_path / "samples")
    write_samples(cfg, url)
    path = str(tmp_path / "out" / "samples.npz")
    assert export_adm_npz(url, path) == 10
    with np.load(path, allow_pickle=False) as npz:
        arr = npz["arr_0"]
    assert arr.shape == (10, 16, 16, 3) and arr.dtype == np.uint8
    expected = np.stack([s.image[..., :3] for s in iter_samples(url)])  # RGBA made RGB
    assert np.array_equal(arr, expected)
    assert np.array_equal(np.concatenate(list(iter_npz_array(path, "arr_0", 3))), arr)  # the streamed reader


def test_export_refuses_unfinished_samples(tmp_path):
    url = str(tmp_path / "samples")
    manifest = SamplesManifest({"seed": 0}, 2)
    manifest.add({"index": 0, "name": "shard-000000.tar", "start": 0, "count": 4})
    manifest.write(url)
    with pytest.raises(SamplesError, match="1 of 2 shards are done"):
        export_adm_npz(url, str(tmp_path / "x.npz"))


def test_text_to_image_samples_record_their_prompts(tmp_path, tiny_t5):
    torch.set_num_threads(1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle on the background\nsmall green\n")
    cfg = tiny_config(str(tmp_path), "model.name=PixArt-debug", "model.caption_channels=32",
                      "model.model_max_length=8", f"data.text_encoder={tiny_t5}", f"sample.prompts={prompts}",
                      "sample.sampler=dpm-solver++", "sample.cfg_scale=4.5", "sample.guidance_channels=null")
    gen = ShardGenerator(cfg)
    samples, _ = gen.generate(plan_shards(8, 4)[1])  # samples 4..7
    assert [s.meta["prompt_index"] for s in samples] == [1, 2, 0, 1]
    assert samples[0].meta["prompt"] == "a blue circle on the background"
    assert samples[0].image.shape == (16, 16, 4)
    alone = gen.decoder(gen.latents([4]))[0]  # independent of its batch (up to float rounding)
    assert np.abs(samples[0].image.astype(int) - alone).max() <= 1
    from dydit_dist.sample import unpack

    back = unpack(pack(samples))
    assert back[1].meta["prompt"] == "small green"


def test_a_dydit_actor_records_its_width_with_shard_0_and_every_shards_gflops(tmp_path, checkpoints):
    """The sampling actor's code without Ray: shard 0's record holds the width per timestep (what the report's
    width plot reads, via the manifest's stats), every record its own GFLOPs."""
    from dydit_dist.sample.pool import SamplingWorker

    torch.set_num_threads(1)
    cfg = tiny_config(str(tmp_path), "model.method=dydit", "sample.method=dydit",
                      f"model.checkpoint={checkpoints['dydit']}")
    worker = SamplingWorker(cfg.to_dict(), f"file://{tmp_path}/samples", use_gpu=False)
    records = {}
    for unit in reversed(plan_shards(4, 2)):  # shard 1 first: the width does not depend on the order
        worker.sample(unit)
        records[unit.index] = worker.write(unit.index)
    assert "width_by_timestep" not in records[1] and len(records[0]["width_by_timestep"]) == cfg.sample.steps
    assert all(0 < r["gflops"] < 1e3 for r in records.values())
    manifest = SamplesManifest({}, 2)
    for record in records.values():
        manifest.add(record)
    assert _method_stats(manifest) and manifest.stats["width_by_timestep"] == records[0]["width_by_timestep"]
