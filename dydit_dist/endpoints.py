"""Where objects live and how one operation on them is bounded: storage URLs (`file://`, `s3://`,
`memory://`), the fsspec filesystem of each, and the one retry loop every operation of `storage` runs in.

Failures on S3 are bounded and retried in one place, `retry`:
- every operation has a wall-clock deadline, `storage.timeout_s` (plus the time its bytes take at
  `SLOWEST_BYTES_PER_S`, so a large object is not cut off), retries included; each botocore request
  also has connect and read timeouts of half of it, so one hung connection leaves time for a retry;
- transient errors (throttling, 5xx, timeouts, a dropped connection, a body cut short: `s3_errors.is_transient`)
  are retried `storage.retries` times with exponential backoff, each retry logged; botocore and s3fs
  make one attempt each, so the layers do not multiply (but in `storage.upload`, whose multipart requests
  botocore retries too: one throttled part is then sent again alone);
- PUTs are sent without `Expect: 100-continue` (aiohttp waits for the `100 Continue` with no timeout,
  so a stalled endpoint would hang a write forever);
- an unreachable endpoint, a missing bucket or denied access raises `StorageError` (an OSError) with
  the URL and the endpoint in the message (credentials written into a URL, `user:password@`, shown as `***`);
- `with deadline(at):` ends every operation of this thread by `at` (time.monotonic()) as well (the
  lease's heartbeat: its renewal is worthless after the holder's fence).
Local and `memory://` operations have no deadline.

S3 endpoint and region come from `configure` (the `storage` config section) or `AWS_ENDPOINT_URL`;
credentials from the usual AWS environment variables, profile or instance role, on every node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.asyn import AsyncFileSystem

from dydit_dist.s3_errors import is_transient, redirected

T = TypeVar("T")
log = logging.getLogger(__name__)

PROTOCOLS = ("file", "s3", "memory")
SLOWEST_BYTES_PER_S = 1 << 20  # an object moving slower than this counts as stalled (see the deadline)
_SCHEME_TYPO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(?!//)/*")  # `s3:/bucket`, `s3:bucket`, `file:/tmp`
_USERINFO = re.compile(r"(?<=://)[^/\s]*@")  # `user:password@` before a URL's host (to the last `@`)

# Options for s3fs, set once per process from the config (`configure`) or the AWS environment.
_S3_OPTIONS: dict[str, Any] = {}
_RETRIES = 5
_TIMEOUT_S = 60.0
_KNOWN_BUCKETS: set[str] = set()  # buckets seen to exist, so a missing object costs one request


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


def protocol(url: str) -> str:
    return _normalize(url).split("://", 1)[0]


def to_url(protocol: str, path: str) -> str:
    return f"file://{path}" if protocol == "file" else f"{protocol}://{path.lstrip('/')}"


def filesystem(url: str, attempts: int = 1) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for a URL. `attempts`: botocore's tries per S3 request
    (1: `retry` is the one retry layer; more only for a filesystem used by code that does not go through
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
            retries = 1  # `retry` is the one retry layer

            async def set_session(self, refresh=False, kwargs={}):  # noqa: B006 - s3fs's own signature
                client = await super().set_session(refresh=refresh, kwargs=kwargs)
                # aiohttp waits for the `100 Continue` without a timeout: a stalled endpoint would hang a PUT
                client.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)
                return client

        BoundedS3FileSystem.__qualname__ = "BoundedS3FileSystem"  # pickled by name: see `__getattr__`
        _BOUNDED_S3 = BoundedS3FileSystem
    return _BOUNDED_S3


def __getattr__(name: str):
    """`endpoints.BoundedS3FileSystem`, made on first use (s3fs is imported only where S3 is used); this is
    how an unpickling process finds the class."""
    if name == "BoundedS3FileSystem":
        return _bounded_s3_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _endpoint(url: str) -> str:
    """The S3 endpoint `url` is sent to, for messages: credentials written into it shown as `***`."""
    endpoint = _S3_OPTIONS.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    return _redacted(endpoint) if endpoint else "the AWS default endpoint"


def _redacted(endpoint: str) -> str:
    """`endpoint` with everything between its scheme and its last `@` as `***` (an AWS secret key may hold `/`)."""
    if "@" not in endpoint:
        return endpoint
    scheme = endpoint.split("://", 1)[0] + "://" if "://" in endpoint else ""
    return f"{scheme}***@{endpoint.rsplit('@', 1)[1]}"


def without_userinfo(text: str) -> str:
    """`text` (an exception's message) with the credentials of the endpoints in use, and of any other URL in
    it (`scheme://user:password@host`), replaced by `***`."""
    for endpoint in (_S3_OPTIONS.get("endpoint_url"), os.environ.get("AWS_ENDPOINT_URL")):
        if endpoint:
            text = text.replace(endpoint, _redacted(endpoint))
    return _USERINFO.sub("***@", text)


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


def retry(url: str, what: str, fn: Callable[[float], T], nbytes: int = 0) -> T:
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
            check_bucket(url)
            raise
        except FileExistsError:  # a create-only PUT that found the object (`create`)
            raise
        except Exception as err:  # noqa: BLE001 - classified below, re-raised with the URL
            left = budget - (time.monotonic() - start)
            if attempt <= _RETRIES and is_transient(err) and left > delay:
                log.warning("%s %s: attempt %d of %d failed (%s: %s); retrying in %.1f s",
                            what, url, attempt, _RETRIES + 1, type(err).__name__, without_userinfo(str(err)), delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            out_of_time = attempt <= _RETRIES and is_transient(err)  # a retry was due, the deadline too close
            raise _failure(url, what, err, attempt, time.monotonic() - start, budget, out_of_time) from err
    raise AssertionError("unreachable")


def _failure(url: str, what: str, err: Exception, attempts: int, elapsed: float, budget: float,
             out_of_time: bool = False) -> StorageError:
    where = f"endpoint {_endpoint(url)}, " if protocol(url) == "s3" else ""
    tries = f"{attempts} attempt{'s' if attempts > 1 else ''} in {elapsed:.1f} s"
    fsspec_deadline = isinstance(err, TimeoutError) and not str(err)
    if fsspec_deadline or out_of_time:
        last = "" if fsspec_deadline else f"; the last attempt: {type(err).__name__}: {without_userinfo(str(err))}"
        return StorageError(f"{what} {url} failed: no answer within the deadline of {budget:.3g} s "
                            f"({where}storage.timeout_s={_TIMEOUT_S:g}, {tries}{last})")
    hint = ""
    if isinstance(err, PermissionError):
        hint = ("; access denied: check the credentials the job runs with (AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, a profile or an instance role) and the bucket's policy")
    elif type(err).__name__ in ("NoCredentialsError", "PartialCredentialsError"):  # botocore's, not OSErrors
        hint = ("; no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run "
                "where an instance role or IRSA provides them (on every Ray node)")
    elif isinstance(err, RecursionError) or redirected(err):  # botocore follows a region-less 301 until it recurses
        hint = ("; the bucket answered from another region or endpoint (a redirect): set storage.region to the "
                "bucket's region, or storage.endpoint_url to the endpoint that serves it")
    return StorageError(f"{what} {url} failed: {type(err).__name__}: {without_userinfo(str(err))} ({where}{tries}){hint}")


def timed(fs, method: str, *args) -> Callable[[float], Any]:
    """`fs.<method>(*args)` as a function of the seconds left: fsspec's async filesystems (s3) cancel
    the call when they run out."""
    if isinstance(fs, AsyncFileSystem):
        return lambda left: getattr(fs, method)(*args, timeout=max(left, 0.01))
    return lambda left: getattr(fs, method)(*args)


def check_bucket(url: str) -> None:
    """Raise StorageError when `url` is on S3 and its bucket does not exist (or cannot be reached)."""
    if protocol(url) != "s3":
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

    if not retry(url, f"checking the bucket s3://{bucket} of", head):
        raise StorageError(f"{url}: bucket s3://{bucket} does not exist (endpoint: {_endpoint(url)})")
    _KNOWN_BUCKETS.add(bucket)
