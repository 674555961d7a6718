"""A screening model's registration: the operator confirms browser distribution, the task
measures it, and a screening version can never become the model that makes a hospital's reads."""

import io
import json
import zipfile
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from accounts.models import AccessEvent
from core.errors import Conflict, Invalid, NotFound
from core.model_package import MANIFEST_NAME
from recognition.models import ModelAlias, ModelVersion
from recognition.services import registry
from recognition.services.inference import upload_routing
from tests.screening_fixtures import screening_package, screening_version  # noqa: F401
from workers.engine import screening
from workers.registration import model_version_register

pytestmark = pytest.mark.django_db


def run(*args) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def repacked(source: Path, tmp_path: Path, filename: str = "repacked.zip", **changes) -> Path:
    """The package with manifest fields changed (same members otherwise)."""
    with zipfile.ZipFile(source) as archive:
        manifest = {**json.loads(archive.read(MANIFEST_NAME)), **changes}
        members = {member: archive.read(member) for member in archive.namelist() if member != MANIFEST_NAME}
    target = tmp_path / filename
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr(MANIFEST_NAME, json.dumps(manifest))
        for member, data in members.items():
            archive.writestr(member, data)
    return target


def test_a_screening_package_without_the_operators_confirmation_is_refused_in_words(screening_package):  # noqa: F811
    with pytest.raises(CommandError, match="runs in readers' browsers.*--browser-distribution-allowed"):
        run("register_model", str(screening_package), "--validate-here")
    assert not ModelVersion.objects.exists()


def test_register_model_with_the_confirmation_records_it_and_the_measured_accuracy_and_size(screening_package):  # noqa: F811
    out = run("register_model", str(screening_package), "--validate-here", "--browser-distribution-allowed")
    assert "Registered sightline-screen 1.0.0 (ready)" in out
    version = ModelVersion.objects.get()
    assert version.browser_confirmed_at is not None
    assert version.manifest["role"] == "screening"
    evaluation = version.evaluation
    assert evaluation["kind"] == "screening"
    assert evaluation["held_out_accuracy"] >= screening.REQUIRED_ACCURACY
    assert evaluation["held_out_images"] == screening.SCREEN_HELD_OUT_IMAGES
    assert evaluation["accuracy_source"].startswith("measured")
    with zipfile.ZipFile(screening_package) as archive:
        assert evaluation["onnx_bytes"] == archive.getinfo("model.onnx").file_size
    assert evaluation["package_bytes"] == screening_package.stat().st_size
    assert not ModelAlias.objects.exists()
    assert AccessEvent.objects.filter(action="model.ready", target_id=str(version.pk)).count() == 1


def test_a_screening_version_takes_no_alias_at_registration(screening_package):  # noqa: F811
    with pytest.raises(CommandError, match="takes no production alias"):
        run(
            "register_model",
            str(screening_package),
            "--alias",
            "production",
            "--validate-here",
            "--browser-distribution-allowed",
        )
    assert not ModelVersion.objects.exists()


def test_a_screening_version_is_refused_every_alias_split_pin_and_allowance(screening_version, hospital_a):  # noqa: F811
    model = screening_version.model
    for alias in ModelAlias.Name.values:
        with pytest.raises(Conflict, match="screening model.*never the model that makes a hospital's reads"):
            registry.model_alias_move(model=model, alias=alias, version=screening_version)
    with pytest.raises(Conflict, match="cannot be given a traffic split"):
        registry.traffic_split_set(tenant=hospital_a, model=model, version=screening_version, percent=10)
    with pytest.raises(Conflict, match="cannot be given a pin"):
        registry.model_pin_set(tenant=hospital_a, model=model, version=screening_version)
    with pytest.raises(Conflict, match="nothing to allow"):
        registry.model_allowance_set(tenant=hospital_a, model=model, version=screening_version)
    with pytest.raises(Conflict, match="nothing to allow"):
        registry.model_allowance_set(tenant=hospital_a, model=model, alias="canary")
    assert not ModelAlias.objects.exists()


def test_a_screening_version_is_never_routed_to_for_reads(screening_version, hospital_a, demo_model):  # noqa: F811
    name = screening.SCREEN_NAME
    with pytest.raises(NotFound, match="screening model, which never makes a hospital's reads"):
        registry.version_for(model_name=name, version=screening_version.version)
    with pytest.raises(NotFound):
        registry.version_for(model_name=name, serial=screening_version.serial)
    with pytest.raises(NotFound):
        upload_routing(tenant=hospital_a, model_name=name, version=screening_version.version)
    with pytest.raises(NotFound):
        upload_routing(tenant=hospital_a, model_name=name)
    # the hospital's own uploads go on to the reads model
    assert upload_routing(tenant=hospital_a).version_for(None) == demo_model


def test_a_model_is_either_a_reads_model_or_a_screening_model(screening_version, demo_package, tmp_path):  # noqa: F811
    reads_under_screen_name = repacked(
        demo_package, tmp_path, "reads-as-screen.zip", name=screening.SCREEN_NAME, version="2.0.0"
    )
    with pytest.raises(Invalid, match="its versions are screening"):
        model_version_register(package_path=reads_under_screen_name, alias=None)
    screen_under_demo_name = repacked(
        screening_version.package.path, tmp_path, "screen-as-demo.zip", name="sightline-demo"
    )
    model_version_register(package_path=demo_package)
    with pytest.raises(Invalid, match="is a reads model and this package is a screening model"):
        model_version_register(package_path=screen_under_demo_name, alias=None, browser_distribution_allowed=True)
    assert ModelVersion.objects.filter(model__name=screening.SCREEN_NAME).count() == 1


def test_a_screening_graph_without_its_logits_output_is_refused_by_the_task(screening_package, tmp_path):  # noqa: F811
    import onnx

    from core.model_package import sha256_bytes

    with zipfile.ZipFile(screening_package) as archive:
        graph = onnx.load_from_string(archive.read("model.onnx"))
    del graph.graph.output[1]  # probabilities only: the browser would have no out-of-distribution score
    one_output = graph.SerializeToString()
    source = repacked(screening_package, tmp_path, "screen-one-output.zip", version="1.0.1")
    target = tmp_path / "one-output.zip"
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for member in archive.namelist():
            data = archive.read(member)
            if member == MANIFEST_NAME:
                manifest = json.loads(data)
                manifest["runtime"]["onnx_sha256"] = sha256_bytes(one_output)
                data = json.dumps(manifest).encode()
            out.writestr(member, one_output if member == "model.onnx" else data)
    with pytest.raises(Invalid, match="answers \\['probabilities'\\]; a screening graph answers"):
        model_version_register(package_path=target, alias=None, browser_distribution_allowed=True)
    assert ModelVersion.objects.get(version="1.0.1").status == "refused"


def test_build_screening_model_registers_it_once(screening_package, settings, tmp_path):  # noqa: F811
    settings.SIGHTLINE_MODEL_BUILD_DIR = str(tmp_path)
    (tmp_path / screening_package.name).write_bytes(screening_package.read_bytes())  # trained once per machine
    out = run("build_screening_model")
    assert "Registered sightline-screen 1.0.0 for browser screening" in out
    assert "held-out accuracy 0.9" in out
    version = ModelVersion.objects.get(model__name=screening.SCREEN_NAME)
    assert version.status == "ready" and version.browser_confirmed_at is not None
    events = AccessEvent.objects.count()
    assert "already registered" in run("build_screening_model")
    assert ModelVersion.objects.count() == 1 and AccessEvent.objects.count() == events


def test_seed_demo_turns_screening_on_for_demo_general_once(screening_version, demo_model):  # noqa: F811
    from accounts.models import Tenant
    from recognition.models import HospitalSettings

    out = run("seed_demo")
    assert f"Demo General screens uploads in the browser with {screening_version}" in out
    row = HospitalSettings.objects.get()
    assert row.tenant.slug == "demo-general" and row.screening_enabled and row.screening_version == screening_version
    assert not row.route_negatives_to_bulk  # off by default, as the issue asks
    assert AccessEvent.objects.filter(action="hospital.settings_update", tenant=row.tenant).count() == 1
    HospitalSettings.objects.filter(pk=row.pk).update(screening_enabled=False)  # the hospital's admin turns it off
    run("seed_demo")
    assert HospitalSettings.objects.get().screening_enabled is False  # a second seeding keeps their choice
    assert not HospitalSettings.objects.filter(tenant=Tenant.objects.get(slug="demo-childrens")).exists()
