"""Object storage through fsspec URLs: `file://` (the default for bare paths), `s3://`, `memory://`.

Every write is whole: local files are written to a temporary name in the same folder and renamed;
S3 objects are written with one PUT (s3fs uploads a small object at close, a multipart upload only
completes at close), so a reader never sees half an object. A missing *object* raises
`FileNotFoundError`, a missing *bucket* raises `StorageError`: the first is a state a job can handle
(nothing written yet), the second is a configuration error it must not paper over.

Failures on S3 are bounded and retried in one place, `_retry`:
- every operation has a wall-clock deadline, `storage.timeout_s` (plus the time its bytes take at
  `SLOWEST_BYTES_PER_S`, so a large object is not cut off), retries included; each botocore request
  also has connect and read timeouts of half of it, so one hung connection leaves time for a retry;
- transient errors (throttling, 5xx, timeouts, a dropped connection, a body cut short: `s3_errors.is_transient`)
  are retried `storage.retries` times with exponential backoff, each retry logged; botocore and s3fs
  make one attempt each, so the layers do not multiply;
- a file opened with `open_file` reads through the same retries, each read one operation, resumed at
  its offset (`_RetryingReader`);
- PUTs are sent without `Expect: 100-continue` (aiohttp waits for the `100 Continue` with no timeout,
  so a stalled endpoint would hang a write forever);
- an unreachable endpoint, a missing bucket or denied access raises `StorageError` (an OSError) with
  the URL and the endpoint in the message;
- `with deadline(at):` ends every operation of this thread by `at` (time.monotonic()) as well (the
  lease's heartbeat: its renewal is worthless after the holder's fence).
Local and `memory://` operations have no deadline.

S3 endpoint and region come from `configure` (the `storage` config section) or `AWS_ENDPOINT_URL`;
credentials from the usual AWS environment variables, profile or instance role, on every node.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.asyn import AsyncFileSystem

from dydit_dist.s3_errors import is_transient, precondition_failed

T = TypeVar("T")
log = logging.getLogger(__name__)

PROTOCOLS = ("file", "s3", "memory")
SLOWEST_BYTES_PER_S = 1 << 20  # an object moving slower than this counts as stalled (see the deadline)
_SCHEME_TYPO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(?!//)/*")  # `s3:/bucket`, `s3:bucket`, `file:/tmp`

# Options for s3fs, set once per process from the config (`configure`) or the AWS environment.
_S3_OPTIONS: dict[str, Any] = {}
_RETRIES = 5
_TIMEOUT_S = 60.0
_KNOWN_BUCKETS: set[str] = set()  # buckets seen to exist, so a missing object costs one request
_MEMORY_LOCK = threading.Lock()  # `create` on memory://


class StorageError(OSError):
    """An object-storage operation failed for a reason the user must fix (URL in the message)."""


def configure(endpoint_url: str | None = None, region: str | None = None, retries: int = 5,
              timeout_s: float = 60.0) -> None:
    """Set the S3 endpoint and region (credentials come from the usual AWS environment variables), how
    often a transient error is retried and the deadline of one operation (see the module docstring)."""
    global _RETRIES, _TIMEOUT_S
    _S3_OPTIONS.clear()
    _KNOWN_BUCKETS.clear()
    client_kwargs = {}
    if endpoint_url:
        _S3_OPTIONS["endpoint_url"] = endpoint_url
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        _S3_OPTIONS["client_kwargs"] = client_kwargs
    _RETRIES, _TIMEOUT_S = retries, timeout_s
    fsspec.config.conf.pop("s3", None)


def configure_from(cfg) -> None:
    """`configure` from a `StorageConfig`, in a process that writes a job's outputs (a job's driver, a
    Ray worker): its `root` must outlive the process (`check_output_root`)."""
    check_output_root(cfg.root)
    configure(cfg.endpoint_url, cfg.region, cfg.retries, cfg.timeout_s)


def check_url(url: str) -> str:
    """`url` made explicit (a bare path becomes `file://` + its absolute path); StorageError for a
    mistyped scheme (`s3:/bucket/x` would otherwise be a local folder named `s3:`) or an unsupported one."""
    if "://" not in url:
        typo = _SCHEME_TYPO.match(url)
        if typo:
            scheme = typo.group(1)
            raise StorageError(f"{url}: a URL with a mistyped scheme separator (it would be a local folder "
                               f"named '{scheme}:'); write {scheme}://{url[typo.end():]}")
        return "file://" + os.path.abspath(url)
    protocol, rest = url.split("://", 1)
    if protocol == "s3" and (not rest or rest.startswith("/")):
        raise StorageError(f"{url}: an s3:// URL without a bucket; write s3://BUCKET/folder")
    if protocol not in PROTOCOLS:
        raise StorageError(f"{url}: unsupported storage protocol {protocol!r}; use a folder (file://), s3:// (any "
                           "S3-compatible store through storage.endpoint_url, GCS's included) or memory:// (tests)")
    return url


def check_output_root(url: str) -> None:
    """StorageError unless `url` can hold a job's outputs: a valid URL whose objects outlive this
    process (`memory://` lives in one process: the writes of Ray workers, and of the job itself once
    it exits, would be lost)."""
    if check_url(url).startswith("memory://"):
        raise StorageError(f"storage.root={url}: memory:// storage lives in one process and a job's outputs are written by "
                           "Ray workers; use a folder or s3://")


def _normalize(url: str) -> str:
    return check_url(url)


def _protocol(url: str) -> str:
    return _normalize(url).split("://", 1)[0]


def _to_url(protocol: str, path: str) -> str:
    return f"file://{path}" if protocol == "file" else f"{protocol}://{path.lstrip('/')}"


def filesystem(url: str, attempts: int = 1) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for a URL. `attempts`: botocore's tries per S3 request
    (1: `_retry` is the one retry layer; more only for a filesystem used by code that does not go through
    `storage`, as Ray Train's own reads and writes: `retrying_filesystem`)."""
    url = _normalize(url)
    if not url.startswith("s3://"):
        return fsspec.core.url_to_fs(url)
    # Other processes (Ray actors, other ranks) write the objects this one lists: no listing cache.
    attempt_s = _TIMEOUT_S / 2
    options = {"use_listings_cache": False,
               "config_kwargs": {"retries": {"total_max_attempts": attempts, "mode": "standard"},
                                 "connect_timeout": attempt_s, "read_timeout": attempt_s},
               **_S3_OPTIONS}
    if "endpoint_url" not in options and os.environ.get("AWS_ENDPOINT_URL"):
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    fs = _bounded_s3_class()(**options)
    return fs, fs._strip_protocol(url)


def retrying_filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """`filesystem(url)` whose S3 requests botocore retries (throttling, 5xx, dropped connections) with
    backoff, `storage.retries` times: for code that does not call `storage` (Ray Train's checkpoint
    downloads and its run snapshot), whose single failed request would otherwise fail a worker group or
    end the run."""
    return filesystem(url, attempts=_RETRIES + 1)


_BOUNDED_S3 = None


def _bounded_s3_class():
    """s3fs's filesystem with one attempt per request and no `Expect: 100-continue` on PUTs, as a class:
    a filesystem pickled to another process (Ray Train uploads checkpoints through one) is rebuilt
    from its class and constructor arguments, so instance tweaks would not travel; the connect/read
    timeouts travel in `config_kwargs`."""
    global _BOUNDED_S3
    if _BOUNDED_S3 is None:
        import botocore.handlers
        import s3fs

        class BoundedS3FileSystem(s3fs.S3FileSystem):
            retries = 1  # `_retry` is the one retry layer

            async def set_session(self, refresh=False, kwargs={}):  # noqa: B006 - s3fs's own signature
                client = await super().set_session(refresh=refresh, kwargs=kwargs)
                # aiohttp waits for the `100 Continue` without a timeout: a stalled endpoint would hang a PUT
                client.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)
                return client

        BoundedS3FileSystem.__qualname__ = "BoundedS3FileSystem"  # pickled by name: see `__getattr__`
        _BOUNDED_S3 = BoundedS3FileSystem
    return _BOUNDED_S3


def __getattr__(name: str):
    """`storage.BoundedS3FileSystem`, made on first use (s3fs is imported only where S3 is used); this is
    how an unpickling process finds the class."""
    if name == "BoundedS3FileSystem":
        return _bounded_s3_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _endpoint(url: str) -> str:
    """The S3 endpoint `url` is sent to, for messages."""
    return _S3_OPTIONS.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS default endpoint"


_THREAD = threading.local()  # .at: the `deadline` of this thread's operations, if any


@contextlib.contextmanager
def deadline(at: float):
    """Within the block, this thread's S3 operations also end by `at` (time.monotonic()); nested: the earliest."""
    previous = getattr(_THREAD, "at", None)
    _THREAD.at = at if previous is None else min(at, previous)
    try:
        yield
    finally:
        _THREAD.at = previous


def _retry(url: str, what: str, fn: Callable[[float], T], nbytes: int = 0) -> T:
    """`fn(seconds_left)`, retried on transient errors with backoff, `storage.retries` times at most,
    all within one deadline: `storage.timeout_s` plus `nbytes` at `SLOWEST_BYTES_PER_S`, or the
    thread's `deadline` when that comes first."""
    start = time.monotonic()
    budget = _TIMEOUT_S + nbytes / SLOWEST_BYTES_PER_S
    if getattr(_THREAD, "at", None) is not None:
        budget = max(min(budget, _THREAD.at - start), 0.0)
    delay = 0.2
    for attempt in range(1, _RETRIES + 2):
        try:
            return fn(budget - (time.monotonic() - start))
        except FileNotFoundError:
            _check_bucket(url)
            raise
        except FileExistsError:  # a create-only PUT that found the object (`create`)
            raise
        except Exception as err:  # noqa: BLE001 - classified below, re-raised with the URL
            left = budget - (time.monotonic() - start)
            if attempt <= _RETRIES and is_transient(err) and left > delay:
                log.warning("%s %s: attempt %d of %d failed (%s: %s); retrying in %.1f s",
                            what, url, attempt, _RETRIES + 1, type(err).__name__, err, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            out_of_time = attempt <= _RETRIES and is_transient(err)  # a retry was due, the deadline too close
            raise _failure(url, what, err, attempt, time.monotonic() - start, budget, out_of_time) from err
    raise AssertionError("unreachable")


def _failure(url: str, what: str, err: Exception, attempts: int, elapsed: float, budget: float,
             out_of_time: bool = False) -> StorageError:
    where = f"endpoint {_endpoint(url)}, " if _protocol(url) == "s3" else ""
    tries = f"{attempts} attempt{'s' if attempts > 1 else ''} in {elapsed:.1f} s"
    fsspec_deadline = isinstance(err, TimeoutError) and not str(err)
    if fsspec_deadline or out_of_time:
        last = "" if fsspec_deadline else f"; the last attempt: {type(err).__name__}: {err}"
        return StorageError(f"{what} {url} failed: no answer within the deadline of {budget:.3g} s "
                            f"({where}storage.timeout_s={_TIMEOUT_S:g}, {tries}{last})")
    hint = ""
    if isinstance(err, PermissionError):
        hint = ("; access denied: check the credentials the job runs with (AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, a profile or an instance role) and the bucket's policy")
    elif type(err).__name__ in ("NoCredentialsError", "PartialCredentialsError"):  # botocore's, not OSErrors
        hint = ("; no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run "
                "where an instance role or IRSA provides them (on every Ray node)")
    return StorageError(f"{what} {url} failed: {type(err).__name__}: {err} ({where}{tries}){hint}")


def _timed(fs, method: str, *args) -> Callable[[float], Any]:
    """`fs.<method>(*args)` as a function of the seconds left: fsspec's async filesystems (s3) cancel
    the call when they run out."""
    if isinstance(fs, AsyncFileSystem):
        return lambda left: getattr(fs, method)(*args, timeout=max(left, 0.01))
    return lambda left: getattr(fs, method)(*args)


def _check_bucket(url: str) -> None:
    """Raise StorageError when `url` is on S3 and its bucket does not exist (or cannot be reached)."""
    if _protocol(url) != "s3":
        return
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    if bucket in _KNOWN_BUCKETS:
        return
    def head(left: float) -> bool:
        # HeadBucket, not `fs.exists`: s3fs's `exists` answers False for any error (a throttled or
        # denied request too), which would read as "no such bucket" and never be retried.
        try:
            fs.call_s3("head_bucket", Bucket=bucket, timeout=max(left, 0.01))
        except FileNotFoundError:  # 404 / NoSuchBucket (s3fs translates botocore's errors)
            return False
        return True

    if not _retry(url, f"checking the bucket s3://{bucket} of", head):
        raise StorageError(f"{url}: bucket s3://{bucket} does not exist (endpoint: {_endpoint(url)})")
    _KNOWN_BUCKETS.add(bucket)


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return posixpath.join(base, *parts) if parts else base


def exists(url: str) -> bool:
    """Whether the object (or folder) exists; StorageError when its S3 bucket does not."""
    fs, path = filesystem(url)
    found = _retry(url, "checking", _timed(fs, "exists", path))
    if not found:
        _check_bucket(url)
    return found


def size(url: str) -> int:
    fs, path = filesystem(url)
    try:
        return _retry(url, "reading the size of", _timed(fs, "size", path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such object") from None


def is_folder(url: str) -> bool:
    """Whether `url` is a folder (a prefix with objects under it, on S3), not an object."""
    fs, path = filesystem(url)
    return bool(_retry(url, "checking", _timed(fs, "isdir", path)))


def listdir(url: str) -> list[str]:
    """URLs of the objects directly under a folder URL (sorted); empty when it does not exist."""
    fs, path = filesystem(url)
    if not exists(url):
        return []
    names = _retry(url, "listing", _timed(fs, "ls", path, False))
    return sorted(_to_url(_protocol(url), n) for n in names)


def find(url: str) -> list[str]:
    """URLs of every object under a folder URL, recursively (sorted); empty when it does not exist."""
    fs, path = filesystem(url)
    if not exists(url):
        return []
    names = _retry(url, "listing", _timed(fs, "find", path))
    return sorted(_to_url(_protocol(url), n) for n in names)


def glob(pattern: str) -> list[str]:
    """URLs of the objects matching a glob pattern (`*`, `?`, `[...]`, `**`), sorted."""
    fs, path = filesystem(pattern)
    names = _retry(pattern, "listing", _timed(fs, "glob", path))
    if not names:
        _check_bucket(pattern)
    return sorted(_to_url(_protocol(pattern), n) for n in names)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    nbytes = size(url) if isinstance(fs, AsyncFileSystem) else 0  # the deadline grows with the object
    try:
        return _retry(url, "reading", _timed(fs, "cat_file", path), nbytes)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such object") from None


def write_bytes(url: str, data: bytes) -> None:
    """Write one object whole: temp-and-rename on local disk, a single PUT elsewhere."""
    fs, path = filesystem(url)
    if _protocol(url) == "file":
        _place_local(path, data, os.replace)
        return
    try:
        _retry(url, "writing", _timed(fs, "pipe_file", path, data), len(data))
    except FileNotFoundError as err:  # only a missing container makes a PUT "not found"
        raise StorageError(f"writing {url} failed: {err}") from err


def create(url: str, data: bytes) -> bool:
    """Write the object `url` whole only if it does not exist yet: True when it now holds `data`, False
    when another writer's object was there first (left as it is). On local disk `os.link` of a complete
    temporary file (exclusive like O_EXCL); on S3 one PUT with `If-None-Match: *` (s3fs
    `pipe_file(mode="create")`, answered 412 when the object exists), retried like any write: a retry
    that finds the object holding exactly `data` is this call's own PUT that landed (True). `memory://`
    (one process) checks and writes under a lock. S3-compatible stores that ignore `If-None-Match`
    overwrite instead."""
    fs, path = filesystem(url)
    protocol = _protocol(url)
    if protocol == "file":
        try:
            _place_local(path, data, os.link)
        except FileExistsError:
            return False
        return True
    if protocol == "memory":
        with _MEMORY_LOCK:
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
            return True
    attempts = []

    def put(left: float) -> None:
        attempts.append(left)
        fs.pipe_file(path, data, mode="create", timeout=max(left, 0.01))

    try:
        _retry(url, "creating", put, len(data))
    except FileExistsError:
        return len(attempts) > 1 and read_bytes(url) == data
    except StorageError as err:
        if not precondition_failed(err.__cause__):  # a 412 whose answer does not name the condition
            raise
        return len(attempts) > 1 and read_bytes(url) == data
    except FileNotFoundError as err:  # only a missing container makes a PUT "not found"
        raise StorageError(f"creating {url} failed: {err}") from err
    return True


def _place_local(path: str, data: bytes, place: Callable[[str, str], None]) -> None:
    """Write `data` to a temporary file beside `path`, synced, then `place(tmp, path)` (os.replace: an
    overwrite; os.link: a create that fails when `path` exists): a reader never sees half a file."""
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        place(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def write_json(url: str, value: Any) -> None:
    write_bytes(url, json.dumps(value, indent=2, sort_keys=True).encode())


def open_file(url: str, mode: str = "rb", **options):
    """A binary file object for reading (read, readinto, seek, tell; writes go through `write_bytes`);
    `options` go to `fs.open` (e.g. `block_size`: how much a remote file fetches per read). On S3 every
    read is retried like any operation (`_RetryingReader`)."""
    if "r" not in mode:
        raise ValueError("open_file is for reading; write objects whole with write_bytes")
    fs, path = filesystem(url)
    try:
        f = _retry(url, "opening", lambda left: fs.open(path, mode, **options))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such object") from None
    return _RetryingReader(url, f) if isinstance(fs, AsyncFileSystem) else f


class _RetryingReader(io.RawIOBase):
    """A remote fsspec file whose reads are operations of `_retry`: a transient failure (a connection
    dropped mid-body, throttling) is read again from the same offset, within `storage.retries` and the
    deadline of the bytes asked for (plus the read-ahead block the file fetches with them).

    The same file reads again: s3fs's file fetches byte ranges on demand, one attempt each, and does not
    move its offset on a failed read; and it asks for the version it opened (`If-Match` its ETag), so a
    replaced object is an error rather than a mix of two versions. An attempt in flight is bounded by
    botocore's connect and read timeouts, not cut at the deadline (the file's reads take no timeout)."""

    def __init__(self, url: str, file):
        super().__init__()
        self.url, self.file = url, file

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError(f"{self.url}: read from a closed file")
        start = self.file.tell()
        left = max(self.file.size - start, 0)
        nbytes = min(left, size if size is not None and size >= 0 else left)

        def attempt(seconds_left: float) -> bytes:
            self.file.seek(start)
            return self.file.read(size)

        return _retry(self.url, f"reading at byte {start} of", attempt, nbytes + self.file.blocksize)

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.file.close()
        super().close()


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if _retry(url, "checking", _timed(fs, "exists", path)):
        _retry(url, "removing", _timed(fs, "rm", path, True))


def upload(local_path: str, url: str) -> None:
    """Copy a local file to `url` whole (a file of any size: streamed, never read into memory)."""
    fs, path = filesystem(url)
    if _protocol(url) == "file":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    _retry(url, "uploading to", _timed(fs, "put_file", local_path, path), os.path.getsize(local_path))


def download(url: str, local_path: str) -> None:
    """Copy the object at `url` to a local file (streamed)."""
    fs, path = filesystem(url)
    nbytes = size(url) if isinstance(fs, AsyncFileSystem) else 0
    try:
        _retry(url, "downloading", _timed(fs, "get_file", path, local_path), nbytes)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such object") from None
