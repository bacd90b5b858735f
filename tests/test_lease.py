"""One writer per run (`dydit_dist.lease`): conditional creates, a heartbeat, an expiry, a clear refusal,
and a takeover that is a compare-and-swap (two jobs taking over the same expired lease, interleaved at
the worst points, leave exactly one holder); on local disk, on the S3 test server and in memory, and
through `cli.run_job` (exit 2, the holder named, the holder's lease left as it was)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from dydit_dist import cli, storage
from dydit_dist import config as config_lib
from dydit_dist import lease as lease_lib
from dydit_dist.lease import Lease, LeaseHeld, _numbers, _object, read
from dydit_dist.paths import RunPaths


@pytest.fixture(params=["file", "s3", "memory"])
def url(request, tmp_path):
    """A lease folder, `{run}/lease`."""
    if request.param == "file":
        return f"file://{tmp_path}/runs/r/lease"
    if request.param == "memory":
        return f"memory://leases/{uuid.uuid4().hex}/lease"
    return f"{request.getfixturevalue('s3_bucket')}/runs/r/lease"


def _stale(url: str, number: int = 1, job: str = "sample", age_s: float = 600.0) -> None:
    """Lease object `number` of a job that died `age_s` seconds ago without releasing it."""
    now = time.time()
    storage.write_bytes(_object(url, number), json.dumps({
        "host": "gone-host", "pid": 4242, "job": job, "since": now - age_s - 60, "renewed": now - age_s,
        "ttl_s": 120.0, "token": "old"}).encode())


def _on_call(monkeypatch, name: str, index: int, action) -> None:
    """Run `action()` once, just before call number `index` (from 0) of `lease.<name>`: a step of the job
    under test, with `action` (another job's whole acquire) happening in between. `create` is the lease's
    `storage.create`."""
    owner = lease_lib.storage if name == "create" else lease_lib
    original, calls = getattr(owner, name), []

    def hooked(*args):
        calls.append(args)
        if len(calls) == index + 1:
            action()
        return original(*args)

    monkeypatch.setattr(owner, name, hooked)


def test_a_held_run_is_refused_with_the_holder_named(url):
    with Lease.acquire(url, "finetune", ttl_s=60):
        with pytest.raises(LeaseHeld) as err:
            Lease.acquire(url, "sample", ttl_s=60)
        message = str(err.value)
        assert f"job 'finetune' (pid {os.getpid()} on host {socket.gethostname()}) since" in message
        assert "expires after 60 s without renewal" in message
        assert read(url).job == "finetune" and not read(url).released  # the holder's lease is untouched
    assert read(url).released and _numbers(url) == [1]


def test_an_expired_lease_is_taken_over(url):
    _stale(url)
    with Lease.acquire(url, "finetune", ttl_s=60) as lease:
        assert lease.number == 2 and read(url).token == lease.holder.token and read(url).pid == os.getpid()
        assert _numbers(url) == [2]  # the expired object is cleaned up by the new holder
    assert read(url).released and read(url).token == lease.holder.token


def test_release_then_acquire_again_never_reuses_a_number(url):
    tokens = []
    for expected in (1, 2, 3):
        with Lease.acquire(url, "sample", ttl_s=60) as lease:
            assert lease.number == expected and not read(url).released
            tokens.append(lease.holder.token)
        assert read(url).released and _numbers(url) == [expected]  # the last object stays, released
        lease.release()  # a second release does nothing
    assert len(set(tokens)) == 3


def test_the_heartbeat_renews_the_lease(tmp_path, monkeypatch):
    url = f"file://{tmp_path}/runs/r/lease"
    beats = [threading.Event(), threading.Event()]
    write = Lease._write

    def counted(self):
        write(self)
        next((e for e in beats if not e.is_set()), beats[-1]).set()

    monkeypatch.setattr(Lease, "_write", counted)
    with Lease.acquire(url, "sample", ttl_s=2.0) as lease:
        first = read(url).renewed
        assert beats[0].wait(10) and beats[1].wait(10)  # two renewals: ttl_s has passed
        assert read(url).renewed > first and not lease.lost
        with pytest.raises(LeaseHeld):  # renewed: never expired, although ttl_s has passed
            Lease.acquire(url, "evaluate", ttl_s=2.0)


def test_a_holder_whose_lease_was_taken_over_stops_renewing(tmp_path):
    """A holder that stalled past ttl_s: its lease was taken (a higher number); its next beat sees it."""
    url = f"file://{tmp_path}/runs/r/lease"
    lease = Lease.acquire(url, "sample", ttl_s=2.0)
    _stale(url, number=2, job="finetune", age_s=0)  # what a job that saw it expired creates
    lease._thread.join(timeout=10)  # the heartbeat ends when it sees the higher number
    assert not lease._thread.is_alive() and lease.lost
    lease.release()
    assert _numbers(url) == [1, 2] and read(url).job == "finetune" and not read(url).released
    assert not lease_lib._read(url, 1).released  # the lost lease is not touched on release


# (hooked function, call index): the job under test is interrupted before its first listing, between
# its listing and its read of the expired lease, between that read and its create, and between its
# create and the listing that confirms it.
STEPS = [("_numbers", 0), ("_read", 0), ("create", 0), ("_numbers", 1)]


@pytest.mark.parametrize("hook, index", STEPS)
@pytest.mark.parametrize("others", ["one takes it", "one takes and releases it, a third takes it"])
def test_two_takeovers_of_one_expired_lease_leave_one_holder(url, monkeypatch, hook, index, others):
    _stale(url)
    outcomes: dict[str, Lease | LeaseHeld] = {}

    def attempt(job: str) -> None:
        try:
            outcomes[job] = Lease.acquire(url, job, ttl_s=60)
        except LeaseHeld as err:
            outcomes[job] = err

    def interloper() -> None:
        attempt("other")
        if others != "one takes it":
            if isinstance(outcomes["other"], Lease):
                outcomes["other"].release()
            attempt("third")

    _on_call(monkeypatch, hook, index, interloper)
    attempt("tested")
    monkeypatch.undo()
    try:
        holders = [job for job, o in outcomes.items() if isinstance(o, Lease) and not o.lost]
        assert len(holders) == 1, outcomes
        held = outcomes[holders[0]]
        refused = [job for job, o in outcomes.items() if isinstance(o, LeaseHeld)]
        assert _numbers(url) == [held.number] and read(url).token == held.holder.token
        for job in refused:
            assert f"held by job {holders[0]!r}" in str(outcomes[job])
    finally:
        for o in outcomes.values():
            if isinstance(o, Lease):
                o.release()
    assert read(url).released


def test_a_stale_creator_whose_number_was_cleaned_up_loses(url, monkeypatch):
    """The job under test reads lease 1 as expired and stalls; meanwhile one job takes lease 2 and releases
    it, a third takes 3 and removes 1 and 2. The stalled job's create of 2 then succeeds, its check sees 3:
    it removes its 2 and is refused, naming the third."""
    _stale(url)
    third = []

    def meanwhile() -> None:
        Lease.acquire(url, "other", ttl_s=60).release()
        third.append(Lease.acquire(url, "third", ttl_s=60))
        assert _numbers(url) == [3]

    created = []
    _on_call(monkeypatch, "create", 0, meanwhile)
    create = storage.create
    monkeypatch.setattr(storage, "create", lambda u, data: created.append(u) or create(u, data))
    with pytest.raises(LeaseHeld, match="held by job 'third'"):
        Lease.acquire(url, "stale", ttl_s=60)
    assert created[0] == _object(url, 2) and _numbers(url) == [3] and read(url).job == "third"
    third[0].release()


def test_simultaneous_takeovers_leave_one_holder(url, monkeypatch):
    """Four jobs read the same expired lease, then all create at once: one holds it, three are refused."""
    if url.startswith("memory://"):
        pytest.skip("memory:// is one process; its create is made atomic by a lock")
    _stale(url)
    ready = threading.Barrier(4, timeout=60)
    create, waited = storage.create, set()

    def together(u, data):
        if threading.current_thread().name not in waited:  # every job has decided before any creates
            waited.add(threading.current_thread().name)
            ready.wait()
        return create(u, data)

    monkeypatch.setattr(storage, "create", together)
    outcomes = {}

    def attempt(job: str) -> None:
        try:
            outcomes[job] = Lease.acquire(url, job, ttl_s=60)
        except LeaseHeld as err:
            outcomes[job] = err

    threads = [threading.Thread(target=attempt, args=(f"job{i}",), name=f"job{i}") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    held = [o for o in outcomes.values() if isinstance(o, Lease)]
    try:
        assert len(outcomes) == 4 and len(held) == 1, outcomes
        assert _numbers(url) == [2] and read(url).token == held[0].holder.token
    finally:
        for lease in held:
            lease.release()


def test_a_second_job_on_a_held_run_exits_2_naming_the_holder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("dydit_dist.preflight.check", lambda *args, **kwargs: None)  # no samples to evaluate here
    cfg = config_lib.load("debug", [f"storage.root={tmp_path}", "storage.run=held"])
    url = RunPaths(cfg).lease
    ran = []
    with Lease.acquire(url, "sample", ttl_s=60):
        assert cli.run_job("evaluate", lambda: ran.append(1), (), cfg) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("evaluate: ") and "the run is held by job 'sample'" in err[0]
        assert not ran and read(url).job == "sample" and not read(url).released
    # the lease is released at the end of a job: the next one takes it
    assert cli.run_job("evaluate", lambda: "done", (), cfg) == 0
    assert read(url).job == "evaluate" and read(url).released and _numbers(url) == [2]


def test_a_lost_lease_calls_on_lost_once_and_release_does_not(tmp_path):
    """The heartbeat that sees a takeover calls `on_lost` (the jobs stop there); a normal release never does."""
    url = f"file://{tmp_path}/runs/r/lease"
    calls = []
    lease = Lease.acquire(url, "sample", ttl_s=2.0, on_lost=calls.append)
    _stale(url, number=2, job="finetune", age_s=0)  # taken over while this job stalled
    lease._thread.join(timeout=10)
    assert calls == [lease] and lease.lost and "job 'finetune'" in lease.taken_by
    lease.release()
    assert calls == [lease]
    kept = Lease.acquire(f"file://{tmp_path}/runs/other/lease", "sample", ttl_s=2.0, on_lost=calls.append)
    time.sleep(0.8)  # at least one renewal
    kept.release()
    assert calls == [lease]


@pytest.mark.parametrize("cause", ["taken over", "storage hangs"])
def test_a_job_whose_lease_is_lost_stops(tmp_path, cause):
    """`stop_job`: a job whose run was taken over, or whose storage hangs under the heartbeat (the fence),
    exits as a stopped job does (143), saying why, instead of writing on beside the job that holds the run
    now or may hold it soon."""
    lose = {"taken over": """
    url = RunPaths(cfg).lease.removeprefix("file://")
    with open(os.path.join(url, "0000000002.json"), "w") as f:  # another job takes the run over
        json.dump(dict(host="h", pid=1, job="finetune", since=time.time(), renewed=time.time(), ttl_s=60.0,
                       token="t", released=False), f)""",
            "storage hangs": """
    from dydit_dist import lease
    lease.Lease._write = lambda self: time.sleep(60)  # every renewal hangs"""}[cause]
    script = f"""
import time
from dydit_dist import cli, config
from dydit_dist.paths import RunPaths
cfg = config.load("debug", ["storage.root={tmp_path}", "storage.run=r", "storage.lease_ttl_s=4", "storage.timeout_s=2"])
cli.install_signal_handlers("sample", cfg)
def work():
    import json, os{lose}
    time.sleep(30)
    return "not stopped"
import dydit_dist.preflight
dydit_dist.preflight.check = lambda *a, **k: None
raise SystemExit(cli.run_job("sample", work, (), cfg))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr[-2000:]
    if cause == "taken over":
        assert f"sample: the lease {tmp_path}/runs/r/lease was taken over by job 'finetune'" in done.stderr
    else:
        assert re.search(rf"sample: could not renew the lease {re.escape(str(tmp_path))}/runs/r/lease for \d+ s", done.stderr)
        assert "stopping first, so that two jobs never write one run" in done.stderr
    assert "not stopped" not in done.stdout


def test_a_holder_that_cannot_renew_stops_before_its_lease_can_be_taken(tmp_path, monkeypatch):
    """Storage hangs under the heartbeat: the fence calls `on_lost` (stalled) FENCE * ttl_s after the last
    renewal that was stored, while the lease still reads as held: no other job could have taken the run."""
    url = f"file://{tmp_path}/runs/r/lease"
    hang, seen, writes = threading.Event(), [], []
    write = Lease._write
    monkeypatch.setattr(Lease, "_write", lambda self: hang.wait(30) and writes.append(write(self)))

    def on_lost(lease):
        seen.append((lease.stalled, read(url).free(time.time()), time.time() - read(url).renewed))

    lease = Lease.acquire(url, "finetune", ttl_s=4.0, on_lost=on_lost)
    deadline = time.time() + 20
    while not seen and time.time() < deadline:
        time.sleep(0.05)
    hang.set()
    assert len(seen) == 1 and lease.lost and lease.stalled
    stalled, free, age = seen[0]
    assert stalled and not free and lease_lib.FENCE * 4.0 <= age < 4.0, seen
    lease._thread.join(timeout=10)  # the heartbeat ends after the write it was stuck in: no beat after the fence
    assert not lease._thread.is_alive() and len(writes) == 1
    lease.release()
    assert seen == [(True, False, age)] and not read(url).released


def test_a_stopping_job_does_not_wait_past_the_fence_for_a_stuck_renewal(tmp_path, monkeypatch):
    """release() (the SIGTERM handler calls it) while a renewal hangs on storage: it gives up at the fence,
    while the lease still reads as held, instead of keeping the process alive until another job may take
    the run over."""
    url = f"file://{tmp_path}/runs/r/lease"
    hang, stuck, calls = threading.Event(), threading.Event(), []
    write = Lease._write

    def hung(self):
        stuck.set()
        hang.wait(30)
        write(self)

    monkeypatch.setattr(Lease, "_write", hung)
    lease = Lease.acquire(url, "sample", ttl_s=4.0, on_lost=calls.append)
    assert stuck.wait(20)  # the first renewal is stuck
    lease.release()
    free, age = read(url).free(time.time()), time.time() - read(url).renewed
    hang.set()
    assert lease.lost and lease.stalled and calls == []  # gave up; on_lost is for a job still running
    assert not free and lease_lib.FENCE * 4.0 - 0.1 <= age < 4.0
    lease._thread.join(timeout=10)
    assert not read(url).released  # the stuck renewal landed; the lease expires after ttl_s


def test_a_failed_beat_is_retried_before_the_fence(tmp_path, monkeypatch):
    """A renewal that fails once (storage error) is retried at ttl_s / 16 and the job keeps its lease."""
    url = f"file://{tmp_path}/runs/r/lease"
    failures, calls = [OSError("connection reset")], []
    write = Lease._write

    def flaky(self):
        if failures:
            raise failures.pop()
        write(self)

    monkeypatch.setattr(Lease, "_write", flaky)
    with Lease.acquire(url, "finetune", ttl_s=4.0, on_lost=calls.append) as lease:
        first = lease.confirmed
        deadline = time.time() + 20
        while lease.confirmed == first and time.time() < deadline:
            time.sleep(0.02)
        assert not failures and first < lease.confirmed < first + lease_lib.FENCE * 4.0  # renewed before the fence
        time.sleep(max(0.0, first + lease_lib.FENCE * 4.0 + 0.3 - time.time()))  # past the first fence time
        assert calls == [] and not lease.lost
    assert read(url).released


def test_a_lease_that_missed_its_beats_is_waited_out_not_refused(tmp_path):
    """A holder killed without releasing (an OOM-killed pod; the KubeRay retry comes in seconds): its lease,
    not renewed for over half its ttl, is waited out and taken over; a recently renewed one is refused."""
    url = f"file://{tmp_path}/runs/r/lease"
    now = time.time()
    storage.write_bytes(_object(url, 1), json.dumps({
        "host": "gone-host", "pid": 4242, "job": "finetune", "since": now - 60, "renewed": now - 3.0,
        "ttl_s": 4.0, "token": "old"}).encode())
    start = time.monotonic()
    with Lease.acquire(url, "finetune", ttl_s=60) as lease:
        assert lease.number == 2 and 0.9 <= time.monotonic() - start < 10  # ~2 s: until it expired
    storage.write_bytes(_object(url, 3), json.dumps({
        "host": "live-host", "pid": 4343, "job": "sample", "since": now, "renewed": time.time() - 0.5,
        "ttl_s": 4.0, "token": "live"}).encode())
    start = time.monotonic()
    with pytest.raises(LeaseHeld, match="job 'sample' .pid 4343 on host live-host"):
        Lease.acquire(url, "finetune", ttl_s=60)
    assert time.monotonic() - start < 1.0


def test_a_job_told_to_wait_takes_the_lease_its_holder_releases_meanwhile(url, monkeypatch):
    """storage.lease_wait_s: a KubeRay retry starts while the lost attempt's driver still renews (Ray drains
    the head for up to 80 s without stopping the job); it waits for the release instead of exiting 2, and a
    holder that goes on past the wait is refused, the wait named."""
    monkeypatch.setattr(lease_lib, "_POLL_S", 0.1)
    holder = Lease.acquire(url, "finetune", ttl_s=60)
    threading.Timer(1.0, holder.release).start()
    start = time.monotonic()
    with Lease.acquire(url, "finetune", ttl_s=60, wait_s=30) as lease:
        assert lease.number == 2 and 0.9 <= time.monotonic() - start < 10
        start = time.monotonic()
        with pytest.raises(LeaseHeld, match=r"after waiting 0.5 s \(storage.lease_wait_s\); wait for it"):
            Lease.acquire(url, "sample", ttl_s=60, wait_s=0.5)
        assert 0.5 <= time.monotonic() - start < 5
        assert read(url).token == lease.holder.token and not read(url).released  # untouched by the waiter
    assert read(url).released


def test_a_lease_that_cannot_be_released_leaves_the_jobs_outcome_as_it_was(tmp_path, capsys, monkeypatch):
    """A storage error while releasing, after the work ended: the job's exit status stands (0 here, not a
    crash), and the message says the lease expires on its own."""
    monkeypatch.setattr("dydit_dist.preflight.check", lambda *args, **kwargs: None)
    cfg = config_lib.load("debug", [f"storage.root={tmp_path}", "storage.run=r"])

    def fail(self):
        raise storage.StorageError("writing the lease failed: no answer within the deadline")

    monkeypatch.setattr(Lease, "_write", fail)  # renewals and the release's write (acquire creates, not writes)
    assert cli.run_job("evaluate", lambda: "done", (), cfg) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "done"
    assert f"evaluate: could not release the lease {RunPaths(cfg).lease} (writing the lease failed" in err
    assert "it expires 120 s after its last renewal" in err


_HOLDER = """
import sys, time
from dydit_dist.lease import Lease
lost = []
lease = Lease.acquire(sys.argv[1], "finetune", ttl_s=4.0, on_lost=lambda lease: lost.append(1))
print("holds", lease.number, flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end and not lost:
    time.sleep(0.1)
print("lost" if lost else "held", flush=True)
if not lost:
    lease.release()
"""


@pytest.mark.parametrize("skew_s", [3.5, 6.0])
def test_a_live_holder_is_not_taken_over_by_a_host_whose_clock_runs_ahead(tmp_path, monkeypatch, skew_s):
    """The holder stamps `renewed` with its wall clock. A job on a host whose clock ran 0.875 ttl (3.5 s of a
    4 s ttl) ahead read the live lease as expired, took it over and so stopped a healthy job; at 1.5 ttl it
    waited, then ended with "the lease changed hands 8 times". It now watches the lease on its own
    monotonic clock and finds it renewed: held, and the message says the clocks disagree."""
    import types

    url = f"file://{tmp_path}/runs/r/lease"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, url, "6"], stdout=subprocess.PIPE, text=True,
                              cwd=str(Path(__file__).resolve().parents[1]))
    try:
        assert holder.stdout.readline().strip() == "holds 1"
        monkeypatch.setattr(lease_lib, "time", types.SimpleNamespace(
            time=lambda: time.time() + skew_s, monotonic=time.monotonic, sleep=time.sleep,
            strftime=time.strftime, gmtime=time.gmtime))
        start = time.monotonic()
        with pytest.raises(LeaseHeld, match="it renews, but its renewals look .* the hosts' clocks disagree"):
            Lease.acquire(url, "sample", ttl_s=4.0)
        assert time.monotonic() - start < 12.0  # found renewed (every ttl/4), not waited on for ever
        monkeypatch.undo()
        assert _numbers(url) == [1] and not read(url).released
    finally:
        out = holder.communicate(timeout=60)[0]  # it holds for 6 s, then releases
    assert out.split() == ["held"]  # never taken over
