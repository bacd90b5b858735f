"""One writer per run: a lease object in the run folder, created atomically, renewed by a heartbeat.

    lease = Lease.acquire(RunPaths(cfg).lease, "finetune", ttl_s=120)   # LeaseHeld naming the holder
    ...
    lease.release()

The lease is one JSON object, `{run}/lease.json`:

    {"host", "pid", "job", "since", "renewed", "ttl_s", "token"}

Created only if absent: `O_CREAT | O_EXCL` on local disk; on S3 one PUT with `If-None-Match: *`
(s3fs `pipe_file(mode="create")`, botocore >= 1.35.20), which AWS S3 and moto answer with 412 when
the object exists; `memory://` (one process) checks, then writes. A background thread rewrites it
every `ttl_s / 4` with a new `renewed` time (wall clock: hosts are assumed to agree to well within
`ttl_s`). A lease not renewed for `ttl_s` seconds has expired (its holder died without releasing
it) and is taken over: deleted if it still carries the token read, then created again conditionally.

Limitations: two jobs taking over the same expired lease in the same instant can both delete and
one re-create it; the heartbeat of the job that lost it sees another token, logs an error and stops
renewing (it does not stop the job). S3-compatible stores that ignore `If-None-Match` on PUT (older
MinIO, some gateways) make the create a plain overwrite: the lease is then advisory only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from dydit_dist import storage

log = logging.getLogger(__name__)


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

    def expired(self, now: float) -> bool:
        return now - self.renewed > self.ttl_s

    def describe(self, now: float) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return (f"job {self.job!r} (pid {self.pid} on host {self.host}) since {since}, "
                f"last renewed {now - self.renewed:.0f} s ago, expires after {self.ttl_s:g} s without renewal")


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def _create(url: str, data: bytes) -> bool:
    """Write `url` only if it does not exist; False when it exists."""
    fs, path = storage.filesystem(url)
    protocol = _protocol(url)
    if protocol == "file":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if protocol == "s3":
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except Exception as err:  # noqa: BLE001 - reported with the URL
            raise storage.StorageError(f"creating {url} failed: {type(err).__name__}: {err}") from err
        return True
    if storage.exists(url):  # memory://: one process
        return False
    storage.write_bytes(url, data)
    return True


def read(url: str) -> Holder | None:
    """The lease at `url`, or None when there is none (or it vanished while read)."""
    try:
        return Holder(**json.loads(storage.read_bytes(url)))
    except FileNotFoundError:
        return None


class Lease:
    """A held lease; `release()` (or the context manager) deletes it and stops the heartbeat."""

    def __init__(self, url: str, holder: Holder):
        self.url, self.holder = url, holder
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, url: str, job: str, ttl_s: float) -> Lease:
        """Create the lease at `url` for `job`, taking over an expired one; LeaseHeld when another
        job holds it."""
        now = time.time()
        holder = Holder(socket.gethostname(), os.getpid(), job, now, now, ttl_s, uuid.uuid4().hex)
        data = json.dumps(asdict(holder)).encode()
        for _ in range(2):  # an expired lease is removed once, then created again
            if _create(url, data):
                return cls(url, holder)
            current = read(url)
            if current is None:
                continue  # released between the create and the read
            if not current.expired(time.time()):
                raise LeaseHeld(f"{url}: the run is held by {current.describe(time.time())}; wait for it to "
                                f"finish, stop it, or use another storage.run")
            log.warning("%s: taking over an expired lease of %s", url, current.describe(time.time()))
            if (again := read(url)) is not None and again.token == current.token:
                storage.remove(url)
        raise LeaseHeld(f"{url}: another job took the run's lease while this one was taking it over")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.holder.ttl_s / 4):
            try:
                current = read(self.url)
                if current is None or current.token != self.holder.token:
                    self.lost = True
                    log.error("%s: this job's lease was taken by %s; no longer renewing it", self.url,
                              "nobody (deleted)" if current is None else current.describe(time.time()))
                    return
                self.holder.renewed = time.time()
                storage.write_bytes(self.url, json.dumps(asdict(self.holder)).encode())
            except OSError as err:  # storage trouble: try again at the next beat, before the lease expires
                log.warning("%s: lease renewal failed (%s); retrying", self.url, err)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this job's."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.lost:
            return
        current = read(self.url)
        if current is not None and current.token == self.holder.token:
            storage.remove(self.url)
            if _protocol(self.url) == "file":  # the run folder this lease made, if nothing else is in it
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(storage.filesystem(self.url)[1]))
        self.lost = True  # released: a second call does nothing

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
