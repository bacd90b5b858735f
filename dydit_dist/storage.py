"""Object storage through fsspec URLs: `file://` (the default for bare paths), `s3://`, `memory://`.

Every write is whole: local files are written to a temporary name in the same folder and renamed;
S3 objects are written with one PUT (s3fs uploads a small object at close, a multipart upload only
completes at close), so a reader never sees half an object. Transient S3 errors are retried with
exponential backoff; an unreachable endpoint, a missing bucket or denied access raises
`StorageError` with the URL in the message.
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


class StorageError(OSError):
    """An object-storage operation failed for a reason the user must fix (URL in the message)."""


def configure(endpoint_url: str | None = None, region: str | None = None, retries: int = 5) -> None:
    """Set the S3 endpoint and region (credentials come from the usual AWS environment variables)."""
    global _RETRIES
    _S3_OPTIONS.clear()
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


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for a URL."""
    url = _normalize(url)
    protocol = url.split("://", 1)[0]
    options: dict[str, Any] = {}
    if protocol == "s3":
        options = dict(_S3_OPTIONS)
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
            raise
        except Exception as err:  # noqa: BLE001 - classified below, re-raised with the URL
            if attempt < _RETRIES and _is_transient(err):
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            raise StorageError(f"{what} {url} failed: {type(err).__name__}: {err}") from err
    raise AssertionError("unreachable")


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return posixpath.join(base, *parts) if parts else base


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return _retry(url, "checking", lambda: fs.exists(path))


def size(url: str) -> int:
    fs, path = filesystem(url)
    return _retry(url, "reading the size of", lambda: fs.size(path))


def listdir(url: str) -> list[str]:
    """URLs of the objects directly under a folder URL (sorted); empty when it does not exist."""
    fs, path = filesystem(url)
    protocol = _normalize(url).split("://", 1)[0]
    if not _retry(url, "checking", lambda: fs.exists(path)):
        return []
    names = _retry(url, "listing", lambda: fs.ls(path, detail=False))
    return sorted(f"{protocol}://{n.lstrip('/') if protocol != 'file' else n}" for n in names)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        return _retry(url, "reading", lambda: fs.cat_file(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such object") from None


def write_bytes(url: str, data: bytes) -> None:
    """Write one object whole: temp-and-rename on local disk, a single PUT elsewhere."""
    fs, path = filesystem(url)
    protocol = _normalize(url).split("://", 1)[0]
    if protocol == "file":
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
    _retry(url, "writing", lambda: fs.pipe_file(path, data))


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def write_json(url: str, value: Any) -> None:
    write_bytes(url, json.dumps(value, indent=2, sort_keys=True).encode())


def open_file(url: str, mode: str = "rb"):
    """An fsspec file object for reading (writes go through `write_bytes`)."""
    if "r" not in mode:
        raise ValueError("open_file is for reading; write objects whole with write_bytes")
    fs, path = filesystem(url)
    try:
        return _retry(url, "opening", lambda: fs.open(path, mode))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such object") from None


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if _retry(url, "checking", lambda: fs.exists(path)):
        _retry(url, "removing", lambda: fs.rm(path, recursive=True))
