"""One writer per run (`dydit_dist.lease`): an atomic create, a heartbeat, an expiry, a clear refusal;
on local disk and on the S3 test server, and through `cli.run_job` (exit 2, the holder named, the
holder's lease left as it was)."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from dydit_dist import cli, storage
from dydit_dist import config as config_lib
from dydit_dist.lease import Lease, LeaseHeld, _create, read
from dydit_dist.paths import RunPaths


@pytest.fixture(params=["file", "s3"])
def run_url(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/runs/r"
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/runs/r"


def _stale(url: str, job: str = "sample", age_s: float = 600.0) -> None:
    now = time.time()
    storage.write_bytes(url, json.dumps({"host": "gone-host", "pid": 4242, "job": job, "since": now - age_s - 60,
                                         "renewed": now - age_s, "ttl_s": 120.0, "token": "old"}).encode())


def test_create_is_conditional(run_url):
    url = f"{run_url}/lease.json"
    assert _create(url, b"first")
    assert not _create(url, b"second")  # O_EXCL locally, If-None-Match: * on S3
    assert storage.read_bytes(url) == b"first"


def test_a_held_run_is_refused_with_the_holder_named(run_url):
    url = f"{run_url}/lease.json"
    with Lease.acquire(url, "finetune", ttl_s=60):
        with pytest.raises(LeaseHeld) as err:
            Lease.acquire(url, "sample", ttl_s=60)
        message = str(err.value)
        assert f"job 'finetune' (pid {os.getpid()} on host {socket.gethostname()}) since" in message
        assert "expires after 60 s without renewal" in message
        assert read(url).job == "finetune"  # the holder's lease is untouched
    assert not storage.exists(url)  # released


def test_an_expired_lease_is_taken_over(run_url):
    url = f"{run_url}/lease.json"
    _stale(url)
    with Lease.acquire(url, "finetune", ttl_s=60) as lease:
        assert read(url).token == lease.holder.token and read(url).pid == os.getpid()
    assert not storage.exists(url)


def test_the_heartbeat_renews_the_lease(tmp_path):
    url = f"file://{tmp_path}/runs/r/lease.json"
    with Lease.acquire(url, "sample", ttl_s=0.4) as lease:
        first = read(url).renewed
        deadline = time.monotonic() + 10
        while read(url).renewed == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read(url).renewed > first and not lease.lost
        with pytest.raises(LeaseHeld):  # renewed: never expired, although ttl_s has passed many times
            Lease.acquire(url, "evaluate", ttl_s=0.4)


def test_a_second_job_on_a_held_run_exits_2_naming_the_holder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("dydit_dist.preflight.check", lambda *args, **kwargs: None)  # no samples to evaluate here
    cfg = config_lib.load("debug", [f"storage.root={tmp_path}", "storage.run=held"])
    url = RunPaths(cfg).lease
    ran = []
    with Lease.acquire(url, "sample", ttl_s=60):
        assert cli.run_job("evaluate", lambda: ran.append(1), (), cfg) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("evaluate: ") and "the run is held by job 'sample'" in err[0]
        assert not ran and read(url).job == "sample"
    # the lease is released at the end of a job, which leaves nothing behind
    assert cli.run_job("evaluate", lambda: "done", (), cfg) == 0
    assert not storage.exists(url) and not os.path.exists(tmp_path / "runs" / "held")
