"""The model registry from the command line and the admin: registration, aliases, splits, pins."""

import io
import json
import zipfile
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from accounts.models import AccessEvent
from recognition.models import InferenceRequest, ModelAlias, ModelPin, ModelVersion, TrafficSplit
from recognition.services.images import image_upload
from recognition.services.registry import split_bucket
from tests.conftest import PASSWORD, png_bytes, upload_file
from workers.engine.package import MANIFEST_NAME

pytestmark = pytest.mark.django_db


def variant(demo_package: Path, tmp_path: Path, **changes) -> Path:
    """The demo package under another version number (same weights)."""
    with zipfile.ZipFile(demo_package) as source:
        manifest = {**json.loads(source.read(MANIFEST_NAME)), **changes}
        members = {name: source.read(name) for name in source.namelist() if name != MANIFEST_NAME}
    target = tmp_path / f"variant-{manifest['version']}.zip"
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr(MANIFEST_NAME, json.dumps(manifest))
        for name, data in members.items():
            archive.writestr(name, data)
    return target


def run(*args) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.fixture
def two_versions(demo_model, demo_package, tmp_path):
    run("register_model", str(variant(demo_package, tmp_path, version="1.1.0")))
    return demo_model, ModelVersion.objects.get(version="1.1.0")


def test_register_model_loads_checks_and_registers_once(demo_package, tmp_path):
    assert "Registered sightline-demo 1.0.0" in run("register_model", str(demo_package), "--alias", "production")
    assert "Already registered" in run("register_model", str(demo_package))
    assert ModelVersion.objects.count() == 1
    assert ModelAlias.objects.get(name="production").version.version == "1.0.0"
    assert AccessEvent.objects.filter(action="model.register").count() == 1


def test_a_package_is_stored_once_under_its_checksum_even_after_a_rolled_back_registration(demo_package):
    from django.core.files.storage import default_storage
    from django.db import transaction

    from recognition.services.registry import model_version_register

    class RolledBack(Exception):
        pass

    with pytest.raises(RolledBack), transaction.atomic():
        first, _ = model_version_register(package_path=demo_package)
        raise RolledBack
    assert not ModelVersion.objects.exists()
    version, created = model_version_register(package_path=demo_package)
    assert created and version.package.name == first.package.name
    assert version.package.name.endswith(f"-{version.package_sha256}.zip")
    stored = default_storage.listdir(str(Path(version.package.name).parent))[1]
    assert [name for name in stored if name.startswith("1.0.0")] == [Path(version.package.name).name]


def test_a_package_whose_outputs_do_not_match_its_labels_is_refused(demo_package, tmp_path):
    wrong = variant(demo_package, tmp_path, version="9.0.0", labels=["a", "b", "c"])
    with pytest.raises(CommandError, match="refused"):
        run("register_model", str(wrong))
    assert not ModelVersion.objects.exists()


def test_versions_are_immutable(demo_model, demo_package, tmp_path):
    other = variant(demo_package, tmp_path, version="1.0.0", weights_sha256="0" * 64)
    with pytest.raises(CommandError):
        run("register_model", str(other))  # a forged checksum is refused before anything else
    assert ModelVersion.objects.get().weights_sha256 == demo_model.weights_sha256


def test_moving_an_alias_is_recorded(two_versions):
    _, newer = two_versions
    run("model", "alias", "sightline-demo", "canary", "1.1.0")
    assert ModelAlias.objects.get(name="canary").version == newer
    assert AccessEvent.objects.filter(action="model.alias_move").count() == 2  # production at registration, canary now
    with pytest.raises(CommandError, match="no version"):
        run("model", "alias", "sightline-demo", "canary", "7.7.7")


def test_a_split_sends_a_stable_share_of_one_hospitals_images(two_versions, clinician_a, clinician_b):
    production, newer = two_versions
    run("model", "split", "sightline-demo", "--hospital", "demo-general", "--version", "1.1.0", "--percent", "30")
    share = sum(split_bucket(image_id) < 30 for image_id in range(1, 2001)) / 2000
    assert 0.25 < share < 0.35
    images = [image_upload(membership=clinician_a, upload=upload_file(png_bytes(seed=i))) for i in range(12)]
    for image in images:
        expected = newer if split_bucket(image.pk) < 30 else production
        assert InferenceRequest.objects.get(image=image).model_version == expected  # same image, same version
    other = image_upload(membership=clinician_b, upload=upload_file(png_bytes()))
    assert InferenceRequest.objects.get(image=other).model_version == production  # only that hospital
    assert AccessEvent.objects.filter(action="model.split_change", tenant=clinician_a.tenant).count() == 1
    run("model", "split", "sightline-demo", "--hospital", "demo-general", "--percent", "0")
    assert not TrafficSplit.objects.exists()


def test_a_pin_wins_over_splits_and_aliases(two_versions, clinician_a):
    production, newer = two_versions
    run("model", "split", "sightline-demo", "--hospital", "demo-general", "--version", "1.1.0", "--percent", "99")
    run("model", "pin", "sightline-demo", "--hospital", "demo-general", "--version", "1.0.0")
    run("model", "alias", "sightline-demo", "production", "1.1.0")
    image = image_upload(membership=clinician_a, upload=upload_file(png_bytes()))
    assert InferenceRequest.objects.get(image=image).model_version == production
    run("model", "pin", "sightline-demo", "--hospital", "demo-general", "--clear")
    assert not ModelPin.objects.exists()
    assert "split: demo-general sends 99% to 1.1.0" in run("model", "list")


def test_a_split_outside_1_to_99_is_refused(two_versions, hospital_a):
    with pytest.raises(CommandError, match="1-99"):
        run("model", "split", "sightline-demo", "--hospital", "demo-general", "--version", "1.1.0", "--percent", "100")


def test_staff_register_a_package_on_the_admin_page(client, demo_package, django_user_model):
    staff = django_user_model.objects.create_superuser("platform", password=PASSWORD)
    client.force_login(staff)
    assert client.get("/admin/recognition/modelversion/register/").status_code == 200
    with demo_package.open("rb") as package:
        response = client.post(
            "/admin/recognition/modelversion/register/", {"package": package, "alias": "production"}, follow=True
        )
    assert b"Registered sightline-demo 1.0.0" in response.content
    version = ModelVersion.objects.get()
    assert version.registered_by == staff
    assert AccessEvent.objects.filter(action="model.register", actor=staff).count() == 1


def test_a_bad_package_on_the_admin_page_says_why(client, django_user_model, tmp_path):
    client.force_login(django_user_model.objects.create_superuser("platform", password=PASSWORD))
    response = client.post(
        "/admin/recognition/modelversion/register/", {"package": io.BytesIO(b"not a zip"), "alias": ""}
    )
    assert response.status_code == 200
    assert b"not a zip archive" in response.content
    assert not ModelVersion.objects.exists()


def test_only_staff_reach_the_registration_page(client, clinician_a):
    client.force_login(clinician_a.user)
    response = client.get("/admin/recognition/modelversion/register/")
    assert response.status_code == 302 and "login" in response["Location"]


def test_staff_split_a_hospital_in_the_admin_and_it_is_recorded(client, two_versions, clinician_a, django_user_model):
    _, newer = two_versions
    staff = django_user_model.objects.create_superuser("platform", password=PASSWORD)
    client.force_login(staff)
    response = client.post(
        "/admin/recognition/trafficsplit/add/",
        {"tenant": clinician_a.tenant_id, "model": newer.model_id, "version": newer.pk, "percent": 10},
    )
    assert response.status_code == 302
    split = TrafficSplit.objects.get()
    assert (split.percent, split.version, split.updated_by) == (10, newer, staff)
    assert AccessEvent.objects.filter(action="model.split_change", actor=staff).count() == 1
