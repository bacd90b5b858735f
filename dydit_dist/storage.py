"""Object storage through fsspec URLs: `file://` (the default for bare paths), `s3://`, `memory://`.

Every write is whole: local files are written to a temporary name in the same folder and renamed;
S3 objects are written with one PUT (`upload`: a file of 100 MiB or more in parts, which become the object
only when the upload completes), so a reader never sees half an object. A missing *object* raises
`FileNotFoundError`, a missing *bucket* raises `StorageError`: the first is a state a job can handle
(nothing written yet), the second is a configuration error it must not paper over.

Every operation runs in `endpoints.retry` (transient errors retried with backoff within a deadline;
the URLs, filesystems and failure messages are there too); a file opened with `open_file` reads
through the same retries, each read one operation, resumed at its offset (`_RetryingReader`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import posixpath
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from fsspec.asyn import AsyncFileSystem

from dydit_dist.endpoints import (  # noqa: F401 - the storage API: callers use storage.<name>
    PROTOCOLS,
    SLOWEST_BYTES_PER_S,
    StorageError,
    check_bucket,
    check_output_root,
    check_url,
    configure,
    configure_from,
    deadline,
    filesystem,
    protocol,
    retry,
    retrying_filesystem,
    timed,
    to_url,
)
from dydit_dist.s3_errors import precondition_failed

_MEMORY_LOCK = threading.Lock()  # `create` on memory://


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return posixpath.join(base, *parts) if parts else base


def exists(url: str) -> bool:
    """Whether the object (or folder) exists; StorageError when its S3 bucket does not."""
    fs, path = filesystem(url)
    found = retry(url, "checking", timed(fs, "exists", path))
    if not found:
        check_bucket(url)
    return found


def size(url: str) -> int:
    fs, path = filesystem(url)
    try:
        return retry(url, "reading the size of", timed(fs, "size", path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such object") from None


def is_folder(url: str) -> bool:
    """Whether `url` is a folder (a prefix with objects under it, on S3), not an object."""
    fs, path = filesystem(url)
    return bool(retry(url, "checking", timed(fs, "isdir", path)))


def listdir(url: str) -> list[str]:
    """URLs of the objects directly under a folder URL (sorted); empty when it does not exist."""
    fs, path = filesystem(url)
    if not exists(url):
        return []
    names = retry(url, "listing", timed(fs, "ls", path, False))
    return sorted(to_url(protocol(url), n) for n in names)


def entries(url: str) -> list[dict]:
    """What is directly under a folder URL, as fsspec describes it (`name`: the URL, `type`: "file",
    "directory", or locally "other" for a special file, `size`), sorted by name; empty when it does not
    exist. On S3 a zero-byte folder marker object (`folder/`) may be listed as a "file"."""
    fs, path = filesystem(url)
    if not exists(url):
        return []
    found = retry(url, "listing", timed(fs, "ls", path, True))
    return sorted(({**e, "name": to_url(protocol(url), e["name"])} for e in found), key=lambda e: e["name"])


def find(url: str) -> list[str]:
    """URLs of every object under a folder URL, recursively (sorted); empty when it does not exist."""
    fs, path = filesystem(url)
    if not exists(url):
        return []
    names = retry(url, "listing", timed(fs, "find", path))
    return sorted(to_url(protocol(url), n) for n in names)


def glob(pattern: str) -> list[str]:
    """URLs of the objects matching a glob pattern (`*`, `?`, `[...]`, `**`), sorted."""
    fs, path = filesystem(pattern)
    names = retry(pattern, "listing", timed(fs, "glob", path))
    if not names:
        check_bucket(pattern)
    return sorted(to_url(protocol(pattern), n) for n in names)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    nbytes = size(url) if isinstance(fs, AsyncFileSystem) else 0  # the deadline grows with the object
    try:
        return retry(url, "reading", timed(fs, "cat_file", path), nbytes)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such object") from None


def write_bytes(url: str, data: bytes) -> None:
    """Write one object whole: temp-and-rename on local disk, a single PUT elsewhere."""
    fs, path = filesystem(url)
    if protocol(url) == "file":
        _place_local(path, data, os.replace)
        return
    try:
        retry(url, "writing", timed(fs, "pipe_file", path, data), len(data))
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
    scheme = protocol(url)
    if scheme == "file":
        try:
            _place_local(path, data, os.link)
        except FileExistsError:
            return False
        return True
    if scheme == "memory":
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
        retry(url, "creating", put, len(data))
    except FileExistsError:
        return len(attempts) > 1 and read_bytes(url) == data
    except StorageError as err:
        if not precondition_failed(err.__cause__):  # a 412 whose answer does not name the condition
            raise
        return len(attempts) > 1 and read_bytes(url) == data
    except FileNotFoundError as err:  # only a missing container makes a PUT "not found"
        raise StorageError(f"creating {url} failed: {err}") from err
    return True


_DISK_ERRORS = {errno.ENOSPC: "free space on that disk", errno.EDQUOT: "the disk quota is used up",
                errno.EROFS: "the file system is read-only", errno.EIO: "the disk failed a read or write",
                errno.EACCES: "this user may not write there"}


def _place_local(path: str, data: bytes | None, place: Callable[[str, str], None], source: str | None = None) -> None:
    """Write `data` (or copy the file `source`) to a temporary file beside `path`, synced, then
    `place(tmp, path)` (os.replace: an overwrite; os.link: a create that fails when `path` exists) and sync
    the folder, so that the name survives a power loss once this returns: a reader never sees half a file."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        if source is not None:
            shutil.copyfile(source, tmp)
        with open(tmp, "ab" if source is not None else "wb") as f:
            if data is not None:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        place(tmp, path)
        handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:  # best effort: some file systems refuse to sync a folder (EINVAL), and the file is in place
            with contextlib.suppress(OSError):
                os.fsync(handle)
        finally:
            os.close(handle)
    except OSError as err:
        if err.errno not in _DISK_ERRORS or (source is not None and err.filename == source):
            raise  # FileExistsError is `create`'s answer; an unreadable source is no fault of the target's disk
        failure = StorageError(f"writing {path} failed: {errno.errorcode[err.errno]} ({err.strerror}); "
                               f"{_DISK_ERRORS[err.errno]}; nothing was written there (a rerun resumes)")
        failure.errno = err.errno
        raise failure from err
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
        f = retry(url, "opening", lambda left: fs.open(path, mode, **options))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such object") from None
    return _RetryingReader(url, f) if isinstance(fs, AsyncFileSystem) else f


class _RetryingReader(io.RawIOBase):
    """A remote fsspec file whose reads are operations of `endpoints.retry`: a transient failure (a connection
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

        return retry(self.url, f"reading at byte {start} of", attempt, nbytes + self.file.blocksize)

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
    """Remove the object or folder `url` (everything under it), if it is there. On S3 a folder goes in
    DeleteObjects batches, whose answer lists the keys S3 failed to delete (throttled, an internal error)
    under a 200, which s3fs does not raise: what is left is listed again, and removed again by the retry."""
    fs, path = filesystem(url)
    if not retry(url, "checking", timed(fs, "exists", path)):
        return

    def rm(left: float) -> None:
        start = time.monotonic()
        with contextlib.suppress(FileNotFoundError):  # removed by an attempt whose check below then failed
            timed(fs, "rm", path, True)(left)
        if protocol(url) == "s3":
            kept = timed(fs, "find", path)(left - (time.monotonic() - start))
            if kept:  # errno EBUSY, as s3fs gives throttling: transient, so removed again
                raise OSError(errno.EBUSY, f"the store answered the delete but kept {len(kept)} object(s), "
                                           f"e.g. {to_url('s3', kept[0])}")

    retry(url, "removing", rm)


def upload(local_path: str, url: str) -> None:
    """Copy a local file to `url` whole (a file of any size: streamed, never read into memory)."""
    fs, path = filesystem(url)
    if protocol(url) == "file":
        _place_local(path, None, os.replace, source=local_path)
        return
    # A file of 100 MiB or more goes up in parts: botocore retries each part's request (`retrying_filesystem`),
    # so that one throttled part of a 2 GB checkpoint does not fail the upload and send it all again.
    fs, path = retrying_filesystem(url)
    retry(url, "uploading to", timed(fs, "put_file", local_path, path), os.path.getsize(local_path))


def download(url: str, local_path: str) -> None:
    """Copy the object at `url` to a local file (streamed)."""
    fs, path = filesystem(url)
    nbytes = size(url) if isinstance(fs, AsyncFileSystem) else 0
    try:
        retry(url, "downloading", timed(fs, "get_file", path, local_path), nbytes)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such object") from None
