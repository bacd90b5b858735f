"""Storage against S3 errors as s3fs really raises them: throttling and 5xx are retried (and logged), denied
access and missing objects are not; a streamed read survives a connection cut mid-body, byte for byte.

The faults come from `FaultyProxy`, an HTTP proxy in front of the moto S3 server that answers chosen
requests with an S3 error document or cuts them off mid-body, so every layer (aiohttp, botocore, s3fs's
error translation, `storage`) sees what it would see from a real endpoint."""

import errno
import http.client
import http.server
import io
import logging
import socket
import threading
import zipfile
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import pytest
from botocore.exceptions import ClientError
from s3fs.errors import translate_boto_error

from dydit_dist import endpoints, s3_errors, storage
from dydit_dist.sample.export import iter_npz_array
from dydit_dist.storage import StorageError


def s3_error(status: int, code: str, message: str) -> Exception:
    """The exception s3fs raises for an S3 error response: a botocore ClientError built from the response
    S3 sends, translated by s3fs's own `translate_boto_error`."""
    response = {"Error": {"Code": code, "Message": message},
                "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": {}, "RetryAttempts": 0}}
    return translate_boto_error(ClientError(response, "GetObject"))


TRANSIENT = [(503, "SlowDown", "Please reduce your request rate."),
             (503, "ServiceUnavailable", "Service is unable to handle request."),
             (500, "InternalError", "We encountered an internal error. Please try again."),
             (400, "RequestTimeout", "Your socket connection to the server was not read from or written to within "
                                     "the timeout period."),
             (502, "502", "Bad Gateway"), (504, "504", "Gateway Timeout"), (503, "503", "Service Unavailable")]
PERMANENT = [(403, "AccessDenied", "Access Denied"), (404, "NoSuchKey", "The specified key does not exist."),
             (404, "NoSuchBucket", "The specified bucket does not exist"),
             (400, "InvalidArgument", "Invalid Argument"), (403, "403", "Forbidden"), (404, "404", "Not Found"),
             (412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold")]


@pytest.mark.parametrize(("status", "code", "message"), TRANSIENT, ids=[t[1] for t in TRANSIENT])
def test_s3_throttling_and_server_errors_are_transient(status, code, message):
    err = s3_error(status, code, message)
    assert isinstance(err, OSError) and message in str(err)  # s3fs's message names no status or code
    assert s3_errors.is_transient(err)


@pytest.mark.parametrize(("status", "code", "message"), PERMANENT, ids=[p[1] for p in PERMANENT])
def test_s3_client_errors_are_permanent(status, code, message):
    assert not s3_errors.is_transient(s3_error(status, code, message))


def test_the_errnos_s3fs_gives_throttling_are_transient_without_their_cause():
    """s3fs drops the ClientError in some paths (`set_cause=False`): its errno decides then."""
    assert s3_error(503, "SlowDown", "x").errno == errno.EBUSY
    assert s3_error(500, "InternalError", "x").errno == errno.EREMOTEIO
    for code in (errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNRESET):
        assert s3_errors.is_transient(OSError(code, "no cause"))
    for err in (OSError(errno.EINVAL, "bad"), PermissionError("denied"), FileNotFoundError("x"),
                ConnectionRefusedError(errno.ECONNREFUSED, "refused")):
        assert not s3_errors.is_transient(err)


def test_a_replaced_object_is_not_retried():
    """s3fs raises FileExpired (errno EBUSY, like throttling) when the object changed under an open file:
    the S3 answer in its causes (412) decides, and reading again would not help."""
    from s3fs.utils import FileExpired

    expired = FileExpired("b/x", '"etag"')
    expired.__cause__ = s3_error(412, "PreconditionFailed", "pre-conditions")
    assert expired.errno == errno.EBUSY and not s3_errors.is_transient(expired)


# ---------------------------------------------------------------------------- end to end, through a proxy


@dataclass
class Fault:
    """The next `times` requests of `method` (whose path holds `path`) fail: with an S3 error (`status`,
    `code`), or, when `cut_after` is set, with the upstream answer cut off after that many body bytes."""

    method: str
    path: str = ""
    status: int = 503
    code: str = "SlowDown"
    message: str = "Please reduce your request rate."
    cut_after: int | None = None
    times: int = 1
    exact: bool = False  # the path is `path` itself (a bucket's HEAD: its objects' paths start with it)
    after: bool = False  # the request reaches the server (a PUT lands), then the client gets the error
    body: bytes | None = None  # answered 200 with this body, the request not forwarded
    skip: int = 0  # the first `skip` matching requests pass


class FaultyProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of `upstream`, failing the requests its `faults` match;
    `requests` lists every request seen as (method, path, range)."""

    def __init__(self, upstream: str):
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fault = proxy._take(self.command, self.path, self.headers.get("Range"))
                if fault is not None and fault.body is not None:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(fault.body)))
                    self.end_headers()
                    self.wfile.write(fault.body)
                    return
                if fault is not None and fault.cut_after is None and not fault.after:
                    return self._s3_error(fault)
                host = urlsplit(upstream)
                conn = http.client.HTTPConnection(host.hostname, host.port, timeout=30)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                answer = conn.getresponse()
                data = answer.read()
                conn.close()
                if fault is not None and fault.after:  # done upstream; the answer lost on the way
                    return self._s3_error(fault)
                self.send_response(answer.status)
                for key, value in answer.getheaders():  # a HEAD keeps the object's Content-Length
                    if key.lower() not in ("transfer-encoding", "connection", "date", "server") and not (
                            key.lower() == "content-length" and self.command != "HEAD"):
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault is not None:  # cut off mid-body: the client was promised len(data) bytes
                    self.wfile.write(data[: fault.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _s3_error(self, fault: Fault):
                body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{fault.code}</Code>"
                        f"<Message>{fault.message}</Message><RequestId>1</RequestId></Error>").encode()
                self.send_response(fault.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _take(self, method: str, path: str, byte_range: str | None) -> Fault | None:
        with self.lock:
            self.requests.append((method, path, byte_range))
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and (
                        path == fault.path if fault.exact else fault.path in path):
                    if fault.skip:
                        fault.skip -= 1
                        continue
                    fault.times -= 1
                    return fault
        return None

    def seen(self, method: str) -> int:
        return sum(1 for m, _, _ in self.requests if m == method)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(s3_bucket, s3_endpoint, monkeypatch):
    """(bucket URL, FaultyProxy): `storage` talks to the moto server through the proxy; no backoff sleeps."""
    faulty = FaultyProxy(s3_endpoint)
    storage.configure(endpoint_url=faulty.url, retries=3, timeout_s=20)
    monkeypatch.setattr(endpoints.time, "sleep", lambda s: None)
    yield s3_bucket, faulty
    faulty.close()
    storage.configure()


@pytest.mark.integration
@pytest.mark.parametrize(("status", "code", "message"), TRANSIENT[:3], ids=[t[1] for t in TRANSIENT[:3]])
def test_a_throttled_request_is_retried_and_logged(proxy, caplog, status, code, message):
    bucket, faulty = proxy
    url = f"{bucket}/x.bin"
    storage.write_bytes(url, b"payload")
    faulty.faults.append(Fault("GET", "/x.bin", status=status, code=code, message=message))
    with caplog.at_level(logging.WARNING, logger="dydit_dist.endpoints"):
        assert storage.read_bytes(url) == b"payload"
    assert faulty.seen("GET") == 2
    assert f"reading {url}: attempt 1 of 4 failed (OSError: [Errno" in caplog.text and message in caplog.text


@pytest.mark.integration
def test_a_throttled_put_and_head_are_retried(proxy):
    bucket, faulty = proxy
    url = f"{bucket}/y.bin"
    faulty.faults += [Fault("PUT", "/y.bin", times=2), Fault("HEAD", "/y.bin", status=503, code="503")]
    storage.write_bytes(url, b"12345")
    assert faulty.seen("PUT") == 3 and storage.size(url) == 5


@pytest.mark.integration
def test_a_create_whose_answer_was_lost_is_its_own_on_the_retry(proxy):
    """A create-only PUT that landed but whose answer did not come back: the retry meets 412, finds its own
    bytes there and counts as created; one that finds another writer's object does not, without a retry."""
    bucket, faulty = proxy
    url = f"{bucket}/c.bin"
    faulty.faults.append(Fault("PUT", "/c.bin", status=500, code="InternalError", after=True))
    assert storage.create(url, b"mine")
    assert faulty.seen("PUT") == 2 and storage.read_bytes(url) == b"mine"
    assert not storage.create(url, b"theirs") and faulty.seen("PUT") == 3
    assert storage.read_bytes(url) == b"mine"
    # a store whose 412 does not name the condition (s3fs then raises no FileExistsError): the same answer
    faulty.faults.append(Fault("PUT", "/c.bin", status=412, code="PreconditionFailed",
                               message="At least one of the pre-conditions you specified did not hold"))
    assert not storage.create(url, b"theirs") and storage.read_bytes(url) == b"mine"


@pytest.mark.integration
def test_a_throttled_bucket_check_is_retried_not_called_a_missing_bucket(proxy):
    bucket, faulty = proxy
    head_bucket = f"/{bucket.removeprefix('s3://')}"
    faulty.faults.append(Fault("HEAD", head_bucket, exact=True, times=2))
    assert not storage.exists(f"{bucket}/nothing-here")  # a missing object: its bucket checked through two 503s
    assert sum(1 for m, p, _ in faulty.requests if (m, p) == ("HEAD", head_bucket)) == 3
    storage.configure(endpoint_url=faulty.url, retries=3, timeout_s=20)  # forgets the buckets it saw
    faulty.faults.append(Fault("HEAD", head_bucket, exact=True, times=10))
    with pytest.raises(StorageError, match=rf"checking the bucket {bucket} of {bucket}/other failed: OSError: "
                                           r".*4 attempts"):
        storage.exists(f"{bucket}/other")
    storage.configure(endpoint_url=faulty.url, retries=3, timeout_s=20)
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-x: bucket s3://no-such-bucket-x does not exist"):
        storage.exists("s3://no-such-bucket-x")


@pytest.mark.integration
def test_denied_access_is_not_retried(proxy):
    bucket, faulty = proxy
    url = f"{bucket}/z.bin"
    storage.write_bytes(url, b"payload")
    faulty.faults.append(Fault("GET", "/z.bin", status=403, code="AccessDenied", message="Access Denied", times=5))
    with pytest.raises(StorageError, match=rf"reading {url} failed: PermissionError: Access Denied .*1 attempt in.*"
                                           r"; access denied: check the credentials"):
        storage.read_bytes(url)
    assert faulty.seen("GET") == 1


@pytest.mark.integration
def test_throttling_past_the_retries_names_the_url(proxy):
    bucket, faulty = proxy
    url = f"{bucket}/w.bin"
    storage.write_bytes(url, b"payload")
    faulty.faults.append(Fault("GET", "/w.bin", times=10))
    with pytest.raises(StorageError, match=rf"reading {url} failed: OSError: .*Please reduce your request rate.*4 attempts"):
        storage.read_bytes(url)
    assert faulty.seen("GET") == 4


def _object(nbytes: int) -> bytes:
    return np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


@pytest.mark.integration
def test_a_streamed_read_cut_mid_body_resumes_where_it_stopped(proxy, caplog):
    """The first ranged GET is cut off mid-body, a later one before its first byte; the reads (read and
    readinto, as tarfile, zipfile and torch.load use them) still return the object byte for byte."""
    bucket, faulty = proxy
    url = f"{bucket}/shard.tar"
    data = _object(300_000)
    storage.write_bytes(url, data)
    faulty.faults += [Fault("GET", "/shard.tar", cut_after=10_000, times=1)]
    out = bytearray()
    with caplog.at_level(logging.WARNING, logger="dydit_dist.endpoints"), \
            storage.open_file(url, block_size=1 << 16) as f:
        out += f.read(50_000)
        faulty.faults.append(Fault("GET", "/shard.tar", cut_after=0, times=1))
        buf = bytearray(70_000)
        out += buf[: f.readinto(buf)]
        assert f.tell() == 120_000
        out += f.read()
    assert bytes(out) == data
    assert f"reading at byte 0 of {url}: attempt 1 of 4 failed" in caplog.text
    assert f"reading at byte 50000 of {url}: attempt 1 of 4 failed" in caplog.text
    assert [f.times for f in faulty.faults] == [0, 0]


@pytest.mark.integration
def test_an_npz_streamed_through_a_cut_connection_is_intact(proxy):
    """`iter_npz_array` (zipfile: seek, tell, read) over a connection cut in the middle of the array."""
    bucket, faulty = proxy
    url = f"{bucket}/ref.npz"
    array = np.random.default_rng(1).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=array)
    storage.write_bytes(url, buffer.getvalue())
    with storage.open_file(url) as f, zipfile.ZipFile(f) as zf:
        assert zf.namelist() == ["arr_0.npy"]
    faulty.faults.append(Fault("GET", "/ref.npz", cut_after=1000, times=2))
    batches = list(iter_npz_array(url, "arr_0", batch=16))
    assert np.array_equal(np.concatenate(batches), array)
    assert faulty.faults[-1].times == 0


@pytest.mark.integration
def test_a_streamed_read_denied_is_not_retried(proxy):
    bucket, faulty = proxy
    url = f"{bucket}/denied.bin"
    storage.write_bytes(url, _object(1000))
    with storage.open_file(url) as f:
        faulty.faults.append(Fault("GET", "/denied.bin", status=403, code="AccessDenied", message="Access Denied"))
        with pytest.raises(StorageError, match=rf"reading at byte 0 of {url} failed: PermissionError"):
            f.read()
    assert faulty.seen("GET") == 1


def test_a_reset_connection_is_transient_a_refused_one_is_not():
    """aiobotocore raises botocore's EndpointConnectionError for every aiohttp connection error: a keep-alive
    connection reset as a request starts is worth another try, a connection refused (nothing listens) is not."""
    import asyncio

    import aiohttp
    from botocore.exceptions import EndpointConnectionError

    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def connect_to_nothing():
        async with aiohttp.ClientSession() as session:
            await session.get(f"http://127.0.0.1:{port}/")

    with pytest.raises(aiohttp.ClientConnectorError) as refused:
        asyncio.run(connect_to_nothing())
    reset = aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer")
    assert s3_errors.is_transient(EndpointConnectionError(endpoint_url="http://s3", error=reset))
    assert not s3_errors.is_transient(EndpointConnectionError(endpoint_url="http://s3", error=refused.value))
    wrapped = OSError("s3fs's own error")
    wrapped.__cause__ = EndpointConnectionError(endpoint_url="http://s3", error=reset)
    assert s3_errors.is_transient(wrapped)


@pytest.mark.integration
def test_a_checkpoint_upload_retries_a_throttled_put_and_raises_what_it_cannot_write(proxy, tmp_path, monkeypatch):
    """Ray Train's checkpoints go through `storage`: pyarrow's copy_files, Ray's default, ignored the error of a
    PUT that failed at close, and a checkpoint with a file missing was committed (found by a review)."""
    import types

    import ray.train

    from dydit_dist.train.launcher import ray_storage
    from dydit_dist.train.ray_session import upload_checkpoint

    bucket, faulty = proxy
    path, fs = ray_storage(f"{bucket}/runs/r/checkpoints")
    context = types.SimpleNamespace(experiment_fs_path=path, storage_filesystem=fs)
    monkeypatch.setattr(ray.train, "get_context", lambda: types.SimpleNamespace(get_storage=lambda: context))
    folder = tmp_path / "step-0000002"
    (folder / "trainer").mkdir(parents=True)
    (folder / "meta.json").write_text("{}")
    (folder / "trainer" / "rank-00000.pt").write_bytes(b"x" * 5000)
    faulty.faults.append(Fault("PUT", "/trainer/rank-00000.pt"))
    persisted = upload_checkpoint(ray.train.Checkpoint.from_directory(str(folder)), "step-0000002")
    assert persisted.path == f"{path}/step-0000002" and persisted.filesystem is fs
    assert storage.size(f"{bucket}/runs/r/checkpoints/step-0000002/trainer/rank-00000.pt") == 5000
    assert storage.exists(f"{bucket}/runs/r/checkpoints/step-0000002/meta.json")
    faulty.faults.append(Fault("PUT", "step-0000004/meta.json", status=403, code="AccessDenied", message="Access Denied"))
    with pytest.raises(StorageError, match=r"step-0000004/meta.json failed: PermissionError"):
        upload_checkpoint(ray.train.Checkpoint.from_directory(str(folder)), "step-0000004")
    # Ray's own writes (its run snapshot) and reads go through the filesystem it is given: botocore retries there
    faulty.faults.append(Fault("PUT", "checkpoint_manager_snapshot.json", times=2))
    with fs.open_output_stream(f"{path}/checkpoint_manager_snapshot.json") as f:
        f.write(b"{}")
    assert storage.read_bytes(f"{bucket}/runs/r/checkpoints/checkpoint_manager_snapshot.json") == b"{}"


def _delete_result(*keys: str) -> bytes:
    """DeleteObjects' 200 answer listing `keys` as not deleted (S3 answers so for a key it throttled)."""
    errors = "".join(f"<Error><Key>{k}</Key><Code>InternalError</Code><Message>We encountered an internal error. "
                     "Please try again.</Message></Error>" for k in keys)
    return (f'<?xml version="1.0" encoding="UTF-8"?><DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"{errors}</DeleteResult>").encode()


@pytest.mark.integration
def test_keys_a_delete_answer_lists_as_failed_are_removed_again(proxy):
    """DeleteObjects answers 200 with a per-key <Error> for what it did not delete, which s3fs does not
    raise: `remove` looked done while a stale shard (then kept by the create-only write and recorded) or
    a checkpoint step's files stayed. What is left is removed by the retry; a store that keeps it past the
    retries is an error naming the URL."""
    from dydit_dist import shardset

    bucket, faulty = proxy
    samples = f"{bucket}/samples"
    storage.write_bytes(shardset.shard_url(samples, 3), b"stale bytes of a lost run")
    faulty.faults.append(Fault("POST", "?delete", body=_delete_result("samples/shard-000003.tar")))
    assert shardset.remove_shards(samples, [3]) and not storage.exists(shardset.shard_url(samples, 3))
    assert shardset.write_shard(samples, 3, b"this run's bytes", 1)["bytes"] == len(b"this run's bytes")

    step = f"{bucket}/runs/r/checkpoints/step-0000100"
    for name in ("rank0.pt", "rank1.pt"):
        storage.write_bytes(f"{step}/{name}", b"zero shard")
    faulty.faults.append(Fault("POST", "?delete", body=_delete_result("runs/r/checkpoints/step-0000100/rank1.pt")))
    storage.remove(step)
    assert storage.find(step) == []

    storage.write_bytes(f"{step}/rank0.pt", b"zero shard")
    faulty.faults.append(Fault("POST", "?delete", times=10, body=_delete_result("runs/r/checkpoints/step-0000100/rank0.pt")))
    with pytest.raises(StorageError, match=r"removing .*step-0000100 failed: .*kept 1 object\(s\), e\.g\. s3://"):
        storage.remove(step)


@pytest.mark.integration
def test_listing_an_image_folder_source_is_retried(proxy, monkeypatch):
    """`data.sources.class_folders` (prepare and its preflight) listed S3 through s3fs directly: one throttled
    LIST failed the job with "[Errno 16] Please reduce your request rate." and no URL."""
    from dydit_dist.data.sources import class_folders

    bucket, faulty = proxy
    for name in ("cat/0.png", "dog/0.png"):
        storage.write_bytes(f"{bucket}/images/{name}", b"png")
    monkeypatch.setattr(storage, "is_folder", lambda url: True)  # its own listing is retried: not this test's
    faulty.faults.append(Fault("GET", "delimiter=%2F&encoding-type"))  # the full listing, not exists' max-keys=1
    assert class_folders(f"{bucket}/images", 2) == ["cat", "dog"]
    assert faulty.faults[-1].times == 0


@pytest.mark.integration
def test_a_throttled_part_of_a_multipart_upload_is_sent_again_alone(proxy, tmp_path, monkeypatch):
    """A checkpoint file of 100 MiB or more goes up in parts. With one attempt per request, one throttled part
    failed the whole upload and the retry sent every part again (a 2 GB ZeRO file: 41 parts)."""
    import s3fs.core

    monkeypatch.setattr(s3fs.core, "calculate_chunksize", lambda size, chunksize=None: 5 * 2**20)  # not 50 MiB
    bucket, faulty = proxy
    local = tmp_path / "rank-00000.pt"
    local.write_bytes(_object(12 * 2**20))  # 3 parts
    faulty.faults.append(Fault("PUT", "partNumber=2"))
    storage.upload(str(local), f"{bucket}/ck/rank-00000.pt")
    assert storage.read_bytes(f"{bucket}/ck/rank-00000.pt") == local.read_bytes()
    parts = [p for m, p, _ in faulty.requests if m == "PUT" and "partNumber=" in p]
    assert len(parts) == 4, parts  # parts 1 and 3 once, part 2 twice


@pytest.mark.integration
def test_a_remove_whose_check_listing_was_throttled_is_done_not_missing(proxy):
    """The listing after the delete throttled: the retry found nothing left to delete and raised
    FileNotFoundError for what it had just removed."""
    bucket, faulty = proxy
    storage.write_bytes(f"{bucket}/runs/r/report.md", b"# old")
    # exists' HEAD, then the delete's own listing and HEAD; the check after the delete is the third HEAD
    faulty.faults.append(Fault("HEAD", "/runs/r/report.md", skip=2))
    storage.remove(f"{bucket}/runs/r/report.md")
    assert not storage.exists(f"{bucket}/runs/r/report.md") and faulty.faults[-1].times == 0
