"""A bulk job's storage-prefix import reads only the hospital's own imports, on the real S3 server
(SeaweedFS) and on local files alike, whatever the prefix or the keys listed under it."""

import os
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage, default_storage
from storages.backends.s3 import S3Storage

from accounts.models import AccessEvent
from recognition.models import BatchItem, BatchUpload, Image
from recognition.storage import ForeignStorageKey, storage_key_for_tenant
from tests.conftest import api_client_for, png_bytes
from tests.integration.test_batches import create, expand_all
from tests.integration.test_s3_storage import BUCKET, s3_endpoint, s3_storage  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db

# {a}: the importing hospital, {b}: another one. Each must be refused before anything is listed.
HOSTILE_PREFIXES = [
    "tenants/{a}/imports/..\\..\\{b}\\images",  # the review's example: S3 turned it into tenants/{b}/images/
    "tenants/{a}/imports/..\\..\\{b}\\imports\\",
    "tenants/{a}/imports\\..\\..\\{b}\\images\\",
    "tenants/{a}/imports/../../{b}/images/",
    "tenants/{a}/imports/./../../{b}/images/",
    "tenants/{a}/imports//../../{b}/images/",
    "tenants/{a}/imports/night/../../../{b}/images/",
    "tenants/{a}/imports/.../",
    "/tenants/{b}/images/",
    "//tenants/{a}/imports/",
    "/tenants/{a}/imports/",
    "tenants/{a}/imports/%2e%2e/%2e%2e/{b}/images/",
    "tenants/{a}/imports/..%2f..%2f{b}%2fimages/",
    "tenants/{a}/imports/..%5c..%5c{b}%5cimages",
    "tenants/{a}/imports/..\u2215..\u2215{b}\u2215images",  # DIVISION SLASH
    "tenants/{a}/imports/..\uff0f..\uff0f{b}\uff0fimages",  # FULLWIDTH SOLIDUS
    "tenants/{a}/imports/..\u2044..\u2044{b}\u2044images",  # FRACTION SLASH
    "tenants/{a}/imports/\uff0e\uff0e/\uff0e\uff0e/{b}/images/",  # FULLWIDTH FULL STOP
    "tenants/{a}/imports/x\x00/../../../{b}/images/",
    "tenants/{a}/imports/\t/../../{b}/images/",
    "tenants/{a}/imports/night /",
    "tenants/{b}/imports/",
    "tenants/{b}/images/",
    "tenants/{a}/images/",
    "tenants/{a}{b}/imports/",
    "tenants/",
]


@pytest.fixture
def s3_client(request):
    return request.getfixturevalue("s3_storage")


@pytest.fixture(params=["s3", "local"])
def storage_kind(request):
    if request.param == "s3":
        request.getfixturevalue("s3_storage")
    return request.param


@pytest.fixture
def reads(monkeypatch):
    """Every key the storage is asked to list, size or open, as it was asked."""
    asked: list[tuple[str, str]] = []
    for backend in (S3Storage, FileSystemStorage):
        for method in ("listdir", "size", "_open"):
            original = getattr(backend, method)

            def spy(self, name, *args, _original=original, _method=method, **kwargs):
                asked.append((_method, name))
                if len(asked) > 500:  # today's code walked some listings forever
                    raise AssertionError("the listing never ended")
                return _original(self, name, *args, **kwargs)

            monkeypatch.setattr(backend, method, spy)
    return asked


def other_hospitals_files(b: int) -> list[str]:
    """Real objects of hospital B, where a leak would find them."""
    keys = [f"tenants/{b}/images/secret.png", f"tenants/{b}/imports/secret.png"]
    for key in keys:
        default_storage.save(key, ContentFile(png_bytes(seed=404, size=64)))
    return keys


def fresh() -> str:
    """A folder no earlier test wrote: stored files outlive the rolled-back rows that named them."""
    return f"night-{uuid.uuid4().hex[:12]}"


def add_prefix(client, job_id, prefix):
    return client.post(f"/api/v1/batches/{job_id}/items/", {"prefix": prefix}, format="multipart")


@pytest.mark.parametrize("template", HOSTILE_PREFIXES)
def test_a_hostile_prefix_is_refused_in_words_and_reads_nothing(
    storage_kind, template, clinician_a, clinician_b, demo_model, reads
):
    a, b = clinician_a.tenant_id, clinician_b.tenant_id
    placed = other_hospitals_files(b)
    client = api_client_for(clinician_a)
    job = create(client).json()
    del reads[:]
    response = add_prefix(client, job["id"], template.format(a=a, b=b))
    expand_all()
    # nothing of hospital B's became hospital A's, nothing was even listed or opened
    assert not Image.objects.filter(tenant_id=a).exists() and not BatchItem.objects.exists()
    assert reads == []
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert not BatchUpload.objects.exists()
    assert all(default_storage.exists(key) for key in placed)
    if "\x00" in template:  # the API's input check refuses a NUL before the storage check sees it
        assert error["code"] == "invalid" and "prefix" in error["detail"], error
        return
    assert error["code"] == "foreign_prefix" and len(error["message"]) > 20
    assert AccessEvent.objects.filter(action="batch.add_prefix", outcome="denied", tenant_id=a).count() == 1


def test_keys_listed_under_the_own_prefix_are_checked_again_before_they_are_read_on_s3(
    s3_client, clinician_a, clinician_b, demo_model, reads
):
    """The hospital can write any key into its own imports; every key the listing names is checked
    again, by the same function, before it is read, so a key the first check would not have let
    through becomes a failed item that says why. (SeaweedFS itself turns "\\" into "/", folds "//"
    and refuses ".." in keys, so keys that lead elsewhere through django-storages, possible on AWS,
    cannot be placed here; the refused forms below go through the same check.)"""
    a, b = clinician_a.tenant_id, clinician_b.tenant_id
    placed = other_hospitals_files(b)
    night = f"tenants/{a}/imports/{fresh()}/"
    body = png_bytes(seed=1, size=64)
    for key in (
        f"{night}ok.png",
        f"{night}%2e%2e/%2e%2e/{b}/images/secret.png",  # one percent-decoding away from hospital B
        f"{night}.../secret.png",
        f"{night}wide\uff0fsecret.png",
        f"{night}with space.png",
    ):
        s3_client.put_object(Bucket=BUCKET, Key=key, Body=body)
    client = api_client_for(clinician_a)
    job = create(client).json()
    del reads[:]
    assert add_prefix(client, job["id"], night).status_code == 202
    expand_all()

    opened = [name for method, name in reads if method != "listdir"]
    assert opened and all(name == f"{night}ok.png" for name in opened), opened
    assert [name for method, name in reads if method == "listdir"] == [night]  # no folder below was walked
    upload = BatchUpload.objects.get()
    assert upload.status == "complete", upload.error
    items = BatchItem.objects.filter(job_id=job["id"]).order_by("position")
    assert [item.status for item in items].count("pending") == 1
    failed = [item.error for item in items if item.status == "failed"]
    assert len(failed) == 4 and all("was not read" in error for error in failed), failed
    assert Image.objects.filter(tenant_id=a).count() == 1
    assert all(default_storage.exists(key) for key in placed)


def test_links_under_the_own_prefix_are_never_followed_on_local_files(clinician_a, clinician_b, demo_model, reads):
    """On local files the analogue is a link: to hospital B's folder or file, or a loop back up."""
    a, b = clinician_a.tenant_id, clinician_b.tenant_id
    other_hospitals_files(b)
    root = Path(settings.MEDIA_ROOT)
    folder = fresh()
    night = root / "tenants" / str(a) / "imports" / folder
    night.mkdir(parents=True)
    (night / "ok.png").write_bytes(png_bytes(seed=1, size=64))
    os.symlink(root / "tenants" / str(b) / "images", night / "theirs")
    os.symlink(root / "tenants" / str(b) / "images" / "secret.png", night / "secret.png")
    os.symlink(night, night / "loop")
    (night / "evil\\..\\..\\..\\2\\secret.png").write_bytes(png_bytes(seed=2, size=64))
    client = api_client_for(clinician_a)
    job = create(client).json()
    del reads[:]
    assert add_prefix(client, job["id"], f"tenants/{a}/imports/{folder}").status_code == 202  # "/" may be left off
    expand_all()

    opened = [name for method, name in reads if method != "listdir"]
    assert opened and all(name == f"tenants/{a}/imports/{folder}/ok.png" for name in opened), opened
    upload = BatchUpload.objects.get()
    assert upload.status == "complete", upload.error
    statuses = list(BatchItem.objects.order_by("position").values_list("status", "error"))
    assert [status for status, _ in statuses].count("pending") == 1
    failed = [error for status, error in statuses if status == "failed"]
    assert len(failed) == 4 and all("was not read" in error for error in failed), failed
    assert Image.objects.filter(tenant_id=a).count() == 1


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_a_missing_or_empty_prefix_is_refused_in_words(storage_kind, where, clinician_a, demo_model):
    a = clinician_a.tenant_id
    prefix = f"tenants/{a}/imports/{where}-{fresh()}/"
    if where == "empty":  # S3 has no empty folders: a folder holding only a folder of nothing
        default_storage.save(f"{prefix}.keep", ContentFile(b""))
        default_storage.delete(f"{prefix}.keep")
    client = api_client_for(clinician_a)
    job = create(client).json()
    assert add_prefix(client, job["id"], prefix).status_code == 202
    expand_all()
    upload = BatchUpload.objects.get()
    assert upload.status == "refused" and upload.error == f"There are no files under {prefix}."
    refused = client.get(f"/api/v1/batches/{job['id']}/").json()["uploads_refused"]
    assert refused == [f"The storage prefix {prefix} was refused: There are no files under {prefix}."]
    assert client.post(f"/api/v1/batches/{job['id']}/start/").status_code == 200  # it blocks nothing


@pytest.mark.parametrize(
    "key",
    [
        "tenants/7/imports/night/a.png",
        "tenants/7/imports/",
        "tenants/7/imports/Night-01_(copy)/IM.0001.dcm",
    ],
)
def test_a_plain_key_in_the_hospitals_area_is_its_own(key):
    assert storage_key_for_tenant(tenant_id=7, key=key, under="imports") == key


@pytest.mark.parametrize("template", [*HOSTILE_PREFIXES, "", "tenants/{a}/imports", "tenants/{a}/imports/a\u00e9.png"])
def test_the_one_check_refuses_every_hostile_form(template):
    key = template.format(a=7, b=8)  # "tenants/7/imports" is no key in the area: the import adds the "/" itself
    with pytest.raises(ForeignStorageKey):
        storage_key_for_tenant(tenant_id=7, key=key, under="imports")


class RepeatingListing(FileSystemStorage):
    """Local files whose listing names every file twice, as a listing whose pages overlap would."""

    def listdir(self, path):
        folders, files = super().listdir(path)
        return folders, files + files


def test_a_listing_that_names_a_key_twice_ends_the_import_in_words(settings, clinician_a, demo_model):
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": f"{__name__}.RepeatingListing",
            "OPTIONS": {"location": str(settings.MEDIA_ROOT)},
        },
    }
    night = f"tenants/{clinician_a.tenant_id}/imports/{fresh()}/"
    for name in ("a.png", "b.png"):
        default_storage.save(f"{night}{name}", ContentFile(png_bytes(seed=1, size=64)))
    client = api_client_for(clinician_a)
    job = create(client).json()
    assert add_prefix(client, job["id"], night).status_code == 202
    expand_all()
    upload = BatchUpload.objects.get()
    assert upload.status == "refused" and "twice" in upload.error and "a.png" in upload.error
    assert client.post(f"/api/v1/batches/{job['id']}/start/").status_code == 200  # nothing waits for it
