"""Shard format, source listing, ADM center crop, and the VAE / T5 / pixel encoders (no Ray)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dydit_dist import config
from dydit_dist.data import DataError, pipeline, sources
from dydit_dist.data.encoders import ImageEncoder, TextEncoder
from dydit_dist.data.shards import decode_sample, sample_files
from dydit_dist.shardset import ShardError, pack, unpack


def test_shard_round_trip_is_deterministic_and_webdataset_readable(tmp_path):
    import webdataset as wds

    samples = [sample_files(f"{i:09d}", np.full((2, 4, 2, 2), i, np.float16), label=i, meta={"source": f"s{i}"})
               for i in range(3)]
    data = pack(samples)
    assert pack(samples) == data
    back = [decode_sample(files, "x.tar") for files in unpack(data, "x.tar")]
    assert [s.label for s in back] == [0, 1, 2] and back[2].latent.shape == (2, 4, 2, 2)
    assert back[1].latent.dtype == np.float16 and float(back[1].latent.max()) == 1.0
    (tmp_path / "s.tar").write_bytes(data)
    keys = [(s["__key__"], s["cls"]) for s in wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False)]
    assert keys == [("000000000", b"0"), ("000000001", b"1"), ("000000002", b"2")]
    with pytest.raises(ShardError, match="corrupt shard bad.tar"):
        unpack(data[:700], "bad.tar")


def _adm_center_crop_reference(image: Image.Image, size: int) -> np.ndarray:
    """ADM's center crop (guided-diffusion `center_crop_arr`), written here from its definition so the
    project's function is checked against an independent version: (1) halve with BOX resampling while
    the shorter side is at least twice `size`; (2) one BICUBIC resize taking the shorter side to `size`
    (each side scaled by the same factor, rounded); (3) cut the central size x size window, offsets
    rounded down."""
    width, height = image.size
    while min(width, height) >= 2 * size:
        width, height = width // 2, height // 2
        image = image.resize((width, height), Image.BOX)
    factor = size / min(width, height)
    width, height = round(width * factor), round(height * factor)
    image = image.resize((width, height), Image.BICUBIC)
    top, left = (height - size) // 2, (width - size) // 2
    return np.asarray(image)[top : top + size, left : left + size]


def test_center_crop_matches_adm():
    # A 96x64 image with a bright column in the middle: box-halved to 48x32, 24x16, bicubic at 1, cropped.
    arr = np.zeros((64, 96, 3), np.uint8)
    arr[:, 44:52] = 255
    out = np.asarray(sources.center_crop_arr(Image.fromarray(arr), 16))
    assert out.shape == (16, 16, 3)
    assert out[:, 8].mean() > 200 and out[:, 0].mean() < 10  # the column stays centred
    # Random images of odd sizes, bit for bit against the reference: three halvings then a bicubic
    # downscale (157x203 -> 78x101 -> 39x50 -> 19x25 -> 16x21 for 16), a shorter side of exactly 2 * size
    # (halved, not resized), a bicubic downscale alone, upscaling of images smaller than the crop (7x11,
    # 13x5, 6x13 -> 16x34.67 rounded up to 35, 6x7 -> 9x10.5 rounded half to even to 10), either side the
    # shorter one, and centre offsets that round down.
    rng = np.random.default_rng(0)
    cases = [((157, 203), 16), ((203, 157), 16), ((64, 99), 32), ((45, 33), 16), ((31, 47), 16),
             ((7, 11), 16), ((13, 5), 9), ((6, 13), 16), ((6, 7), 9), ((33, 33), 16), ((17, 40), 17)]
    for (h, w), size in cases:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        got = np.asarray(sources.center_crop_arr(Image.fromarray(arr), size))
        want = _adm_center_crop_reference(Image.fromarray(arr), size)
        assert want.shape == (size, size, 3)
        assert np.array_equal(got, want), f"{h}x{w} -> {size}: differs from ADM's center crop"


def test_pixart_data_is_cropped_as_pixart_crops_it():
    """PixArt-alpha's transforms: Resize(n) (bilinear, shorter side) then CenterCrop(n); DiT keeps ADM's."""
    import torchvision.transforms as T

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (53, 70, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    official = np.asarray(T.Compose([T.Resize(16), T.CenterCrop(16)])(image))
    assert np.array_equal(sources.load_image(buf.getvalue(), 16, crop="resize-center"), official)
    adm = sources.load_image(buf.getvalue(), 16)
    assert adm.shape == official.shape and not np.array_equal(adm, official)


def test_imagefolder_plan_and_layout_errors(image_source, tmp_path):
    plan = sources.plan_imagefolder(image_source["folder"], num_classes=3, shard_size=8)
    assert plan.num_inputs == 50 and len(plan.chunks) == 7 and plan.classes == ("class_0", "class_1", "class_2")
    labels = [item.label for chunk in plan.chunks for item in chunk.items]
    assert labels != sorted(labels) and set(labels) == {0, 1, 2}  # a seeded permutation, not class order
    with pytest.raises(DataError, match="3 class folders but model.num_classes=10"):
        sources.plan_imagefolder(image_source["folder"], num_classes=10, shard_size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        sources.plan_imagefolder(str(tmp_path / "empty"), num_classes=1, shard_size=8)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        sources.plan_imagefolder(str(tmp_path / "empty"), num_classes=1, shard_size=8)
    Image.new("RGB", (8, 8)).save(tmp_path / "empty" / "stray.png")
    with pytest.raises(DataError, match="images outside class folders"):
        sources.plan_imagefolder(str(tmp_path / "empty"), num_classes=1, shard_size=8)


def test_imagefolder_lists_class_folders_in_parallel_in_label_order(tmp_path, monkeypatch):
    """60 class folders listed 16 at a time: each image keeps its folder's label (sorted folder names) and
    the plan is the one a listing in order gives; a wrong folder count is refused before any listing."""
    for k in range(60):
        (tmp_path / f"c{k:02d}").mkdir()
        for i in range(k % 3 + 1):
            Image.new("RGB", (8, 8), (k, i, 0)).save(tmp_path / f"c{k:02d}" / f"{i}.png")
    plan = sources.plan_imagefolder(str(tmp_path), num_classes=60, shard_size=8, seed=3)
    got = sorted((item.key, item.url, item.label) for chunk in plan.chunks for item in chunk.items)
    want, key = [], 0
    for k in range(60):
        for i in range(k % 3 + 1):
            want.append((f"{key:09d}", f"file://{tmp_path}/c{k:02d}/{i}.png", k))
            key += 1
    assert got == want
    listed = []
    monkeypatch.setattr(sources.storage, "find", lambda url: listed.append(url) or [])
    with pytest.raises(DataError, match="60 class folders but model.num_classes=1000"):
        sources.plan_imagefolder(str(tmp_path), num_classes=1000, shard_size=8)
    assert listed == []


def test_captions_and_webdataset_plans(image_source, tmp_path):
    plan = sources.plan_captions(image_source["captions"], shard_size=16)
    assert plan.num_inputs == 49 and plan.chunks[0].items[0].caption
    assert plan.chunks[0].items[0].url.startswith(image_source["folder"])
    (tmp_path / "bad.csv").write_text("file,words\nx.png,hello\n")
    with pytest.raises(DataError, match=r"line 2: needs one of the columns \['path', 'image', 'file_name'\]"):
        sources.plan_captions(str(tmp_path / "bad.csv"), shard_size=4)
    for i in range(3):
        (tmp_path / f"in-{i:03d}.tar").write_bytes(pack([]))
    assert sources.plan_webdataset(str(tmp_path / "in-{000..002}.tar")).num_inputs == 3
    assert sources.plan_webdataset(str(tmp_path / "in-*.tar")).num_inputs == 3
    with pytest.raises(DataError, match="matches no .tar files"):
        sources.plan_webdataset(str(tmp_path / "nothing-{0..3}.tar"))
    # one tar of a pattern not uploaded yet: refused, not prepared without its samples
    with pytest.raises(DataError, match=rf"in-{{000..003}}.tar: 1 of the tars it names do not exist: {tmp_path}/in-003"):
        sources.plan_webdataset(str(tmp_path / "in-{000..003}.tar"))


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", '{"path": "a.png", "caption": "a"}\n{"path": "b.png", caption: "b"}\n',
     r"bad.jsonl line 2: not a JSON object \(Expecting property name"),
    ("list.jsonl", '{"path": "a.png", "caption": "a"}\n\n["b.png", "b"]\n',
     r"list.jsonl line 3: expected an object with an image and a caption, got list"),
    ("latin.csv", None, r"latin.csv is not UTF-8 text"),
    ("web.csv", "path,caption\nhttps://example.com/a.png,a\n", r"web.csv line 2: .*unsupported storage protocol 'https'"),
])
def test_a_malformed_captions_file_is_an_error_naming_its_line(tmp_path, name, text, message):
    path = tmp_path / name
    if text is None:
        path.write_bytes("path,caption\na.png,caf\xe9\n".encode("latin-1"))
    else:
        path.write_text(text)
    with pytest.raises(DataError, match=message):
        sources.plan_captions(str(path), shard_size=4)


def test_an_input_denied_to_this_job_is_skipped_and_listed(tmp_path, monkeypatch):
    """Access denied to one object is that input's problem (skipped, listed with the reason); any other
    storage failure stops the job, whose rerun goes on from the shards written."""
    from dydit_dist import storage

    items = (sources.Item("0", "s3://b/ok.png"), sources.Item("1", "s3://b/denied.png"), sources.Item("2", "s3://b/x.png"))
    failures = {"s3://b/denied.png": PermissionError("Access Denied")}

    def read_bytes(url):
        if url in failures:
            raise storage.StorageError(f"reading {url} failed: {failures[url]}") from failures[url]
        return b"image"

    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    out = [(item.url, data, error) for item, data, error in sources.iter_chunk(sources.Chunk(0, items=items), "class")]
    assert out[0] == ("s3://b/ok.png", b"image", None) and out[2] == ("s3://b/x.png", b"image", None)
    assert out[1][:2] == ("s3://b/denied.png", None) and "Access Denied" in out[1][2]
    failures["s3://b/x.png"] = TimeoutError("no answer")  # the store failing: not an input's fault
    with pytest.raises(storage.StorageError, match="x.png"):
        list(sources.iter_chunk(sources.Chunk(0, items=items), "class"))


def test_webdataset_members_are_read_as_webdataset_reads_them(tmp_path):
    """Extensions in any case (ImageNet's `.JPEG`), a caption that is empty or null (img2dataset writes both
    for a sample without one) is an unusable input, not the prompt "none", and a `json` that is no object
    is listed, not a crash of the encoder task."""
    samples = [{"__key__": b"a", "JPEG": b"jpeg-bytes", "TXT": b"a red bus"},
               {"__key__": b"b", "jpg": b"x", "txt": b"", "json": b'{"caption": null}'},
               {"__key__": b"c", "jpg": b"x", "json": b'["not", "an", "object"]'},
               {"__key__": b"d", "jpg": b"x", "json": b'{"caption": "  "}'},
               {"__key__": b"e", "webp": b"x", "json": b'{"caption": "from json"}'}]
    (tmp_path / "in.tar").write_bytes(pack(samples))
    chunk = sources.plan_webdataset(str(tmp_path / "in.tar")).chunks[0]
    out = [(item.key, item.caption, data, error) for item, data, error in sources.iter_chunk(chunk, "caption")]
    assert out[0] == ("in-000000", "a red bus", b"jpeg-bytes", None)
    assert out[4] == ("in-000004", "from json", b"x", None)
    assert "no caption (got None)" in out[1][3] and "no caption (got '  ')" in out[3][3]
    assert "no caption (TypeError" in out[2][3]


def test_tars_of_one_name_in_two_folders_give_distinct_keys(tmp_path):
    """The keys seed each stored posterior sample's noise: equal keys would give equal noise."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train-000.tar").write_bytes(pack([{"__key__": b"k", "jpg": b"x", "cls": b"0"}]))
    chunks = sources.plan_webdataset(str(tmp_path / "*/train-000.tar")).chunks
    keys = [item.key for chunk in chunks for item, _, _ in sources.iter_chunk(chunk, "class")]
    assert keys == ["000000_train-000-000000", "000001_train-000-000000"]
    assert [c.prefix for c in sources.plan_webdataset(str(tmp_path / "a/train-000.tar")).chunks] == ["train-000"]


def test_a_captions_csv_with_a_byte_order_mark_and_relative_paths(tmp_path, monkeypatch):
    """Excel writes a BOM before the header; relative paths are resolved against the file's folder into
    absolute URLs (the encoder tasks run in other working directories)."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "c.csv").write_text("\ufeffpath,caption\na.png,a cat\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    item = sources.plan_captions("d/c.csv", shard_size=4).chunks[0].items[0]
    assert (item.url, item.caption) == (f"{tmp_path}/d/a.png", "a cat")


def test_plan_rejects_configs_that_do_not_fit(image_source, tiny_vae):
    base = [f"data.source={image_source['folder']}", "model.num_classes=3", "model.image_size=32"]
    with pytest.raises(DataError, match="data.vae=none stores pixels: model.vae_downsample must be 1"):
        pipeline.plan(config.load("debug", [*base, "model.vae_downsample=8"]))
    with pytest.raises(DataError, match="downsamples by 8, model.vae_downsample=4"):
        pipeline.plan(config.load("debug", [*base, f"data.vae={tiny_vae}", "model.vae_downsample=4"]))
    with pytest.raises(DataError, match="scaling_factor 0.18215 != data.vae_scale_factor=0.13025"):
        pipeline.plan(config.load("debug", [*base, f"data.vae={tiny_vae}", "model.vae_downsample=8",
                                            "data.vae_scale_factor=0.13025"]))
    with pytest.raises(DataError, match="needs captions"):
        pipeline.plan(config.load("pixart_xl2_256", [f"data.source={image_source['folder']}",
                                                     "data.source_format=imagefolder"]))
    with pytest.raises(config.ConfigError, match="divisible by model.vae_downsample x patch size"):
        config.load("debug", [*base, f"data.vae={tiny_vae}", "model.vae_downsample=8", "model.image_size=40"])
    settings, plan = pipeline.plan(config.load("debug", [*base, f"data.vae={tiny_vae}", "model.vae_downsample=8"]))
    assert settings["latent_shape"] == [4, 4, 4] and settings["stored_shape"] == [2, 4, 4, 4]


def test_pixel_encoder():
    images = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    out = ImageEncoder("none", channels=3, storage="mean_std")(images, [0, 1])
    assert out.shape == (2, 3, 8, 8) and out.dtype == np.float16
    np.testing.assert_allclose(out, images.transpose(0, 3, 1, 2) / 127.5 - 1, atol=1e-3)
    with pytest.raises(ValueError, match="in_channels in"):
        ImageEncoder("none", channels=2, storage="sample")


def test_vae_encoder_stores_unscaled_posterior(tiny_vae):
    from diffusers import AutoencoderKL

    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    mean_std = ImageEncoder(tiny_vae, 4, "mean_std", dtype="float32", device="cpu")(images, [5, 6])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        dist = AutoencoderKL.from_pretrained(tiny_vae).encode(x).latent_dist
    assert mean_std.shape == (2, 2, 4, 4, 4)
    np.testing.assert_allclose(mean_std[:, 0], dist.mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean_std[:, 1], dist.std.numpy(), rtol=1e-5, atol=1e-6)
    sampler = ImageEncoder(tiny_vae, 4, "sample", dtype="float32", seed=3, device="cpu")
    a, b = sampler(images, [5, 6]), sampler(images[::-1].copy(), [6, 5])
    np.testing.assert_allclose(a, b[::-1], rtol=1e-5, atol=1e-6)  # noise follows the sample, not the batch
    assert not np.allclose(a, mean_std[:, 0])


def test_text_encoder_masks_and_truncates(tiny_t5):
    encoder = TextEncoder(tiny_t5, None, max_length=6, device="cpu")
    features, mask = encoder(["a red square", "a big blue circle on the noisy background"])
    assert mask.shape == (2, 6) and mask.dtype == np.uint8
    assert mask.sum(1).tolist() == [4, 6]  # 3 words + </s>; the long one truncated to 6
    assert [f.shape for f in features] == [(4, 32), (6, 32)] and features[0].dtype == np.float16


def test_captions_are_cleaned_as_pixart_cleans_them(tiny_t5):
    """The official T5Embedder lowercases and cleans every caption (twice) before its case-sensitive
    tokenizer, in training and at inference; features of "A Red SQUARE" are those of "a red square"."""
    from dydit_dist.data.encoders import clean_captions

    assert clean_captions(["A Red SQUARE", "  Two <b>cats</b> &amp; a dog  ", "see www.example.com now"]) == [
        "a red square", "two cats a dog", "see now"]
    encoder = TextEncoder(tiny_t5, None, max_length=6, device="cpu")
    raw, _ = encoder(["A Red SQUARE"])
    clean, _ = encoder(["a red square"])
    assert np.array_equal(raw[0], clean[0])
    assert encoder.tokenizer("A Red SQUARE").input_ids != encoder.tokenizer("a red square").input_ids  # case matters


def test_load_image_modes():
    buf = io.BytesIO()
    Image.new("RGB", (40, 36), (255, 0, 0)).save(buf, format="PNG")
    assert sources.load_image(buf.getvalue(), 16, "RGB").shape == (16, 16, 3)
    assert sources.load_image(buf.getvalue(), 16, "L").shape == (16, 16, 1)
    assert sources.load_image(buf.getvalue(), 16, "RGBA")[0, 0].tolist() == [255, 0, 0, 255]


def test_unpack_reads_any_tar_and_npy_layout():
    import tarfile

    from dydit_dist.data.shards import load_npy, npy_bytes

    buf = io.BytesIO()
    long_key = "k" * 120  # needs a GNU long-name or pax header: tarfile reads it, not the ustar fast path
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ext, data in (("cls", b"3"), ("txt", b"caption")):
            info = tarfile.TarInfo(f"dir/{long_key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (sample,) = unpack(buf.getvalue(), "pax.tar")
    assert sample == {"__key__": f"dir/{long_key}".encode(), "cls": b"3", "txt": b"caption"}
    fortran = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    stored = io.BytesIO()
    np.save(stored, fortran)
    assert b"'fortran_order': True" in stored.getvalue()
    assert np.array_equal(load_npy(stored.getvalue()), fortran)
    assert np.array_equal(load_npy(stored.getvalue()), fortran)  # second time from the header cache
    with pytest.raises(ValueError, match="npy payload"):
        load_npy(npy_bytes(fortran)[:-4])


@pytest.mark.parametrize("tar_format", ["pax", "gnu"])
def test_a_truncated_tar_with_long_names_is_an_error_naming_it(tmp_path, tar_format):
    """Member names over 100 characters take tarfile's path, which stops quietly where a truncated archive
    ends: unpack requires its end-of-archive block, as the ustar path does, so that the prepare job
    (`sources.iter_chunk`) stops on a cut input tar instead of encoding only the samples before the cut."""
    import tarfile

    buf = io.BytesIO()
    form = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT}[tar_format]
    ends = []  # where each sample's last member ends, at a block boundary
    with tarfile.open(fileobj=buf, mode="w", format=form) as tar:
        for i in range(3):
            for ext, data in (("cls", str(i).encode()), ("jpg", bytes(600))):
                info = tarfile.TarInfo(f"{'k' * 120}{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            ends.append(tar.offset)
    whole = buf.getvalue()
    assert [s["cls"] for s in unpack(whole, "long.tar")] == [b"0", b"1", b"2"]
    for cut in (ends[1], ends[1] + 300, ends[1] + 512, ends[2] + 100):
        with pytest.raises(ShardError, match=r"corrupt shard long.tar: not a readable tar \((EOF|Read)Error"):
            unpack(whole[:cut], "long.tar")
    url = str(tmp_path / "cut.tar")
    (tmp_path / "cut.tar").write_bytes(whole[: ends[1]])
    with pytest.raises(DataError, match=f"the input tar {url} is not a readable tar .*replace it with a readable copy"):
        list(sources.iter_chunk(sources.Chunk(0, tar=url), "class"))
