"""Exit codes and messages of the jobs: a bad config or YAML file is one line `job: message` with
exit 2, before ray / deepspeed / diffusers are imported; a bug keeps its traceback (exit 1); SIGTERM
and SIGINT print what was kept and how to resume, release the run's lease and exit 143 / 130."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dydit_dist.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("ray", "deepspeed", "diffusers")


def _job(*args, env=None, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})}, **kwargs)
    return done, time.monotonic() - start


def _message(stderr: str) -> list[str]:
    """stderr without -X importtime's lines."""
    return [line for line in stderr.splitlines() if not line.startswith("import time:")]


def _imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("job", ["finetune", "sample", "evaluate", "prepare", "reproduce", "calibrate"])
def test_a_config_typo_is_one_line_before_the_heavy_imports(job, tmp_path):
    done, seconds = _job("-m", f"jobs.{job}", "--config", "debug", f"storage.root={tmp_path}", "train.lrr=1")
    print(f"{job}: config typo reported in {seconds:.1f} s")
    assert done.returncode == 2
    lines = _message(done.stderr)
    head = f"{job}: unknown config key 'train.lrr'; did you mean 'train.lr'? valid keys in section 'train': "
    assert len(lines) == 1 and lines[0].startswith(head)
    keys = lines[0][len(head):].split(", ")
    assert {"lr", "max_steps", "global_batch_size", "micro_batch_size", "warmup_steps", "seed"} <= set(keys)
    assert keys == [f.name for f in dataclasses.fields(TrainConfig)]  # every key of the section, nothing else
    assert not _imported(done.stderr) & set(HEAVY)
    assert not (tmp_path / "runs").exists()


def test_a_yaml_syntax_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1\n")
    done, _ = _job("-m", "jobs.sample", "--config", str(bad), f"storage.root={tmp_path}")
    lines = _message(done.stderr)
    assert done.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("sample: while parsing a flow sequence") and str(bad) in lines[0]


def test_an_env_interpolation_is_refused_and_nothing_written(tmp_path):
    done, _ = _job("-m", "jobs.finetune", f"storage.root={tmp_path}", "storage.endpoint_url=${oc.env:SECRET_X}",
                   env={"SECRET_X": "hunter2"})
    lines = _message(done.stderr)
    assert done.returncode == 2 and len(lines) == 1 and "hunter2" not in done.stdout + done.stderr
    assert lines[0].startswith("finetune: storage.endpoint_url='${oc.env:SECRET_X}': interpolations")
    assert not any(tmp_path.iterdir())


def test_a_bug_keeps_its_traceback(capsys):
    from dydit_dist import cli
    from dydit_dist.config import ConfigError

    def bug():
        raise ValueError("a bug, not an input error")  # a ValueError the job does not name

    with pytest.raises(ValueError, match="a bug"):
        cli.run_job("sample", bug, (ConfigError,))
    assert capsys.readouterr().err == ""


STOPPABLE = """
import sys, threading
from dydit_dist import cli
import dydit_dist.preflight
dydit_dist.preflight.check = lambda *args, **kwargs: None  # this test stops a job, it has no inputs to resolve
cfg, args = cli.parse_args(cli.job_parser("sample", "test"), sys.argv[1:])

def work():
    if cfg.ray.address == "local":  # a job that starts Ray, as prepare and evaluate do inside the library
        from dydit_dist.capacity import connect_ray
        connect_ray(cfg.ray.address)  # ray.init replaces the handlers; connect_ray puts the job's back
    from dydit_dist.lease import Lease
    Lease.acquire(cfg.storage.root + "/runs/stopped/static/lease", "sample", 60)  # a stage's, as reproduce takes
    print("working", flush=True)
    threading.Event().wait()

sys.exit(cli.run_job("sample", work, (), cfg))
"""


@pytest.mark.parametrize("sig, rc, on_ray", [(signal.SIGTERM, 143, False), (signal.SIGINT, 130, False),
                                            pytest.param(signal.SIGTERM, 143, True, marks=pytest.mark.integration)])
def test_a_signal_says_what_was_kept_and_releases_the_lease(sig, rc, on_ray, tmp_path):
    from dydit_dist.lease import read

    lease = f"{tmp_path}/runs/stopped/lease"
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    args = [f"storage.root={tmp_path}", "storage.run=stopped", *(["ray.address=local"] if on_ray else [])]
    proc = subprocess.Popen([sys.executable, "-c", STOPPABLE, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "RAY_TMPDIR": ray_dir})
    assert proc.stdout.readline() == "working\n"
    assert read(lease).job == "sample" and not read(lease).released
    started = _descendants(proc.pid, wait_for="ray::DashboardAgent" if on_ray else None)
    assert not on_ray or {"raylet", "gcs_server"} <= {name for *_, name in started}
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == rc
    # the Ray processes the job started (raylet, GCS, its agents, workers) end with it: none left orphaned
    deadline = time.monotonic() + 10
    while [p for p in started if _runs(*p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in started if _runs(*p)], f"left running: {[p for p in started if _runs(*p)]}"
    assert (f"sample: stopped by {signal.Signals(sig).name}; kept: every finished shard under "
            f"{tmp_path}/runs/stopped/samples") in err
    assert "rerun the same command to make only the missing ones" in err and "Traceback" not in err
    assert read(lease).released  # by the signal handler: the next job takes it at once
    assert read(f"{tmp_path}/runs/stopped/static/lease").released  # and every stage's lease the job held
    shutil.rmtree(ray_dir, ignore_errors=True)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(name, parent pid, start time) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
    return name, int(rest[1]), int(rest[19])


def _runs(pid: int, starttime: int, name: str) -> bool:
    found = _stat(pid)
    return found is not None and found[2] == starttime


def _descendants(root: int, wait_for: str | None = None, seconds: float = 30.0) -> list[tuple[int, int, str]]:
    """(pid, start time, name) of every process under `root`; with `wait_for`, once one of that name is there."""
    deadline = time.monotonic() + seconds
    while True:
        stats = {int(p): _stat(int(p)) for p in os.listdir("/proc") if p.isdigit()}
        below, frontier = [], [root]
        while frontier:
            parent = frontier.pop()
            children = [pid for pid, st in stats.items() if st is not None and st[1] == parent]
            below += [(pid, stats[pid][2], stats[pid][0]) for pid in children]
            frontier += children
        cmdlines = []
        for pid, _, _ in below:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdlines.append(f.read().decode(errors="replace"))
        if wait_for is None or any(wait_for in c for c in cmdlines) or time.monotonic() > deadline:
            return below
        time.sleep(0.5)


def test_an_input_error_raised_in_a_ray_task_is_its_own_message():
    """Ray re-raises a task's or actor's error as a RayTaskError that is also an instance of the cause's
    class (so `run_job` treats it as the input error it is); the line printed is the cause's message, not
    the remote traceback Ray's message carries."""
    from ray.exceptions import RayTaskError

    from dydit_dist import cli
    from dydit_dist.data import DataError

    cause = DataError("data.source: the input tar s3://b/in-002.tar is not a readable tar")
    err = RayTaskError("encode_chunk", "Traceback (most recent call last):\n  File \"x.py\", line 1", cause)
    err = err.as_instanceof_cause()
    assert isinstance(err, DataError) and "File \"x.py\"" in str(err)  # the remote traceback
    assert cli._one_line(err) == str(cause)
