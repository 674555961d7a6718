"""A storage or network blip is not a verdict: through the worker's real runtime (claim → read →
decode → forward → store) against the real database, a request a blip stopped goes back to the
queue with a backoff and then succeeds; only the attempt cap turns blips into a failure, in words.

The storage is the real one (local files here) with one fault put in front of ``open`` for the
names a test picks: the one unit replaced, so the blip can be timed."""

import errno
from unittest import mock

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from django.core.files.storage import default_storage
from django.utils import timezone

from recognition.models import InferenceRequest, Result
from recognition.services.images import image_upload
from tests.conftest import png_bytes, upload_file
from workers.model_cache import model_cache_clear
from workers.runner import inference_run

pytestmark = pytest.mark.django_db

SLOW_DOWN = ClientError(
    {
        "Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
        "ResponseMetadata": {"HTTPStatusCode": 503},
    },
    "GetObject",
)


class Blips:
    """``default_storage.open`` raising ``error`` for the next ``times`` opens of a name."""

    def __init__(self, monkeypatch):
        self.pending: dict[str, list[BaseException]] = {}
        self.opened: list[str] = []
        real_open = default_storage.open

        def open_(name, mode="rb"):
            self.opened.append(name)
            faults = self.pending.get(name)
            if faults:
                raise faults.pop(0)
            return real_open(name, mode)

        monkeypatch.setattr(default_storage, "open", open_)

    def fail(self, name: str, error: BaseException, times: int = 1) -> None:
        self.pending[name] = [error] * times


@pytest.fixture
def blips(monkeypatch):
    return Blips(monkeypatch)


@pytest.fixture
def wake_ups(monkeypatch):
    """The delayed wake-up tasks a requeue sends (to the broker, after commit)."""
    sent = []
    monkeypatch.setattr(
        "recognition.services.inference.task_send",
        lambda name, args, queue, countdown=None: sent.append((args[0], queue, countdown)),
    )
    return sent


@pytest.fixture
def cold_worker(settings, tmp_path):
    """A worker process that has not loaded the model yet: the package comes from storage."""
    model_cache_clear()
    settings.SIGHTLINE_MODEL_CACHE_DIR = tmp_path / "model-cache"
    yield
    model_cache_clear()


def queued(membership, count=1, seed=0):
    images = [image_upload(membership=membership, upload=upload_file(png_bytes(seed=seed + i))) for i in range(count)]
    return [InferenceRequest.objects.get(image=image) for image in images]


def backoff_over():
    """Time passes: every waiting backoff is over."""
    InferenceRequest.objects.filter(retry_after__isnull=False).update(retry_after=timezone.now())


def test_a_storage_blip_while_loading_the_model_requeues_the_batch_then_it_succeeds(
    clinician_a, clinician_b, demo_model, blips, cold_worker, wake_ups, django_capture_on_commit_callbacks
):
    ours, theirs = queued(clinician_a)[0], queued(clinician_b, seed=5)[0]  # two hospitals in one batch
    blips.fail(demo_model.package.name, SLOW_DOWN)
    with django_capture_on_commit_callbacks(execute=True):
        assert inference_run(request_id=ours.pk) == 0
    for request in InferenceRequest.objects.all():
        assert request.status == "queued" and request.error == ""  # no failure recorded
        assert request.transient_retries == 1 and request.attempts == 0
        assert request.retry_after > timezone.now()
    assert not Result.objects.exists()
    assert [(request_id, queue) for request_id, queue, _ in wake_ups] == [(ours.pk, "interactive")]  # one wake-up
    ((_, _, countdown),) = wake_ups
    retry_after = InferenceRequest.objects.get(pk=theirs.pk).retry_after
    assert retry_after == InferenceRequest.objects.get(pk=ours.pk).retry_after  # one backoff for the batch
    assert timezone.now() + timezone.timedelta(seconds=countdown) > retry_after  # it lands after the backoff

    assert inference_run(request_id=ours.pk) == 0  # too early: the backoff holds them back
    assert InferenceRequest.objects.filter(status="queued").count() == 2

    backoff_over()
    assert inference_run(request_id=ours.pk) == 2
    assert set(InferenceRequest.objects.values_list("status", flat=True)) == {"done"}
    assert Result.objects.count() == 2
    assert InferenceRequest.objects.get(pk=theirs.pk).transient_retries == 1  # the record of the blip stays


def test_a_blip_reading_one_image_is_tried_again_in_place(clinician_a, demo_model, blips):
    first, second = queued(clinician_a, 2)
    blips.fail(second.image.original.name, OSError(errno.EIO, "Input/output error"))
    assert inference_run(request_id=first.pk) == 2
    assert set(InferenceRequest.objects.values_list("status", "transient_retries")) == {("done", 0)}
    assert blips.opened.count(second.image.original.name) == 2


def test_an_image_whose_reads_keep_failing_goes_back_to_the_queue_alone_then_succeeds(
    clinician_a, clinician_b, demo_model, blips, settings
):
    (ours,) = queued(clinician_a)
    (theirs,) = queued(clinician_b, seed=3)
    blips.fail(theirs.image.original.name, EndpointConnectionError(endpoint_url="https://s3.example.org"), times=3)
    assert inference_run(request_id=ours.pk) == 1
    ours.refresh_from_db()
    theirs.refresh_from_db()
    assert ours.status == "done"  # the other hospital's blip did not touch this read
    assert (theirs.status, theirs.error, theirs.transient_retries) == ("queued", "", 1)
    assert blips.opened.count(theirs.image.original.name) == settings.SIGHTLINE_READ_TRIES

    backoff_over()
    assert inference_run(request_id=theirs.pk) == 1
    theirs.refresh_from_db()
    assert theirs.status == "done" and Result.objects.filter(request=theirs).exists()


def test_only_the_attempt_cap_turns_blips_into_a_failure_in_words(clinician_a, demo_model, blips, settings):
    settings.SIGHTLINE_TRANSIENT_RETRIES = 3
    (request,) = queued(clinician_a)
    blips.fail(request.image.original.name, SLOW_DOWN, times=100)
    for tries in (1, 2):
        assert inference_run(request_id=request.pk) == 0
        request.refresh_from_db()
        assert (request.status, request.transient_retries) == ("queued", tries)
        backoff_over()
    inference_run(request_id=request.pk)
    request.refresh_from_db()
    assert request.status == "failed"
    assert request.error == "the stored image could not be read: the storage answered SlowDown (503), after 3 tries"


def test_a_model_whose_package_never_comes_back_fails_in_words_at_the_cap(
    clinician_a, demo_model, blips, cold_worker, settings
):
    settings.SIGHTLINE_TRANSIENT_RETRIES = 2
    (request,) = queued(clinician_a)
    blips.fail(demo_model.package.name, OSError(errno.ETIMEDOUT, "Connection timed out"), times=100)
    inference_run(request_id=request.pk)
    backoff_over()
    inference_run(request_id=request.pk)
    request.refresh_from_db()
    assert request.status == "failed"
    assert request.error == (
        "the model could not be loaded: "
        "the storage could not be read (TimeoutError: Connection timed out), after 2 tries"
    )


def test_an_image_the_storage_refuses_for_good_fails_alone_without_retries(clinician_a, demo_model, blips):
    good, gone = queued(clinician_a, 2)
    no_such_key = ClientError(
        {"Error": {"Code": "NoSuchKey", "Message": "not there"}, "ResponseMetadata": {"HTTPStatusCode": 404}},
        "GetObject",
    )
    blips.fail(gone.image.original.name, no_such_key)
    assert inference_run(request_id=good.pk) == 2
    gone.refresh_from_db()
    assert (gone.status, gone.error, gone.transient_retries) == ("failed", "the stored image could not be read", 0)
    assert InferenceRequest.objects.get(pk=good.pk).status == "done"  # one bad image never fails its batch


def test_a_database_blip_mid_batch_sends_the_claimed_requests_back(clinician_a, demo_model, monkeypatch):
    """The task retries on the database error (core/transient.py); the rows it had claimed do
    not wait for the time limit's reconciliation."""
    from django.db import OperationalError

    from workers import runner

    requests = queued(clinician_a, 2)
    real_store, calls = runner.outcomes_store, []

    def store_once_unreachable(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        return real_store(*args, **kwargs)

    monkeypatch.setattr(runner, "outcomes_store", store_once_unreachable)
    with pytest.raises(OperationalError):
        inference_run(request_id=requests[0].pk)
    assert set(InferenceRequest.objects.values_list("status", "transient_retries", "attempts")) == {("queued", 1, 0)}
    backoff_over()
    with mock.patch("recognition.services.inference.task_send"):
        assert inference_run(request_id=requests[0].pk) == 2
    assert set(InferenceRequest.objects.values_list("status", flat=True)) == {"done"}


# --- the web answers a database or broker blip with a 503 to retry, never a 500 ---------------------

LEAKED = "could not connect to server: host=db-primary.internal password=hunter2"


def _every_query_fails(error: BaseException):
    """The database connection's own hook (``connection.execute_wrapper``): every query of the
    request meets ``error``, as it would while PostgreSQL restarts."""
    from django.db import connection

    def wrapper(execute, sql, params, many, context):
        raise error

    return connection.execute_wrapper(wrapper)


def _transient_errors():
    from django.db import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError

    return [OperationalError(LEAKED), RedisConnectionError(LEAKED)]


@pytest.mark.parametrize("index", [0, 1], ids=["database", "broker"])
def test_an_api_request_during_an_outage_gets_503_unavailable_with_retry_after(clinician_a, index):
    from rest_framework.test import APIClient

    from core.errors import UNAVAILABLE_RETRY_AFTER_SECONDS

    client = APIClient(raise_request_exception=False)
    client.force_authenticate(clinician_a.user)
    with _every_query_fails(_transient_errors()[index]):
        response = client.get("/api/v1/images/")
    assert response.status_code == 503
    assert response["Retry-After"] == str(UNAVAILABLE_RETRY_AFTER_SECONDS)
    body = response.json()
    assert body["error"]["code"] == "unavailable"
    assert set(body["error"]) == {"code", "message", "detail"}
    text = response.content.decode()
    assert "hunter2" not in text and "db-primary" not in text and "OperationalError" not in text


def test_a_page_during_a_database_outage_gets_a_plain_503_page(clinician_a):
    from django.db import OperationalError
    from django.test import Client

    client = Client(raise_request_exception=False)
    client.force_login(clinician_a.user)
    with _every_query_fails(OperationalError(LEAKED)):
        response = client.get("/")
    assert response.status_code == 503
    assert response["Retry-After"]
    assert response["Content-Type"].startswith("text/html")
    text = response.content.decode()
    assert "briefly unavailable" in text and "hunter2" not in text and "db-primary" not in text


def test_a_bug_is_still_a_500_in_the_error_shape(clinician_a):
    """Only what ``is_transient`` names becomes a 503: a programming error stays a 500."""
    from rest_framework.test import APIClient

    client = APIClient(raise_request_exception=False)
    client.force_authenticate(clinician_a.user)
    with _every_query_fails(ZeroDivisionError(LEAKED)):
        response = client.get("/api/v1/images/")
    assert response.status_code == 500 and "Retry-After" not in response
    assert response.json()["error"]["code"] == "server_error"
    assert "hunter2" not in response.content.decode()
