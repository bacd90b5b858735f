"""Storage against a broken S3 endpoint: every operation fails within `storage.timeout_s`, retried in one
layer only, with a message naming the URL and the endpoint; PUTs never wait for `100 Continue`."""

import logging
import socket
import threading
import time

import pytest

from dydit_dist import storage
from dydit_dist.config import StorageConfig
from dydit_dist.storage import StorageError

TIMEOUT_S = 2.0
SLACK_S = 3.0  # client creation and a loaded machine; the stall itself would last forever


class StalledEndpoint:
    """A TCP server on 127.0.0.1 that accepts every connection, reads what is sent and never answers."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self.received = bytearray()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:  # closed
                return
            self.connections.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn):
        while chunk := conn.recv(65536):
            self.received += chunk

    def close(self):
        self.server.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def aws_env(monkeypatch):
    """Fake credentials: botocore would otherwise ask the instance-metadata service for some."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    yield
    storage.configure()


@pytest.fixture
def stalled(aws_env):
    endpoint = StalledEndpoint()
    yield endpoint
    endpoint.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


OPERATIONS = {
    "write_bytes": lambda url: storage.write_bytes(url, b"x" * 100),
    "exists": storage.exists,
    "read_bytes": storage.read_bytes,
    "listdir": storage.listdir,
}


@pytest.mark.parametrize("op", OPERATIONS)
def test_stalled_endpoint_fails_within_the_deadline(stalled, op):
    storage.configure(endpoint_url=stalled.url, retries=0, timeout_s=TIMEOUT_S)
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        OPERATIONS[op]("s3://bucket/runs/x/key.bin")
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT_S + SLACK_S, f"{op} took {elapsed:.1f} s"
    assert "s3://bucket/runs/x/key.bin" in str(err.value) and stalled.url in str(err.value)


def test_retries_stay_within_the_deadline_and_are_logged(stalled, caplog):
    """Each attempt may take half the deadline (here 3 of 6 s), so the first is retried however loaded
    the machine; the failure says the deadline ran out whichever attempt was the last (cut by the
    deadline itself, or stopped because no retry fits in what is left)."""
    timeout_s = 3 * TIMEOUT_S
    storage.configure(endpoint_url=stalled.url, retries=5, timeout_s=timeout_s)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="dydit_dist.endpoints"), pytest.raises(StorageError) as err:
        storage.write_bytes("s3://bucket/key", b"x")
    elapsed = time.monotonic() - start
    assert elapsed < timeout_s + SLACK_S, f"took {elapsed:.1f} s"
    assert f"no answer within the deadline of 6 s (endpoint {stalled.url}, storage.timeout_s=6" in str(err.value)
    assert "writing s3://bucket/key: attempt 1 of 6 failed" in caplog.text and "retrying in 0.2 s" in caplog.text


def test_one_attempt_is_one_request(stalled):
    """botocore and s3fs do not retry underneath `storage`: without retries the endpoint sees one connection."""
    storage.configure(endpoint_url=stalled.url, retries=0, timeout_s=TIMEOUT_S)
    with pytest.raises(StorageError, match="1 attempt in"):
        storage.exists("s3://bucket/key")
    time.sleep(0.2)  # the accept thread registers the connection after the client gave up
    assert len(stalled.connections) == 1


def test_put_does_not_wait_for_100_continue(stalled):
    storage.configure(endpoint_url=stalled.url, retries=0, timeout_s=TIMEOUT_S)
    with pytest.raises(StorageError):
        storage.write_bytes("s3://bucket/key", b"payload")
    request = bytes(stalled.received).lower()
    assert request.startswith(b"put /bucket/key") and b"expect:" not in request
    assert request.endswith(b"payload")  # the body went out with the headers


def test_connection_refused_fails_fast_with_the_endpoint(aws_env):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    storage.configure(endpoint_url=endpoint, retries=5, timeout_s=30)
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.write_bytes("s3://bucket/key", b"x")
    assert time.monotonic() - start < SLACK_S
    assert "writing s3://bucket/key failed: EndpointConnectionError: Could not connect" in str(err.value)
    assert f"(endpoint {endpoint}, 1 attempt in" in str(err.value)  # not a transient error: no retry


def test_the_deadline_comes_from_the_config(stalled):
    storage.configure_from(StorageConfig(root="s3://bucket/out", endpoint_url=stalled.url, retries=0, timeout_s=1.0))
    start = time.monotonic()
    with pytest.raises(StorageError):
        storage.exists("s3://bucket/key")
    assert time.monotonic() - start < 1.0 + SLACK_S


def test_a_mistyped_scheme_is_not_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match=r"s3:/bucket/x.yaml: a URL with a mistyped scheme separator .* write s3://bucket/x.yaml"):
        storage.write_bytes("s3:/bucket/x.yaml", b"x")
    assert list(tmp_path.iterdir()) == []


def test_a_job_refuses_a_memory_root():
    """memory:// outputs die with the process that wrote them: refused where a job (or its worker) starts."""
    with pytest.raises(StorageError, match="storage.root=memory://x: memory:// storage lives in one process"):
        storage.configure_from(StorageConfig(root="memory://x"))
    storage.write_bytes("memory://x/in-process.bin", b"x")  # in-process use (tests) stays possible
    storage.remove("memory://x")


def test_a_memory_root_is_one_line_and_exit_2(capsys, tmp_path):
    from jobs import sample

    with pytest.raises(SystemExit) as exit_:
        sample.main(["--config", "debug", "storage.root=memory://x"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("sample: storage.root=memory://x: memory:// storage lives in one process") and len(err.splitlines()) == 1


def test_a_pickled_filesystem_keeps_one_attempt_and_no_expect(stalled):
    """Ray Train uploads checkpoints through the filesystem pickled to its workers: the copy must keep
    the bounds (one attempt per request, timeouts, no `Expect: 100-continue`)."""
    import pickle

    storage.configure(endpoint_url=stalled.url, retries=0, timeout_s=TIMEOUT_S)
    fs, path = storage.filesystem("s3://bucket/key")
    copy = pickle.loads(pickle.dumps(fs))
    assert type(copy).__name__ == "BoundedS3FileSystem" and copy.retries == 1
    start = time.monotonic()
    with pytest.raises(OSError):
        copy.pipe_file(path, b"payload")
    assert time.monotonic() - start < TIMEOUT_S + SLACK_S
    request = bytes(stalled.received).lower()
    assert request.startswith(b"put /bucket/key") and b"expect:" not in request


def test_a_retry_that_no_longer_fits_in_the_deadline_is_reported_as_the_deadline(aws_env):
    """A transient failure with retries left but less time left than the backoff: the error says the
    deadline ran out and gives the last attempt's error, not only that error."""
    from botocore.exceptions import ReadTimeoutError

    storage.configure(retries=5, timeout_s=0.3)

    def slow_failure(left: float):
        time.sleep(0.2)
        raise ReadTimeoutError(endpoint_url="http://s3")

    with pytest.raises(StorageError) as err:
        storage.retry("s3://bucket/key", "reading", slow_failure)
    assert str(err.value).startswith("reading s3://bucket/key failed: no answer within the deadline of 0.3 s")
    assert "storage.timeout_s=0.3, 1 attempt in 0.2 s; the last attempt: ReadTimeoutError: Read timeout" in str(err.value)


def test_a_threads_deadline_cuts_its_operations_short(stalled):
    """`storage.deadline` (the lease's heartbeat): an operation ends by it, well before `storage.timeout_s`."""
    storage.configure(endpoint_url=stalled.url, retries=5, timeout_s=60.0)
    start = time.monotonic()
    with storage.deadline(start + TIMEOUT_S), pytest.raises(StorageError, match="no answer within the deadline"):
        storage.exists("s3://bucket/key")
    assert time.monotonic() - start < TIMEOUT_S + SLACK_S
    with storage.deadline(start + 100.0), storage.deadline(start), pytest.raises(StorageError):  # the earliest
        storage.exists("s3://bucket/key")
    assert time.monotonic() - start < TIMEOUT_S + 2 * SLACK_S
