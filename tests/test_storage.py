"""Storage: whole-object writes, listing, retries, and errors that name the URL (local, memory, S3)."""

import errno
import os

import pytest

from dydit_dist import endpoints, storage
from dydit_dist.storage import StorageError


@pytest.fixture(params=["file", "memory"])
def root(request, tmp_path):
    if request.param == "file":
        return str(tmp_path / "store")
    return f"memory://test-{os.getpid()}-{tmp_path.name}"


def test_round_trip_and_listing(root):
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"hello")
    storage.write_json(storage.join(root, "a", "b", "m.json"), {"k": [1, 2]})
    assert storage.read_bytes(storage.join(root, "a", "x.bin")) == b"hello"
    assert storage.read_json(storage.join(root, "a", "b", "m.json")) == {"k": [1, 2]}
    assert storage.exists(storage.join(root, "a", "x.bin")) and storage.size(storage.join(root, "a", "x.bin")) == 5
    names = [u.rsplit("/", 1)[-1] for u in storage.listdir(storage.join(root, "a"))]
    assert names == ["b", "x.bin"]
    found = storage.find(storage.join(root, "a"))
    assert [u.rsplit("/", 1)[-1] for u in found] == ["m.json", "x.bin"]
    assert storage.glob(storage.join(root, "a", "*.bin")) == [found[1]]
    assert storage.read_bytes(found[1]) == b"hello"  # listed URLs open as they are
    with storage.open_file(found[1]) as f:
        assert f.read() == b"hello"
    storage.remove(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "x.bin"))
    assert storage.listdir(storage.join(root, "nothing")) == []


@pytest.fixture(params=["file", "memory", "s3"])
def any_root(request, tmp_path):
    if request.param == "s3":
        return f"{request.getfixturevalue('s3_bucket')}/store"
    return f"memory://create-{os.getpid()}-{tmp_path.name}" if request.param == "memory" else str(tmp_path / "store")


def test_create_writes_only_where_nothing_is(any_root):
    """The one conditional write (the lease's objects, shards): a link locally, If-None-Match: * on S3."""
    url = storage.join(any_root, "one.json")
    assert storage.create(url, b"first")
    assert not storage.create(url, b"second") and not storage.create(url, b"first")
    assert storage.read_bytes(url) == b"first"
    assert [u.rsplit("/", 1)[-1] for u in storage.listdir(any_root)] == ["one.json"]  # no temporary left


def test_missing_object_is_file_not_found(root):
    with pytest.raises(FileNotFoundError, match="no such object"):
        storage.read_bytes(storage.join(root, "missing.bin"))


def test_local_write_is_atomic(tmp_path, monkeypatch):
    url = str(tmp_path / "obj.bin")
    storage.write_bytes(url, b"old")

    def crash(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk went away"):
        storage.write_bytes(url, b"new contents")
    assert (tmp_path / "obj.bin").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["obj.bin"]  # no temporary left behind


def test_bad_protocol_and_write_mode():
    with pytest.raises(StorageError, match="unsupported storage protocol .gs.; use a folder .* GCS.s included"):
        storage.read_bytes("gs://bucket/x")
    with pytest.raises(ValueError, match="write objects whole"):
        storage.open_file("memory://x", "wb")
    for url in ("s3://", "s3:///folder"):  # no bucket: not a "mistyped scheme"
        with pytest.raises(StorageError, match=f"^{url}: an s3:// URL without a bucket; write s3://BUCKET/folder"):
            storage.check_url(url)


class _FlakyFS:
    def __init__(self, failures):
        self.failures, self.calls = list(failures), 0

    def cat_file(self, path):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return b"ok"


def _slow_down() -> OSError:
    """What s3fs raises for S3's 503 SlowDown: OSError(EBUSY, S3's message), the ClientError as its cause."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    response = {"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                "ResponseMetadata": {"HTTPStatusCode": 503}}
    return translate_boto_error(ClientError(response, "GetObject"))


def test_transient_errors_are_retried_then_reported(monkeypatch):
    from botocore.exceptions import ReadTimeoutError

    monkeypatch.setattr(endpoints.time, "sleep", lambda s: None)
    flaky = _FlakyFS([_slow_down(), ReadTimeoutError(endpoint_url="http://s3")])
    monkeypatch.setattr(storage, "filesystem", lambda url: (flaky, "b/x"))
    assert storage.read_bytes("s3://b/x") == b"ok" and flaky.calls == 3

    storage.configure(retries=2)
    try:
        always = _FlakyFS([_slow_down() for _ in range(10)])
        monkeypatch.setattr(storage, "filesystem", lambda url: (always, "b/x"))
        with pytest.raises(StorageError, match=r"reading s3://b/x failed: OSError: \[Errno 16\] Please reduce your request rate"):
            storage.read_bytes("s3://b/x")
        assert always.calls == 3
        denied = _FlakyFS([PermissionError("AccessDenied")])
        monkeypatch.setattr(storage, "filesystem", lambda url: (denied, "b/x"))
        with pytest.raises(StorageError, match="s3://b/x.*AccessDenied"):
            storage.read_bytes("s3://b/x")
        assert denied.calls == 1  # not transient: no retry
        from botocore.exceptions import NoCredentialsError

        anonymous = _FlakyFS([NoCredentialsError()])
        monkeypatch.setattr(storage, "filesystem", lambda url: (anonymous, "b/x"))
        with pytest.raises(StorageError, match="NoCredentialsError: .*; no S3 credentials found: set AWS_ACCESS_KEY_ID"):
            storage.read_bytes("s3://b/x")
        assert anonymous.calls == 1
        # a 301 without the bucket's region (an S3-compatible gateway): botocore's redirector recurses
        redirected = _FlakyFS([RecursionError("maximum recursion depth exceeded in comparison")])
        monkeypatch.setattr(storage, "filesystem", lambda url: (redirected, "b/x"))
        with pytest.raises(StorageError, match="another region or endpoint .*: set storage.region to the bucket's"):
            storage.read_bytes("s3://b/x")
        assert redirected.calls == 1
    finally:
        storage.configure()


def test_credentials_in_the_endpoint_are_never_shown(monkeypatch, caplog):
    """An endpoint written as http://KEY:SECRET@host (which S3 refuses anyway) appears with `***` in the
    retry warnings and the error, whether it came from storage.endpoint_url or AWS_ENDPOINT_URL."""
    from botocore.exceptions import ReadTimeoutError

    secret = "CanarySecret/0001@x"  # a `/` and an `@` too: nothing before the last `@` may show
    endpoint = f"http://AKIACANARY:{secret}@127.0.0.1:9"
    monkeypatch.setattr(endpoints.time, "sleep", lambda s: None)
    for configured in (True, False):
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        storage.configure(endpoint_url=endpoint if configured else None, retries=1)
        try:
            timeouts = _FlakyFS([ReadTimeoutError(endpoint_url=endpoint) for _ in range(2)])  # botocore names it
            monkeypatch.setattr(storage, "filesystem", lambda url, fs=timeouts: (fs, "b/x"))
            caplog.clear()
            with caplog.at_level("WARNING", logger="dydit_dist.endpoints"), pytest.raises(StorageError) as err:
                storage.read_bytes("s3://b/x")
        finally:
            storage.configure()
        assert timeouts.calls == 2 and caplog.records  # one retry, logged
        for message in (str(err.value), caplog.text):
            assert "http://***@127.0.0.1:9" in message
            assert "AKIACANARY" not in message and "CanarySecret" not in message


@pytest.mark.integration
def test_s3_round_trip(s3_bucket):
    url = f"{s3_bucket}/data/shard-000000.tar"
    storage.write_bytes(url, b"x" * 1000)
    assert storage.exists(url) and storage.size(url) == 1000
    assert storage.listdir(f"{s3_bucket}/data") == [url]
    assert storage.read_bytes(url) == b"x" * 1000
    with pytest.raises(FileNotFoundError, match="no such object"):
        storage.read_bytes(f"{s3_bucket}/data/missing")
    assert not storage.exists(f"{s3_bucket}/data/missing")


@pytest.mark.integration
def test_s3_missing_bucket_names_the_url(s3_endpoint):
    storage.configure(endpoint_url=s3_endpoint)
    try:
        url = "s3://no-such-bucket-here/data/manifest.json"
        for op in (storage.read_bytes, storage.exists, storage.listdir, lambda u: storage.write_bytes(u, b"1")):
            with pytest.raises(StorageError, match=r"s3://no-such-bucket-here.*does not exist"):
                op(url)
    finally:
        storage.configure()


@pytest.mark.integration
def test_s3_unreachable_endpoint_names_the_url():
    with socket_closed_port() as port:
        storage.configure(endpoint_url=f"http://127.0.0.1:{port}", retries=0)
        try:
            with pytest.raises(StorageError, match=r"s3://bucket/key.*(connect|Connect)"):
                storage.read_bytes("s3://bucket/key")
        finally:
            storage.configure()


class socket_closed_port:
    """A localhost port nobody listens on, for the duration of the block."""

    def __enter__(self):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def __exit__(self, *exc):
        return False


@pytest.mark.integration
def test_the_writable_check_says_when_a_store_ignores_conditional_writes(s3_bucket, monkeypatch):
    """The lease and the shards rely on create-only PUTs; a store that overwrites instead is named in the plan."""
    from dydit_dist import resolve

    assert resolve.writable(f"{s3_bucket}/runs").note == "writable (probe written and deleted)"
    monkeypatch.setattr(storage, "create", lambda url, data: storage.write_bytes(url, data) or True)
    found = resolve.writable(f"{s3_bucket}/runs")
    assert found.problem is None and "its store ignores If-None-Match" in found.note
    assert storage.listdir(f"{s3_bucket}/runs") == []  # the probe removed


def test_a_local_root_without_hard_links_is_refused_by_the_writable_check(tmp_path, monkeypatch):
    """`create` places a local file with a hard link: on a mount without them (a FUSE mount of a bucket,
    SMB) every create, the lease's first, failed with a raw error naming a temporary file."""
    from dydit_dist import resolve

    assert resolve.writable(str(tmp_path)).problem is None

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    found = resolve.writable(f"file://{tmp_path}/runs")
    assert found.problem.startswith(f"{tmp_path} has no hard links (PermissionError: [Errno 1] Operation not permitted)")
    assert "use a POSIX file system" in found.problem and os.listdir(tmp_path) == []


def test_local_writes_sync_the_file_and_its_folder(tmp_path, monkeypatch):
    """A whole-object write on local disk syncs the file's bytes and, once it is renamed or linked into
    place, the folder holding the name (a power loss could lose a rename that had returned); an upload of a
    local file too (it synced nothing)."""
    synced = []
    fsync = os.fsync

    def recording(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    source = tmp_path / "rank0.pt"
    source.write_bytes(b"zero shard")
    for i, write in enumerate((lambda url: storage.write_bytes(url, b"x"), lambda url: storage.create(url, b"x"),
                               lambda url: storage.upload(str(source), url))):
        synced.clear()
        folder = tmp_path / f"out{i}"
        write(str(folder / "object"))
        assert len(synced) == 2 and synced[-1] == str(folder), synced
    assert (tmp_path / "out2" / "object").read_bytes() == b"zero shard"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EIO])
def test_a_full_or_failing_local_disk_names_the_object(tmp_path, monkeypatch, code):
    """A write that the disk refuses (full, read-only, failing) was a bare OSError without a path, which the
    jobs print as a bug (a traceback, exit 1): now a StorageError naming the object, what to do, the errno
    kept, and neither the object nor a temporary file left."""
    url = f"{tmp_path}/out/shard-000001.tar"

    def refuse(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(storage.os, "fsync", refuse)
    for write in (storage.write_bytes, storage.create):
        with pytest.raises(StorageError, match=rf"writing {url} failed: {errno.errorcode[code]} .*a rerun resumes") as err:
            write(url, b"samples")
        assert err.value.errno == code
        assert os.listdir(tmp_path / "out") == []
    monkeypatch.undo()
    storage.write_bytes(url, b"samples")  # space freed: the same write goes through
    assert storage.read_bytes(url) == b"samples"


def test_the_writable_check_finds_a_full_disk(tmp_path, monkeypatch):
    """A full disk still has inodes: an empty probe and its hard link fitted, the plan said `writable`, and the
    first real write (the lease) failed. The probe now holds data and is synced; a disk without free blocks
    (stood in for by an fsync that refuses any file holding data) is a problem of storage.root."""
    from dydit_dist import resolve

    assert "GiB free" in resolve.writable(str(tmp_path / "runs")).note

    def no_blocks(fd):
        if os.fstat(fd).st_size > 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_blocks)
    found = resolve.writable(str(tmp_path / "runs"))
    assert found.problem and "No space left on device" in found.problem, found
    assert os.listdir(tmp_path) == []  # no probe left


def test_an_unreadable_upload_source_is_not_blamed_on_the_target(tmp_path, monkeypatch):
    """An upload whose local source cannot be read keeps the source's error (it was reported as the target
    disk refusing writes: "this user may not write there")."""
    import shutil

    def deny(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), src)

    (tmp_path / "src").write_bytes(b"x")
    monkeypatch.setattr(shutil, "copyfile", deny)
    with pytest.raises(PermissionError) as err:
        storage.upload(str(tmp_path / "src"), str(tmp_path / "out" / "obj"))
    assert not isinstance(err.value, StorageError) and err.value.filename == str(tmp_path / "src")
