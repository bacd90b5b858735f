"""Settings a run cannot silently change: the config history (`run_config.save`), a resumed fine-tune
refused when what decides its weights changed (`run_config.WEIGHTS`: lr, batch, precision, the model
and its method's options, ...; applied with
train.allow_changed_settings=true, the optimizer's lr included), a finished fine-tune detected before
Ray starts, and no `${...}` interpolation in a written config."""

from __future__ import annotations

import os

import pytest

from dydit_dist import config as config_lib
from dydit_dist import run_config, storage
from dydit_dist.data.synthetic import random_dataset
from dydit_dist.paths import RunPaths

BASE = ["ray.num_workers=1", "train.global_batch_size=4", "train.micro_batch_size=2", "train.max_steps=4",
        "train.checkpoint_every=2", "train.log_every=1", "data.num_workers=0"]


def _cfg(root, *overrides):
    return config_lib.load("debug", [*BASE, f"storage.root={root}", f"data.uri={root}/data", *overrides])


def test_config_history_keeps_every_distinct_config(tmp_path):
    cfg = _cfg(tmp_path)
    paths = RunPaths(cfg)
    storage.write_bytes(paths.config("finetune"), b"written before the history\n")  # an older run folder
    run_config.save(cfg, "finetune")
    changed = _cfg(tmp_path, "train.log_every=2")
    run_config.save(changed, "finetune")
    mtime = os.path.getmtime(storage.filesystem(paths.config("finetune"))[1])
    run_config.save(changed, "finetune")  # the same config again: nothing written
    assert os.path.getmtime(storage.filesystem(paths.config("finetune"))[1]) == mtime
    history = [storage.read_bytes(paths.config_version("finetune", n)) for n in (1, 2, 3)]
    assert history == [b"written before the history\n", cfg.to_yaml().encode(), changed.to_yaml().encode()]
    assert not storage.exists(paths.config_version("finetune", 4))
    assert storage.read_bytes(paths.config("finetune")) == changed.to_yaml().encode()


def test_weights_changes_lists_each_key_that_decides_the_weights(tmp_path):
    old = _cfg(tmp_path, "model.method=dydit").to_dict()
    new = _cfg(tmp_path, "model.method=dydit", "train.lr=1e-3", "train.global_batch_size=8", "train.log_every=7",
               "model.dynamic.target_lambda=0.7", "model.flexdit.ramp_start=0.5", "data.shuffle_buffer=7",
               "data.num_workers=1")
    assert run_config.weights_changes(old, new) == [  # in the config's order
        "model.dynamic.target_lambda: 0.5 -> 0.7", "data.shuffle_buffer: 16 -> 7", "data.num_workers: 0 -> 1",
        "train.global_batch_size: 4 -> 8", "train.lr: 0.0001 -> 0.001"]  # the loader workers decide the order;
    # not how it ran (logging), nor FlexDiT's options on a DyDiT
    assert run_config.weights_changes(old, new, ignore=("train", "data.num_workers")) == [
        "model.dynamic.target_lambda: 0.5 -> 0.7", "data.shuffle_buffer: 16 -> 7"]
    assert run_config.weights_changes(None, new) == []


def test_a_key_added_since_counts_at_its_default_the_old_behaviour(tmp_path):
    """A run of before `train.stage1_update` existed took one step per iteration (the default, skip): its
    resume with the DyDiT presets' official double step is a change, not a silent switch mid-run."""
    old = _cfg(tmp_path, "model.method=dydit").to_dict()
    del old["train"]["stage1_update"]  # as a config written before the key existed
    official = _cfg(tmp_path, "model.method=dydit", "train.skip_grad_norm=200", "train.grad_clip=null",
                    "train.stage1_update=official")
    assert run_config.weights_changes(old, official, ignore=("train.skip_grad_norm", "train.grad_clip")) == [
        "train.stage1_update: 'skip' -> 'official'"]
    assert run_config.weights_changes(old, _cfg(tmp_path, "model.method=dydit")) == []


def test_the_lr_keys_count_as_the_lr_the_optimizer_runs_at(tmp_path):
    """A PixArt run of before train.lr_scaling existed (its lr then unscaled) resumes with the presets that now
    scale by sqrt at the same batch of 256: the same lr, no change; at another batch the lr differs."""
    old = config_lib.load("pixart_xl2_256", ["train.max_steps=10"]).to_dict()
    for key in ("lr_scaling", "lr_base_batch"):
        del old["train"][key]  # as a config written before the keys existed
    assert run_config.weights_changes(old, config_lib.load("pixart_xl2_256", ["train.max_steps=10"])) == []
    bigger = config_lib.load("pixart_xl2_256", ["train.max_steps=10", "train.global_batch_size=1024"])
    assert run_config.weights_changes(old, bigger) == ["train.global_batch_size: 256 -> 1024",
                                                       "train.lr_scaling: 'none' -> 'sqrt'"]
    scaled = config_lib.load("pixart_xl2_256", ["train.max_steps=10", "train.global_batch_size=1024"]).to_dict()
    assert run_config.weights_changes(scaled, config_lib.load("pixart_xl2_256", ["train.max_steps=10"])) == [
        "train.global_batch_size: 1024 -> 256", "train.scaled_lr (the lr the optimizer runs at): 4e-05 -> 2e-05"]


def _resumable_run(root, *overrides) -> None:
    """A run folder as a first fine-tune leaves it: data, its config, a checkpoint folder."""
    cfg = _cfg(root, *overrides)
    random_dataset(f"{root}/data", cfg, num_samples=24)
    run_config.save(cfg, "finetune")
    storage.write_bytes(f"{RunPaths(cfg).checkpoints}/step-0000002/meta.json", b"{}")
    _commit(RunPaths(cfg).checkpoints, "step-0000002")


def _commit(checkpoints: str, *names: str) -> None:
    """Ray Train's snapshot as it writes it once a checkpoint is committed (the fields `has_checkpoint` reads)."""
    results = [{"checkpoint_dir_name": n, "metrics": {}} for n in names]
    storage.write_json(f"{checkpoints}/checkpoint_manager_snapshot.json",
                       {"checkpoint_results": results, "latest_checkpoint_result": results[-1] if results else None})


def test_only_a_committed_checkpoint_locks_the_settings(tmp_path):
    """A step folder whose upload was cut short (a worker lost before Ray Train committed it) is not resumed:
    Ray starts from scratch, so the next run's settings are free; a committed one keeps them."""
    from dydit_dist.config import ConfigError
    from dydit_dist.models import CheckpointError
    from dydit_dist.train.checkpoints import RAY_SNAPSHOT, has_checkpoint, remove_uncommitted
    from dydit_dist.train.launcher import check_settings

    cfg = _cfg(tmp_path)
    random_dataset(f"{tmp_path}/data", cfg, num_samples=24)
    run_config.save(cfg, "finetune")
    checkpoints = RunPaths(cfg).checkpoints
    storage.write_bytes(f"{checkpoints}/step-0000002/deepspeed/mp_rank_00_model_states.pt", b"half")
    assert not has_checkpoint(checkpoints)
    assert check_settings(_cfg(tmp_path, "train.lr=1e-3")) == []
    _commit(checkpoints)  # no checkpoint named (Ray writes the snapshot at a commit, so only in principle)
    assert not has_checkpoint(checkpoints)
    _commit(checkpoints, "step-0000002")
    assert has_checkpoint(checkpoints)
    with pytest.raises(ConfigError, match=r"other settings \(train.lr: 0.0001 -> 0.001\)"):
        check_settings(_cfg(tmp_path, "train.lr=1e-3"))
    storage.write_bytes(f"{checkpoints}/step-0000004/deepspeed/zero_pp_rank_3_mp_rank_00_optim_states.pt", b"x")
    assert [u.rsplit("/", 1)[-1] for u in remove_uncommitted(checkpoints)] == ["step-0000004"]
    assert storage.exists(f"{checkpoints}/step-0000002/deepspeed/mp_rank_00_model_states.pt")
    assert not storage.exists(f"{checkpoints}/step-0000004") and remove_uncommitted(checkpoints) == []
    storage.write_bytes(f"{checkpoints}/{RAY_SNAPSHOT}", b'{"checkpoint_res')  # cut short
    with pytest.raises(CheckpointError, match=rf"{RAY_SNAPSHOT} is not the JSON Ray Train writes.*Do not delete it"):
        has_checkpoint(checkpoints)


def test_a_lost_snapshot_never_discards_committed_checkpoints(tmp_path):
    """Ray Train rewrites its snapshot in place: a full disk truncates it, and the advice was to remove it,
    after which the next run removed every step folder as an upload cut short. With the EMA pointer showing a
    commit, a missing snapshot is an error and nothing is removed."""
    from dydit_dist.models import CheckpointError
    from dydit_dist.paths import EMA_POINTER
    from dydit_dist.train.checkpoints import has_checkpoint, remove_uncommitted

    checkpoints = f"{tmp_path}/runs/r/checkpoints"
    storage.write_bytes(f"{checkpoints}/step-0000002/deepspeed/mp_rank_00_model_states.pt", b"committed")
    assert remove_uncommitted(checkpoints) != []  # no pointer: never committed, removed
    storage.write_bytes(f"{checkpoints}/step-0000004/deepspeed/mp_rank_00_model_states.pt", b"committed")
    storage.write_json(f"{checkpoints}/{EMA_POINTER}", {"step": 4, "file": "ema-0000004.safetensors",
                                                   "url": f"{checkpoints}/ema-0000004.safetensors"})
    with pytest.raises(CheckpointError, match=rf"is missing, but .*{EMA_POINTER} names the export of step 4.*"
                                              rf"train.init_from={tmp_path}/runs/r\b"):
        has_checkpoint(checkpoints)
    assert remove_uncommitted(checkpoints) == []
    assert storage.exists(f"{checkpoints}/step-0000004/deepspeed/mp_rank_00_model_states.pt")


def test_a_corrupt_ray_snapshot_is_an_input_error_of_the_job(tmp_path, capsys, ray_calls):
    from jobs import finetune

    _resumable_run(tmp_path)
    storage.write_bytes(f"{RunPaths(_cfg(tmp_path)).checkpoints}/checkpoint_manager_snapshot.json", b'{"check')
    rc = finetune.main(["--config", "debug", *BASE, f"storage.root={tmp_path}", f"data.uri={tmp_path}/data"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and ray_calls == []
    assert err[0].startswith("finetune: ") and "checkpoint_manager_snapshot.json is not the JSON Ray Train writes" in err[0]


def test_the_snapshot_name_is_ray_trains():
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    from dydit_dist.train.checkpoints import RAY_SNAPSHOT

    assert RAY_SNAPSHOT == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


@pytest.fixture
def ray_calls(monkeypatch) -> list:
    """Calls of ray.init during the test (Ray may already run for other tests of the session)."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append((a, k)))
    return calls


def test_a_resume_with_changed_settings_is_refused_before_ray(tmp_path, capsys, ray_calls):
    from jobs import finetune

    _resumable_run(tmp_path)
    before = storage.find(f"{tmp_path}/runs")
    rc = finetune.main(["--config", "debug", *BASE, f"storage.root={tmp_path}", f"data.uri={tmp_path}/data",
                        "train.lr=1e-3", "train.global_batch_size=8", "train.precision=bf16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("finetune: ") and "resumes from a checkpoint made with other settings (train.global_batch_size: " \
        "4 -> 8; train.lr: 0.0001 -> 0.001; train.precision: 'fp32' -> 'bf16')" in err[0]
    assert "train.allow_changed_settings=true" in err[0]
    assert storage.find(f"{tmp_path}/runs") == before and ray_calls == []  # nothing written, no lease left


def test_a_dry_run_refuses_a_resume_with_changed_settings_and_a_corrupt_ema_pointer(tmp_path, capsys, ray_calls):
    """What the job would refuse, its --dry-run refuses (the README says to dry-run before a RayJob, whose
    retries repeat an input error); a hand-edited ema-latest.json is named, not a KeyError."""
    from jobs import finetune

    _resumable_run(tmp_path)
    argv = ["--dry-run", "--config", "debug", *BASE, f"storage.root={tmp_path}", f"data.uri={tmp_path}/data"]
    assert finetune.main(argv) == 0
    capsys.readouterr()
    assert finetune.main([*argv, "train.lr=1e-3"]) == 2
    assert "resumes from a checkpoint made with other settings (train.lr: 0.0001 -> 0.001" in capsys.readouterr().err
    pointer = f"{tmp_path}/runs/debug/checkpoints/ema-latest.json"
    for content in (b"{}", b'{"url": "x", "st'):
        storage.write_bytes(pointer, content)
        assert finetune.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"finetune: {pointer}: not an EMA pointer" in err[0], err
    assert ray_calls == []


def test_a_resume_keeps_the_method_options_but_may_run_longer(tmp_path):
    """DyDiT's target lambda decides the weights: a resume with another one is refused, as the lr is; more
    steps, another init_from (a resume starts from its checkpoint) or FlexDiT's options are not changes."""
    from dydit_dist.config import ConfigError
    from dydit_dist.train.launcher import check_settings

    _resumable_run(tmp_path, "model.method=dydit")
    with pytest.raises(ConfigError, match=r"other settings \(model.dynamic.target_lambda: 0.5 -> 0.7\); rerun with "
                                          r"train.allow_changed_settings=true"):
        check_settings(_cfg(tmp_path, "model.method=dydit", "model.dynamic.target_lambda=0.7"))
    assert check_settings(_cfg(tmp_path, "model.method=dydit", "train.max_steps=40", "train.init_from=elsewhere.pt",
                               "model.flexdit.ramp_start=0.5")) == []


def test_allowed_changes_are_logged_and_recorded(tmp_path, caplog):
    from dydit_dist.train.launcher import check_settings

    _resumable_run(tmp_path)
    cfg = _cfg(tmp_path, "train.lr=1e-3", "train.allow_changed_settings=true")
    assert check_settings(cfg) == ["train.lr: 0.0001 -> 0.001"]
    assert "resuming with changed settings (train.allow_changed_settings=true): train.lr: 0.0001 -> 0.001" in caplog.text
    run_config.save(cfg, "finetune")
    assert "lr: 0.001" in storage.read_bytes(RunPaths(cfg).config_version("finetune", 2)).decode()
    assert check_settings(_cfg(tmp_path, "train.lr=1e-3")) == []  # the run's settings now are the new ones
    fresh = _cfg(tmp_path, "storage.run=fresh", "train.lr=5")
    assert check_settings(fresh) == []  # no checkpoint: nothing to keep


def test_a_finished_finetune_exits_before_ray_and_writes_nothing(tmp_path, capsys, ray_calls):
    from jobs import finetune

    cfg = _cfg(tmp_path)
    random_dataset(f"{tmp_path}/data", cfg, num_samples=24)
    pointer = RunPaths(cfg).ema_pointer
    storage.write_json(pointer, {"step": 4, "file": "ema-0000004.safetensors", "url": "x", "model": {}})
    before = {u: storage.read_bytes(u) for u in storage.find(f"{tmp_path}/runs")}
    assert finetune.main(["--config", "debug", *BASE, f"storage.root={tmp_path}", f"data.uri={tmp_path}/data"]) == 0
    out = capsys.readouterr().out
    assert f"finetune: {RunPaths(cfg).url} is finished: EMA weights at train.max_steps=4" in out
    assert "nothing to do" in out
    assert {u: storage.read_bytes(u) for u in storage.find(f"{tmp_path}/runs")} == before and ray_calls == []


def test_interpolations_are_refused_not_written(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_FOR_TEST", "hunter2")
    with pytest.raises(config_lib.ConfigError, match=r"storage.endpoint_url='\$\{oc.env:SECRET_FOR_TEST\}': "
                                                     r"interpolations \(\$\{...\}\) are not allowed"):
        config_lib.load("debug", ["storage.endpoint_url=${oc.env:SECRET_FOR_TEST}"])
    path = tmp_path / "preset.yaml"
    path.write_text("_base_: debug\ntrain:\n  lr: ${oc.env:SECRET_FOR_TEST}\n")
    with pytest.raises(config_lib.ConfigError, match="train.lr="):
        config_lib.load(str(path))


def test_a_resume_with_a_new_lr_trains_at_the_new_lr(tmp_path, monkeypatch):
    """DeepSpeed's checkpoint load restores the optimizer's (and the schedule's) old lr, weight decay and eps;
    the config's win; the lr is scaled to the global batch by train.lr_scaling (PixArt's auto_lr)."""
    import torch

    from dydit_dist.train.deepspeed_setup import init_single_process
    from dydit_dist.train.loop import Trainer
    from dydit_dist.train.ray_session import LocalSession

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # init_single_process sets them; later Ray workers must not inherit them
        monkeypatch.setenv(key, "1" if key == "WORLD_SIZE" else "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        init_single_process("gloo")  # one rank, as tests/test_train_loop.py
        root = f"memory://settings-{os.getpid()}-{tmp_path.name}"
        cfg = config_lib.load("debug", [*BASE, f"storage.root={root}", f"data.uri={root}/data", "train.max_steps=2",
                                        "train.warmup_steps=8", "train.grad_clip=1.0",
                                        "train.lr_scaling=linear", "train.lr_base_batch=2"])
        random_dataset(f"{root}/data", cfg, num_samples=24)
        first_session = LocalSession(str(tmp_path))
        first = Trainer(cfg, first_session)
        first.train()
        # PixArt's auto_lr: sqrt(global batch 4 / base 1) = 2 x the new lr
        resumed_cfg = config_lib.load("debug", [*BASE, f"storage.root={root}", f"data.uri={root}/data",
                                                "train.warmup_steps=8", "train.lr=0.5e-3", "train.weight_decay=0.05",
                                                "train.adam_eps=1e-10", "train.grad_clip=0.5",
                                                "train.lr_scaling=sqrt", "train.lr_base_batch=1",
                                                "train.allow_changed_settings=true"])
        session = LocalSession(str(tmp_path))
        resumed = Trainer(resumed_cfg, session)
        resumed.train()
    finally:
        torch.set_num_threads(threads)
    assert resumed.resumed_from == 2
    # the first run (each report gives the lr its step ran at; PixArt's warm-up, step s at s / 8): 0 and 1/8
    # of lr scaled linearly to the global batch, 1e-4 * 4 / 2
    assert [r["lr"] for r in first_session.reports] == pytest.approx([0.0, 0.25e-4])
    # warm-up over 8 steps: steps 3 and 4 ran at 2/8 and 3/8 of the NEW lr (0.5e-3 scaled by 2)
    assert [r["lr"] for r in session.reports] == pytest.approx([0.25e-3, 0.375e-3])
    # torch's load_state_dict took every group's settings from the checkpoint; the config's win
    groups = (resumed.engine.lr_scheduler or resumed.engine).optimizer.param_groups
    assert {(g["weight_decay"], g["eps"]) for g in groups} == {(0.05, 1e-10)}
    # ZeRO-2's checkpoint load put the old clip back into its optimizer (the engine said the new one)
    assert resumed.engine.gradient_clipping() == resumed.engine.optimizer.clip_grad == 0.5


def test_ray_writes_whole_files_or_none_into_a_local_run(tmp_path, monkeypatch):
    """Ray Train's snapshot is rewritten through the filesystem `ray_storage` gives it: a write that fails (a
    full disk) leaves the old file as it was, where pyarrow's local file system left it cut."""
    import errno

    from dydit_dist.train.launcher import ray_storage

    path, fs = ray_storage(f"{tmp_path}/runs/r/checkpoints")
    target = f"{path}/checkpoint_manager_snapshot.json"
    with fs.open_output_stream(target) as f:
        f.write(b'{"checkpoint_results": []}')
    with fs.open_input_stream(target) as f:
        assert f.read() == b'{"checkpoint_results": []}'

    def no_blocks(fd):  # a full disk: any file holding data fails to reach it
        if os.fstat(fd).st_size > 0:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_blocks)
    with pytest.raises(OSError, match="No space left"), fs.open_output_stream(target) as f:
        f.write(b'{"checkpoint_results": [{"checkpoint_dir_name": "step-0000002"}]}')
    assert open(target, "rb").read() == b'{"checkpoint_results": []}'
    assert sorted(os.listdir(path)) == ["checkpoint_manager_snapshot.json"]  # no temporary left
