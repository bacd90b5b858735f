"""Which failures of an S3 request may succeed when it is sent again (`storage` retries those, with backoff,
within its deadline): S3's own answer when there is one (throttling, server errors), else the errno s3fs
gives such answers, or the way the request failed on its way (a timeout, a connection reset or cut
short, a garbled body). Everything else (a missing object or bucket, denied access, a bad request, an
object replaced under an open file, a connection refused) is permanent.
"""

from __future__ import annotations

import errno
import functools

# S3 answers to a request that may succeed when sent again: throttling and server errors, as botocore's
# "standard" retry mode counts them.
_TRANSIENT_STATUS = frozenset({500, 502, 503, 504})
_TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeoutException", "Throttling",
    "ThrottlingException", "ThrottledException", "RequestThrottled", "RequestThrottledException",
    "RequestLimitExceeded", "TooManyRequestsException", "BandwidthLimitExceeded", "OperationAborted",
    "PriorRequestNotComplete"})
# The errnos s3fs gives those answers when it translates them (`s3fs.errors.ERROR_CODE_TO_EXCEPTION`:
# SlowDown, ServiceUnavailable, 503 -> EBUSY; InternalError, 500 -> EREMOTEIO), and a dropped connection's.
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.ETIMEDOUT,
                               errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE})


@functools.cache
def _transient_types() -> tuple[type[Exception], ...]:
    """Failures of a request on its way, raised by botocore and aiohttp as they are (s3fs translates only
    S3's answers): a timeout, a connection closed early or reset, a body cut short or garbled (throttling
    answers can be malformed XML)."""
    import aiohttp
    from botocore import exceptions as boto
    from botocore.parsers import ResponseParserError

    return (TimeoutError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError, boto.HTTPClientError,
            boto.ConnectTimeoutError, ResponseParserError, aiohttp.ClientPayloadError)


def is_transient(err: Exception) -> bool:
    """Whether sending the request again may succeed. S3's answer decides when there is one: s3fs raises an
    OSError whose message names neither status nor code, with botocore's ClientError as its cause (or a
    cause's cause). Without one: the errno s3fs gives throttling and server errors, or a request that failed
    on its way, or over a connection that dropped (`_dropped`). A missing object or bucket, denied access, a
    bad request, an object replaced under an open file (412) and a refused connection (nothing listens
    there) are permanent."""
    cause: BaseException | None = err
    while cause is not None:
        answer = getattr(cause, "response", None)
        if isinstance(answer, dict) and "Error" in answer:
            status = answer.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return answer["Error"].get("Code") in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
        cause = cause.__cause__
    if isinstance(err, FileNotFoundError | PermissionError | ConnectionRefusedError):
        return False
    if _dropped(err):
        return True
    if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
        return True
    return isinstance(err, _transient_types())


def precondition_failed(err: BaseException | None) -> bool:
    """Whether `err` (or a cause of it) is S3's 412 PreconditionFailed: a create-only PUT (`If-None-Match: *`)
    that found the object. s3fs turns it into FileExistsError only when the answer names the condition."""
    return _answered(err, "PreconditionFailed", 412)


def redirected(err: BaseException | None) -> bool:
    """Whether S3 answered `err` (or a cause of it) with a redirect to another region or endpoint (301)."""
    return _answered(err, "PermanentRedirect", 301)


def _answered(err: BaseException | None, code: str, status: int) -> bool:
    """Whether the first S3 answer among `err` and its causes has error `code` or HTTP `status`."""
    while err is not None:
        answer = getattr(err, "response", None)
        if isinstance(answer, dict) and "Error" in answer:
            return answer["Error"].get("Code") == code or answer.get("ResponseMetadata", {}).get("HTTPStatusCode") == status
        err = err.__cause__
    return False


def _dropped(err: BaseException) -> bool:
    """Whether `err` (or a cause of it) is botocore's EndpointConnectionError over a connection that was made
    and then reset or closed (aiobotocore raises it for any aiohttp ClientConnectionError, a keep-alive
    connection reset as a request starts included), not one that could not be made (refused, no such
    host: aiohttp's ClientConnectorError, a DNS error), which stays permanent."""
    import aiohttp
    from botocore.exceptions import EndpointConnectionError

    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, EndpointConnectionError):
            inner = cause.kwargs.get("error")
            return isinstance(inner, aiohttp.ClientConnectionError) and not isinstance(inner, aiohttp.ClientConnectorError)
        cause = cause.__cause__
    return False
