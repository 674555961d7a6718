"""A real network blip between the worker and S3 (the SeaweedFS server the suite runs): while it
lasts, boto3 cannot connect (EndpointConnectionError, from the real client), and the worker's
real runtime sends the requests back to the queue instead of failing them; once S3 answers
again they succeed. Nothing is faked: the blip is the storage pointed at an address where
nothing listens, then back."""

import pytest
from botocore.config import Config
from django.utils import timezone

from recognition.models import InferenceRequest, Result
from recognition.services.images import image_upload
from tests.conftest import png_bytes, upload_file
from tests.e2e.conftest import free_port
from tests.integration.test_s3_storage import s3_endpoint, s3_storage  # noqa: F401  (fixtures)
from workers.model_cache import model_cache_clear
from workers.registration import model_version_register
from workers.runner import inference_run

pytestmark = pytest.mark.django_db


def s3_reachable(settings, reachable: bool, endpoint: str) -> None:
    default = settings.STORAGES["default"]
    options = {
        **default["OPTIONS"],
        "endpoint_url": endpoint if reachable else f"http://127.0.0.1:{free_port()}",
        # botocore's own retries would hide the blip for seconds; the platform's are under test
        "client_config": Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2),
    }
    settings.STORAGES = {**settings.STORAGES, "default": {**default, "OPTIONS": options}}


def backoff_over():
    InferenceRequest.objects.filter(retry_after__isnull=False).update(retry_after=timezone.now())


def test_s3_unreachable_while_loading_the_model_and_reading_images_requeues_then_succeeds(
    s3_storage,  # noqa: F811
    s3_endpoint,  # noqa: F811
    settings,
    clinician_a,
    clinician_b,
    demo_package,
):
    endpoint, _ = s3_endpoint
    model_version_register(package_path=demo_package)
    ours = InferenceRequest.objects.get(image=image_upload(membership=clinician_a, upload=upload_file(png_bytes())))
    theirs = InferenceRequest.objects.get(
        image=image_upload(membership=clinician_b, upload=upload_file(png_bytes(seed=4)))
    )
    model_cache_clear()  # a worker that has not loaded the model: the package comes from S3

    s3_reachable(settings, False, endpoint)
    assert inference_run(request_id=ours.pk) == 0
    for request in InferenceRequest.objects.all():
        assert (request.status, request.error, request.transient_retries) == ("queued", "", 1)
    s3_reachable(settings, True, endpoint)
    backoff_over()
    assert inference_run(request_id=ours.pk) == 2
    assert Result.objects.count() == 2

    third = InferenceRequest.objects.get(
        image=image_upload(membership=clinician_a, upload=upload_file(png_bytes(seed=9)))
    )
    s3_reachable(settings, False, endpoint)  # the model is loaded now: only the image read fails
    assert inference_run(request_id=third.pk) == 0
    third.refresh_from_db()
    assert (third.status, third.error, third.transient_retries) == ("queued", "", 1)
    s3_reachable(settings, True, endpoint)
    backoff_over()
    assert inference_run(request_id=third.pk) == 1
    third.refresh_from_db()
    assert third.status == "done" and theirs.tenant_id != third.tenant_id
    model_cache_clear()
