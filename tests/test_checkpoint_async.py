"""Checkpoints off the critical path: training goes on while a checkpoint uploads, a checkpoint is the
resume point only once committed, and an upload that fails leaves the previous committed one."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

from dydit_dist import config as config_lib
from dydit_dist import storage
from dydit_dist.data.synthetic import random_dataset
from dydit_dist.train.loop import Trainer
from dydit_dist.train.ray_session import FailingUpload, LocalSession


def _cfg(root: str, *overrides):
    return config_lib.load("debug", [
        "ray.num_workers=1", "train.global_batch_size=4", "train.micro_batch_size=2", "train.max_steps=6",
        "train.checkpoint_every=2", "train.log_every=1", "data.num_workers=0", f"storage.root={root}",
        f"data.uri={root}/data", *overrides])


def _partial_then_fail(source: str, destination: str) -> None:
    """An upload that dies half way: some files arrive, the commit never does."""
    os.makedirs(destination, exist_ok=True)
    shutil.copy(os.path.join(source, "meta.json"), destination)
    raise OSError("test fault: the connection dropped")


class PartialUpload(FailingUpload):
    def report(self, metrics, checkpoint_dir=None, name=None, upload_fn=None):
        if checkpoint_dir and metrics.get("step") == self.step:
            upload_fn = _partial_then_fail
        self.session.report(metrics, checkpoint_dir=checkpoint_dir, name=name, upload_fn=upload_fn)


def test_a_failed_upload_leaves_the_previous_committed_checkpoint_as_the_resume_point(one_rank, tmp_path):
    root = f"memory://ckpt-{uuid.uuid4().hex[:8]}"
    cfg = _cfg(root)
    random_dataset(cfg.data.uri, cfg, num_samples=32)
    folder = str(tmp_path / "session")
    session = PartialUpload(LocalSession(folder), step=4, marker=f"{root}/fault.json")

    # The upload of step 4 fails in the background; training goes on and the error surfaces at the next
    # checkpoint (step 6), which is then never written.
    trainer = Trainer(cfg, session)
    with pytest.raises(OSError, match="test fault: the connection dropped"):
        trainer.train()
    assert trainer.state.step == 6
    assert os.path.exists(os.path.join(folder, "step-0000004", "meta.json"))  # half an upload is there...
    assert LocalSession(folder).checkpoints() == ["step-0000002"]  # ...but only step 2 is committed
    exports = f"{root}/runs/debug/checkpoints"
    assert storage.exists(f"{exports}/ema-0000004.safetensors")  # step 4's EMA was written, but the pointer
    assert storage.read_json(f"{exports}/ema-latest.json")["step"] == 2  # names only a committed step's

    # A new run resumes from step 2, and its checkpoints commit.
    resumed = Trainer(cfg, LocalSession(folder))
    assert resumed.resumed_from == 2
    resumed.train()
    assert LocalSession(folder).checkpoints() == ["step-0000002", "step-0000004", "step-0000006"]
    assert storage.read_json(f"{root}/runs/debug/checkpoints/ema-latest.json")["step"] == 6


def test_the_session_deletes_the_local_folder_once_uploaded(tmp_path):
    source = tmp_path / "local"
    (source / "deepspeed").mkdir(parents=True)
    (source / "deepspeed" / "x.pt").write_bytes(b"123")
    session = LocalSession(str(tmp_path / "session"))
    session.report({"step": 1}, checkpoint_dir=str(source), name="step-0000001")
    session.wait_committed()
    assert not source.exists()
    assert session.checkpoints() == ["step-0000001"]
    assert (tmp_path / "session" / "step-0000001" / "deepspeed" / "x.pt").read_bytes() == b"123"


def test_staging_folders_of_ended_processes_are_removed_at_a_worker_start(tmp_path, monkeypatch):
    """A worker killed before its checkpoint upload ended leaves its local staging folder (a rank's DeepSpeed
    state, GBs): the next worker on the node removes those of processes that no longer run, and only those."""
    import socket
    import subprocess
    import sys
    import tempfile

    from dydit_dist.train import checkpoints

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    host = socket.gethostname()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"dydit-ckpt-{host}-{int(ended.stdout)}-x1y2"
    (dead / "deepspeed").mkdir(parents=True)
    (dead / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"0" * 1024)
    absurd = tmp_path / f"dydit-ckpt-{host}-{10**30}-x"  # no process has that number
    absurd.mkdir()
    live = checkpoints.staging_folder()
    assert os.path.basename(live).startswith(f"dydit-ckpt-{host}-{os.getpid()}-")
    others = [tmp_path / "dydit-ckpt-notapid", tmp_path / f"dydit-ckpt-{host}x-{int(ended.stdout)}-x",  # not ours
              tmp_path / f"dydit-ckpt-another-host-{int(ended.stdout)}-x"]  # a temp folder shared between nodes
    for other in others:
        other.mkdir()
    assert sorted(checkpoints.remove_stale_staging()) == sorted([str(dead), str(absurd)])
    assert not dead.exists() and os.path.isdir(live) and all(other.exists() for other in others)
