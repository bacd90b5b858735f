"""Object storage through fsspec URLs: `file://` (the default for bare paths), `s3://`, `memory://`.

Every write is whole: local files are written to a temporary name in the same folder and renamed;
S3 objects are written with one PUT (s3fs uploads a small object at close, a multipart upload only
completes at close), so a reader never sees half an object. Transient S3 errors are retried with
exponential backoff (botocore's standard mode, `retries` times, plus s3fs's retries of broken
reads); an unreachable endpoint, a missing bucket or
denied access raises `StorageError` with the URL in the message. A missing *object* raises
`FileNotFoundError`, a missing *bucket* raises `StorageError`: the first is a state a job can handle
(nothing written yet), the second is a configuration error it must not paper over.

S3 endpoint and region come from `configure` (the `storage` config section) or `AWS_ENDPOINT_URL`;
credentials from the usual AWS environment variables, profile or instance role, on every node.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec

T = TypeVar("T")

# Options for s3fs, set once per process from the config (`configure`) or the AWS environment.
_S3_OPTIONS: dict[str, Any] = {}
_RETRIES = 5
_KNOWN_BUCKETS: set[str] = set()  # buckets seen to exist, so a missing object costs one request


class StorageError(OSError):
    """An object-storage operation failed for a reason the user must fix (URL in the message)."""


def configure(endpoint_url: str | None = None, region: str | None = None, retries: int = 5) -> None:
    """Set the S3 endpoint and region (credentials come from the usual AWS environment variables)."""
    global _RETRIES
    _S3_OPTIONS.clear()
    _KNOWN_BUCKETS.clear()
    client_kwargs = {}
    if endpoint_url:
        _S3_OPTIONS["endpoint_url"] = endpoint_url
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        _S3_OPTIONS["client_kwargs"] = client_kwargs
    _RETRIES = retries
    fsspec.config.conf.pop("s3", None)


def configure_from(cfg) -> None:
    """`configure` from a `StorageConfig`."""
    configure(cfg.endpoint_url, cfg.region, cfg.retries)


def _normalize(url: str) -> str:
    return url if "://" in url else "file://" + os.path.abspath(url)


def _protocol(url: str) -> str:
    return _normalize(url).split("://", 1)[0]


def _to_url(protocol: str, path: str) -> str:
    return f"file://{path}" if protocol == "file" else f"{protocol}://{path.lstrip('/')}"


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for a URL."""
    url = _normalize(url)
    protocol = url.split("://", 1)[0]
    options: dict[str, Any] = {}
    if protocol == "s3":
        # Other processes (Ray actors, other ranks) write the objects this one lists: no listing cache.
        # botocore retries throttling, 5xx and connection errors with backoff, `retries` times.
        options = {"use_listings_cache": False,
                   "config_kwargs": {"retries": {"max_attempts": _RETRIES + 1, "mode": "standard"}},
                   **_S3_OPTIONS}
        if "endpoint_url" not in options and os.environ.get("AWS_ENDPOINT_URL"):
            options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    elif protocol not in ("file", "memory"):
        raise StorageError(f"{url}: unsupported storage protocol {protocol!r}; use file://, s3:// or memory://")
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def _is_transient(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    permanent = ("nosuchbucket", "accessdenied", "forbidden", "invalidaccesskey", "signaturedoesnotmatch")
    if any(p in text.replace(" ", "") for p in permanent) or isinstance(err, FileNotFoundError | PermissionError):
        return False
    transient = ("timeout", "timed out", "throttl", "slowdown", "503", "500", "connection reset", "temporar")
    return any(t in text for t in transient)


def _retry(url: str, what: str, fn: Callable[[], T]) -> T:
    delay = 0.2
    for attempt in range(_RETRIES + 1):
        try:
            return fn()
        except FileNotFoundError:
            _check_bucket(url)
            raise
        except Exception as err:  # noqa: BLE001 - classified below, re-raised with the URL
            if attempt < _RETRIES and _is_transient(err):
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            raise StorageError(f"{what} {url} failed: {type(err).__name__}: {err}") from err
    raise AssertionError("unreachable")


def _check_bucket(url: str) -> None:
    """Raise StorageError when `url` is on S3 and its bucket does not exist (or cannot be reached)."""
    if _protocol(url) != "s3":
        return
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    if bucket in _KNOWN_BUCKETS:
        return
    try:
        found = fs.exists(bucket)
    except Exception as err:  # noqa: BLE001 - any failure here is reported with the URL
        raise StorageError(f"{url}: cannot reach bucket s3://{bucket}: {type(err).__name__}: {err}") from err
    if not found:
        endpoint = getattr(fs, "endpoint_url", None) or "the AWS default"
        raise StorageError(f"{url}: bucket s3://{bucket} does not exist (endpoint: {endpoint})")
    _KNOWN_BUCKETS.add(bucket)


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return posixpath.join(base, *parts) if parts else base


def exists(url: str) -> bool:
    """Whether the object (or folder) exists; StorageError when its S3 bucket does not."""
    fs, path = filesystem(url)
    found = _retry(url, "checking", lambda: fs.exists(path))
    if not found:
        _check_bucket(url)
    return found


def size(url: str) -> int:
    fs, path = filesystem(url)
    try:
        return _retry(url, "reading the size of", lambda: fs.size(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such object") from None


def listdir(url: str) -> list[str]:
    """URLs of the objects directly under a folder URL (sorted); empty when it does not exist."""
    fs, path = filesystem(url)
    if not exists(url):
        return []
    names = _retry(url, "listing", lambda: fs.ls(path, detail=False))
    return sorted(_to_url(_protocol(url), n) for n in names)


def find(url: str) -> list[str]:
    """URLs of every object under a folder URL, recursively (sorted); empty when it does not exist."""
    fs, path = filesystem(url)
    if not exists(url):
        return []
    names = _retry(url, "listing", lambda: fs.find(path))
    return sorted(_to_url(_protocol(url), n) for n in names)


def glob(pattern: str) -> list[str]:
    """URLs of the objects matching a glob pattern (`*`, `?`, `[...]`, `**`), sorted."""
    fs, path = filesystem(pattern)
    names = _retry(pattern, "listing", lambda: fs.glob(path))
    if not names:
        _check_bucket(pattern)
    return sorted(_to_url(_protocol(pattern), n) for n in names)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        return _retry(url, "reading", lambda: fs.cat_file(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such object") from None


def write_bytes(url: str, data: bytes) -> None:
    """Write one object whole: temp-and-rename on local disk, a single PUT elsewhere."""
    fs, path = filesystem(url)
    if _protocol(url) == "file":
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    try:
        _retry(url, "writing", lambda: fs.pipe_file(path, data))
    except FileNotFoundError as err:  # only a missing container makes a PUT "not found"
        raise StorageError(f"writing {url} failed: {err}") from err


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def write_json(url: str, value: Any) -> None:
    write_bytes(url, json.dumps(value, indent=2, sort_keys=True).encode())


def open_file(url: str, mode: str = "rb", **options):
    """An fsspec file object for reading (writes go through `write_bytes`); `options` go to `fs.open`
    (e.g. `block_size`: how much a remote file fetches per read)."""
    if "r" not in mode:
        raise ValueError("open_file is for reading; write objects whole with write_bytes")
    fs, path = filesystem(url)
    try:
        return _retry(url, "opening", lambda: fs.open(path, mode, **options))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such object") from None


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if _retry(url, "checking", lambda: fs.exists(path)):
        _retry(url, "removing", lambda: fs.rm(path, recursive=True))
