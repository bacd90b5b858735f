"""One writer per run: a lease in the run folder, taken by creating an object, renewed by a heartbeat.

    lease = Lease.acquire(RunPaths(cfg).lease, "finetune", ttl_s=120)   # LeaseHeld naming the holder
    ...
    lease.release()

The lease is a folder of numbered objects, `{run}/lease/0000000001.json`, `0000000002.json`, ...,
each `{"host", "pid", "job", "since", "renewed", "ttl_s", "token", "released"}`. The highest number is
the lease; the others are leftovers. It is free when that object is released or has expired (not
renewed for `ttl_s` seconds: its holder died). Holders stamp `renewed` with their wall clock, which need
not agree with the reader's: a lease whose stamp looks between ttl/2 and `_SKEW_TTLS` x ttl old is watched
on the reader's monotonic clock and taken over only once it stayed unchanged for a whole `ttl_s` (a live
holder renews every ttl/4); older than that it is expired at once (the hosts' clocks are assumed to agree
to within `ttl_s`). Objects are only ever *created if absent* (`storage.create`), the one conditional operation
every backend has: `os.link` on local disk, a PUT with `If-None-Match: *` on S3 (botocore >= 1.35.20;
AWS S3 and moto answer 412 when the object exists), a check under a lock on `memory://`.

Acquire: list; none -> create number 1; the highest, n, held -> LeaseHeld (after polling for up to
`wait_s`, `storage.lease_wait_s`, for it to be released: a KubeRay retry starts while the lost attempt's
driver still renews), but when it looks not renewed for half its ttl (its holder missed beats: killed
without releasing it, as a retry after a crash finds it; or the clocks disagree) the job watches it for
a ttl as above: unchanged, it is taken; renewed, it is held; free -> create n + 1. A failed create means another job took n + 1 first: decide again (at
most `_ATTEMPTS` times, the waits for expiry included). After a create, list again: a higher
number means this job's view was stale (its number had been taken and cleaned up, see below), so it
removes its own object and decides again. Otherwise it holds the lease and removes the lower numbers.
The holder rewrites only its own object: every `ttl_s / 4` with a new `renewed`, and once with
`"released": true` at the end. Before each write it lists; a higher number means the lease expired
and was taken over: it logs an error, sets `lost`, stops renewing and calls `on_lost(lease)`; the jobs
pass `stop_job`, which stops the process (SIGTERM, so it exits as a stopped job does), so that two
jobs never go on writing one run.

A holder that cannot renew (storage unreachable, or slower than the beats) stops itself first. Another
job may take over only `ttl_s` after the last `renewed` it can read, and that is never earlier than
the holder's last *confirmed* renewal (a write that returned; this assumes a PUT the holder gave up on
does not land later over a newer one). So when `FENCE * ttl_s` has passed since that one (measured on
the monotonic clock), the holder sets `lost` and `stalled` and calls `on_lost` too: it stops while
nobody else can hold the run yet, leaving `(1 - FENCE) * ttl_s` for the process to stop and for the
hosts' clocks to disagree. A beat starts `ttl_s / 4` after the last confirmed renewal, or `ttl_s / 16`
after a failed one; its storage operations end by the fence (`storage.deadline`), so the half ttl
between them must fit at least one whole storage operation (`config`: lease_ttl_s >= 2 x timeout_s).
`release()` waits for a renewal in flight only until the fence, then gives up (`lost`, `stalled`).

Why two jobs never both hold it. (1) The highest number only grows: an object is removed only by
the holder of a higher number, or by its creator after seeing a higher one; release rewrites it.
(2) A job holds m only if it created m and then listed nothing above m; so m had never existed
before (a removed m implies a higher number, forever, by (1)) and only its holder writes it. Any
number above m is first m + 1, created by a job that listed m as the highest and read it released or
not renewed for `ttl_s`: the holder gave it up or stalled, and its next beat sees m + 1. Two jobs
creating the same number: one create fails. A stale job re-creating a number that was cleaned up:
its check after the create sees the higher one. A lost holder's last write may re-create its own
object below the highest: ignored, and removed by the next holder. Deleting the highest on release
would break (1) (the folder empty, one job creates 1 while a stale one re-creates the old number, and
both hold it): a released lease leaves its last object behind, and numbers are never reused.
Listings must show the writes made before them, as on local disk, AWS S3 and moto.

Limitation: S3-compatible stores that ignore `If-None-Match` on PUT (older MinIO, some gateways) make
the create a plain overwrite: the lease is then advisory only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from dydit_dist import storage

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{10})\.json$")
_ATTEMPTS = 8  # each failed attempt means another job created a number meanwhile
_HELD: list[Lease] = []  # the leases this process holds, newest last (`held`)
_POLL_S = 5.0  # how often a job waiting for a held lease (`wait_s`) looks again
_SKEW_TTLS = 2.0  # a lease not renewed for this many ttl_s by this host's clock is expired at once (module docstring)
FENCE = 0.75  # a holder whose last confirmed renewal is this many ttl_s old stops (module docstring)


class LeaseHeld(RuntimeError):
    """Another job holds the run's lease; the message names it (host, pid, job, since)."""


@dataclass
class Holder:
    host: str
    pid: int
    job: str
    since: float  # time.time() when acquired
    renewed: float  # time.time() of the last heartbeat
    ttl_s: float
    token: str
    released: bool = False

    def expired(self, now: float) -> bool:
        return now - self.renewed > self.ttl_s

    def free(self, now: float) -> bool:
        return self.released or self.expired(now)

    def describe(self, now: float) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        age = now - self.renewed
        renewed = (f"last renewed {age:.0f} s ago" if age >= -1 else
                   f"last renewed {-age:.0f} s in the future by this host's clock (the hosts' clocks disagree)")
        return (f"job {self.job!r} (pid {self.pid} on host {self.host}) since {since}, {renewed}, expires after "
                f"{self.ttl_s:g} s without renewal")


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def _object(url: str, number: int) -> str:
    return storage.join(url, f"{number:010d}.json")


def _numbers(url: str) -> list[int]:
    """The numbers of the lease objects in the folder `url`, ascending."""
    names = (u.rstrip("/").rsplit("/", 1)[-1] for u in storage.listdir(url))
    return sorted(int(m.group(1)) for m in map(_NAME.match, names) if m)


def _read(url: str, number: int) -> Holder | None:
    """Lease object `number`, or None when it is gone (cleaned up after a higher one was made)."""
    try:
        return Holder(**json.loads(storage.read_bytes(_object(url, number))))
    except FileNotFoundError:
        return None


def _remove(url: str, number: int) -> None:
    with contextlib.suppress(FileNotFoundError):  # another job cleaned it up first
        storage.remove(_object(url, number))


def _changes_within(url: str, number: int, seen: Holder) -> Holder | None:
    """Lease object `number` as it is once it differs from `seen` (renewed or released; a removed one, or a
    higher number: released, for the caller to decide again), watched for `seen.ttl_s` seconds of this host's
    monotonic clock; None when it stayed unchanged that long (its holder is gone, whatever the clocks say)."""
    end = time.monotonic() + seen.ttl_s
    while time.monotonic() < end:
        time.sleep(min(_POLL_S, seen.ttl_s / 8, max(end - time.monotonic(), 0.0)))
        current = _read(url, number)
        if current is None or max(_numbers(url), default=number) > number:
            return dataclasses.replace(seen, released=True)
        if current.renewed != seen.renewed or current.released or current.token != seen.token:
            return current
    return None


def read(url: str) -> Holder | None:
    """The lease in the folder `url` (its highest object, held or not), or None when there is none."""
    numbers = _numbers(url)
    return _read(url, numbers[-1]) if numbers else None


class Lease:
    """A held lease (object `number` in the folder `url`); `release()` (or the context manager) marks it
    released and stops the heartbeat."""

    def __init__(self, url: str, number: int, holder: Holder, on_lost: Callable[[Lease], None] | None = None):
        self.url, self.number, self.holder, self.on_lost = url, number, holder, on_lost
        self.lost = False  # taken over (or released): this job no longer writes the lease
        self.taken_by: str | None = None  # who took it over, once the heartbeat saw it
        self.stalled = False  # lost because this job could not renew it in time (the fence), not taken over
        self.confirmed = holder.renewed  # `renewed` of the last write that returned: stored for sure
        self._confirmed_at = time.monotonic() - max(0.0, time.time() - holder.renewed)  # the same, monotonic
        self._lock = threading.RLock()  # one write at a time; re-entered by a signal handler's release()
        self._lost_lock = threading.Lock()  # the heartbeat, the fence and release decide `lost` once
        self._stop = threading.Event()  # the heartbeat ends
        self._done = threading.Event()  # the fence ends: lost, or release() began (the job writes no more)
        self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        threading.Thread(target=self._fence, name="lease-fence", daemon=True).start()

    @classmethod
    def acquire(cls, url: str, job: str, ttl_s: float, on_lost: Callable[[Lease], None] | None = None,
                wait_s: float = 0.0) -> Lease:
        """Take the lease in the folder `url` for `job` (see the module docstring); LeaseHeld when
        another job holds it after `wait_s` seconds of waiting for it to be released or to expire (0: at
        once). `on_lost(lease)` runs in the heartbeat thread once a takeover is seen."""
        holder = Holder(socket.gethostname(), os.getpid(), job, 0.0, 0.0, ttl_s, uuid.uuid4().hex)
        deadline, waiting, attempts = time.monotonic() + wait_s, False, 0
        while attempts < _ATTEMPTS:
            # 1. The highest object decides: none or free -> the next number; held -> wait or refuse.
            numbers = _numbers(url)
            top = numbers[-1] if numbers else 0
            if top:
                current = _read(url, top)
                if current is None:
                    attempts += 1
                    continue  # cleaned up after the listing: a higher one exists now
                now = time.time()
                age = now - current.renewed
                renews = False  # seen renewing while its stamps look stale here: the hosts' clocks disagree
                if not current.released and current.ttl_s / 2 < age <= _SKEW_TTLS * current.ttl_s:
                    # A live holder renews every ttl/4 (and stops itself at 3/4): by this host's clock this one
                    # missed beats (killed without releasing it: an OOM-killed pod, a SIGKILL), or the two
                    # clocks disagree. Expiry is decided on this host's monotonic clock: a whole ttl unchanged.
                    log.warning("%s: the lease of %s; watching it for %.0f s: taken over if it is not renewed", url,
                                current.describe(now), current.ttl_s)
                    changed = _changes_within(url, top, current)
                    if changed is None:
                        log.warning("%s: taking over the lease of %s: not renewed for %.0f s by this host's clock",
                                    url, current.describe(time.time()), current.ttl_s)
                        current.released = True  # free: taken below
                    elif changed.released or changed.renewed == current.renewed:
                        attempts += 1  # released, or another number: decide again
                        continue
                    else:
                        current, renews, now = changed, True, time.time()
                if not current.free(now) or renews:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        waited = f" after waiting {wait_s:g} s (storage.lease_wait_s)" if wait_s else ""
                        skew = (f" (it renews, but its renewals look {now - current.renewed:.0f} s old by this host's "
                                "clock: the hosts' clocks disagree, or its writes land late)") if renews else ""
                        raise LeaseHeld(f"{url}: the run is held by {current.describe(now)}{skew}{waited}; wait for "
                                        f"it to finish, stop it, or use another storage.run")
                    if not waiting:  # a KubeRay retry: the lost attempt's driver may renew until Ray kills it
                        log.warning("%s: the run is held by %s; waiting up to %.0f s (storage.lease_wait_s) for "
                                    "it to be released or to expire", url, current.describe(now), left)
                        waiting = True
                    time.sleep(min(left, _POLL_S))
                    continue
                if not current.released:
                    log.warning("%s: taking over an expired lease of %s", url, current.describe(now))
            # 2. Create it; a failure means another job created that number first.
            mine, holder.since = top + 1, time.time()
            holder.renewed = holder.since
            if not storage.create(_object(url, mine), json.dumps(asdict(holder)).encode()):
                attempts += 1
                continue
            # 3. Nothing above it: held. Something above: this job's view was stale; withdraw.
            numbers = _numbers(url)
            if max(numbers, default=mine) > mine:
                _remove(url, mine)
                attempts += 1
                continue
            for number in numbers:
                if number < mine:
                    _remove(url, number)
            lease = cls(url, mine, holder, on_lost)
            _HELD.append(lease)
            return lease
        raise LeaseHeld(f"{url}: the lease changed hands {_ATTEMPTS} times while this job tried to take it; "
                        f"another job is taking it")

    def _taken(self) -> bool:
        """Whether a higher number exists (the lease expired and was taken over); logs who took it."""
        numbers = _numbers(self.url)
        if not numbers or numbers[-1] <= self.number:
            return False
        current = _read(self.url, numbers[-1])
        self.taken_by = "another job" if current is None else current.describe(time.time())
        log.error("%s: this job's lease was taken over by %s; no longer renewing it", self.url, self.taken_by)
        return True

    def _write(self) -> None:
        storage.write_bytes(_object(self.url, self.number), json.dumps(asdict(self.holder)).encode())

    def _lose(self, stalled: bool) -> bool:
        """Mark the lease lost; True for the first caller only (who then calls `on_lost`)."""
        with self._lost_lock:
            if self.lost:
                return False
            self.lost, self.stalled = True, stalled
            self._done.set()
            return True

    def _fence_at(self) -> float:
        """When (time.monotonic()) the holder stops unless a renewal is confirmed before."""
        return self._confirmed_at + FENCE * self.holder.ttl_s

    def _heartbeat(self) -> None:
        ttl = self.holder.ttl_s
        next_beat = self._confirmed_at + ttl / 4
        while not self._stop.wait(max(0.0, next_beat - time.monotonic())):
            with self._lock:
                if self._stop.is_set() or self.lost:
                    return
                try:
                    with storage.deadline(self._fence_at()):
                        if self._taken():
                            if self._lose(stalled=False) and self.on_lost is not None:
                                self.on_lost(self)
                            return
                        if self.lost:  # the fence stopped the job while the listing took its time
                            return
                        stamp, at = time.time(), time.monotonic()
                        self.holder.renewed = stamp
                        self._write()
                    self.confirmed, self._confirmed_at, next_beat = stamp, at, at + ttl / 4
                except OSError as err:  # storage trouble: try again soon, before the fence stops the job
                    log.warning("%s: lease renewal failed (%s); retrying", self.url, err)
                    next_beat = time.monotonic() + ttl / 16

    def _fence(self) -> None:
        """Stop the job (`on_lost`, with `stalled`) once its last confirmed renewal is FENCE * ttl_s old."""
        while not self._done.wait(max(0.0, self._fence_at() - time.monotonic())):
            if time.monotonic() >= self._fence_at():
                log.error("%s: this job's lease was not renewed for %.0f s (storage unreachable or too slow); "
                          "stopping before another job can take it over", self.url, time.time() - self.confirmed)
                if self._lose(stalled=True) and self.on_lost is not None:
                    self.on_lost(self)
                return

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released if it is still this job's (the object stays:
        numbers are never reused). A second call does nothing. It waits for a renewal in flight (which
        could otherwise undo this write) only until the fence: a renewal stuck on storage must not keep a
        stopping job alive past the time another job may take the run over."""
        self._stop.set()
        self._done.set()  # the job writes no more (its work ended, or it is exiting): nothing left to fence
        with contextlib.suppress(ValueError):
            _HELD.remove(self)
        if self.lost:
            return
        if not self._lock.acquire(timeout=max(0.0, self._fence_at() - time.monotonic())):
            if self._lose(stalled=True):
                log.warning("%s: a lease renewal is stuck on storage; not released, it expires %g s after the "
                            "last renewal", self.url, self.holder.ttl_s)
            return
        try:
            if self.lost:
                return
            with storage.deadline(self._fence_at()):
                if not self._taken():
                    self.holder.released, self.holder.renewed = True, time.time()
                    self._write()
            with self._lost_lock:
                self.lost = True
        finally:
            self._lock.release()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def held() -> list[Lease]:
    """The leases this process holds, newest first: a job's own, and those of the folders its stages
    write (jobs.reproduce); a stopping job releases them all."""
    return _HELD[::-1]


def stop_job(lease: Lease) -> None:
    """The jobs' `on_lost`: the run is another job's now, or may be soon (the fence), so this process stops
    as a SIGTERM stops it (the job's handler says what was kept and exits 143)."""
    job, ttl = lease.holder.job, lease.holder.ttl_s
    if lease.stalled:
        print(f"{job}: could not renew the lease {lease.url} for {time.time() - lease.confirmed:.0f} s (storage "
              f"unreachable or too slow; another job may take the run over {ttl:g} s after the last renewal, "
              "storage.lease_ttl_s); stopping first, so that two jobs never write one run", file=sys.stderr, flush=True)
    else:
        print(f"{job}: the lease {lease.url} was taken over by {lease.taken_by} (this job did not renew it for "
              f"{ttl:g} s: stalled, or storage too slow); stopping, so that two jobs never write one run",
              file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


def acquire_for_job(url: str, job: str, storage_cfg) -> Lease:
    """The lease of a job's folder `url` with the job's `storage` settings (`lease_ttl_s`, `lease_wait_s`),
    the process stopped when it is lost (`stop_job`)."""
    return Lease.acquire(url, job, storage_cfg.lease_ttl_s, on_lost=stop_job, wait_s=storage_cfg.lease_wait_s)
