"""The trainer on one rank, without Ray: DeepSpeed engine, checkpoints, exact resume, EMA export,
initialization from a static checkpoint. Data are shards in memory:// written by the synthetic writer."""

from __future__ import annotations

import json
import os
import uuid

import pytest
import torch

from dydit_dist import config as config_lib
from dydit_dist import storage
from dydit_dist.data.synthetic import random_dataset
from dydit_dist.models import build_model
from dydit_dist.network import build_network, latest_ema, load_weights, read_weights, save_weights
from dydit_dist.train.deepspeed_setup import check_deepspeed
from dydit_dist.train.loop import Trainer
from dydit_dist.train.ray_session import LocalSession


def _cfg(root: str, *overrides):
    return config_lib.load("debug", [
        "ray.num_workers=1", "train.global_batch_size=4", "train.micro_batch_size=2", "train.max_steps=4",
        "train.checkpoint_every=2", "train.log_every=1", "model.method=dydit", "data.num_workers=0",
        f"storage.root={root}", f"data.uri={root}/data", "train.record_batches=true", *overrides])


def _root() -> str:
    return f"memory://train-{uuid.uuid4().hex[:8]}"


def _run(cfg, folder) -> tuple[Trainer, LocalSession]:
    session = LocalSession(str(folder))
    trainer = Trainer(cfg, session)
    trainer.train()
    return trainer, session


def _recorded(root: str, cfg) -> list:
    urls = storage.find(f"{root}/runs/{cfg.storage.run}/batches")
    return [storage.read_json(u)["index"] for u in urls]


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_continues_exactly(one_rank, tmp_path, stage):
    root_a, root_b = _root(), _root()
    cfg_a = _cfg(root_a, f"deepspeed.zero_stage={stage}")
    random_dataset(f"{root_a}/data", cfg_a, num_samples=24)
    straight, _ = _run(cfg_a, tmp_path / "a")

    cfg_b = _cfg(root_b, f"deepspeed.zero_stage={stage}", "train.max_steps=2")
    random_dataset(f"{root_b}/data", cfg_b, num_samples=24)
    first, session = _run(cfg_b, tmp_path / "b")
    assert session.checkpoints() == ["step-0000002"]
    resumed, session = _run(_cfg(root_b, f"deepspeed.zero_stage={stage}"), tmp_path / "b")
    assert resumed.resumed_from == 2 and resumed.state.step == 4
    assert [r["step"] for r in session.reports] == [3, 4]

    # Same batches, same weights, same EMA as the uninterrupted run.
    assert _recorded(root_a, cfg_a) == _recorded(root_b, cfg_b)
    assert len({i for step in _recorded(root_a, cfg_a) for micro in step for i in micro}) == 4 * 4
    ema_a, ema_b = straight.state.ema.gather(), resumed.state.ema.gather()
    assert all(torch.allclose(ema_a[k], ema_b[k], atol=1e-6) for k in ema_a)
    assert straight.session.reports[-1]["loss"] == pytest.approx(session.reports[-1]["loss"], rel=1e-5)


def test_exported_ema_loads_into_the_sampler_network(one_rank, tmp_path):
    root = _root()
    cfg = _cfg(root, "train.max_steps=3", "train.keep_checkpoints=1")
    random_dataset(f"{root}/data", cfg, num_samples=16)
    trainer, _ = _run(cfg, tmp_path)
    url = latest_ema(f"{root}/runs/{cfg.storage.run}")
    assert url.endswith("checkpoints/ema-0000003.safetensors")
    exports = [u for u in storage.listdir(f"{root}/runs/{cfg.storage.run}/checkpoints") if u.endswith(".safetensors")]
    assert exports == [url]  # keep_checkpoints=1 pruned ema-0000002
    network = build_network(cfg.model)
    load_weights(network, url)  # strict: every key of the dynamic network, routers included
    ema = trainer.state.ema.gather()
    assert all(torch.equal(network.state_dict()[k], ema[k]) for k in ema)
    assert storage.find(f"{root}/runs/{cfg.storage.run}/tensorboard")


def test_init_from_static_checkpoint_only_routers_missing(one_rank, tmp_path):
    from dydit_dist.models import CheckpointError

    root = _root()
    cfg = _cfg(root, "train.max_steps=1", f"model.checkpoint={root}/static.safetensors")
    random_dataset(f"{root}/data", cfg, num_samples=8)
    torch.manual_seed(3)
    static = build_model("debug", input_size=16, num_classes=10)
    save_weights(static, f"{root}/static.safetensors")
    session = LocalSession(str(tmp_path))
    trainer = Trainer(cfg, session)
    assert torch.equal(trainer.network.blocks[1].mlp.fc1.weight, static.blocks[1].mlp.fc1.weight)

    # A DyDiT file that lost some of its routers: neither a static checkpoint nor a whole DyDiT one
    dynamic = {k: v for k, v in trainer.network.state_dict().items() if not k.startswith("blocks.0.attn_rate.")}
    save_weights(dynamic, f"{root}/partial.safetensors")
    with pytest.raises(CheckpointError, match=r"partial.safetensors holds (\d+) of the \d+ tensors that "
                                              r"model.method=dydit adds to the static network \(missing e.g. "
                                              r"blocks.0.attn_rate.router.weight"):
        Trainer(_cfg(root, f"train.init_from={root}/partial.safetensors", "storage.run=partial"),
                LocalSession(str(tmp_path / "p")))

    wrong = build_model("debug", input_size=8, num_classes=10)  # another latent size: pos_embed differs
    save_weights(wrong, f"{root}/wrong.safetensors")
    with pytest.raises(ValueError, match=r"(?s)wrong.safetensors does not fit .*pos_embed: checkpoint \[1, 16, 64\] vs model \[1, 64, 64\]"):
        Trainer(_cfg(root, f"train.init_from={root}/wrong.safetensors", "storage.run=other"), LocalSession(str(tmp_path / "x")))


def test_static_pixart_zero0_with_accumulation(one_rank, tmp_path):
    root = _root()
    cfg = _cfg(root, "model.method=static", "model.name=PixArt-debug", "model.caption_channels=32",
               "model.model_max_length=8", "deepspeed.zero_stage=0", "train.max_steps=2",
               "train.global_batch_size=4", "train.micro_batch_size=1", "train.caption_dropout=0.5")
    random_dataset(f"{root}/data", cfg, num_samples=16)
    trainer, session = _run(cfg, tmp_path)
    assert trainer.accumulation == 4
    recorded = _recorded(root, cfg)  # per step, 4 micro-batches of 1 sample, all different
    assert [len(step) for step in recorded] == [4, 4] and len({i for s in recorded for (i,) in s}) == 8
    last = session.reports[-1]
    assert {"mse", "vb", "loss"} <= set(last) and last["grad_norm"] > 0
    network = build_network(cfg.model)
    load_weights(network, latest_ema(f"{root}/runs/{cfg.storage.run}"))
    assert torch.equal(network.y_embedder.y_embedding, trainer.network.y_embedder.y_embedding)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="Linux / glibc only")
def test_retain_freed_memory_is_accepted_by_glibc():
    """The worker's malloc settings (see `retain_freed_memory`) are values glibc accepts; the page faults
    they save are measured by benchmarks/train_throughput.py, not asserted here."""
    from dydit_dist.train.worker import retain_freed_memory

    assert retain_freed_memory() is True


def test_a_session_gets_reports_no_more_often_than_it_takes_them(one_rank, tmp_path):
    """Ray Train's controller collects one report per poll; a session that says so gets the checkpoints'
    reports only (here), while TensorBoard still gets every log window."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = _root()
    cfg = _cfg(root, "train.max_steps=5", "train.checkpoint_every=4", f"storage.root={tmp_path}/store")
    random_dataset(f"{root}/data", cfg, num_samples=16)
    session = LocalSession(str(tmp_path / "session"))
    session.min_report_interval_s = 3600.0
    Trainer(cfg, session).train()
    assert [r["step"] for r in session.reports] == [4, 5]
    (events,) = [os.path.join(d, f) for d, _, files in os.walk(f"{tmp_path}/store") for f in files
                 if f.startswith("events.out.tfevents")]
    acc = EventAccumulator(events)
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("stage", [0, 2])
def test_updates_whose_gradient_norm_reaches_skip_grad_norm_are_skipped(one_rank, tmp_path, stage):
    """DyDiT's rule through the real DeepSpeed engine: a threshold every step reaches leaves the weights
    as initialized; one no step reaches changes them."""
    runs = {}
    for name, threshold in (("skip", 1e-12), ("take", 1e12)):
        root = _root()
        cfg = _cfg(root, f"deepspeed.zero_stage={stage}", "train.max_steps=2", "train.grad_clip=null",
                   f"train.skip_grad_norm={threshold}")
        random_dataset(f"{root}/data", cfg, num_samples=16)
        trainer, _ = _run(cfg, tmp_path / name)
        torch.manual_seed(cfg.train.seed)  # as the trainer did: its initial weights
        runs[name] = (trainer, build_network(cfg.model))
    for name, (trainer, initial) in runs.items():
        trained = trainer.engine.module.network.state_dict()
        same = all(torch.equal(trained[k].cpu(), v) for k, v in initial.state_dict().items())
        assert same == (name == "skip"), name
        adamw = getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)  # ZeRO wraps it
        assert adamw.skipped_steps == (2 if name == "skip" else 0)


@pytest.mark.parametrize("stage", [0, 2])
def test_dydit_stage1_updates_as_the_official_train_py(one_rank, tmp_path, stage):
    """train.stage1_update=official through the real DeepSpeed engine: below the threshold each stage-1
    step is taken twice with the same gradient (two Adam updates); at or above it, once with the raw
    gradient (never skipped), which is exactly what the skip rule takes below its threshold."""
    weights, repeated = {}, {}
    for name, rule, threshold in (("official-below", "official", 1e12), ("official-above", "official", 1e-12),
                                  ("skip-below", "skip", 1e12)):
        root = _root()
        cfg = _cfg(root, "model.method=dydit", f"deepspeed.zero_stage={stage}", "train.max_steps=2",
                   "train.grad_clip=null", f"train.skip_grad_norm={threshold}", f"train.stage1_update={rule}")
        random_dataset(f"{root}/data", cfg, num_samples=16)
        trainer, _ = _run(cfg, tmp_path / name)
        weights[name] = {k: v.detach().cpu().clone() for k, v in trainer.engine.module.network.state_dict().items()}
        adamw = getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)  # ZeRO wraps it
        repeated[name] = (adamw.repeated_steps, adamw.skipped_steps)
    assert repeated == {"official-below": (2, 0), "official-above": (0, 0), "skip-below": (0, 0)}
    same = {k: torch.equal(weights["official-above"][k], v) for k, v in weights["skip-below"].items()}
    assert all(same.values())  # one raw step each: the same weights
    assert not all(torch.equal(weights["official-below"][k], v) for k, v in weights["skip-below"].items())


def test_skip_grad_norm_refuses_clipping_and_zero3():
    with pytest.raises(config_lib.ConfigError, match="replaces clipping: set train.grad_clip=null"):
        check_deepspeed(config_lib.load("debug", ["train.skip_grad_norm=200"]))
    with pytest.raises(config_lib.ConfigError, match="train.stage1_update=official repeats a step"):
        check_deepspeed(config_lib.load("debug", ["train.stage1_update=official"]))
    with pytest.raises(config_lib.ConfigError, match="zero_stage 0-2"):
        check_deepspeed(config_lib.load("debug", ["train.skip_grad_norm=200", "train.grad_clip=null",
                                                  "deepspeed.zero_stage=3"]))


def test_stage_switch_inside_a_run_survives_a_resume(one_rank, tmp_path):
    """DyDiT stage 1 -> stage 2 at model.dynamic.stage1_steps in one run: the complete-model loss stops at
    the switch, and a run resumed after the switch continues in stage 2 exactly as the uninterrupted one."""
    switch = ["model.dynamic.stage1_steps=1"]
    root_a, root_b = _root(), _root()
    cfg_a = _cfg(root_a, *switch)
    random_dataset(f"{root_a}/data", cfg_a, num_samples=24)
    straight, session_a = _run(cfg_a, tmp_path / "a")
    complete = {r["step"]: r["complete"] for r in session_a.reports}
    assert complete[1] > 0 and complete[2] == complete[3] == complete[4] == 0.0

    cfg_b = _cfg(root_b, *switch, "train.max_steps=2")
    random_dataset(f"{root_b}/data", cfg_b, num_samples=24)
    _run(cfg_b, tmp_path / "b")
    resumed, session_b = _run(_cfg(root_b, *switch), tmp_path / "b")
    assert resumed.resumed_from == 2 and [r["complete"] for r in session_b.reports] == [0.0, 0.0]
    assert session_a.reports[-1]["loss"] == pytest.approx(session_b.reports[-1]["loss"], rel=1e-5)


@pytest.mark.parametrize("part", ["deepspeed/mp_rank_00_model_states.pt", "optim_states", "trainer/rank-00000.pt"])
def test_a_corrupt_checkpoint_is_an_input_error_naming_the_file(one_rank, tmp_path, part):
    """A committed checkpoint whose file went bad on storage (truncated: a restart reads the same bytes):
    CheckpointError naming the checkpoint and the file, which the launcher does not retry
    (`train.worker.NOT_RETRIED`), with what to do."""
    from dydit_dist.models import CheckpointError
    from dydit_dist.train import checkpoints
    from dydit_dist.train.worker import NOT_RETRIED

    root = _root()
    cfg = _cfg(root, "train.max_steps=2")
    random_dataset(f"{root}/data", cfg, num_samples=24)
    _run(cfg, tmp_path / "run")
    checkpoint = tmp_path / "run" / "step-0000002"
    assert checkpoints.unreadable_files(str(checkpoint)) == []  # whole files: another error is re-raised as it is
    [bad] = [p for p in checkpoint.rglob("*.pt") if part in str(p.relative_to(checkpoint))]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        _run(_cfg(root, "train.max_steps=4"), tmp_path / "run")
    assert isinstance(err.value, NOT_RETRIED)
    message = str(err.value)
    assert message.startswith(f"checkpoint {root}/runs/{cfg.storage.run}/checkpoints/step-0000002 is unreadable: "
                              f"{bad.relative_to(checkpoint)} is not a whole torch file (RuntimeError: ")
    assert message.endswith("a restart would read the same bytes: to resume from the checkpoint before it, remove "
                            f"the folder and its entries in {root}/runs/{cfg.storage.run}/checkpoints/"
                            "checkpoint_manager_snapshot.json (checkpoint_results, latest_checkpoint_result: Ray "
                            "refuses a snapshot naming a missing folder), or start a new storage.run with "
                            "train.init_from set to an earlier EMA export")


@pytest.mark.parametrize("stage", [2, 3])
def test_a_resume_into_another_network_is_an_input_error_naming_the_checkpoint(one_rank, tmp_path, stage):
    """Model settings that change the network's tensors (here learn_sigma: the output layer's width), let through
    by train.allow_changed_settings: DeepSpeed's strict load fails the same way on every restart, so it is a
    CheckpointError (not retried) naming the checkpoint and what to do, not a bare RuntimeError retried
    ray.max_failures times."""
    from dydit_dist.models import CheckpointError
    from dydit_dist.train.worker import NOT_RETRIED

    root = _root()
    cfg = _cfg(root, "train.max_steps=2", f"deepspeed.zero_stage={stage}")
    random_dataset(f"{root}/data", cfg, num_samples=24)
    _run(cfg, tmp_path / "run")
    with pytest.raises(CheckpointError) as err:
        _run(_cfg(root, f"deepspeed.zero_stage={stage}", "model.learn_sigma=false"), tmp_path / "run")
    assert isinstance(err.value, NOT_RETRIED)
    message = str(err.value)
    assert message.startswith(f"checkpoint {root}/runs/{cfg.storage.run}/checkpoints/step-0000002 holds another "
                              "network than this run's model settings make (")
    assert "network.final_layer.linear.weight [32, 64] -> [16, 64]" in message
    assert message.endswith("or start a new storage.run with train.init_from set to this run (its EMA weights)")
    if stage == 2:  # a checkpoint written before meta.json recorded the shapes: torch's strict load tells
        meta = tmp_path / "run" / "step-0000002" / "meta.json"
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "shapes"}))
        with pytest.raises(CheckpointError, match=r"step-0000002 holds another network than this run's model "
                                                  r"settings make \(size mismatch for network.final_layer"):
            _run(_cfg(root, f"deepspeed.zero_stage={stage}", "model.learn_sigma=false"), tmp_path / "run")


def test_a_resume_with_another_shuffle_buffer_is_an_input_error_naming_it(one_rank, tmp_path):
    """The checkpoint's data positions only hold under the shuffle order they were saved with: a resume
    with another data.shuffle_buffer stops with a DataError, which the launcher does not retry (exit 2),
    saying what changed and what to do."""
    from dydit_dist.data import DataError
    from dydit_dist.train.worker import NOT_RETRIED

    root = _root()
    cfg = _cfg(root, "train.max_steps=2")
    random_dataset(f"{root}/data", cfg, num_samples=24)
    _run(cfg, tmp_path / "run")
    with pytest.raises(DataError) as err:
        _run(_cfg(root, "data.shuffle_buffer=4"), tmp_path / "run")
    assert isinstance(err.value, NOT_RETRIED)
    assert f"shuffle_buffer (data.shuffle_buffer): {cfg.data.shuffle_buffer} -> 4" in str(err.value)
    assert str(err.value).endswith("restore those settings, or start a new storage.run")


def test_an_input_error_from_a_dataloader_worker_keeps_only_its_own_message(tmp_path):
    """torch re-raises a DataLoader worker's error with \"Caught ShardError in DataLoader worker process 0\"
    and the worker's traceback in its message; the job's one-line error is the error's own message, the
    same as without DataLoader workers."""
    import numpy as np

    from dydit_dist.data import LatentStream
    from dydit_dist.data.synthetic import write_dataset
    from dydit_dist.shardset import ShardError, shard_url
    from dydit_dist.train.worker import without_worker_traceback

    uri = str(tmp_path / "data")
    write_dataset(uri, np.zeros((8, 4, 2, 2), np.float16), labels=np.zeros(8, int), shard_size=4, num_classes=1)
    storage.write_bytes(shard_url(uri, 1), b"not the shard")
    errors = {}
    for num_workers in (0, 1):
        with pytest.raises(ShardError) as err:
            for _ in LatentStream(uri, batch_size=4, num_workers=num_workers, shuffle_buffer=0):
                pass
        errors[num_workers] = without_worker_traceback(err.value)
    assert "DataLoader worker" in str(err.value) and "Traceback" in str(err.value)  # torch's message
    assert type(errors[1]) is ShardError and str(errors[1]) == str(errors[0])
    assert str(errors[1]).startswith(f"corrupt shard {shard_url(uri, 1)}: 13 bytes") and "\n" not in str(errors[1])


@pytest.mark.parametrize("stage", [2, 3])
def test_a_resume_exports_the_ema_that_a_dead_worker_left_unwritten(one_rank, tmp_path, monkeypatch, stage):
    """The worker dies after the last checkpoint (step == train.max_steps) is committed but before its EMA
    export is written (train.async_checkpoint writes it in a thread): the resumed run has no step left to
    train, and exports the EMA of the resumed state itself, so that ema-latest.json reaches max_steps."""
    from dydit_dist.train import checkpoints

    root = _root()
    cfg = _cfg(root, f"deepspeed.zero_stage={stage}", "train.keep_checkpoints=1")
    random_dataset(f"{root}/data", cfg, num_samples=24)
    exports = f"{root}/runs/{cfg.storage.run}/checkpoints"
    write_ema = checkpoints.write_ema

    def dies_at_the_last_step(weights, step, *args):
        if step == cfg.train.max_steps:
            raise RuntimeError("test fault: the worker died before the export was written")
        return write_ema(weights, step, *args)

    monkeypatch.setattr(checkpoints, "write_ema", dies_at_the_last_step)
    dead = Trainer(cfg, LocalSession(str(tmp_path)))
    with pytest.raises(RuntimeError, match="test fault"):
        dead.train()
    assert LocalSession(str(tmp_path)).checkpoints() == ["step-0000002", "step-0000004"]  # step 4 is committed
    assert storage.read_json(f"{exports}/ema-latest.json")["step"] == 2  # its export is not
    monkeypatch.setattr(checkpoints, "write_ema", write_ema)

    resumed, session = _run(cfg, tmp_path)
    assert resumed.resumed_from == 4 and session.reports == []  # nothing left to train
    pointer = storage.read_json(f"{exports}/ema-latest.json")
    assert pointer["step"] == 4 and pointer["url"] == f"{exports}/ema-0000004.safetensors"
    assert [u for u in storage.listdir(exports) if u.endswith(".safetensors")] == [pointer["url"]]  # keep=1
    exported, lost = read_weights(pointer["url"]), dead.state.ema.gather()
    assert all(torch.equal(exported[k], lost[k]) for k in lost)  # the EMA the dead worker had at step 4

    # Once the export is there, a resume does not write it again.
    calls = []
    monkeypatch.setattr(checkpoints, "write_ema", lambda *args: calls.append(args))
    _run(cfg, tmp_path)
    assert calls == []


def test_flexdit_draws_a_rank_interval_only_with_a_grid_per_interval(one_rank, tmp_path):
    """FlexDiT with a grid per timestep interval trains each rank on its own interval, so that a batch
    shares one grid; with one grid (the released runs) every rank draws t over [0, T), as train.py does."""
    for grids, intervals, expected in (("[6,4]", 2, (0, 1000)), ("[4]", 1, None)):
        root = _root()
        cfg = _cfg(root, "model.method=flexdit", f"model.flexdit.grid_sizes={grids}",
                   f"model.flexdit.num_intervals={intervals}")
        random_dataset(f"{root}/data", cfg, num_samples=16)
        assert Trainer(cfg, LocalSession(str(tmp_path / str(intervals)))).t_range == expected


def _non_finite_first_step(monkeypatch):
    """NaN inputs in the first micro-batch only: step 1's loss and gradient are NaN, step 2's finite."""
    from dydit_dist.train import loop

    draw, calls = loop.draw_inputs, []

    def poisoned(*args, **kwargs):
        inputs = draw(*args, **kwargs)
        if not calls:
            inputs["x0"] = torch.full_like(inputs["x0"], float("nan"))
        calls.append(1)
        return inputs

    monkeypatch.setattr(loop, "draw_inputs", poisoned)


@pytest.mark.parametrize("rule", ["skip", "official"])
def test_a_non_finite_gradient_norm_is_skipped_not_taken_nor_repeated(one_rank, tmp_path, monkeypatch, rule):
    """Under ZeRO-0 nothing else stops a NaN gradient: DyDiT's skip rule skips it (NaN >= threshold is false),
    the stage-1 rule neither takes nor repeats it; the weights stay finite and the report counts the skip."""
    _non_finite_first_step(monkeypatch)
    root = _root()
    cfg = _cfg(root, "deepspeed.zero_stage=0", "train.max_steps=2", "train.grad_clip=null",
               "train.skip_grad_norm=1e12", f"train.stage1_update={rule}")
    random_dataset(f"{root}/data", cfg, num_samples=16)
    trainer, session = _run(cfg, tmp_path)
    adamw = getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)
    assert (adamw.skipped_steps, adamw.repeated_steps) == (1, 1 if rule == "official" else 0)  # step 2 repeated
    assert all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())
    assert [r["train/skipped_steps"] for r in session.reports] == [1, 1]


def test_steps_deepspeed_skips_are_reported(one_rank, tmp_path, monkeypatch):
    """ZeRO-2 drops a step whose gradient holds NaN (on every rank): train/skipped_steps says so."""
    _non_finite_first_step(monkeypatch)
    root = _root()
    cfg = _cfg(root, "deepspeed.zero_stage=2", "train.max_steps=3", "model.method=static")
    random_dataset(f"{root}/data", cfg, num_samples=16)
    trainer, session = _run(cfg, tmp_path)
    assert trainer.engine.skipped_steps == 1
    assert [r["train/skipped_steps"] for r in session.reports] == [1, 1, 1]
    assert all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())


def test_a_loss_that_stays_non_finite_stops_the_run_before_nan_weights_are_checkpointed(one_rank, tmp_path, monkeypatch):
    """ZeRO-0 without a skip rule takes a NaN gradient: the weights and the EMA became NaN, and the run went on
    to the end, checkpointed and published them, and exited 0. A non-finite window is reported, not
    checkpointed; DIVERGED_WINDOWS of them in a row raise Diverged, an input error (not retried)."""
    from dydit_dist.train import loop
    from dydit_dist.train.worker import NOT_RETRIED

    draw = loop.draw_inputs

    def poisoned(*args, **kwargs):
        inputs = draw(*args, **kwargs)
        inputs["x0"] = torch.full_like(inputs["x0"], float("nan"))
        return inputs

    monkeypatch.setattr(loop, "draw_inputs", poisoned)
    root = _root()
    cfg = _cfg(root, "deepspeed.zero_stage=0", "train.max_steps=8", "model.method=static")
    random_dataset(f"{root}/data", cfg, num_samples=16)
    session = LocalSession(str(tmp_path))
    with pytest.raises(loop.Diverged, match=r"training diverged: the loss was NaN or infinite for 3 metrics window\(s\) "
                                            r"in a row, up to step 3 .*lower train.lr"):
        Trainer(cfg, session).train()
    assert issubclass(loop.Diverged, NOT_RETRIED)
    assert len(session.reports) == 2 and session.checkpoints() == []  # step 2's checkpoint: reported only
    assert not storage.find(f"{root}/runs/{cfg.storage.run}/checkpoints")


def test_a_full_staging_disk_names_the_folder_and_leaves_nothing(one_rank, tmp_path, monkeypatch):
    """A temp disk that fills while a rank stages its checkpoint: torch says only "[enforce fail at
    inline_container.cc:672] unexpected pos 576 vs 534" (as measured on a full tmpfs). The error now names the
    staging folder, its free space and TMPDIR, and the half-written folder is removed."""
    import errno
    import shutil
    import tempfile
    from collections import namedtuple

    from dydit_dist.train import checkpoints

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    root = _root()
    cfg = _cfg(root)
    random_dataset(f"{root}/data", cfg, num_samples=24)
    real_save = checkpoints.save

    def fills_the_disk(engine, state, directory, *args):
        real_save(engine, state, directory, *args)  # what a full disk leaves: files, then torch's error
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoints, "save", fills_the_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    with pytest.raises(OSError, match=rf"staging this rank's part of a checkpoint in {tmp_path}/tmp/\S+ failed "
                                      r"\(\[enforce fail .*unexpected pos 576 vs 534\): 1 MiB free .*set TMPDIR") as err:
        _run(cfg, tmp_path / "session")
    assert err.value.errno == errno.ENOSPC
    assert [n for n in os.listdir(tmp_path / "tmp") if n.startswith(checkpoints.STAGING_PREFIX)] == []
    # on the same nearly full disk, a device error stays itself (faults tells it apart), and so does any other
    for other in (RuntimeError("CUDA error: an illegal memory access was encountered"), ValueError("a bug")):
        folder = checkpoints.staging_folder()
        assert checkpoints.staging_failed(folder, other) is other and not os.path.exists(folder)


def test_skipped_updates_are_counted_across_a_resume(one_rank, tmp_path):
    """train/skipped_steps counts the run's skips: skip_on_grad_norm's own count starts at 0 in each worker, so
    a resumed run reported only those since its restart (DeepSpeed's own count is in its checkpoint)."""
    root = _root()
    cfg = _cfg(root, "deepspeed.zero_stage=2", "train.max_steps=2", "train.grad_clip=null", "train.skip_grad_norm=1e-12")
    random_dataset(f"{root}/data", cfg, num_samples=16)
    first, _ = _run(cfg, tmp_path / "run")
    assert first.skipped_steps() == 2
    resumed, session = _run(_cfg(root, "deepspeed.zero_stage=2", "train.grad_clip=null", "train.skip_grad_norm=1e-12"),
                            tmp_path / "run")
    assert resumed.resumed_from == 2 and resumed.skipped_steps() == 4
    assert session.reports[-1]["train/skipped_steps"] == 4
