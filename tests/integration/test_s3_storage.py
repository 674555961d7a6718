"""Image bytes and model packages in S3-compatible storage: a real SeaweedFS S3 server."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import BotoCoreError, ClientError

from recognition.models import InferenceRequest
from recognition.services.images import image_upload
from tests.conftest import api_client_for, png_bytes, upload_file
from tests.e2e.conftest import free_port
from workers.runner import inference_run

pytestmark = pytest.mark.django_db
BUCKET = "sightline-test"
WEED = Path(sys.executable).parent / "weed"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    data = tmp_path_factory.mktemp("seaweedfs")
    port = free_port()
    process = subprocess.Popen(
        [
            str(WEED),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-s3.port={port}",
            f"-bucket={BUCKET}",
        ],
        cwd=data,
        stdout=(data / "weed.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            client.head_bucket(Bucket=BUCKET)
            break
        except (BotoCoreError, ClientError):
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail(f"SeaweedFS did not start:\n{(data / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield endpoint, client
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def s3_storage(settings, s3_endpoint, tmp_path):
    endpoint, client = s3_endpoint
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": BUCKET,
                "endpoint_url": endpoint,
                "access_key": "test",
                "secret_key": "test",
                "region_name": "us-east-1",
                "default_acl": None,
                "file_overwrite": False,
            },
        },
    }
    settings.SIGHTLINE_MODEL_CACHE_DIR = tmp_path / "model-cache"
    return client


def test_images_and_models_live_in_s3_and_the_worker_reads_them_back(
    s3_storage, settings, clinician_a, demo_package, django_capture_on_commit_callbacks
):
    from workers.model_cache import model_cache_clear
    from workers.registration import model_version_register

    version, _ = model_version_register(package_path=demo_package)
    model_cache_clear()  # load from S3, not from an earlier test's handler
    keys = {o["Key"] for o in s3_storage.list_objects_v2(Bucket=BUCKET).get("Contents", [])}
    assert version.package.name in keys

    data = png_bytes(opacity=True, seed=77)
    image = image_upload(membership=clinician_a, upload=upload_file(data))
    stored = s3_storage.get_object(Bucket=BUCKET, Key=image.original.name)["Body"].read()
    assert image.original.name.startswith(f"tenants/{clinician_a.tenant_id}/originals/")
    assert stored == data  # as sent: the worker that reads it makes the display copy

    request = InferenceRequest.objects.get(image=image)
    with django_capture_on_commit_callbacks(execute=True):  # the original is deleted after commit
        assert inference_run(request_id=request.pk) == 1
    request.refresh_from_db()
    assert request.status == "done", request.error
    assert request.result.top_label == "round_opacity"
    assert (settings.SIGHTLINE_MODEL_CACHE_DIR / f"{version.package_sha256}.zip").is_file()  # copied from S3
    model_cache_clear()

    image.refresh_from_db()  # rendered by its read: the display copy in S3, the original gone
    copy = s3_storage.get_object(Bucket=BUCKET, Key=image.file.name)["Body"].read()
    keys = {o["Key"] for o in s3_storage.list_objects_v2(Bucket=BUCKET).get("Contents", [])}
    assert image.file.name in keys and not image.original and not any("/originals/" in key for key in keys)
    download = api_client_for(clinician_a).get(f"/api/v1/images/{image.pk}/file/")
    assert download.status_code == 200
    assert b"".join(download.streaming_content) == copy
