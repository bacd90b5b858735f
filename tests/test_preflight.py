"""The preflight of every job (`dydit_dist.preflight`): all unresolved inputs named at once, before the
lease and Ray; `--dry-run` prints the plan and exits 0 when everything resolves. No Ray is started here."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from sampling_util import random_checkpoint

from dydit_dist import cli, config, storage
from dydit_dist.preflight import plan
from jobs import calibrate, evaluate, finetune, prepare, reproduce, sample


def _fixtures(tmp_path) -> dict[str, str]:
    """A tiny random debug checkpoint, an ADM-style reference batch, an "Inception" weights file, an image folder
    (a class folder per class of the debug model)."""
    from PIL import Image

    for label in range(10):
        (tmp_path / "images" / f"class_{label}").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / f"class_{label}" / "0.png")
    images = tmp_path / "images" / "class_0"
    reference = tmp_path / "reference.npz"
    np.savez(reference, arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    inception = tmp_path / "inception.pth"
    torch.save({}, inception)
    return {"checkpoint": random_checkpoint(str(tmp_path / "static.safetensors")), "reference": str(reference),
            "inception": str(inception), "images": str(images.parent), "root": str(tmp_path / "out")}


def test_missing_checkpoint_and_inception_weights_fail_together_before_any_work(tmp_path, capsys, monkeypatch):
    f = _fixtures(tmp_path)
    missing_ckpt, missing_inception = tmp_path / "no" / "DiT.safetensors", tmp_path / "no" / "inception.pth"

    def no_work(*args, **kwargs):
        raise AssertionError("the job went past its preflight")

    # What follows the preflight: the run's lease, then Ray and the pipeline's stages.
    monkeypatch.setattr(cli, "acquire_for_job", no_work)
    monkeypatch.setattr(cli, "connect_ray", no_work)
    start = time.monotonic()
    code = reproduce.main(["--config", "debug", f"storage.root={f['root']}", f"data.source={f['images']}",
                           f"model.checkpoint={missing_ckpt}", f"eval.inception_weights={missing_inception}",
                           f"eval.reference={f['reference']}"])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    print(f"reproduce: the missing inputs reported in {elapsed:.1f} s")
    assert code == 2, (code, err)
    assert "reproduce: 2 input(s) of the reproduce job do not resolve" in err
    assert f"model.checkpoint={missing_ckpt}: " in err and f"eval.inception_weights={missing_inception}: " in err
    assert not (tmp_path / "out").exists()  # nothing written, not even the resolved config


def test_sample_without_weights_is_an_error_outside_the_debug_models(tmp_path, capsys):
    root = f"storage.root={tmp_path}"
    assert sample.main(["--dry-run", "--config", "dit_xl2_256", root, "model.checkpoint=null", "data.vae=none"]) == 2
    assert "model.checkpoint=None: unset; sampling DiT-XL/2 without weights is an error" in capsys.readouterr().err
    assert sample.main(["--dry-run", "--config", "debug", root]) == 0
    assert "unset: random weights (allowed for the tiny debug model)" in capsys.readouterr().out


def test_dry_run_prints_the_plan_of_every_stage_and_exits_0(tmp_path, capsys):
    f = _fixtures(tmp_path)
    argv = ["--dry-run", "--config", "debug", f"storage.root={f['root']}", f"model.checkpoint={f['checkpoint']}",
            f"data.source={f['images']}", f"eval.reference={f['reference']}", f"eval.inception_weights={f['inception']}"]
    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    for stage in ("1. prepare", "2. finetune", "3. sample static", "4. evaluate static", "5. sample dydit",
                  "6. evaluate dydit", "7. report"):
        assert stage in out, out
    assert "32 samples x 10 ddpm steps x 2 (guidance)" in out and "GPU-hours" in out and "an estimate" in out
    assert f"model.checkpoint={f['checkpoint']}: made by" not in out  # the static weights are given, and checked
    assert "every key and shape fits the network" in out and "UNRESOLVED" not in out
    assert not (tmp_path / "out").exists()
    assert sample.main(argv[:5]) == 0  # the sample job alone
    assert "1. sample static: 32 samples" in capsys.readouterr().out


def test_demo_config_resolves_offline(tmp_path, capsys):
    assert reproduce.main(["--dry-run", "--config", "demo", f"storage.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "1. prepare" in out and "2. pretrain" in out and "trained by the reproduce job" in out


def test_checkpoint_of_another_model_is_named_with_its_differences(tmp_path, capsys):
    other = random_checkpoint(str(tmp_path / "five.safetensors"), "model.num_classes=5")
    assert sample.main(["--dry-run", "--config", "debug", f"storage.root={tmp_path}", f"model.checkpoint={other}"]) == 2
    err = capsys.readouterr().err
    assert f"model.checkpoint={other}: {other} does not fit debug" in err and "y_embedder.embedding_table.weight" in err


def test_run_folder_resolves_through_its_ema_pointer(tmp_path):
    f = _fixtures(tmp_path)
    storage.write_json(str(tmp_path / "run" / "checkpoints" / "ema-latest.json"), {"step": 4, "url": f["checkpoint"]})
    cfg = config.load("debug", [f"storage.root={f['root']}", f"model.checkpoint={tmp_path / 'run'}"])
    (weights,) = [i for i in plan(cfg, "sample").inputs if i.key == "model.checkpoint"]
    assert weights.problem is None and f["checkpoint"] in weights.note
    empty = config.load("debug", [f"storage.root={f['root']}", f"model.checkpoint={tmp_path / 'nothing'}"])
    (weights,) = [i for i in plan(empty, "sample").inputs if i.key == "model.checkpoint"]
    assert "not found; expected a weights file" in weights.problem


def test_evaluate_prepare_finetune_calibrate_name_their_inputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = f"storage.root={tmp_path}"
    assert evaluate.main(["--config", "debug", root, "eval.feature_extractor=digits-cnn"]) == 2
    err = capsys.readouterr().err
    assert f"eval.samples=file://{tmp_path}/runs/debug/samples: no samples manifest" in err
    assert "eval.reference=None: unset" in err and "eval.feature_extractor_weights=None: unset; digits-cnn" in err
    assert prepare.main(["--config", "debug", root, f"data.source={tmp_path}/none-*.tar", "data.source_format=webdataset",
                         "data.vae=nobody/no-such-vae"]) == 2
    err = capsys.readouterr().err
    assert "matches no .tar files" in err and "data.vae=nobody/no-such-vae: not in the local Hugging Face cache" in err
    assert finetune.main(["--config", "debug", root, f"data.uri={tmp_path}/data"]) == 2
    assert f"{tmp_path}/data/manifest.json not found" in capsys.readouterr().err
    assert calibrate.main(["--dry-run", "--config", "dit_xl2_256", root, "model.checkpoint=null"]) == 2
    assert calibrate.main(["--dry-run", "--random-init", "--config", "debug", root]) == 0
    # What the calibration would refuse, its dry run refuses: random weights without --random-init (even the
    # debug model's), tolerances out of order
    capsys.readouterr()
    assert calibrate.main(["--dry-run", "--config", "debug", root]) == 2
    assert "model.checkpoint=None: unset: calibrating random weights gives a meaningless table" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        calibrate.main(["--dry-run", "--random-init", "--tolerance", "0.01", "--tolerance-at-zero", "0.1",
                        "--config", "debug", root])
    assert stop.value.code == 2 and "need 0 <= --tolerance-at-zero <= --tolerance" in capsys.readouterr().err


def test_an_unwritable_storage_root_is_named(tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    cfg = config.load("debug", [f"storage.root={tmp_path}/a-file/out"])
    (root,) = [i for i in plan(cfg, "sample").inputs if i.key == "storage.root"]
    assert "not writable" in root.problem
    with pytest.raises(ValueError, match="no preflight for job"):
        plan(cfg, "train")


def _official_pt(path, *overrides: str, opt_bytes: int = 0) -> str:
    """A DiT training checkpoint as the official train.py writes it: {"model", "ema", "opt", "args"}
    (the optimizer state `opt_bytes` of zeros)."""
    import argparse

    from dydit_dist.models import load_state_dict_file

    sd = load_state_dict_file(random_checkpoint(str(path) + ".safetensors", *overrides))
    opt = {"state": {0: {"exp_avg": torch.zeros(opt_bytes // 4)}}}
    torch.save({"model": sd, "ema": sd, "opt": opt, "args": argparse.Namespace(model="DiT-XL/2")}, path)
    return str(path)


def test_pt_checkpoint_keys_are_checked_without_reading_its_tensors(tmp_path, capsys):
    fits, other = _official_pt(tmp_path / "fits.pt"), _official_pt(tmp_path / "five.pt", "model.num_classes=5")
    root = f"storage.root={tmp_path}/out"
    assert sample.main(["--dry-run", "--config", "debug", root, f"model.checkpoint={fits}"]) == 0
    assert f"model.checkpoint={fits}: {fits}: every key and shape fits the network" in capsys.readouterr().out
    assert sample.main(["--dry-run", "--config", "debug", root, f"model.checkpoint={other}"]) == 2
    err = capsys.readouterr().err
    assert f"{other} does not fit debug" in err and "mismatched shapes" in err and "y_embedder.embedding_table" in err
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    assert sample.main(["--dry-run", "--config", "debug", root, f"model.checkpoint={tmp_path / 'garbage.pt'}"]) == 2
    assert "cannot read as a PyTorch checkpoint" in capsys.readouterr().err


def test_pt_checkpoint_on_s3_is_checked_from_a_few_kilobytes(tmp_path, s3_bucket, monkeypatch):
    local = _official_pt(tmp_path / "fits.pt", opt_bytes=16 << 20)
    url = f"{s3_bucket}/pretrained/DiT.pt"
    storage.write_bytes(url, open(local, "rb").read())
    import s3fs.core

    read = []
    fetch = s3fs.core._fetch_range

    def counting(fs, bucket, key, version_id, start, end, **kwargs):
        read.append(end - start)
        return fetch(fs, bucket, key, version_id, start, end, **kwargs)

    monkeypatch.setattr(s3fs.core, "_fetch_range", counting)
    cfg = config.load("debug", [f"storage.root={tmp_path}/out", f"model.checkpoint={url}"])
    (weights,) = [i for i in plan(cfg, "sample").inputs if i.key == "model.checkpoint"]
    assert weights.problem is None and "every key and shape fits" in weights.note
    size = len(open(local, "rb").read())
    assert 0 < sum(read) < size / 8, (sum(read), size)  # the pickle and the zip directory, not the tensors


def test_a_static_checkpoint_for_a_dydit_sampler_lacks_its_routers(tmp_path, capsys):
    static = random_checkpoint(str(tmp_path / "static.safetensors"))
    root = f"storage.root={tmp_path}/out"
    assert sample.main(["--dry-run", "--config", "debug", root, "model.method=dydit", "sample.method=dydit",
                        f"model.checkpoint={static}"]) == 2
    err = capsys.readouterr().err
    assert "32 missing keys (e.g. blocks.0.attn_rate.router.bias, blocks.0.attn_rate.router.weight" in err
    dynamic = random_checkpoint(str(tmp_path / "dydit.safetensors"), "model.method=dydit")
    assert sample.main(["--dry-run", "--config", "debug", root, "model.method=dydit", "sample.method=dydit",
                        f"model.checkpoint={dynamic}"]) == 0


def test_dynamic_checkpoints_are_checked_key_by_key_before_the_job(tmp_path, capsys):
    """The tensors a method adds are named exactly (`resolve.added_keys`, the same names the networks make): a
    DyDiT export that lost one block's routers, or a FlexDiT export of another layout, is refused by the
    preflight, not by every worker once the cluster is acquired; a static file to fine-tune from has none."""
    from dydit_dist.network import read_weights, sampling_network, save_weights
    from dydit_dist.resolve import added_keys

    root = f"storage.root={tmp_path}/out"
    grids = ["model.flexdit.grid_sizes=[6,4]", "model.flexdit.num_intervals=2"]
    for method, extra in (("dydit", []), ("flexdit", ["model.flexdit.layout=CSRD", *grids])):
        cfg = config.load("debug", [f"model.method={method}", *extra])
        static_keys = set(sampling_network(config.load("debug", [])).state_dict())
        assert set(sampling_network(cfg).state_dict()) - static_keys == added_keys(cfg, 4)
    dynamic = read_weights(random_checkpoint(str(tmp_path / "dydit.safetensors"), "model.method=dydit"))
    save_weights({k: v for k, v in dynamic.items() if not k.startswith("blocks.2.mlp_rate")}, tmp_path / "lost.safetensors")
    args = ["--dry-run", "--config", "debug", root, "model.method=dydit", "sample.method=dydit"]
    assert sample.main([*args, f"model.checkpoint={tmp_path}/lost.safetensors"]) == 2
    assert "2 missing keys (e.g. blocks.2.mlp_rate.router.bias, blocks.2.mlp_rate.router.weight)" in capsys.readouterr().err
    assert finetune.main([*args[:-1], f"train.init_from={tmp_path}/lost.safetensors"]) == 2  # not a static file
    assert "2 missing keys (e.g. blocks.2.mlp_rate.router.bias" in capsys.readouterr().err

    flex = random_checkpoint(str(tmp_path / "flex.safetensors"), "model.method=flexdit", "model.flexdit.layout=CRDD",
                             *grids)
    assert sample.main(["--dry-run", "--config", "debug", root, "model.method=flexdit", "sample.method=flexdit",
                        "model.flexdit.layout=CSRD", *grids, f"model.checkpoint={flex}"]) == 2
    err = capsys.readouterr().err
    assert "4 missing keys (e.g. blocks.2.merged_layer1.bias" in err and "4 unexpected keys (e.g. blocks.1.merged" in err


def test_an_eb_cache_table_of_another_step_count_is_named(tmp_path):
    """A calibration table is read in the preflight: one of 5 steps for a 10-step sampler fails in seconds,
    not in every sampling actor."""
    f = _fixtures(tmp_path)
    table = tmp_path / "table.json"
    table.write_text('{"format": "dydit_dist.eb_cache_table/1", "schedule": "01201"}')

    def table_input(steps: int):
        cfg = config.load("debug", [f"storage.root={f['root']}", f"model.checkpoint={f['checkpoint']}",
                                    "sample.method=eb_cache", f"sample.eb_cache.schedule={table}", f"sample.steps={steps}"])
        return next(i for i in plan(cfg, "sample").inputs if i.key == "sample.eb_cache.schedule")

    assert table_input(10).problem == ("cache schedule has 5 steps but sampling runs 10; calibrate one for this step "
                                       "count (python -m jobs.calibrate)")
    assert table_input(5).problem is None and table_input(5).note == "a calibration table of 5 steps"
    table.write_text('{"format": "something else"}')
    assert "is not an EB-Cache calibration table" in table_input(5).problem


def test_an_eb_cache_table_calibrated_along_another_trajectory_is_refused(tmp_path):
    """A table records the model, size, sampler, guidance and correction it was calibrated with; a DDIM
    table used with DDPM (other timesteps) is a schedule of another run, named in the preflight."""
    f = _fixtures(tmp_path)
    table = tmp_path / "table.json"
    recorded = {"format": "dydit_dist.eb_cache_table/1", "schedule": "01201", "model": "debug", "image_size": 16,
                "sampler": "ddim", "cfg_scale": 1.5, "eps_scale": "released"}
    table.write_text(json.dumps(recorded))
    cfg = config.load("debug", [f"storage.root={f['root']}", f"model.checkpoint={f['checkpoint']}",
                                "sample.method=eb_cache", f"sample.eb_cache.schedule={table}", "sample.steps=5"])
    assert cfg.model.image_size == 16 and cfg.sample.sampler == "ddpm"
    found = next(i for i in plan(cfg, "sample").inputs if i.key == "sample.eb_cache.schedule")
    assert found.problem == ("calibrated for another trajectory (sampler 'ddim' there, 'ddpm' here); calibrate one "
                             "with these settings (python -m jobs.calibrate)")
    table.write_text(json.dumps({**recorded, "sampler": "ddpm"}))
    assert next(i for i in plan(cfg, "sample").inputs if i.key == "sample.eb_cache.schedule").problem is None
    # `paper` multiplied eps by b(t) before its factors were recorded: such a table is of the other trajectory
    paper = config.load("debug", [f"storage.root={f['root']}", f"model.checkpoint={f['checkpoint']}",
                                  "sample.method=eb_cache", f"sample.eb_cache.schedule={table}", "sample.steps=5",
                                  "sample.eb_cache.eps_scale=paper"])
    table.write_text(json.dumps({**recorded, "sampler": "ddpm", "eps_scale": "paper"}))
    problem = next(i for i in plan(paper, "sample").inputs if i.key == "sample.eb_cache.schedule").problem
    assert "eps_scale factors None there (none recorded: `paper` multiplied by b(t) then)" in problem
    factors = [[0.0, 1 / 0.96], [0.4, 1 / 0.98], [1.0, 1.0]]
    table.write_text(json.dumps({**recorded, "sampler": "ddpm", "eps_scale": "paper", "eps_scale_factors": factors}))
    assert next(i for i in plan(paper, "sample").inputs if i.key == "sample.eb_cache.schedule").problem is None
    # guidance on other channels is another trajectory; other weights, method or precision another network,
    # which the plan says (a schedule stays a schedule: the released one serves any DiT-XL/2)
    table.write_text(json.dumps({**recorded, "sampler": "ddpm", "guidance_channels": 4}))
    assert "guidance_channels 4 there, 3 here" in next(
        i for i in plan(cfg, "sample").inputs if i.key == "sample.eb_cache.schedule").problem
    for extra, said in (({"checkpoint": None}, "calibrated on random weights (--random-init), sampled with "
                                               "model.checkpoint"),
                        ({"checkpoint": "/elsewhere/w.safetensors"}, "calibrated on /elsewhere/w.safetensors, "
                                                                     f"sampled with {f['checkpoint']}"),
                        ({"method": "dydit", "checkpoint": f["checkpoint"]}, "method 'dydit' there, 'static' here")):
        table.write_text(json.dumps({**recorded, "sampler": "ddpm", "guidance_channels": 3, **extra}))
        found = next(i for i in plan(cfg, "sample").inputs if i.key == "sample.eb_cache.schedule")
        assert found.problem is None and found.note == f"a calibration table of 5 steps; NOT of this network: {said}"


def test_more_inception_score_splits_than_samples_is_named_before_the_features(tmp_path, capsys):
    from sampling_util import write_samples

    f = _fixtures(tmp_path)
    small = config.load("debug", [f"storage.root={f['root']}", f"model.checkpoint={f['checkpoint']}",
                                  "sample.num_samples=4", "sample.shard_size=2", "sample.batch_size=2", "sample.steps=2"])
    samples = f"{f['root']}/runs/debug/samples"
    write_samples(small, samples)
    argv = ["--dry-run", "--config", "debug", f"storage.root={f['root']}", f"eval.reference={f['reference']}",
            f"eval.inception_weights={f['inception']}", "eval.metrics=[isc]"]
    assert evaluate.main(argv) == 2
    assert "eval.isc_splits=10: more splits than the 4 samples" in capsys.readouterr().err
    assert evaluate.main([*argv, "eval.isc_splits=4"]) == 0


def test_a_checkpoint_folder_without_an_ema_pointer_is_named(tmp_path):
    f = _fixtures(tmp_path)
    run = tmp_path / "runs" / "unfinished"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.finetune.yaml").write_text("model: {}\n")
    cfg = config.load("debug", [f"storage.root={f['root']}", f"model.checkpoint={run}"])
    (found,) = [i for i in plan(cfg, "sample").inputs if i.key == "model.checkpoint"]
    assert found.problem.startswith("a folder without checkpoints/ema-latest.json (a run that exported no EMA")


def test_an_image_folder_source_of_another_layout_is_named_in_the_dry_run(tmp_path, capsys):
    """What the prepare job would refuse before Ray, its dry run refuses: a file, or a class folder count
    other than model.num_classes (one listing), and a captions source that is no .csv / .jsonl."""
    f = _fixtures(tmp_path)
    (tmp_path / "caps.csv").write_text("path,caption\n")
    (tmp_path / "two" / "a").mkdir(parents=True)
    (tmp_path / "two" / "b").mkdir()
    root = f"storage.root={f['root']}"
    assert prepare.main(["--dry-run", "--config", "debug", root, f"data.source={f['images']}"]) == 0
    capsys.readouterr()
    cases = {f"data.source={tmp_path}/caps.csv": "is a file; data.source_format=imagefolder reads a folder",
             f"data.source={tmp_path}/two": "has 2 class folders but model.num_classes=10",
             f"data.source={f['images']} data.source_format=captions": "not a .csv or .jsonl name"}
    for overrides, message in cases.items():
        assert prepare.main(["--dry-run", "--config", "debug", root, *overrides.split()]) == 2
        assert message in capsys.readouterr().err, overrides


def test_a_caption_reference_from_a_non_caption_source_is_refused_in_the_dry_run(tmp_path, capsys):
    """jobs.reference refuses an image folder source and a reference that is no .npz before Ray: its dry
    run does too (it used to pass them)."""
    from jobs import reference

    f = _fixtures(tmp_path)
    caps = tmp_path / "caps.csv"
    caps.write_text("path,caption\n")
    argv = ["--dry-run", "--config", "debug", f"storage.root={f['root']}", f"sample.prompts={tmp_path}/p.txt",
            f"eval.inception_weights={f['inception']}"]
    assert reference.main([*argv, f"data.source={caps}", "data.source_format=captions",
                           f"eval.reference={tmp_path}/ref.npz"]) == 0
    capsys.readouterr()
    assert reference.main([*argv, f"data.source={f['images']}", f"eval.reference={tmp_path}/ref.npz"]) == 2
    assert "data.source_format=imagefolder: a caption reference is made from a .csv" in capsys.readouterr().err
    assert reference.main([*argv, f"data.source={caps}", "data.source_format=captions",
                           f"eval.reference={tmp_path}/ref.npy"]) == 2
    assert "ref.npy: not a .npz name" in capsys.readouterr().err
    assert reference.main([*argv, f"data.source={caps}", "data.source_format=captions",
                           f"eval.reference={tmp_path}/ref.npz", f"sample.prompts={tmp_path}/p.csv"]) == 2
    assert "p.csv: not a .txt or .jsonl name" in capsys.readouterr().err
    # where it writes, at the end of the whole pass over the images: checked first
    (tmp_path / "afile").write_text("x")
    for key in ("eval.reference", "sample.prompts"):
        bad = f"{tmp_path}/afile/out." + ("npz" if key == "eval.reference" else "txt")
        assert reference.main([*argv, f"data.source={caps}", "data.source_format=captions",
                               f"eval.reference={tmp_path}/ref.npz", f"{key}={bad}"]) == 2
        assert f"{key}={bad}: its folder is not writable" in capsys.readouterr().err
    from dydit_dist.eval.captions import prepare_caption_reference  # the job itself: the same checks

    with pytest.raises(ValueError, match=r"^data.source_format=imagefolder: .*; eval.reference=.*ref.npy: not a .npz"):
        prepare_caption_reference(config.load("debug", [f"storage.root={f['root']}", f"data.source={f['images']}",
                                                        f"eval.reference={tmp_path}/ref.npy",
                                                        f"sample.prompts={tmp_path}/p.txt"]))


def test_a_dydit_sampling_estimate_scales_only_the_layers_its_routers_scale():
    """DyDiT's lambda is the ratio of the blocks' self-attention + MLP (`dynamic.losses.flops_ratio`); PixArt's
    cross-attention, caption projection and adaLN stay whole, so a lambda-0.5 DyPixArt costs ~0.6 of static,
    as the analytic count of half the heads and MLP groups says (a DiT: ~0.5)."""
    from dydit_dist import flops
    from dydit_dist.estimate import network_macs, routed_share

    for preset, name, at_least, at_most in [("dydit_xl2_256_lambda0.5", "DiT-XL/2", 0.99, 1.0),
                                             ("pixart_xl2_256", "PixArt-XL/2", 0.75, 0.85)]:
        cfg = config.load(preset, ["model.method=dydit", "sample.method=dydit", "model.dynamic.target_lambda=0.5"])
        share = routed_share(cfg.model)
        assert at_least < share < at_most, (preset, share)
        half = flops.count(name, 256, [flops.BlockActivity(heads=0.5, mlp=0.5)] * 28).total
        assert 1.0 - share * 0.5 == pytest.approx(half / network_macs(cfg.model), rel=0.01), preset
        stage = next(s for s in plan(cfg, "sample").stages if s.name == "sample dydit")
        assert stage.flop == pytest.approx(cfg.sample.num_samples * cfg.sample.steps * 2 * network_macs(cfg.model)
                                           * (1.0 - share * 0.5) * 2) and f"x {1.0 - share * 0.5:.3f}" in stage.work


@pytest.mark.parametrize("kind", ["not-a-zip", "cut-short", "no-npy", "manifest-not-json", "unknown-format", "a-file"])
def test_an_unreadable_reference_is_listed_with_the_other_inputs(tmp_path, capsys, kind):
    """A reference that is no readable .npz or reference folder is one line under eval.reference, beside the
    other unresolved inputs (here the samples folder), in the dry run: no traceback, exit 2."""
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    folder = tmp_path / "ref"
    folder.mkdir()
    reference = str(tmp_path / "ref.npz")
    if kind == "not-a-zip":
        (tmp_path / "ref.npz").write_text("junk")
    elif kind == "cut-short":
        (tmp_path / "ref.npz").write_bytes(good.read_bytes()[:100])
    elif kind == "no-npy":
        with __import__("zipfile").ZipFile(tmp_path / "ref.npz", "w") as zf:
            zf.writestr("arr_0.npy", b"not an array")
    elif kind in ("manifest-not-json", "unknown-format"):
        (folder / "manifest.json").write_text("{oops" if kind == "manifest-not-json" else "{}")
        reference = str(folder)
    else:
        reference = str(tmp_path / "ref.bin")
        (tmp_path / "ref.bin").write_text("images")
    code = evaluate.main(["--dry-run", "--config", "debug", f"storage.root={tmp_path}/out", "eval.metrics=[fid]",
                          f"eval.reference={reference}", "eval.feature_extractor=digits-cnn"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"eval.reference={reference}: " in err and "eval.samples=" in err, err
    expected = {"manifest-not-json": "not a manifest", "unknown-format": "unknown manifest format",
                "a-file": "neither an .npz nor a folder"}.get(kind, "not a readable .npz")
    assert expected in err, err


def test_calibrate_names_an_unwritable_out_before_calibrating_and_its_bad_weights_in_one_line(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    (tmp_path / "afile").write_text("x")
    root = f"storage.root={tmp_path}/out"
    assert calibrate.main(["--dry-run", "--random-init", "--config", "debug", root, "--out",
                           f"{tmp_path}/afile/t.json"]) == 2
    err = capsys.readouterr().err
    assert f"--out={tmp_path}/afile/t.json: its folder is not writable" in err, err
    assert calibrate.main(["--dry-run", "--random-init", "--config", "debug", root, "--out", "gs://b/t.json"]) == 2
    assert "--out=gs://b/t.json: gs://b/t.json: unsupported storage protocol" in capsys.readouterr().err
    assert calibrate.main(["--dry-run", "--random-init", "--config", "debug", root, "--out",
                           f"{tmp_path}/new/t.json"]) == 0
    assert not (tmp_path / "new").exists()
    for out in (f"{tmp_path}/new/t.txt", f"{tmp_path}/new/"):  # the sampler reads only a .json name as a table
        assert calibrate.main(["--dry-run", "--random-init", "--config", "debug", root, "--out", out]) == 2
        assert f"--out={out}: not a .json name; expected the table's name" in capsys.readouterr().err
    # a network EB-Cache does not sample: its table would be of no use
    assert calibrate.main(["--dry-run", "--random-init", "--config", "debug", root, "model.method=flexdit",
                           "model.flexdit.grid_sizes=[8,6,4]"]) == 2
    assert "model.method=flexdit: sample.method=eb_cache samples a network with model.method in" in \
        capsys.readouterr().err
    # weights holding NaN pass the preflight (it reads headers only) and are refused as they load: one line, exit 2
    weights = load_file(random_checkpoint(str(tmp_path / "w.safetensors")))
    weights["pos_embed"] = torch.full_like(weights["pos_embed"], float("nan"))
    save_file(weights, str(tmp_path / "nan.safetensors"))
    capsys.readouterr()
    assert calibrate.main(["--config", "debug", root, f"model.checkpoint={tmp_path}/nan.safetensors",
                           "--num-samples", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("calibrate: ") and "NaN" in err, err


@pytest.mark.parametrize("layout", ["no-folders", "empty-folders"])
def test_a_prepare_dry_run_refuses_an_image_folder_without_images(tmp_path, capsys, layout):
    """What the job refuses, its dry run refuses: no class folders, or a first class folder without images."""
    source = tmp_path / "src"
    source.mkdir()
    if layout == "empty-folders":
        for label in range(10):
            (source / f"c{label}").mkdir()
    assert prepare.main(["--dry-run", "--config", "debug", f"storage.root={tmp_path}/out", f"data.source={source}",
                         "data.vae=none"]) == 2
    err = capsys.readouterr().err
    assert f"data.source={source}: " in err
    assert ("has no class folders" if layout == "no-folders" else "first class folder c0 holds no images") in err


def test_a_data_set_smaller_than_its_readers_is_named_under_data_uri(tmp_path, capsys):
    from dydit_dist.data.synthetic import random_dataset

    root = tmp_path / "out"
    cfg = config.load("debug", [f"storage.root={root}", "ray.num_workers=2", "train.global_batch_size=4",
                                "train.micro_batch_size=2"])
    random_dataset(f"{root}/data/debug", cfg, num_samples=1)
    assert finetune.main(["--dry-run", "--config", "debug", f"storage.root={root}", "ray.num_workers=2",
                          "train.global_batch_size=4", "train.micro_batch_size=2"]) == 2
    err = capsys.readouterr().err
    assert f"data.uri=file://{root}/data/debug: " in err and "has 1 samples, fewer than ray.num_workers" in err, err


def test_the_plan_notes_where_eb_caches_released_correction_was_not_tuned():
    def notes(*overrides):
        cfg = config.load("eb_cache_dit_xl2_256_50", ["model.checkpoint=/nowhere/DiT-XL-2-256x256.pt", *overrides])
        return [line for line in plan(cfg, "sample").text().splitlines() if "sample.eb_cache.eps_scale" in line]

    assert notes() == []  # the released code's own setting
    assert "untuned here" in notes("sample.steps=25", f"sample.eb_cache.schedule={'0' * 25}")[0]
    assert "untuned here" in notes("model.image_size=512")[0]
    assert notes("sample.steps=25", f"sample.eb_cache.schedule={'0' * 25}", "sample.eb_cache.eps_scale=none") == []


def test_an_export_made_with_other_shape_neutral_model_settings_is_named_for_sampling(tmp_path, caplog):
    """PixArt's position table is computed, not loaded: an export of another image_size or lewei_scale loads
    into the sampler without a key or shape differing. The model settings it recorded are compared and named."""
    from dydit_dist.network import sampling_network, save_weights

    pixart = ["model.name=PixArt-debug", "model.caption_channels=32", f"storage.root={tmp_path}"]
    trained = config.load("debug", [*pixart, "model.lewei_scale=2.0"])
    url = str(tmp_path / "ema-0000004.safetensors")
    save_weights(sampling_network(trained), url, metadata={"step": "4", "model": json.dumps(trained.to_dict()["model"])})
    (same,) = [i for i in plan(config.load("debug", [*pixart, "model.lewei_scale=2.0", f"model.checkpoint={url}"]),
                               "sample").inputs if i.key == "model.checkpoint"]
    assert same.problem is None and same.note == f"{url}: every key and shape fits the network"
    cfg = config.load("debug", [*pixart, f"model.checkpoint={url}"])
    (other,) = [i for i in plan(cfg, "sample").inputs if i.key == "model.checkpoint"]
    assert other.problem is None
    assert other.note.endswith(f"BUT it was exported with other model settings (model.lewei_scale: 2.0 -> "
                               f"{cfg.model.lewei_scale!r}): the weights were trained for those")
    assert "exported with other model settings" in caplog.text
    (init,) = [i for i in plan(config.load("debug", [*pixart, f"train.init_from={url}"]), "finetune").inputs
               if i.key == "train.init_from"]
    assert "BUT" not in init.note  # a fine-tune may start from another model's weights
    # DyDiT's options shape its training, not its sampling: a stage-1 export sampled with other targets is fine
    dydit = config.load("debug", [f"storage.root={tmp_path}", "model.method=dydit", "model.dynamic.target_lambda=0.7"])
    exported = str(tmp_path / "dydit.safetensors")
    save_weights(sampling_network(dydit), exported, metadata={"model": json.dumps(dydit.to_dict()["model"])})
    sampled = config.load("debug", [f"storage.root={tmp_path}", "model.method=dydit", "sample.method=dydit",
                                    "model.dynamic.target_lambda=0.5", f"model.checkpoint={exported}"])
    (weights,) = [i for i in plan(sampled, "sample").inputs if i.key == "model.checkpoint"]
    assert weights.problem is None and "BUT" not in weights.note
