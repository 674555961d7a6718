"""The worker's runtime: what a batch costs in statements, and what each lane takes."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from recognition.models import InferenceRequest
from recognition.services.images import image_upload
from tests.conftest import png_bytes, upload_file
from workers import queue_policy
from workers.queue_policy import claim, takes_bulk
from workers.runner import inference_run

pytestmark = pytest.mark.django_db

Priority = InferenceRequest.Priority


def queued(memberships, count, seed=0):
    """``count`` queued reads, spread over the memberships' hospitals (one study per image)."""
    images = [
        image_upload(membership=memberships[i % len(memberships)], upload=upload_file(png_bytes(seed=seed + i)))
        for i in range(count)
    ]
    return [InferenceRequest.objects.get(image=image) for image in images]


def statements_for_one_batch(memberships, size, seed):
    requests = queued(memberships, size, seed=seed)
    with CaptureQueriesContext(connection) as captured:
        assert inference_run(request_id=requests[0].pk) == size
    assert set(
        InferenceRequest.objects.filter(pk__in=[r.pk for r in requests]).values_list("batch_size", flat=True)
    ) == {size}
    return len(captured)


def test_a_batch_costs_the_same_statements_whatever_its_size(clinician_a, clinician_b, demo_model, settings):
    """Outcomes, results, studies, job items and notifications are written in bulk: one read of
    8 images (in 8 studies of 2 hospitals) runs as many statements as a read of one."""
    settings.SIGHTLINE_MAX_BATCH_SIZE = 8
    statements_for_one_batch([clinician_a], 1, seed=0)  # the model is loaded, the reclaim has run
    one = statements_for_one_batch([clinician_a], 1, seed=10)
    eight = statements_for_one_batch([clinician_a, clinician_b], 8, seed=20)
    assert one == eight, f"a batch of 1 ran {one} statements, a batch of 8 ran {eight}"
    # the request with its version; the claim (3, and a savepoint's 2); the rows; the next claim;
    # the store (7, and a savepoint's 2); the uploads' display copies (2: the rows still received,
    # one UPDATE)
    assert one <= 19


def test_the_bulk_lane_takes_only_bulk_work(clinician_a, demo_model, settings):
    interactive = queued([clinician_a], 2)
    bulk = queued([clinician_a], 2, seed=5)
    InferenceRequest.objects.filter(pk__in=[r.pk for r in bulk]).update(priority=Priority.BULK)
    settings.SIGHTLINE_WORKER_LANE = "bulk"
    # even woken by an interactive request's message, it claims bulk work only
    assert claim(model_version_id=demo_model.pk, limit=8, first_id=interactive[0].pk) == [r.pk for r in bulk]


def test_the_interactive_lane_falls_back_to_bulk_work_only_when_no_clinician_waits(clinician_a, demo_model, settings):
    interactive = queued([clinician_a], 2)
    bulk = queued([clinician_a], 2, seed=5)
    InferenceRequest.objects.filter(pk__in=[r.pk for r in bulk]).update(priority=Priority.BULK)
    settings.SIGHTLINE_WORKER_LANE = "interactive"
    assert claim(model_version_id=demo_model.pk, limit=8, first_id=bulk[0].pk) == [r.pk for r in interactive]
    assert claim(model_version_id=demo_model.pk, limit=8) == [r.pk for r in bulk]


def test_an_unknown_lane_is_refused_in_words(clinician_a, demo_model, settings):
    settings.SIGHTLINE_WORKER_LANE = "fast"
    with pytest.raises(ValueError, match="SIGHTLINE_WORKER_LANE is 'fast'"):
        claim(model_version_id=demo_model.pk, limit=1)


def test_the_interactive_lane_takes_bulk_work_in_small_batches_and_the_others_in_full(
    clinician_a, demo_model, settings
):
    bulk = queued([clinician_a], 6, seed=40)
    InferenceRequest.objects.filter(pk__in=[r.pk for r in bulk]).update(priority=Priority.BULK)
    settings.SIGHTLINE_INTERACTIVE_LANE_BULK_BATCH = 2
    settings.SIGHTLINE_WORKER_LANE = "interactive"
    assert claim(model_version_id=demo_model.pk, limit=8) == [r.pk for r in bulk[:2]]
    settings.SIGHTLINE_WORKER_LANE = "all"
    assert claim(model_version_id=demo_model.pk, limit=8) == [r.pk for r in bulk[2:]]
    interactive = queued([clinician_a], 3, seed=50)
    settings.SIGHTLINE_WORKER_LANE = "interactive"  # a clinician's reads are never capped
    assert claim(model_version_id=demo_model.pk, limit=8) == [r.pk for r in interactive]


def test_a_task_for_a_clinicians_read_on_the_interactive_lane_claims_no_bulk_work(clinician_a, demo_model, settings):
    interactive = queued([clinician_a], 1)
    bulk = queued([clinician_a], 2, seed=60)
    InferenceRequest.objects.filter(pk__in=[r.pk for r in bulk]).update(priority=Priority.BULK)
    settings.SIGHTLINE_WORKER_LANE = "interactive"
    assert not takes_bulk(Priority.INTERACTIVE) and takes_bulk(Priority.BULK)
    assert claim(model_version_id=demo_model.pk, limit=8, bulk=False) == [interactive[0].pk]
    assert claim(model_version_id=demo_model.pk, limit=8, bulk=False) == []  # the bulk reads wait for a bulk task
    settings.SIGHTLINE_WORKER_LANE = "all"
    assert takes_bulk(Priority.INTERACTIVE)


def test_a_bulk_task_on_the_interactive_lane_hands_over_to_a_read_that_arrived_and_ends(
    clinician_a, demo_model, settings, monkeypatch
):
    bulk = queued([clinician_a], 3, seed=70)
    InferenceRequest.objects.filter(pk__in=[r.pk for r in bulk]).update(priority=Priority.BULK)
    settings.SIGHTLINE_WORKER_LANE = "interactive"
    settings.SIGHTLINE_INTERACTIVE_LANE_BULK_BATCH = 1
    woken = []
    monkeypatch.setattr(queue_policy, "inference_enqueue", lambda *args, **kwargs: woken.append(args))
    readers = []

    def yields(version_id, priority):  # a clinician's read arrived while the first bulk batch ran
        if not readers:
            readers.append(None)  # the first batch's check: nobody waits yet
            return False
        readers.append(queued([clinician_a], 1, seed=80)[0])  # its own wake-up is on its way
        return True

    monkeypatch.setattr(queue_policy, "yields_to_interactive", yields)

    assert inference_run(request_id=bulk[0].pk) == 1  # one bulk batch of 1, then the hand-over
    reader = readers[-1]
    statuses = dict(InferenceRequest.objects.values_list("pk", "status"))
    assert statuses[bulk[0].pk] == "done" and statuses[bulk[1].pk] == statuses[bulk[2].pk] == "queued"
    assert statuses[reader.pk] == "queued"  # not read inside the bulk task: its own task reads it
    assert InferenceRequest.objects.get(pk=bulk[1].pk).attempts == 0  # released, the attempt not counted
    assert woken == [(reader.pk, Priority.INTERACTIVE), (bulk[1].pk, Priority.BULK)]  # a wake-up per lane

    settings.SIGHTLINE_WORKER_LANE = "all"  # one worker for everything turns to the read itself
    assert not queue_policy.hands_over(demo_model.pk, Priority.BULK)
