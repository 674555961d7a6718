"""Wake-ups coalesce: while one waits for a version's lane, uploads send none of their own, and
the worker that takes it claims them all (recognition.services.inference.inference_enqueue)."""

import pytest
from celery import current_app
from django.core.cache import cache

from recognition.models import InferenceRequest
from recognition.services import inference
from recognition.services.images import image_upload
from tests.conftest import png_bytes, upload_file
from workers.runner import inference_run

pytestmark = pytest.mark.django_db
INFER = "workers.tasks.infer"


@pytest.fixture
def sent(monkeypatch):
    """The infer messages sent to the broker, as (request id, queue, countdown)."""
    messages = []
    app = type(current_app._get_current_object())

    def send_task(self, name, args=(), **options):
        if name == INFER:
            messages.append((args[0], options.get("queue"), options.get("countdown")))

    monkeypatch.setattr(app, "send_task", send_task)
    return messages


def upload(membership, seed, django_capture_on_commit_callbacks) -> InferenceRequest:
    with django_capture_on_commit_callbacks(execute=True):
        image = image_upload(membership=membership, upload=upload_file(png_bytes(seed=seed)))
    return image.inference_requests.get()


def test_uploads_behind_a_pending_wake_up_send_none_until_a_worker_takes_it(
    clinician_a, demo_model, sent, django_capture_on_commit_callbacks
):
    first = upload(clinician_a, 1, django_capture_on_commit_callbacks)
    second = upload(clinician_a, 2, django_capture_on_commit_callbacks)
    assert sent == [(first.pk, "interactive", None)]  # the second found one on its way
    assert inference_run(request_id=first.pk) == 2  # which claimed both
    assert set(InferenceRequest.objects.filter(pk__in=[first.pk, second.pk]).values_list("status", flat=True)) == {
        "done"
    }
    third = upload(clinician_a, 3, django_capture_on_commit_callbacks)
    assert sent[-1] == (third.pk, "interactive", None)  # the worker took the first: a new one goes


def test_a_wake_up_whose_own_request_was_done_meanwhile_takes_what_waits_and_clears_its_marker(
    clinician_a, demo_model, sent, django_capture_on_commit_callbacks
):
    """The stall this prevents: a task already running took the first request (between two bulk
    batches, say) but not its wake-up; a second upload found that wake-up on its way and sent
    none; when the wake-up's task finally runs, its own request is done, and it must not stop
    there, or the second waits until the marker expires."""
    first = upload(clinician_a, 4, django_capture_on_commit_callbacks)
    second = upload(clinician_a, 5, django_capture_on_commit_callbacks)  # coalesced: no message
    assert [request_id for request_id, _, _ in sent] == [first.pk]
    InferenceRequest.objects.filter(pk=first.pk).update(status=InferenceRequest.Status.DONE)  # served elsewhere
    assert inference_run(request_id=first.pk) == 1  # the wake-up's task serves the second
    assert InferenceRequest.objects.get(pk=second.pk).status == "done"
    assert inference_run(request_id=first.pk) == 0  # redelivered again: nothing waits now
    third = upload(clinician_a, 6, django_capture_on_commit_callbacks)
    assert sent[-1][0] == third.pk and len(sent) == 2  # the marker was cleared


def test_lanes_and_versions_have_markers_of_their_own_and_delayed_wake_ups_never_coalesce(demo_model, sent):
    bulk = InferenceRequest.Priority.BULK
    assert inference.inference_enqueue(1, model_version_id=demo_model.pk)
    assert inference.inference_enqueue(2, bulk, model_version_id=demo_model.pk)
    assert inference.inference_enqueue(3, model_version_id=demo_model.pk + 1000)
    assert inference.inference_enqueue(4, model_version_id=demo_model.pk)  # coalesced: True, nothing sent
    assert inference.inference_enqueue(5, countdown=2.5, model_version_id=demo_model.pk)
    assert inference.inference_enqueue(6)  # no version given (a bulk job's spread of wake-ups)
    assert sent == [
        (1, "interactive", None),
        (2, "bulk", None),
        (3, "interactive", None),
        (5, "interactive", 2.5),
        (6, "interactive", None),
    ]


def test_with_the_cache_away_every_wake_up_is_sent(demo_model, sent, monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("cache down")

    monkeypatch.setattr(cache, "add", unreachable)
    monkeypatch.setattr(cache, "delete", unreachable)
    for request_id in (1, 2):
        assert inference.inference_enqueue(request_id, model_version_id=demo_model.pk)
    inference.inference_wake_taken(model_version_id=demo_model.pk, priority=InferenceRequest.Priority.INTERACTIVE)
    assert [request_id for request_id, _, _ in sent] == [1, 2]
