"""Under ASGI every export is an asynchronous stream (Django would read a synchronous one whole
into memory first), with the same rows, the same access-log entry and the same 404 for another
hospital as under WSGI. tests/e2e/test_export_streaming.py measures the memory through uvicorn."""

from __future__ import annotations

import csv
import io
import json

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient

from accounts.models import AccessEvent, Role
from accounts.services import membership_grant, user_get_or_create
from recognition.models import BatchItem
from recognition.services.jobs import batch_job_create
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db


def fetch(user, url: str):
    client = AsyncClient()
    client.force_login(user)

    async def get():
        response = await client.get(url)
        if not response.streaming:
            return response, response.content
        return response, b"".join([chunk async for chunk in response.streaming_content])

    return async_to_sync(get)()


@pytest.fixture
def job(clinician_a, demo_model):
    job, _ = batch_job_create(membership=clinician_a, name="streamed")
    BatchItem.objects.bulk_create(
        BatchItem(tenant=job.tenant, job=job, position=n, status=BatchItem.Status.FAILED, error=f"=bad {n}")
        for n in range(3)
    )
    return job


@pytest.mark.parametrize("url", ["/api/v1/batches/{id}/results/", "/jobs/{id}/results.csv"])
def test_a_jobs_csv_streams_asynchronously_and_its_download_is_logged_once(url, job, clinician_a):
    response, body = fetch(clinician_a.user, url.format(id=job.pk))
    assert response.status_code == 200 and response.is_async
    assert response["Content-Disposition"] == f'attachment; filename="job-{job.pk}.csv"'
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert [row["position"] for row in rows] == ["0", "1", "2"]
    assert rows[0]["error"] == "'=bad 0"  # still spreadsheet-safe
    assert AccessEvent.objects.filter(action="batch.results", target_id=str(job.pk)).count() == 1


def test_a_jobs_json_streams_asynchronously(job, clinician_a):
    response, body = fetch(clinician_a.user, f"/api/v1/batches/{job.pk}/results/?format=json")
    assert response.status_code == 200 and response.is_async and response["Content-Type"] == "application/json"
    assert [row["position"] for row in json.loads(body)["results"]] == [0, 1, 2]


@pytest.mark.parametrize("url", ["/api/v1/batches/{id}/results/", "/jobs/{id}/results.csv"])
def test_another_hospitals_job_export_is_a_404_and_streams_nothing(url, job, clinician_b):
    response, body = fetch(clinician_b.user, url.format(id=job.pk))
    assert response.status_code == 404 and b"=bad" not in body
    assert not AccessEvent.objects.filter(action="batch.results", outcome=AccessEvent.Outcome.SUCCESS).exists()


def test_the_agreement_csv_streams_asynchronously(hospital_a):
    admin = membership_grant(
        tenant=hospital_a, user=user_get_or_create(username="hospital-admin", password=PASSWORD), role=Role.TENANT_ADMIN
    )
    response, body = fetch(admin.user, "/agreement.csv")
    assert response.status_code == 200 and response.is_async
    assert response["Content-Disposition"].startswith('attachment; filename="agreement-')
    assert body.decode().startswith("model,version,label")
