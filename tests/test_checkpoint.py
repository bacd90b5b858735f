"""Checkpoint files: formats, official containers, fsspec URLs, and clear errors for the wrong model."""

from __future__ import annotations

import argparse
import io
import re

import pytest
import torch

from dydit_dist import storage
from dydit_dist.models import CheckpointError, DiT, build_model, load_into, load_state_dict_file, read_shapes
from dydit_dist.network import load_weights, read_weights, save_weights

DEBUG = dict(input_size=8, num_classes=10)


def _model(seed: int = 0, **overrides) -> DiT:
    torch.manual_seed(seed)
    arch = dict(depth=4, hidden_size=64, patch_size=2, num_heads=4)  # the "debug" entry
    model = DiT(**{**DEBUG, **arch, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # also the zero-initialized layers, so equality means something
    return model


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("container", ["flat.pt", "state_dict.pth", "dit_training.pt", "model.safetensors"])
def test_round_trip(tmp_path, container):
    source = _model(seed=1)
    sd = source.state_dict()
    path = tmp_path / container
    if container == "flat.pt":
        torch.save(sd, path)
    elif container == "state_dict.pth":  # PixArt release format
        torch.save({"state_dict": sd}, path)
    elif container == "dit_training.pt":  # DiT train.py: the EMA weights are the ones to sample with
        other = {k: torch.zeros_like(v) for k, v in sd.items()}
        torch.save({"model": other, "ema": sd, "opt": {}, "args": argparse.Namespace(lr=1e-4)}, path)
    else:
        save_weights(source, path)
    assert _same(load_state_dict_file(path), sd)
    target = _model(seed=2)
    assert not _same(target.state_dict(), sd)
    result = load_into(target, str(path))
    assert _same(target.state_dict(), sd) and result.missing == [] and result.unexpected == []
    with torch.no_grad():
        x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 999]), torch.tensor([1, 10])
        assert torch.equal(target.eval()(x, t, y), source.eval()(x, t, y))


def test_other_size_lists_mismatched_shapes_and_the_file(tmp_path):
    path = tmp_path / "dit_width48.safetensors"
    save_weights(_model(hidden_size=48), path)
    with pytest.raises(ValueError) as err:
        load_into(_model(), path)
    message = str(err.value)
    assert "dit_width48.safetensors" in message and "mismatched shapes" in message
    assert "x_embedder.proj.weight: checkpoint [48, 4, 2, 2] vs model [64, 4, 2, 2]" in message


def test_other_family_lists_missing_and_unexpected_keys(tmp_path):
    pixart = build_model("PixArt-debug", input_size=8, caption_channels=16, model_max_length=8)
    path = tmp_path / "pixart.pth"
    torch.save({"state_dict": pixart.state_dict()}, path)
    with pytest.raises(ValueError) as err:
        load_into(_model(), path)
    message = str(err.value)
    assert "pixart.pth" in message
    assert re.search(r"missing keys.*y_embedder\.embedding_table\.weight", message)
    assert re.search(r"unexpected keys.*t_block\.1\.weight", message)


def test_allow_missing_patterns_and_non_strict(tmp_path):
    source = _model(seed=3)
    sd = dict(source.state_dict())
    del sd["y_embedder.embedding_table.weight"]
    target = _model(seed=4)
    before = target.y_embedder.embedding_table.weight.clone()
    with pytest.raises(ValueError, match="missing keys"):
        load_into(target, sd)
    result = load_into(target, sd, allow_missing=("y_embedder.*",))
    assert result.missing == ["y_embedder.embedding_table.weight"]
    assert torch.equal(target.y_embedder.embedding_table.weight, before)
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    extra = {**source.state_dict(), "blocks.0.attn_rate.router.weight": torch.zeros(3, 64)}
    with pytest.raises(ValueError, match="unexpected keys"):
        load_into(target, extra)
    assert load_into(target, extra, strict=False).unexpected == ["blocks.0.attn_rate.router.weight"]


def test_memory_url():
    source = _model(seed=5)
    root = "memory://test_checkpoint_models"
    try:
        save_weights(source, f"{root}/ema.safetensors")
        assert _same(read_weights(f"{root}/ema.safetensors"), source.state_dict())
        buf = io.BytesIO()
        torch.save({"ema": source.state_dict()}, buf)
        storage.write_bytes(f"{root}/ckpt.pt", buf.getvalue())
        target = _model(seed=6)
        load_weights(target, f"{root}/ckpt.pt")
        assert _same(target.state_dict(), source.state_dict())
        with pytest.raises(ValueError, match="a URL"):  # models/ never reads storage
            load_state_dict_file(f"{root}/ckpt.pt")
    finally:
        storage.remove(root)


def test_unreadable_files_are_refused_with_their_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_state_dict_file(tmp_path / "nope.pt")
    # The content errors are CheckpointError (a ValueError): a fine-tuning worker stops on them instead of
    # having Ray Train retry (test_train_ray)
    pickled = tmp_path / "object.pt"
    torch.save({"weights": tmp_path}, pickled)  # a Path object: refused by weights_only loading
    with pytest.raises(CheckpointError, match="object.pt.*weights_only"):
        load_state_dict_file(pickled)
    not_tensors = tmp_path / "numbers.pt"
    torch.save({"step": 3, "lr": 0.1}, not_tensors)
    with pytest.raises(CheckpointError, match="numbers.pt: not a state dict"):
        load_state_dict_file(not_tensors)
    truncated = tmp_path / "cut.safetensors"
    save_weights(_model().state_dict(), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="cut.safetensors: cannot read as a safetensors file"):
        load_state_dict_file(truncated)
    with open(truncated, "rb") as f, pytest.raises(CheckpointError, match="header describes .*; truncated"):
        read_shapes(f, "cut.safetensors")  # the preflight's check: the header alone is intact
    with pytest.raises(CheckpointError, match="does not fit DiT"):
        load_into(_model(), _model(depth=2).state_dict(), source="two-blocks.pt")


def test_a_corrupt_safetensors_header_is_a_checkpoint_error_naming_the_file(tmp_path):
    import json as json_lib

    for header in ([1, 2], {"a": 3}, {"a": {"shape": [1], "data_offsets": None}}, {"a": {"shape": [1]}}):
        text = json_lib.dumps(header).encode()
        path = tmp_path / "odd.safetensors"
        path.write_bytes(len(text).to_bytes(8, "little") + text)
        with open(path, "rb") as f, pytest.raises(CheckpointError, match=r"odd.safetensors: not a safetensors file "
                                                                          r"\(its header: "):
            read_shapes(f, "odd.safetensors")


def test_wrapper_prefixes_and_deepspeeds_container_are_unwrapped(tmp_path):
    source = _model(seed=2)
    sd = source.state_dict()
    files = {"ddp.pt": {f"module.{k}": v for k, v in sd.items()},  # DDP / DeepSpeed's module
             "compiled.pt": {f"_orig_mod.{k}": v for k, v in sd.items()},  # torch.compile
             "both.pt": {f"module._orig_mod.{k}": v for k, v in sd.items()},
             "mp_rank_00_model_states.pt": {"module": sd, "global_steps": 7, "buffer_names": []}}  # DeepSpeed
    for name, content in files.items():
        torch.save(content, tmp_path / name)
        target = _model(seed=3)
        load_into(target, tmp_path / name)
        assert _same(target.state_dict(), sd), name


def test_weights_that_are_not_finite_are_refused(tmp_path):
    sd = _model().state_dict()
    sd["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    sd["final_layer.linear.bias"][0] = float("inf")
    target = _model(seed=4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"diverged.pt: 2 tensors hold NaN or inf: blocks.1.attn.qkv.weight; "
                                              r"final_layer.linear.bias"):
        load_into(target, sd, source="diverged.pt")
    assert _same(target.state_dict(), before)  # nothing copied


def test_pixart_computes_its_position_table_whatever_the_checkpoint_holds():
    """As the official loaders (they delete `pos_embed`): model.lewei_scale decides, and 256 weights load at 512."""
    from dydit_dist.models import PixArt

    tiny = dict(depth=2, hidden_size=32, num_heads=2, caption_channels=16, model_max_length=8)
    small = PixArt(input_size=8, **tiny)
    sd = {k: v.clone() for k, v in small.state_dict().items()}
    sd["pos_embed"] += 1.0  # another table
    other_scale = PixArt(input_size=8, lewei_scale=0.5, **tiny)
    table = other_scale.pos_embed.clone()
    load_into(other_scale, sd, source="pixart-256.pth")
    assert torch.equal(other_scale.pos_embed, table)
    assert torch.equal(other_scale.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)
    larger = PixArt(input_size=16, **tiny)  # 4x the tokens: the file's table has another shape
    load_into(larger, sd, source="pixart-256.pth")
    assert torch.equal(larger.pos_embed, PixArt(input_size=16, **tiny).pos_embed)


def test_a_dit_training_checkpoint_loads_with_torch_2_4s_serialization_api(tmp_path, monkeypatch):
    """torch 2.4 (the oldest the GPU check supports) has `add_safe_globals` but not the `safe_globals`
    context manager: loading any .pt raised AttributeError there (the loader no longer uses it)."""
    sd = _model(seed=1).state_dict()
    path = tmp_path / "dit_training.pt"
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": argparse.Namespace(lr=1e-4)}, path)
    monkeypatch.delattr(torch.serialization, "safe_globals")
    assert _same(load_state_dict_file(path), sd)


def test_a_safetensors_file_named_pt_is_read_as_safetensors(tmp_path):
    """The format comes from the file's first bytes as well as its name: a safetensors export renamed `.pt`
    loads (torch.load would refuse it, advising weights_only=False), and a PyTorch file keeps torch.load."""
    from dydit_dist.models.checkpoint import parse_state_dict

    sd = _model(seed=1).state_dict()
    save_weights(sd, tmp_path / "export.safetensors")
    renamed = tmp_path / "export.pt"
    (tmp_path / "export.safetensors").rename(renamed)
    assert _same(load_state_dict_file(renamed), sd)
    assert _same(parse_state_dict(renamed.read_bytes(), str(renamed)), sd)
    with open(renamed, "rb") as f:
        assert _same(parse_state_dict(f, str(renamed)), sd)
        f.seek(0)
        assert read_shapes(f, str(renamed)) == {k: list(v.shape) for k, v in sd.items()}
    torch.save(sd, tmp_path / "plain.pt")
    with open(tmp_path / "plain.pt", "rb") as f:
        assert read_shapes(f, "plain.pt") == {k: list(v.shape) for k, v in sd.items()}


def test_a_run_folder_copied_elsewhere_names_its_own_ema_export(tmp_path):
    """ema-latest.json names its export by file name beside it: a copy of the run folder resolves to the copy's
    export, not to the place the run was written (which may be gone)."""
    import shutil

    from dydit_dist.network import latest_ema, resolve_weights

    sd = _model(seed=1).state_dict()
    first = tmp_path / "bucket-a" / "runs" / "r"
    save_weights(sd, first / "checkpoints" / "ema-0000004.safetensors")
    storage.write_json(str(first / "checkpoints" / "ema-latest.json"),
                       {"step": 4, "file": "ema-0000004.safetensors", "url": f"file://{first}/checkpoints/ema-0000004.safetensors"})
    copy = tmp_path / "bucket-b" / "runs" / "r"
    shutil.copytree(first, copy)
    shutil.rmtree(first)
    assert latest_ema(str(copy)).endswith("bucket-b/runs/r/checkpoints/ema-0000004.safetensors")
    assert resolve_weights(str(copy)) == latest_ema(str(copy))
    assert _same(read_weights(latest_ema(str(copy))), sd)
