"""What the web's busiest reads cost in statements, pinned: the job list (API and page), the
worklist (API and page) and image detail (API and page). Each is pinned at a small page and
again at a larger one, so a query per row shows as a failure here. The upload's count is pinned
in ``test_upload_cost.py`` (UPLOAD_STATEMENTS, 12), not here.

A page costs five statements more than the API's read of the same thing: the session and the
user before the view, and, in the template, the hospital switcher's memberships and the two
permission reads of the staff links."""

from __future__ import annotations

import pytest

from recognition.models import BatchUpload
from recognition.services.images import StudyFields, image_upload
from recognition.services.jobs import batch_items_add_files, batch_job_create, batch_job_start
from tests.conftest import api_client_for, png_bytes, upload_file

pytestmark = pytest.mark.django_db

# The member (1), the page of jobs with each one's progress annotated (1: item counts per state,
# uploads pending and refused, the pace of the latest run, as subqueries), the refused uploads'
# words for the page (1, only when a job on it has one). Before: up to five queries per job.
JOB_LIST_API = 3
# The page also reads the hospital's settings (1: whether it screens, with which model).
JOB_LIST_PAGE = JOB_LIST_API + 5 + 1
# One job: the member, the job, its progress annotated, the refused uploads' words (only when it has one).
JOB_DETAIL_API = 4
# The member (1), the page of studies with their state (1), the access-log entry: the chain's
# head, the entry, the new head (3).
WORKLIST_API = 5
WORKLIST_PAGE = WORKLIST_API + 5
# The member, the image with its AI state, its results, the access-log entry (3); the page also
# reads the image's place among its study's images and its reviews (2), and the browser's
# preliminary screen with its model version (1).
IMAGE_API = 6
IMAGE_PAGE = IMAGE_API + 5 + 2 + 1


def add_jobs(membership, count: int, start: int = 0) -> None:
    """Jobs in every state the list shows: open, running, and ones with a refused upload."""
    for i in range(start, start + count):
        job, _ = batch_job_create(membership=membership, name=f"night {i}")
        batch_items_add_files(membership=membership, job_id=job.pk, files=[upload_file(png_bytes(seed=i, size=32))])
        if i % 2:
            batch_job_start(membership=membership, job_id=job.pk)
        if i % 3 == 0:
            BatchUpload.objects.create(
                tenant=membership.tenant, job=job, kind="prefix", source="x/", status="refused", error="no files"
            )


def test_the_job_list_costs_the_same_for_3_or_12_jobs(client, clinician_a, demo_model, django_assert_num_queries):
    client.force_login(clinician_a.user)
    api = api_client_for(clinician_a)
    add_jobs(clinician_a, 3)
    client.get("/jobs/")  # the session's first request also records the member's sign-in activity
    for start, count in ((3, 0), (3, 9)):
        add_jobs(clinician_a, count, start)
        with django_assert_num_queries(JOB_LIST_API):
            listed = api.get("/api/v1/batches/")
        assert listed.status_code == 200 and len(listed.json()["results"]) == 3 + count
        with django_assert_num_queries(JOB_LIST_PAGE):
            assert client.get("/jobs/").status_code == 200
    first = BatchUpload.objects.filter(status="refused").earliest("id").job_id
    with django_assert_num_queries(JOB_DETAIL_API):
        assert api.get(f"/api/v1/batches/{first}/").json()["uploads_refused"] == [
            "The storage prefix x/ was refused: no files"
        ]
    refused = [job["uploads_refused"] for job in listed.json()["results"]]
    assert refused.count(["The storage prefix x/ was refused: no files"]) == 4  # jobs 0, 3, 6, 9
    started = [job for job in listed.json()["results"] if job["status"] == "running"]
    assert len(started) == 6 and all(job["counts"]["queued"] == 1 and job["total"] == 1 for job in started)


def test_a_page_with_no_refused_upload_reads_no_words_for_them(clinician_a, demo_model, django_assert_num_queries):
    api = api_client_for(clinician_a)
    add_jobs(clinician_a, 2, start=1)  # jobs 1 and 2: nothing refused
    api.get("/api/v1/batches/")  # the first request marks the member seen (once a minute)
    with django_assert_num_queries(JOB_LIST_API - 1):
        assert all(job["uploads_refused"] == [] for job in api.get("/api/v1/batches/").json()["results"])


def test_the_worklist_and_image_detail_cost_a_fixed_number_of_statements(
    client, clinician_a, demo_model, django_assert_num_queries
):
    client.force_login(clinician_a.user)
    api = api_client_for(clinician_a)

    def add(count: int, start: int) -> list:
        return [
            image_upload(
                membership=clinician_a,
                upload=upload_file(png_bytes(seed=i, size=32)),
                study=StudyFields(accession_number=f"Q-{i}", modality="DX"),
            )
            for i in range(start, start + count)
        ]

    image = add(3, 0)[0]
    client.get("/worklist/")  # the session's first request also records the member's sign-in activity
    for start, count in ((3, 0), (3, 9)):
        add(count, start)
        with django_assert_num_queries(WORKLIST_API):
            assert api.get("/api/v1/studies/").status_code == 200
        with django_assert_num_queries(WORKLIST_PAGE):
            assert client.get("/worklist/").status_code == 200
    with django_assert_num_queries(IMAGE_API):
        assert api.get(f"/api/v1/images/{image.pk}/").status_code == 200
    with django_assert_num_queries(IMAGE_PAGE):
        assert client.get(f"/images/{image.pk}/").status_code == 200
