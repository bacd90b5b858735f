"""Planning samples into shards, per-sample seeds, shard packing and the samples manifest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dydit_dist import storage
from dydit_dist.sample.manifest import SamplesError, SamplesManifest
from dydit_dist.sample.plan import class_label, load_prompts, plan_shards, sample_generators, sample_seed
from dydit_dist.sample.shards import GeneratedSample, pack, unpack
from dydit_dist.shardset import settings_digest, write_marker


def test_shards_cover_every_index_once():
    shards = plan_shards(50_000, 1000)
    assert len(shards) == 50
    indices = [k for s in shards for k in s.indices]
    assert indices == list(range(50_000))
    last = plan_shards(10, 4)[-1]
    assert (last.start, last.stop, last.name) == (8, 10, "shard-000002.tar")
    with pytest.raises(ValueError, match="must be positive"):
        plan_shards(0, 4)


def test_fifty_per_class_in_a_fixed_order():
    labels = [class_label(k, 1000) for k in range(50_000)]
    assert np.bincount(labels).tolist() == [50] * 1000
    assert labels[:3] == [0, 1, 2] and labels[1000] == 0


def test_random_labels_are_uniform_draws_fixed_by_seed_and_index():
    """sample.labels=random (the default, as DiT's sample_ddp.py): each sample's class is its own draw from
    (seed, index): the same whatever the batch or shard, other for another seed, about 50 per class at 50k
    but not exactly (a balanced plan lowers FID against the published protocol)."""
    labels = [class_label(k, 1000, "random", 0) for k in range(50_000)]
    counts = np.bincount(labels, minlength=1000)
    assert counts.min() > 20 and counts.max() < 85 and len(set(counts.tolist())) > 5  # binomial(50k, 1/1000)
    assert [class_label(k, 1000, "random", 0) for k in (7, 3, 49_999)] == [labels[7], labels[3], labels[49_999]]
    assert sum(a == b for a, b in zip(labels, (class_label(k, 1000, "random", 1) for k in range(50_000)), strict=True)) < 200
    with pytest.raises(ValueError, match="sample.labels='uniform': expected random or balanced"):
        class_label(0, 10, "uniform")


def test_seeds_depend_on_seed_and_index_only():
    # A literal, computed once: pins the seed stream across processes and versions (a change here
    # changes every generated sample of every seeded job).
    assert sample_seed(0, 7) == 9250883288030345305
    seeds = {sample_seed(s, k) for s in range(3) for k in range(1000)}
    assert len(seeds) == 3000  # (seed, index) pairs never collide by arithmetic
    a = torch.randn(4, generator=sample_generators(0, [5])[0])
    b = torch.randn(4, generator=sample_generators(0, [9, 5])[1])
    assert torch.equal(a, b)


def test_prompts_file(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"caption": "a dog"}\n')
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["a cat", "a dog"]
    (tmp_path / "bad.txt").write_text("a cat\n\na dog\n")
    with pytest.raises(ValueError, match="bad.txt:2: empty prompt"):
        load_prompts(str(tmp_path / "bad.txt"))
    (tmp_path / "P.JSONL").write_text('{"prompt": "a cat"}\n')
    assert load_prompts(str(tmp_path / "P.JSONL")) == ["a cat"]
    # Other names were read as one prompt per line: a JSON array or a captions .csv sampled as captions.
    (tmp_path / "p.json").write_text('["a cat", "a dog"]\n')
    (tmp_path / "caps.csv").write_text('image,caption\n1.jpg,"a cat"\n')
    for name in ("p.json", "caps.csv"):
        with pytest.raises(ValueError, match=rf"{name}: expected a .txt file \(one prompt per line\) or a .jsonl"):
            load_prompts(str(tmp_path / name))


def test_a_malformed_prompts_file_is_an_input_error_of_the_driver(tmp_path):
    """Read with the settings, in the driver: every actor would otherwise die loading it, a lost worker
    after a lost worker, until ray.max_failures ran out."""
    from dydit_dist import config
    from dydit_dist.sample import SamplesError
    from dydit_dist.sample.pool import LOAD_ERRORS, sampling_settings

    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": 3}\n')
    cfg = config.load("pixart_xl2_256", [f"sample.prompts={tmp_path}/bad.jsonl"])
    with pytest.raises(SamplesError, match=r"sample.prompts=.*bad.jsonl:2: expected a \"prompt\" or \"caption\""):
        sampling_settings(cfg)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(SamplesError, match=r"latin1.txt: not UTF-8 text"):
        sampling_settings(config.load("pixart_xl2_256", [f"sample.prompts={tmp_path}/latin1.txt"]))
    assert SamplesError in LOAD_ERRORS  # an actor that meets it stops the job (exit 2), not replaced


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_pack_round_trip_is_exact_and_deterministic(channels):
    rng = np.random.default_rng(0)
    samples = [GeneratedSample(k, rng.integers(0, 256, (6, 5, channels), dtype=np.uint8), {"index": k, "class": k % 3})
               for k in (4, 5, 6)]
    data = pack(samples)
    assert pack(samples) == data
    back = unpack(data)
    assert [s.index for s in back] == [4, 5, 6]
    for a, b in zip(samples, back, strict=True):
        assert np.array_equal(a.image, b.image) and a.meta == b.meta


def test_resume_merges_markers_and_refuses_other_settings(tmp_path):
    url = str(tmp_path / "samples")
    settings = {"seed": 0, "num_samples": 8}
    manifest = SamplesManifest(settings, 2)
    manifest.add({"index": 0, "name": "shard-000000.tar", "count": 4})
    manifest.write(url)
    digest = SamplesManifest.resume(url, settings, 2)  # nothing beyond the manifest yet
    assert sorted(digest.shards) == [0]

    # A driver that died after an actor's marker but before its manifest write loses nothing.
    write_marker(url, {"index": 1, "name": "shard-000001.tar", "count": 4, "settings_sha256": settings_digest(settings)})
    merged = SamplesManifest.resume(url, settings, 2)
    assert sorted(merged.shards) == [0, 1] and merged.complete
    with pytest.raises(SamplesError, match="seed: 0 there vs 1 now"):
        SamplesManifest.resume(url, {"seed": 1, "num_samples": 8}, 2)
    assert storage.exists(url + "/done/shard-000001.json")


@pytest.mark.parametrize("marker, problem", [
    ('{"index": 1, "na', "a done-marker that is not JSON"),
    ('[1, 2]', r"a done-marker that is no shard record \(a JSON list, not a shard record\)"),
    ('{"index": 1, "count": 4}', r"no shard record \(its 'name' is None, expected a str\)"),
    ('{"name": "shard-000001.tar", "count": 4}', r"its 'index' is None, expected an int >= 0"),
])
def test_a_malformed_done_marker_is_named(tmp_path, marker, problem):
    """It was a JSONDecodeError / KeyError / AttributeError traceback naming nothing, which the preflight
    swallowed (a dry run passed, the job died)."""
    url = str(tmp_path / "samples")
    settings = {"seed": 0}
    SamplesManifest(settings, 2).write(url)
    storage.write_bytes(f"{url}/done/shard-000001.json", marker.encode())
    with pytest.raises(SamplesError, match=rf"{url}/done/shard-000001.json: .*{problem}.*remove it"):
        SamplesManifest.resume(url, settings, 2)


def test_a_manifest_record_without_its_count_is_named(tmp_path):
    url = str(tmp_path / "samples")
    manifest = SamplesManifest({"seed": 0}, 2).to_json()
    storage.write_json(f"{url}/manifest.json", {**manifest, "shards": [{"index": 0, "name": "shard-000000.tar"}]})
    with pytest.raises(SamplesError, match=r"manifest.json: .*shard record 0: its 'count' is None, expected an int"):
        SamplesManifest.resume(url, {"seed": 0}, 2)


def test_settings_record_the_noise_stream_and_precision_knobs():
    from dydit_dist import config
    from dydit_dist.sample.pool import sampling_settings
    from dydit_dist.shardset import settings_digest

    cpu = sampling_settings(config.load("debug", []))
    assert cpu["noise"] == "philox4x32-10/box-muller/cpu" and {"tf32", "vae_precision", "compile"} <= set(cpu)
    gpu = sampling_settings(config.load("debug", ["ray.use_gpu=true"]))
    assert gpu["noise"] == "philox4x32-10/box-muller/cuda"
    old = sampling_settings(config.load("debug", ["sample.noise=generator"]))
    assert old["noise"] == "torch-cpu-generator-per-sample/cpu" and settings_digest(old) != settings_digest(cpu)
    old_gpu = sampling_settings(config.load("debug", ["sample.noise=generator", "ray.use_gpu=true"]))
    assert settings_digest(old_gpu) != settings_digest(old)  # a GPU run resumed on CPUs does not mix its shards


def test_the_preflight_names_a_malformed_prompts_file_as_its_own_input(tmp_path):
    from dydit_dist import config, preflight

    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    cfg = config.load("pixart_xl2_256", [f"storage.root=file://{tmp_path}", f"sample.prompts={tmp_path}/p.txt"])
    def problems(key: str) -> list[str]:
        return [i.problem for i in preflight.plan(cfg, "sample").inputs if i.key == key and i.problem]

    assert any("p.txt:2: empty prompt" in problem for problem in problems("sample.prompts"))
    assert problems("storage.run") == []  # not "outputs made with other settings"
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    assert problems("sample.prompts") == []
