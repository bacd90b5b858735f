"""The sampling settings of a samples folder (`pool.sampling_settings`): every key that decides the bytes
of the samples changes them, a key the model does not read leaves them as they were, and they read back
from a manifest equal to themselves (a rerun resumes its folder)."""

from __future__ import annotations

import hashlib

import pytest

from dydit_dist import config
from dydit_dist.sample import SamplesError, SamplesManifest, sampling_settings


def settings(preset: str, *overrides: str) -> dict:
    return sampling_settings(config.load(preset, list(overrides)))


@pytest.mark.parametrize("preset, override", [
    ("flexdit_xl2_256", "model.flexdit.ramp_start=0.5"),  # the grid schedule: no weights, the checkpoint still loads
    ("flexdit_xl2_256", "model.flexdit.num_intervals=10"),
    ("flexdit_xl2_256", "model.flexdit.r_max=0.9"),
    ("flexdit_xl2_256", "model.flexdit.layout=PDCSSSRDCSSSRDCSSSRDCSSSRDDD"),
    ("pixart_xl2_256", "model.model_max_length=77"),
    ("pixart_xl2_256", "model.lewei_scale=2.0"),
    ("pixart_xl2_256", "data.text_encoder=google/t5-v1_1-xxl"),
    ("pixart_xl2_256", "data.tokenizer=google/t5-v1_1-xxl"),
    ("dit_xl2_256", "data.vae_scale_factor=0.13025"),  # the decoder divides by it
    ("dit_xl2_256", "model.vae_downsample=16"),  # the latent's size
    ("dit_xl2_256", "model.learn_sigma=false"),  # the sampler's variance
])
def test_a_key_the_samples_depend_on_changes_the_settings(preset, override):
    assert settings(preset, override) != settings(preset)


@pytest.mark.parametrize("preset, override", [
    ("dit_xl2_256", "model.flexdit.ramp_start=0.5"),  # FlexDiT's schedule, on a static DiT
    ("dit_xl2_256", "model.dynamic.target_lambda=0.7"),  # DyDiT's routers, on a static DiT
    ("dit_xl2_256", "data.text_encoder=google/t5-v1_1-xxl"),  # PixArt's captions, on a class-conditional DiT
    ("dit_xl2_256", "model.model_max_length=77"),
    ("dit_xl2_256", "model.lewei_scale=2.0"),
    ("dit_xl2_256", "model.class_dropout_prob=0.2"),  # zeroed for sampling
    ("pixart_xl2_256", "model.flexdit.ramp_start=0.5"),
    ("flexdit_xl2_256", "data.text_encoder=google/t5-v1_1-xxl"),
    ("at_edm_sdxl_1024", "data.vae_scale_factor=0.13025"),  # SD-XL decodes with its pipeline's own VAE factor
    ("at_edm_sdxl_1024", "data.text_encoder=google/t5-v1_1-xxl"),
])
def test_a_key_the_model_does_not_read_leaves_the_settings(preset, override):
    assert settings(preset, override) == settings(preset)


def test_pixart_tokenizer_defaults_to_its_text_encoder():
    encoder = config.load("pixart_xl2_256", []).data.text_encoder
    assert settings("pixart_xl2_256", f"data.tokenizer={encoder}") == settings("pixart_xl2_256")


@pytest.mark.parametrize("preset", ["flexdit_xl2_256", "pixart_xl2_256", "dit_xl2_256"])
def test_the_settings_a_manifest_keeps_resume_the_folder(tmp_path, preset):
    url = str(tmp_path / "samples")
    manifest = SamplesManifest(settings(preset), 2)
    manifest.add({"index": 0, "name": "shard-000000.tar", "count": 4})
    manifest.write(url)
    assert sorted(SamplesManifest.resume(url, settings(preset), 2).shards) == [0]  # FlexDiT's grid sizes: a list


def test_a_prompts_file_rewritten_in_place_is_other_settings(tmp_path):
    """The prompts decide the samples by their content: a folder sampled from one caption list refuses a rerun
    after the file at the same URL was rewritten with another (it would mix the two), naming sample.prompts."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    first = settings("pixart_xl2_256", f"sample.prompts={prompts}")
    assert first["prompts"] == {"url": str(prompts), "sha256": hashlib.sha256(prompts.read_bytes()).hexdigest()}
    url = str(tmp_path / "samples")
    manifest = SamplesManifest(first, 2)
    manifest.add({"index": 0, "name": "shard-000000.tar", "count": 4})
    manifest.write(url)
    prompts.write_text("a green cone\na blue sphere\n")
    second = settings("pixart_xl2_256", f"sample.prompts={prompts}")
    assert second["prompts"]["url"] == str(prompts) and second != first
    with pytest.raises(SamplesError, match=r"other settings \(prompts: .*sha256"):
        SamplesManifest.resume(url, second, 2)


def test_prompts_count_only_where_the_model_reads_them(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n")
    assert settings("dit_xl2_256", f"sample.prompts={prompts}") == settings("dit_xl2_256")  # class-conditional
    assert settings("at_edm_sdxl_1024", f"sample.prompts={prompts}")["prompts"]["url"] == str(prompts)
    with pytest.raises(FileNotFoundError, match=r"sample.prompts: no prompts file at .*missing.txt"):
        settings("pixart_xl2_256", f"sample.prompts={tmp_path / 'missing.txt'}")


def test_eb_cache_paper_correction_counts_by_its_factors():
    """`eps_scale: paper` multiplied eps by b(t) once and divides by it now: a folder of then (recorded by the
    name alone) is other settings; a `released` folder's settings are those they were (no factors key)."""
    paper = settings("eb_cache_dit_xl2_256_50", "sample.eb_cache.eps_scale=paper")
    assert paper["method_options"]["eps_scale_factors"][0] == [0.0, pytest.approx(1 / 0.96)]
    assert "eps_scale_factors" not in settings("eb_cache_dit_xl2_256_50")["method_options"]
    assert settings("eb_cache_dit_xl2_256_50")["method_options"] == {
        "schedule": "00000000000000000000002020202020202020202220220220", "eps_scale": "released"}


def test_a_folder_of_before_a_settings_key_resumes_as_it_was_made(tmp_path):
    """Samples folders written before `sample.labels` lack the key. DiT's classes were then k % num_classes:
    `balanced` resumes such a folder (its markers included) and `random` is refused saying it was balanced;
    for a family where the key is None now, the folder resumes as it is (it was refused with an empty
    reason, "other settings ()")."""
    from dydit_dist.shardset import settings_digest, write_marker

    def old_folder(name: str, settings: dict) -> str:
        url = f"{tmp_path}/{name}"
        written = {k: v for k, v in settings.items() if k != "labels"}
        write_marker(url, {"index": 0, "name": "shard-000000.tar", "count": 8, "sha256": "a" * 64,
                           "settings_sha256": settings_digest(written)})
        SamplesManifest(written, 4).write(url)
        return url

    balanced = sampling_settings(config.load("debug", ["sample.labels=balanced"]))
    url = old_folder("dit", balanced)
    manifest = SamplesManifest.resume(url, balanced, 4)
    assert manifest.settings == balanced and list(manifest.shards) == [0]
    manifest.write(url)  # as the sample job does at once: the marker keeps the digest of before
    assert list(SamplesManifest.resume(url, balanced, 4).shards) == [0]  # and resumes again
    random = {**balanced, "labels": "random"}
    with pytest.raises(SamplesError, match=r"other settings \(labels: 'balanced' there vs 'random' now\)"):
        SamplesManifest.resume(old_folder("dit-random", balanced), random, 4)
    with pytest.raises(SamplesError, match=r"other settings \(new_key: absent there vs 1 now\)"):  # no legacy meaning
        SamplesManifest.resume(old_folder("dit-new", balanced), {**balanced, "new_key": 1}, 4)
    unread = {**balanced, "labels": None}  # as PixArt's and SD-XL's settings hold it
    assert list(SamplesManifest.resume(old_folder("pixart", unread), unread, 4).shards) == [0]


def test_a_manifest_write_in_finally_leaves_the_first_error_in_charge(tmp_path, monkeypatch):
    """A full disk fails a shard, then the manifest written in the sampling / prepare `finally`: that second
    error was reported instead of the first, and the pool's shutdown after it was skipped."""
    import errno

    from dydit_dist import storage

    manifest = SamplesManifest({"labels": "random"}, 2)
    shut_down = []

    def full(url, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "write_json", full)
    with pytest.raises(SamplesError, match="the shard's own error"):
        try:
            raise SamplesError("the shard's own error")
        finally:
            manifest.write_in_finally(str(tmp_path))
            shut_down.append(True)
    assert shut_down == [True]
