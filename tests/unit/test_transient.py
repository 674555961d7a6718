"""Which errors are a blip (try again later) and which are an answer, named in one place."""

import errno

import pytest
import redis
from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError
from celery import Celery
from django.db import IntegrityError, InterfaceError, OperationalError
from kombu.exceptions import OperationalError as BrokerError

from core.model_package import PackageError
from core.transient import backoff_seconds, is_transient, transient_reason
from workers.transient import TransientRetryTask


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": ""}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Get")


def wrapped(error: BaseException) -> Exception:
    try:
        raise RuntimeError("storage backend error") from error
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    "error",
    [
        client_error("SlowDown", 503),
        client_error("Throttling", 400),
        client_error("ThrottlingException", 400),
        client_error("InternalError", 500),
        client_error("", 502),
        client_error("TooManyRequests", 429),
        EndpointConnectionError(endpoint_url="https://s3.example.org"),
        ConnectTimeoutError(endpoint_url="https://s3.example.org"),
        ReadTimeoutError(endpoint_url="https://s3.example.org"),
        OSError(errno.EIO, "Input/output error"),
        ConnectionResetError(errno.ECONNRESET, "reset"),
        TimeoutError("timed out"),
        OperationalError("database is locked"),
        InterfaceError("connection already closed"),
        BrokerError("Error 111 connecting to 127.0.0.1:6379"),
        redis.ConnectionError("Connection refused"),
        redis.TimeoutError("Timeout reading from socket"),
        wrapped(client_error("SlowDown", 503)),
    ],
    ids=lambda error: (
        type(error).__name__ + (f"-{error.response['Error']['Code']}" if isinstance(error, ClientError) else "")
    ),
)
def test_blips_are_transient(error):
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        client_error("NoSuchKey", 404),
        client_error("AccessDenied", 403),
        client_error("InvalidRequest", 400),
        FileNotFoundError(errno.ENOENT, "No such file"),
        PermissionError(errno.EACCES, "Permission denied"),
        IsADirectoryError(errno.EISDIR, "Is a directory"),
        PackageError("checksum mismatch"),
        ValueError("corrupt image"),
        IntegrityError("UNIQUE constraint failed"),
        RuntimeError("CUDA out of memory"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_answers_are_not(error):
    assert not is_transient(error)


def test_the_reason_says_what_the_storage_answered():
    assert transient_reason(client_error("SlowDown", 503)) == "the storage answered SlowDown (503)"
    assert transient_reason(OSError(errno.EIO, "Input/output error")) == (
        "the storage could not be read (OSError: Input/output error)"
    )


def test_backoff_grows_to_its_cap_with_jitter():
    for retries, ceiling in ((0, 1), (1, 2), (3, 8), (10, 30)):
        delays = [backoff_seconds(retries, cap=30) for _ in range(50)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
        assert len(set(delays)) > 1


def test_a_task_retries_a_transient_error_and_raises_any_other_at_once():
    app = Celery("transient-test", set_as_current=False)
    app.conf.task_always_eager = True
    calls = []

    @app.task(base=TransientRetryTask, bind=True, max_retries=3, retry_backoff_max=0)
    def flaky(self, fail_times, error):
        calls.append(self.request.retries)
        if len(calls) <= fail_times:
            raise {"db": OperationalError("gone"), "bug": ValueError("bug")}[error]
        return "done"

    assert flaky.apply(args=[2, "db"]).get(disable_sync_subtasks=False) == "done"
    assert calls == [0, 1, 2]
    calls.clear()
    with pytest.raises(ValueError):
        flaky.apply(args=[1, "bug"]).get(disable_sync_subtasks=False)
    assert calls == [0]
    calls.clear()
    with pytest.raises(OperationalError):  # past max_retries: the error itself
        flaky.apply(args=[10, "db"]).get(disable_sync_subtasks=False)
    assert calls == [0, 1, 2, 3]
