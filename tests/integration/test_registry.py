"""The model registry from the command line and the admin: registration, aliases, splits, pins."""

import io
import json
import zipfile
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from accounts.models import AccessEvent
from core.model_package import MANIFEST_NAME
from recognition.models import InferenceRequest, ModelAlias, ModelPin, ModelVersion, TrafficSplit
from recognition.services import registry
from recognition.services.images import image_upload
from recognition.services.registry import split_bucket
from tests.conftest import PASSWORD, api_client_for, png_bytes, upload_file

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
    run("register_model", str(variant(demo_package, tmp_path, version="1.1.0")), "--validate-here")
    return demo_model, ModelVersion.objects.get(version="1.1.0")


def test_register_model_loads_checks_and_registers_once(demo_package, tmp_path):
    out = run("register_model", str(demo_package), "--alias", "production", "--validate-here")
    assert "Registered sightline-demo 1.0.0 (ready)" in out
    assert "Already registered: sightline-demo 1.0.0 (ready)" in run("register_model", str(demo_package))
    assert ModelVersion.objects.get().status == "ready"
    assert ModelAlias.objects.get(name="production").version.version == "1.0.0"
    assert AccessEvent.objects.filter(action="model.register").count() == 1
    assert AccessEvent.objects.filter(action="model.ready").count() == 1


def test_a_package_is_stored_once_under_its_checksum_even_after_a_rolled_back_registration(demo_package):
    from django.core.files.storage import default_storage
    from django.db import transaction

    from workers.registration import model_version_register

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
    assert [name for name in stored if name.startswith("1.0.0-")] == [Path(version.package.name).name]


def test_a_package_whose_outputs_do_not_match_its_labels_is_refused(demo_package, tmp_path):
    wrong = variant(demo_package, tmp_path, version="9.0.0", labels=["a", "b", "c"])
    with pytest.raises(CommandError, match="Refused sightline-demo 9.0.0: weights do not fit resnet18"):
        run("register_model", str(wrong), "--alias", "production", "--validate-here")
    version = ModelVersion.objects.get()  # the refusal is on record, and says why
    assert version.status == "refused" and "size mismatch for fc.weight" in version.refusal_reason
    assert not ModelAlias.objects.exists()  # the alias asked for never moved to it


def test_a_checksum_mismatch_refuses_the_model(demo_package, tmp_path):
    forged = variant(demo_package, tmp_path, version="9.1.0", weights_sha256="0" * 64)
    with pytest.raises(CommandError, match="checksum mismatch"):
        run("register_model", str(forged), "--validate-here")
    assert ModelVersion.objects.get().status == "refused"


def retrained(demo_package: Path, tmp_path: Path, *, version: str) -> Path:
    """The demo package with other weights (every float tensor nudged) and their true checksum:
    a package the checksum accepts, so only "versions are immutable" can refuse it."""
    import torch

    from core.model_package import WEIGHTS_NAME, sha256_bytes

    with zipfile.ZipFile(demo_package) as source:
        manifest = json.loads(source.read(MANIFEST_NAME))
        members = {name: source.read(name) for name in source.namelist() if name not in (MANIFEST_NAME, WEIGHTS_NAME)}
        state = torch.load(io.BytesIO(source.read(WEIGHTS_NAME)), map_location="cpu", weights_only=True)
    nudged = {name: tensor + 1e-3 if tensor.is_floating_point() else tensor for name, tensor in state.items()}
    buffer = io.BytesIO()
    torch.save(nudged, buffer)
    weights = buffer.getvalue()
    manifest = {**manifest, "version": version, "weights_sha256": sha256_bytes(weights)}
    target = tmp_path / f"retrained-{version}.zip"
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr(MANIFEST_NAME, json.dumps(manifest))
        archive.writestr(WEIGHTS_NAME, weights)
        for name, data in members.items():
            archive.writestr(name, data)
    return target


def test_versions_are_immutable(demo_model, demo_package, tmp_path):
    from django.core.files.storage import default_storage

    from recognition.services.registry import model_version_submit

    # other weights with their true checksum: the checksum passes, immutability refuses
    other = retrained(demo_package, tmp_path, version="1.0.0")
    stored_before = default_storage.listdir(str(Path(demo_model.package.name).parent))[1]
    with pytest.raises(CommandError, match="already registered with other contents"):
        run("register_model", str(other), "--validate-here")
    assert default_storage.listdir(str(Path(demo_model.package.name).parent))[1] == stored_before  # nothing stored
    relabelled = variant(demo_package, tmp_path, version="1.0.0", description="same weights, other manifest")
    with pytest.raises(CommandError, match="already registered with other contents"):
        run("register_model", str(relabelled))
    assert ModelVersion.objects.get().weights_sha256 == demo_model.weights_sha256
    assert AccessEvent.objects.filter(action="model.register").count() == 1
    # the same weights under a new number are a package the registry takes: what refused it was the number
    version, created = model_version_submit(package_path=retrained(demo_package, tmp_path, version="1.0.1"))
    assert created and version.status == "validating"


@pytest.mark.parametrize("tampering", ["other weights", "other manifest"])
def test_a_tampered_cached_package_is_never_loaded(demo_model, demo_package, tmp_path, settings, tampering):
    """The worker's local copy of a package is named by its checksum; bytes changed on that
    disk afterwards (other weights with a matching manifest, or the same weights relabelled)
    are refused when the model loads, never served."""
    from core.model_package import PackageError
    from workers.model_cache import local_package, model_cache_clear, model_handler

    settings.SIGHTLINE_MODEL_CACHE_DIR = tmp_path / "cache"
    model_cache_clear()
    cached = local_package(demo_model)
    assert cached.parent == tmp_path / "cache"
    if tampering == "other weights":
        forged, refusal = retrained(demo_package, tmp_path, version="1.0.0"), "checksum mismatch"
    else:
        forged = variant(demo_package, tmp_path, version="1.0.0", description="relabelled on the worker's disk")
        refusal = "differs from the registered one"
    cached.write_bytes(forged.read_bytes())
    try:
        with pytest.raises(PackageError, match=refusal):
            model_handler(demo_model)
    finally:
        model_cache_clear()


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


def test_staff_register_a_package_on_the_admin_page_and_a_worker_checks_it(
    client, demo_package, django_user_model, monkeypatch, django_capture_on_commit_callbacks
):
    from workers.engine.handler import Handler
    from workers.tasks import model_validate

    staff = django_user_model.objects.create_superuser("platform", password=PASSWORD)
    client.force_login(staff)
    assert client.get("/admin/recognition/modelversion/register/").status_code == 200
    real_initialize = Handler.initialize

    def not_in_the_web_process(*args, **kwargs):
        raise AssertionError("the web process loaded the model")

    monkeypatch.setattr(Handler, "initialize", not_in_the_web_process)
    sent = []
    monkeypatch.setattr(registry, "task_send", lambda name, args, **options: sent.append(tuple(args)))
    with demo_package.open("rb") as package, django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/admin/recognition/modelversion/register/", {"package": package, "alias": "production"}, follow=True
        )
    assert b"Stored sightline-demo 1.0.0: a worker is checking it now" in response.content
    version = ModelVersion.objects.get()
    assert (version.status, version.registered_by) == ("validating", staff)
    assert b'<td class="field-status">Validating</td>' in client.get("/admin/recognition/modelversion/").content
    assert not ModelAlias.objects.exists()  # not before it is ready
    assert sent == [(version.pk,)]  # the task message carries the id only

    monkeypatch.setattr(Handler, "initialize", real_initialize)
    assert model_validate.apply(args=[version.pk]).get() == "ready"  # the worker's task, in this process
    version.refresh_from_db()
    assert version.status == "ready" and version.validated_at is not None
    assert ModelAlias.objects.get(name="production").version == version
    page = client.get("/admin/recognition/modelversion/").content
    row = page.split(b"<tbody>")[1].split(b"</tbody>")[0]
    assert b'<td class="field-status">Ready</td>' in row and b"Validating" not in row
    assert AccessEvent.objects.filter(action="model.register", actor=staff).count() == 1
    assert AccessEvent.objects.filter(action="model.ready", actor=staff).count() == 1
    assert model_validate.apply(args=[version.pk]).get() == "ready"  # a redelivery changes nothing
    assert AccessEvent.objects.filter(action="model.ready").count() == 1


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


def test_a_refused_version_shows_why_on_the_admin_page_and_in_the_api(
    client, demo_package, tmp_path, django_user_model, clinician_a
):
    wrong = variant(demo_package, tmp_path, version="9.0.0", labels=["a", "b", "c"])
    with pytest.raises(CommandError):
        run("register_model", str(wrong), "--validate-here")
    client.force_login(django_user_model.objects.create_superuser("platform", password=PASSWORD))
    page = client.get("/admin/recognition/modelversion/").content
    assert b'<td class="field-status">Refused</td>' in page and b"weights do not fit resnet18" in page
    (listed,) = api_client_for(clinician_a).get("/api/v1/model-versions/").json()["results"]
    assert (listed["version"], listed["status"]) == ("9.0.0", "refused")
    assert "weights do not fit resnet18" in listed["refusal_reason"]


def test_the_api_lists_versions_with_their_status(clinician_a, demo_model, demo_package, tmp_path):
    from recognition.services.registry import model_version_submit

    model_version_submit(package_path=variant(demo_package, tmp_path, version="1.2.0"), enqueue=False)
    response = api_client_for(clinician_a).get("/api/v1/model-versions/")
    assert response.status_code == 200
    assert [(row["version"], row["status"], row["refusal_reason"]) for row in response.json()["results"]] == [
        ("1.2.0", "validating", ""),
        ("1.0.0", "ready", ""),
    ]


@pytest.fixture
def validating(demo_model, demo_package, tmp_path):
    """A second version, stored, whose checks have not run yet."""
    from recognition.services.registry import model_version_submit

    version, _ = model_version_submit(package_path=variant(demo_package, tmp_path, version="2.0.0"), enqueue=False)
    return version


def test_only_a_ready_version_gets_an_alias_a_split_or_a_pin(validating, hospital_a):
    from core.errors import Conflict
    from recognition.services.registry import model_alias_move, model_pin_set, traffic_split_set

    model = validating.model
    for change in (
        lambda: model_alias_move(model=model, alias="canary", version=validating),
        lambda: traffic_split_set(tenant=hospital_a, model=model, version=validating, percent=10),
        lambda: model_pin_set(tenant=hospital_a, model=model, version=validating),
    ):
        with pytest.raises(Conflict, match="sightline-demo 2.0.0 is validating: only a version that passed"):
            change()
    assert not ModelPin.objects.exists() and not TrafficSplit.objects.exists()
    assert ModelAlias.objects.filter(name="canary").count() == 0
    with pytest.raises(CommandError, match="is validating"):
        run("model", "alias", "sightline-demo", "canary", "2.0.0")


def test_a_job_for_a_version_that_is_not_ready_is_409_in_words(clinician_a, validating):
    from recognition.models import ModelAllowance

    # one the hospital may name (a version it may not name is a 404 whatever its state)
    ModelAllowance.objects.create(tenant=clinician_a.tenant, model=validating.model, version=validating)
    response = api_client_for(clinician_a).post(
        "/api/v1/batches/", {"name": "nightly", "version": "2.0.0"}, format="json"
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "model_not_ready"
    assert "is validating" in response.json()["error"]["message"]


def test_the_admin_offers_only_ready_versions_for_an_alias(client, validating, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("platform", password=PASSWORD))
    form = client.get("/admin/recognition/modelalias/add/").content.decode()
    assert "sightline-demo 1.0.0" in form and "sightline-demo 2.0.0" not in form


def test_a_worker_never_loads_a_version_that_is_not_ready(validating):
    from core.model_package import PackageError
    from workers.model_cache import model_handler

    with pytest.raises(PackageError, match="validating, not ready"):
        model_handler(validating)


def test_torchscript_is_refused_in_words_unless_the_setting_allows_it(tmp_path, settings):
    from tests.unit.test_engine import _tiny_torchscript_package

    package = tmp_path / "tiny.zip"
    _tiny_torchscript_package(package)
    with pytest.raises(CommandError, match="TorchScript packages carry code as well as weights"):
        run("register_model", str(package), "--validate-here")
    assert ModelVersion.objects.get().status == "refused"
    settings.SIGHTLINE_ALLOW_TORCHSCRIPT = True
    assert "Registered tiny 1 (ready)" in run("register_model", str(package), "--validate-here")  # checked again
    assert ModelVersion.objects.get().status == "ready"
    assert AccessEvent.objects.filter(action="model.revalidate").count() == 1


def test_checks_that_cannot_reach_the_storage_retry_then_refuse_in_words(demo_package, tmp_path, settings, monkeypatch):
    from django.core.files.storage import default_storage

    from recognition.services.registry import model_version_submit
    from workers.tasks import model_validate

    settings.SIGHTLINE_MODEL_CACHE_DIR = tmp_path / "cache"
    version, _ = model_version_submit(package_path=demo_package, enqueue=False)
    opened = []

    def unreachable(name, mode="rb"):
        opened.append(name)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(default_storage, "open", unreachable)
    with pytest.raises(ConnectionRefusedError):
        model_validate.apply(args=[version.pk]).get()  # eager: the retries run at once
    assert len(opened) == model_validate.max_retries + 1
    version.refresh_from_db()
    assert version.status == "refused"
    assert version.refusal_reason == (
        "the registration checks could not run: the storage could not be read "
        "(ConnectionRefusedError: Connection refused), on every attempt"
    )


def test_a_storage_blip_during_the_checks_is_retried_and_the_version_becomes_ready(
    demo_package, tmp_path, settings, monkeypatch
):
    from django.core.files.storage import default_storage

    from recognition.services.registry import model_version_submit
    from workers.tasks import model_validate

    settings.SIGHTLINE_MODEL_CACHE_DIR = tmp_path / "cache"
    version, _ = model_version_submit(package_path=demo_package, enqueue=False)
    real_open, calls = default_storage.open, []

    def once_unreachable(name, mode="rb"):
        calls.append(name)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        return real_open(name, mode)

    monkeypatch.setattr(default_storage, "open", once_unreachable)
    assert model_validate.apply(args=[version.pk]).get() == "ready"
    assert len(calls) == 2


def test_registering_a_package_still_validating_asks_a_worker_again(
    demo_package, monkeypatch, django_capture_on_commit_callbacks
):
    """Its first message may have been lost with a broker outage: the version must not stay
    validating for good."""
    from recognition.services.registry import model_version_submit
    from workers.tasks import model_validate

    sent = []
    monkeypatch.setattr(registry, "task_send", lambda name, args, **options: sent.append(tuple(args)))
    with django_capture_on_commit_callbacks(execute=True):
        version, created = model_version_submit(package_path=demo_package)
    with django_capture_on_commit_callbacks(execute=True):
        again, created_again = model_version_submit(package_path=demo_package)
    assert (created, created_again, again) == (True, False, version)
    assert sent == [(version.pk,), (version.pk,)]
    assert model_validate.apply(args=[version.pk]).get() == "ready"
    assert model_validate.apply(args=[version.pk]).get() == "ready"  # the second message changes nothing
    assert AccessEvent.objects.filter(action="model.ready").count() == 1


def test_beat_sends_a_version_whose_check_message_was_lost_again(demo_package, monkeypatch, settings):
    """Redis keeps nothing: a validating version no task will ever check is found and checked."""
    from datetime import timedelta

    from django.utils import timezone

    from recognition.services.registry import model_version_submit
    from workers.tasks import model_validate, model_validate_reconcile

    sent = []
    monkeypatch.setattr(registry, "task_send", lambda name, args, **options: sent.append(tuple(args)))
    version, _ = model_version_submit(package_path=demo_package, enqueue=False)  # its message never went
    assert model_validate_reconcile.apply().get(disable_sync_subtasks=False) == 0  # not stalled yet
    stalled = timezone.now() - timedelta(seconds=settings.SIGHTLINE_MODEL_VALIDATION_STALL_SECONDS + 1)
    ModelVersion.objects.filter(pk=version.pk).update(created=stalled)
    assert model_validate_reconcile.apply().get(disable_sync_subtasks=False) == 1
    assert sent == [(version.pk,)]
    assert model_validate.apply(args=[version.pk]).get(disable_sync_subtasks=False) == "ready"
    assert model_validate_reconcile.apply().get(disable_sync_subtasks=False) == 0  # decided: nothing to send
