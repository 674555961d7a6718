"""core.bulk.rows_update: each row gets its own values, in one statement, as the ORM would save them."""

import datetime as dt

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from core.bulk import rows_update
from recognition.models import Image, InferenceRequest
from tests.integration.test_runner_costs import queued

pytestmark = pytest.mark.django_db


def test_each_row_keeps_its_own_values_and_the_rest_is_untouched(clinician_a, demo_model):
    requests = queued([clinician_a], 3)
    untouched = requests[2]
    finished = dt.datetime(2026, 12, 1, 9, 30, 15, 123456, tzinfo=dt.UTC)
    for position, request in enumerate(requests[:2]):
        request.status = InferenceRequest.Status.FAILED if position else InferenceRequest.Status.DONE
        request.error = "bad 'quote'; DROP TABLE x" if position else ""
        request.finished_at = finished + dt.timedelta(seconds=position)
        request.wait_ms = 7 + position
        request.batch_size = 2
    with CaptureQueriesContext(connection) as captured:
        rows_update(requests[:2], ["status", "error", "finished_at", "wait_ms", "batch_size"])
    assert len(captured) == 1
    got = {r.pk: r for r in InferenceRequest.objects.filter(pk__in=[r.pk for r in requests])}
    assert (got[requests[0].pk].status, got[requests[0].pk].error, got[requests[0].pk].wait_ms) == ("done", "", 7)
    assert got[requests[1].pk].error == "bad 'quote'; DROP TABLE x" and got[requests[1].pk].wait_ms == 8
    assert got[requests[1].pk].finished_at == finished + dt.timedelta(seconds=1)  # microseconds and zone kept
    assert got[untouched.pk].status == untouched.status and got[untouched.pk].finished_at is None


def test_file_fields_and_foreign_keys_are_saved_by_their_columns(clinician_a, demo_model):
    image = queued([clinician_a], 1)[0].image
    image.file, image.original, image.byte_size = "tenants/1/images/x.png", "", 1234
    rows_update([image], ["file", "original", "byte_size"])
    image = Image.objects.get(pk=image.pk)
    assert (image.file.name, image.original.name, image.byte_size) == ("tenants/1/images/x.png", "", 1234)
    rows_update([], ["file"])  # nothing to write: no statement, no error


def test_keys_and_unknown_fields_are_refused(clinician_a, demo_model):
    request = queued([clinician_a], 1)[0]
    with pytest.raises(ValueError, match="concrete, non-key"):
        rows_update([request], ["id"])
