"""The streaming reader: rank/worker split, determinism, exact resume, values, and shard errors."""

import threading

import numpy as np
import pytest
import torch

from dydit_dist import config, storage
from dydit_dist.data import DataError, LatentStream, ManifestError, verify_manifest
from dydit_dist.data.manifest import read_manifest
from dydit_dist.data.order import segment, shuffle_order
from dydit_dist.data.shards import sample_files
from dydit_dist.data.synthetic import random_dataset, write_dataset
from dydit_dist.shardset import ShardError, pack, shard_url, write_shard


def take(stream, n):
    return [batch for _, batch in zip(range(n), stream, strict=False)]


def indices(batches):
    return torch.cat([b["index"] for b in batches]).tolist()


@pytest.fixture
def pixels(tmp_path):
    """50 pixel-space samples (4x4x4) in uneven shards of 7: 2 samples left over per epoch on 4 consumers."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(50, 4, 4, 4)).astype(np.float16)
    uri = str(tmp_path / "pixels")
    write_dataset(uri, x, labels=np.arange(50) % 10, shard_size=7, num_classes=10)
    return uri, x


def test_order_is_a_partition():
    counts = np.array([7, 7, 3, 7, 0, 7, 5])
    seen = []
    for consumer in range(4):
        pieces = segment(counts, seed=3, epoch=1, consumer=consumer, num_consumers=4)
        assert sum(p.stop - p.start for p in pieces) == 36 // 4
        seen += [(p.shard, i) for p in pieces for i in range(p.start, p.stop)]
    assert len(set(seen)) == len(seen) == 36
    order = shuffle_order(9, buffer_size=4, seed=0, epoch=0, consumer=0)
    assert sorted(order.tolist()) == list(range(9)) and order.tolist() != list(range(9))


@pytest.mark.parametrize(("num_workers", "batch_size"), [(0, 5), (2, 4)])
def test_ranks_split_each_epoch_without_duplicates(pixels, num_workers, batch_size):
    uri, _ = pixels
    streams = [LatentStream(uri, batch_size=batch_size, rank=r, world_size=2, seed=1, num_workers=num_workers,
                            shuffle_buffer=5) for r in range(2)]
    workers = max(1, num_workers)
    assert streams[0].samples_per_epoch == streams[1].samples_per_epoch == 50 // (2 * workers) * workers
    steps_per_epoch = streams[0].samples_per_epoch // batch_size  # whole batches per worker epoch here
    batches = [take(s, 2 * steps_per_epoch) for s in streams]
    for epoch in range(2):
        window = slice(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        seen = indices(batches[0][window]) + indices(batches[1][window])
        assert len(seen) == len(set(seen)) == 2 * streams[0].samples_per_epoch  # 48 of 50, none twice
    assert all(len(b) == 2 * steps_per_epoch for b in batches) and streams[0].step == streams[1].step


def test_deterministic_and_resumes_exactly(pixels):
    uri, _ = pixels
    kwargs = dict(batch_size=3, rank=1, world_size=2, seed=7, num_workers=2, shuffle_buffer=6)
    full = take(LatentStream(uri, **kwargs), 14)
    assert indices(take(LatentStream(uri, **kwargs), 14)) == indices(full)
    assert indices(take(LatentStream(uri, **{**kwargs, "seed": 8}), 14)) != indices(full)
    resumed = take(LatentStream(uri, start_step=5, **kwargs), 9)
    for a, b in zip(full[5:], resumed, strict=True):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    first = LatentStream(uri, **kwargs)
    take(first, 9)
    state = first.state_dict()
    second = LatentStream(uri, **kwargs)
    second.load_state_dict(state)
    assert indices(take(second, 5)) == indices(full[9:])
    other = LatentStream(uri, **{**kwargs, "num_workers": 1})
    with pytest.raises(DataError, match=r"num_workers \(data.num_workers\): 2 -> 1"):
        other.load_state_dict(state)


def test_resume_refuses_another_shuffle_buffer_or_other_shards(pixels, tmp_path):
    """The saved positions only hold under the shuffle order and the shards they were saved with: a
    resume with another shuffle buffer, or over other shards of as many samples, is an input error
    (DataError: the job's exit 2, not retried) naming what changed, not a stream that silently repeats
    and skips samples. A checkpoint saved before the layout recorded them resumes as before."""
    uri, x = pixels
    kwargs = dict(batch_size=4, num_workers=2, seed=0, shuffle_buffer=8)
    full = take(LatentStream(uri, **kwargs), 12)
    first = LatentStream(uri, **kwargs)
    take(first, 6)
    state = first.state_dict()
    with pytest.raises(DataError, match=r"shuffle_buffer \(data.shuffle_buffer\): 8 -> 16\b.*"
                                        r"restore .*, or start a new storage.run"):
        LatentStream(uri, **{**kwargs, "shuffle_buffer": 16}).load_state_dict(state)
    other = str(tmp_path / "reshaped")
    write_dataset(other, x, labels=np.arange(50) % 10, shard_size=5, num_classes=10)  # 50 samples, other shards
    with pytest.raises(DataError, match=r"shards \(the shards at data.uri\): '[0-9a-f]{16}' -> '[0-9a-f]{16}'") as err:
        LatentStream(other, **kwargs).load_state_dict(state)
    assert "num_samples" not in str(err.value)
    # shards remade with the same settings (as a sha256 mismatch says to), their bytes not bit for bit the
    # same: the positions still hold; shards of other settings do not
    remade = str(tmp_path / "remade")
    write_dataset(remade, x + np.float16(1e-2), labels=np.arange(50) % 10, shard_size=7, num_classes=10)
    again = LatentStream(remade, **kwargs)
    again.load_state_dict(state)
    assert indices(take(again, 6)) == indices(full[6:])
    relabelled = str(tmp_path / "relabelled")
    write_dataset(relabelled, x, labels=np.arange(50) % 10, shard_size=7, num_classes=12)
    with pytest.raises(DataError, match=r"shards \(the shards at data.uri\)"):
        LatentStream(relabelled, **kwargs).load_state_dict(state)
    old = {**state, "layout": {k: v for k, v in state["layout"].items() if k not in ("shuffle_buffer", "shards")}}
    resumed = LatentStream(uri, **kwargs)
    resumed.load_state_dict(old)
    assert indices(take(resumed, 6)) == indices(full[6:])


def test_values_pixels_unchanged_and_latents_scaled_once(pixels, tmp_path):
    uri, x = pixels
    batch = take(LatentStream(uri, batch_size=8, num_workers=0), 1)[0]
    assert batch["x"].shape == (8, 4, 4, 4) and batch["x"].dtype == torch.float32
    assert torch.equal(batch["x"], torch.from_numpy(x[batch["index"].numpy()].astype(np.float32)))
    assert torch.equal(batch["y"], batch["index"] % 10)

    mean = np.random.default_rng(1).standard_normal((12, 4, 2, 2)).astype(np.float32)
    stored = np.stack([mean, np.zeros_like(mean)], axis=1)  # std 0: a sample is the mean
    latent_uri = str(tmp_path / "meanstd")
    write_dataset(latent_uri, stored, labels=np.zeros(12, int), latent_storage="mean_std", vae="v", scale_factor=0.5)
    batch = take(LatentStream(latent_uri, batch_size=4, num_workers=0), 1)[0]
    assert torch.equal(batch["x"], torch.from_numpy(mean[batch["index"].numpy()] * 0.5))


def test_mean_std_sampling_and_flip_are_per_sample(tmp_path):
    rng = np.random.default_rng(2)
    stored = np.stack([rng.standard_normal((16, 4, 2, 2)), np.ones((16, 4, 2, 2))], axis=1).astype(np.float32)
    uri = str(tmp_path / "flip")
    write_dataset(uri, stored, labels=np.zeros(16, int), latent_flips=stored + 100, latent_storage="mean_std",
                  vae="v", scale_factor=1.0)
    x = torch.cat([b["x"] for b in take(LatentStream(uri, batch_size=4, num_workers=0), 8)])
    flipped = x.mean(dim=(1, 2, 3)) > 50
    assert 0 < flipped.sum() < len(x)  # some flipped, some not
    assert len({tuple(row.flatten().tolist()) for row in x}) == len(x)  # fresh noise for every sample


def test_caption_batches(tmp_path):
    cfg = config.load("pixart_xl2_256", ["model.name=PixArt-debug", "model.caption_channels=8",
                                         "model.model_max_length=6", "model.image_size=32"])
    uri = str(tmp_path / "captions")
    random_dataset(uri, cfg, num_samples=10, shard_size=4)
    verify_manifest(uri, cfg.model, cfg.data)
    batch = take(LatentStream(uri, batch_size=5, num_workers=0), 1)[0]
    assert batch["x"].shape == (5, 4, 4, 4) and batch["t5"].shape == (5, 1, 6, 8)
    assert batch["t5"].dtype == torch.float16  # as stored: half the bytes through the workers (the step casts)
    assert batch["t5_mask"].shape == (5, 6) and batch["t5_mask"].dtype == torch.int64
    lengths = batch["t5_mask"].sum(1)
    for row, n in zip(batch["t5"][:, 0], lengths.tolist(), strict=True):
        assert row[n:].abs().sum() == 0 and row[:n].abs().sum() > 0  # zero padding after the real tokens
    # Features of captions encoded before they were cleaned as PixArt cleans them are refused by name
    manifest = read_manifest(uri)
    del manifest.settings["caption_preprocessing"]
    manifest.write(uri)
    with pytest.raises(ManifestError, match=r"captions encoded with preprocessing None, not PixArt's "
                                            r"'pixart-clean-caption-x2' \(prepared before the captions were cleaned"):
        verify_manifest(uri, cfg.model, cfg.data)


def _corrupt(uri, index):
    url = shard_url(uri, index)
    data = bytearray(storage.read_bytes(url))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(url, bytes(data))
    return url


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_shard_raises_naming_it(pixels, num_workers):
    uri, _ = pixels
    url = _corrupt(uri, 3)
    with pytest.raises(ShardError, match=f"corrupt shard {url}: .* sha256 .*; remove that object and rerun the job "
                                         r"that wrote it \(prepare, or sample\) with the same config"):
        take(LatentStream(uri, batch_size=4, num_workers=num_workers), 30)


def test_missing_shard_raises_naming_it(pixels):
    uri, _ = pixels
    storage.remove(shard_url(uri, 2))
    with pytest.raises(ShardError, match=f"missing shard {shard_url(uri, 2)}"):
        take(LatentStream(uri, batch_size=4, num_workers=0), 30)


def test_a_missing_shard_is_skipped_too(pixels):
    uri, _ = pixels
    storage.remove(shard_url(uri, 2))  # samples 14..20
    stream = LatentStream(uri, batch_size=4, num_workers=0, on_error="skip", seed=0, max_bad_fraction=0.2)
    batches = take(stream, 10)
    assert not set(range(14, 21)) & set(indices(batches)) and stream.metrics()["data/skipped_samples"] > 0


def test_skipping_a_shard_over_max_bad_fraction_of_the_data_raises_naming_it(pixels):
    """7 of 50 samples (14%) gone: the 6th skipped is over data.max_bad_fraction=0.1 of the data set, a
    systematic cause."""
    uri, _ = pixels
    storage.remove(shard_url(uri, 2))
    with pytest.raises(ShardError, match=r"data.on_error=skip: reader 0 of 1 .* 6 of its 50 samples of epoch 0 "
                                         r"skipped, over data.max_bad_fraction=0.1 of the 50 samples of the data set; "
                                         f"last shards skipped: {shard_url(uri, 2)} "):
        take(LatentStream(uri, batch_size=4, num_workers=0, on_error="skip", max_bad_fraction=0.1), 30)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_stops_when_every_shard_is_gone(pixels, num_workers):
    """The data prefix deleted after the stream was built: on_error=skip raises within the first epoch
    (it used to skip forever, yielding nothing), naming the last shards it skipped, also when
    max_bad_fraction=1 accepts any share."""
    uri, _ = pixels
    stream = LatentStream(uri, batch_size=4, world_size=2, num_workers=num_workers, on_error="skip",
                          max_bad_fraction=1.0)
    for index in range(8):
        storage.remove(shard_url(uri, index))
    result = {}

    def first_batch():
        try:
            result["batch"] = next(iter(stream))
        except Exception as err:  # noqa: BLE001 - the test looks at it
            result["error"] = err

    reader = threading.Thread(target=first_batch, daemon=True)
    reader.start()
    reader.join(30)
    assert not reader.is_alive(), "on_error=skip still skipping after 30 s"
    error = result.get("error")
    assert isinstance(error, ShardError), result
    assert "a whole epoch of its" in str(error) and "last shards skipped: " in str(error)
    assert "missing shard" in str(error) and shard_url(uri, 0).rsplit("/", 1)[0] in str(error)


def test_skip_counts_and_resumes(pixels):
    uri, _ = pixels
    _corrupt(uri, 3)
    bad = set(range(21, 28))  # shard 3 holds samples 21..27
    kwargs = dict(batch_size=4, num_workers=2, on_error="skip", seed=0, shuffle_buffer=8, max_bad_fraction=0.2)
    stream = LatentStream(uri, **kwargs)
    batches = take(stream, 24)  # two epochs of 48 (the corrupt shard is met in each)
    assert not bad & set(indices(batches)) and all(len(b["x"]) == 4 for b in batches)
    metrics = stream.metrics()
    # every position the workers passed is a sample yielded or a sample skipped, and counted once
    assert 4 * 24 + metrics["data/skipped_samples"] == sum(stream.positions)
    assert metrics["data/skipped_shards"] >= 2 and metrics["data/skipped_samples"] >= 7  # met in each epoch
    for step in (3, 6, 10, 17):  # a resume yields and counts what the stream that was not stopped did
        first = LatentStream(uri, **kwargs)
        take(first, step)
        again = LatentStream(uri, **kwargs)
        again.load_state_dict(first.state_dict())
        assert indices(take(again, 24 - step)) == indices(batches[step:])
        counters = {k: v for k, v in again.metrics().items() if k.startswith("data/skipped")}
        assert counters == {k: v for k, v in metrics.items() if k.startswith("data/skipped")}, step


def _rewrite_shard(uri, index, samples):
    """Shard `index` rewritten with `samples` and recorded in the manifest (size and sha256 match: what the
    reader meets is well-formed bytes of the wrong content)."""
    manifest = read_manifest(uri)
    manifest.add({**write_shard(uri, index, pack(samples), len(samples), replace=True), "bad": [], "inputs": len(samples)})
    manifest.write(uri)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_sample_of_another_shape_dtype_or_label_is_a_shard_error_naming_it(pixels, num_workers):
    uri, x = pixels
    good = [sample_files(f"{i:09d}", x[i], label=i % 10) for i in range(14, 21)]  # shard 2
    wrong = {
        "000000015": (sample_files("000000015", np.zeros((4, 3, 3), np.float16), label=5),
                      r"latent float16 \[4, 3, 3\], the manifest says float16 \[4, 4, 4\]"),
        "000000016": (sample_files("000000016", x[16].astype(np.float64), label=6),
                      r"latent float64 \[4, 4, 4\], the manifest says float16"),
        "000000017": (sample_files("000000017", x[17]), r"no class label \(\.cls\)"),
        "000000018": (sample_files("000000018", x[18], label=10), r"class 10 outside \[0, 10\)"),
    }
    url = shard_url(uri, 2)
    for key, (sample, message) in wrong.items():
        _rewrite_shard(uri, 2, [sample if s["__key__"].decode() == key else s for s in good])
        with pytest.raises(ShardError, match=f"corrupt shard {url}: sample '{key}': {message}"):
            take(LatentStream(uri, batch_size=4, num_workers=num_workers), 30)
    # a ShardError like any other: data.on_error=skip passes over that shard
    batches = take(LatentStream(uri, batch_size=4, num_workers=num_workers, on_error="skip", max_bad_fraction=0.2), 12)
    assert not set(range(14, 21)) & set(indices(batches))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_non_finite_sample_is_a_shard_error_naming_it(pixels, num_workers):
    """A NaN or inf (e.g. a float16 overflow) in a latent would make every weight NaN under ZeRO-0: the
    reader refuses it by shard and key, and on_error=skip passes over its shard."""
    uri, x = pixels
    good = [sample_files(f"{i:09d}", x[i], label=i % 10) for i in range(14, 21)]  # shard 2
    for value in (np.nan, np.inf):
        latent = x[16].copy()
        latent[1, 2, 3] = value
        _rewrite_shard(uri, 2, [sample_files("000000016", latent, label=6) if s["__key__"] == b"000000016" else s
                                for s in good])
        with pytest.raises(ShardError, match=f"corrupt shard {shard_url(uri, 2)}: sample '000000016': latent holding "
                                             "NaN or inf, expected finite values"):
            take(LatentStream(uri, batch_size=4, num_workers=num_workers), 30)
    batches = take(LatentStream(uri, batch_size=4, num_workers=num_workers, on_error="skip", max_bad_fraction=0.2), 12)
    assert not set(range(14, 21)) & set(indices(batches))
    assert all(torch.isfinite(b["x"]).all() for b in batches)


def test_a_non_finite_flipped_latent_or_t5_feature_is_a_shard_error(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4, 2, 2)).astype(np.float16)
    uri = str(tmp_path / "flip")
    write_dataset(uri, x, labels=np.arange(8), latent_flips=x[..., ::-1], shard_size=4, num_classes=8)
    flip = x[5, ..., ::-1].copy()
    flip[0, 0, 0] = np.inf
    _rewrite_shard(uri, 1, [sample_files(f"{i:09d}", x[i], label=i, latent_flip=flip if i == 5 else x[i, ..., ::-1])
                            for i in range(4, 8)])
    with pytest.raises(ShardError, match=f"corrupt shard {shard_url(uri, 1)}: sample '000000005': latent_flip holding "
                                         "NaN or inf"):
        take(LatentStream(uri, batch_size=2, num_workers=0), 4)

    masks = np.ones((2, 3), np.uint8)
    t5 = [rng.standard_normal((3, 8)).astype(np.float16) for _ in range(2)]
    uri = str(tmp_path / "captions")
    write_dataset(uri, x[:2], t5=t5, t5_masks=masks, shard_size=2, text_encoder="t5")
    t5[1][2, 7] = np.nan
    _rewrite_shard(uri, 0, [sample_files(f"{i:09d}", x[i], t5=t5[i], t5_mask=masks[i]) for i in range(2)])
    with pytest.raises(ShardError, match=r"sample '000000001': t5 holding NaN or inf, expected finite values"):
        take(LatentStream(uri, batch_size=2, num_workers=0), 1)


def test_a_sample_without_its_flipped_latent_or_t5_features_is_a_shard_error(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4, 2, 2)).astype(np.float16)
    uri = str(tmp_path / "flip")
    write_dataset(uri, x, labels=np.arange(8), latent_flips=x[..., ::-1], shard_size=4, num_classes=8)
    _rewrite_shard(uri, 1, [sample_files(f"{i:09d}", x[i], label=i) for i in range(4, 8)])  # no latent_flip
    with pytest.raises(ShardError, match=f"corrupt shard {shard_url(uri, 1)}: sample '000000004': no latent_flip.npy"):
        take(LatentStream(uri, batch_size=2, num_workers=0), 4)

    lengths = np.array([3, 5, 2, 4])
    masks = (np.arange(6)[None] < lengths[:, None]).astype(np.uint8)
    t5 = [rng.standard_normal((k, 8)).astype(np.float16) for k in lengths]
    uri = str(tmp_path / "captions")
    write_dataset(uri, x[:4], t5=t5, t5_masks=masks, shard_size=2, text_encoder="t5")
    _rewrite_shard(uri, 0, [sample_files("000000000", x[0], t5=t5[1], t5_mask=masks[0]),
                            sample_files("000000001", x[1], t5=t5[1], t5_mask=masks[1])])
    with pytest.raises(ShardError, match=r"sample '000000000': T5 features of shape \[5, 8\], expected \[3, 8\]"):
        take(LatentStream(uri, batch_size=2, num_workers=0), 2)


def test_verify_manifest_names_the_mismatch(tmp_path):
    cfg = config.load("debug")
    uri = str(tmp_path / "debug")
    random_dataset(uri, cfg, num_samples=8)
    verify_manifest(uri, cfg.model, cfg.data)
    bigger = config.load("debug", ["model.image_size=32"])
    with pytest.raises(ManifestError, match=r"latent shape \[4, 16, 16\] != \[4, 32, 32\].*image_size=32"):
        verify_manifest(uri, bigger.model, bigger.data)
    latent = config.load("dit_xl2_256")
    with pytest.raises(ManifestError, match=r"VAE 'none' != data.vae='stabilityai/sd-vae-ft-ema'.*1000"):
        verify_manifest(uri, latent.model, latent.data)
    manifest = read_manifest(uri)
    manifest.complete = False
    manifest.write(uri)
    with pytest.raises(ManifestError, match="incomplete"):
        LatentStream(uri, batch_size=2)
    with pytest.raises(ManifestError, match=f"{tmp_path}/nothing/manifest.json not found"):
        verify_manifest(str(tmp_path / "nothing"), cfg.model, cfg.data)


def test_too_few_samples_for_the_layout(pixels):
    uri, _ = pixels
    with pytest.raises(ValueError, match="50 samples, fewer than ranks x workers = 64"):
        LatentStream(uri, batch_size=2, world_size=32, num_workers=2)


def test_a_manifest_that_cannot_be_read_is_an_error_naming_it(pixels):
    uri, _ = pixels
    url = f"{uri}/manifest.json"
    good = storage.read_bytes(url)
    cases = {good[: len(good) // 2]: "not JSON", b"[1, 2]": r"is not a dydit_dist.latents/1 manifest \(format: 'a JSON list'\)",
             good.replace(b'"complete"', b'"finished"'): r"cannot be read \(KeyError: 'complete'\)",
             good.replace(b'"index"', b'"idx"'): r"cannot be read \(ValueError: shard record 0: its 'index' is None"}
    for content, message in cases.items():
        storage.write_bytes(url, content)
        with pytest.raises(ManifestError, match=f"{url}.*{message}"):
            LatentStream(uri, batch_size=4)


@pytest.mark.parametrize(("prepared", "wanted"), [(False, True), (True, False)])
def test_verify_manifest_refuses_another_flip(tmp_path, prepared, wanted):
    """The reader flips as the data were prepared: a config asking for the other augmentation is refused,
    naming both values and the two ways out, and the data prepared as it asks passes."""
    uri = str(tmp_path / "data")
    random_dataset(uri, config.load("debug", [f"data.flip={str(prepared).lower()}"]), num_samples=8)
    cfg = config.load("debug", [f"data.flip={str(wanted).lower()}"])
    p, w = str(prepared).lower(), str(wanted).lower()
    with pytest.raises(ManifestError, match=rf"does not match the model config: prepared with flip={p} != "
                                            rf"data.flip={w} \(prepare again with data.flip={w} into another "
                                            rf"data.uri, or set data.flip={p}\)"):
        verify_manifest(uri, cfg.model, cfg.data)
    random_dataset(str(tmp_path / "again"), cfg, num_samples=8)
    verify_manifest(str(tmp_path / "again"), cfg.model, cfg.data)
    assert read_manifest(str(tmp_path / "again")).settings["flip"] is wanted
    assert len(take(LatentStream(str(tmp_path / "again"), batch_size=4, num_workers=0), 3)) == 3
