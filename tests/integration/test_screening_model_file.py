"""The screening model a hospital's pages load: the page config and the model file, for the
hospital's members only (another hospital, another version, screening off: 404)."""

import zipfile

import pytest
from django.test import Client
from django.urls import reverse

from accounts.models import Role
from core.model_package import sha256_bytes
from recognition.screening import screening_page_config
from tests.conftest import member
from tests.screening_fixtures import screening_package, screening_turn_on, screening_version  # noqa: F401
from workers.engine import screening

pytestmark = pytest.mark.django_db


def client_for(membership) -> Client:
    client = Client()
    client.force_login(membership.user)
    return client


def model_url(version) -> str:
    return reverse("recognition:screening-model", args=[version.pk])


def onnx_of(package) -> bytes:
    with zipfile.ZipFile(package) as archive:
        return archive.read("model.onnx")


# The platform answers no-store outside SIGHTLINE_CACHEABLE_PATH_PREFIXES (core/cache_control.py);
# the model file's prefix belongs in that setting's default (config/settings/base.py, asked of the
# lead), as the middleware's docstring already says: until then it is named here.
MODEL_FILE_PREFIX = "/screening/models/"


def test_a_member_downloads_the_hospitals_screening_model_private_with_its_etag(
    screening_version,  # noqa: F811
    screening_package,  # noqa: F811
    clinician_a,
    settings,
):
    if MODEL_FILE_PREFIX not in settings.SIGHTLINE_CACHEABLE_PATH_PREFIXES:
        settings.SIGHTLINE_CACHEABLE_PATH_PREFIXES = [*settings.SIGHTLINE_CACHEABLE_PATH_PREFIXES, MODEL_FILE_PREFIX]
    assert model_url(screening_version).startswith(MODEL_FILE_PREFIX)
    screening_turn_on(clinician_a.tenant, screening_version)
    response = client_for(clinician_a).get(model_url(screening_version))
    assert response.status_code == 200
    body = response.content
    assert body == onnx_of(screening_package)
    assert sha256_bytes(body) == screening_version.manifest["runtime"]["onnx_sha256"]
    assert response["Cache-Control"].startswith("private")
    assert response["ETag"] == f'"{sha256_bytes(body)}"'
    again = client_for(clinician_a).get(model_url(screening_version), HTTP_IF_NONE_MATCH=response["ETag"])
    assert again.status_code == 304 and not again.content


def test_a_viewer_of_the_hospital_may_load_it_too(screening_version, viewer_a):  # noqa: F811
    screening_turn_on(viewer_a.tenant, screening_version)
    assert client_for(viewer_a).get(model_url(screening_version)).status_code == 200


def test_another_hospital_gets_404_for_it(screening_version, clinician_a, clinician_b):  # noqa: F811
    screening_turn_on(clinician_a.tenant, screening_version)
    response = client_for(clinician_b).get(model_url(screening_version))
    assert response.status_code == 404
    assert screening_page_config(membership=clinician_b) is None


def test_with_screening_off_or_no_version_the_file_is_404_and_the_page_gets_none(
    screening_version,  # noqa: F811
    clinician_a,
):
    assert client_for(clinician_a).get(model_url(screening_version)).status_code == 404  # no settings row
    screening_turn_on(clinician_a.tenant, screening_version, screening_enabled=False)
    assert client_for(clinician_a).get(model_url(screening_version)).status_code == 404
    assert screening_page_config(membership=clinician_a) is None
    screening_turn_on(clinician_a.tenant, None)
    assert screening_page_config(membership=clinician_a) is None


def test_a_version_other_than_the_chosen_one_is_404(screening_version, demo_model, clinician_a):  # noqa: F811
    screening_turn_on(clinician_a.tenant, screening_version)
    assert client_for(clinician_a).get(model_url(demo_model)).status_code == 404
    assert client_for(clinician_a).get(reverse("recognition:screening-model", args=[999999])).status_code == 404


def test_a_version_whose_browser_distribution_was_never_confirmed_is_not_served(
    screening_version,  # noqa: F811
    clinician_a,
):
    from recognition.models import ModelVersion

    screening_turn_on(clinician_a.tenant, screening_version)
    ModelVersion.objects.filter(pk=screening_version.pk).update(browser_confirmed_at=None)
    assert client_for(clinician_a).get(model_url(screening_version)).status_code == 404
    assert screening_page_config(membership=clinician_a) is None


def test_signed_out_the_model_file_asks_to_sign_in(screening_version, clinician_a):  # noqa: F811
    screening_turn_on(clinician_a.tenant, screening_version)
    response = Client().get(model_url(screening_version))
    assert response.status_code == 302 and "login" in response["Location"]


def test_the_page_config_names_the_model_its_normalisation_and_the_quality_reference(
    screening_version,  # noqa: F811
    clinician_a,
):
    screening_turn_on(clinician_a.tenant, screening_version, route_negatives_to_bulk=True, negative_threshold=0.9)
    config = screening_page_config(membership=clinician_a)
    assert config["version_id"] == screening_version.pk
    assert config["label"] == f"sightline-screen v{screening_version.serial} · 1.0.0"
    assert config["model_url"] == model_url(screening_version)
    assert config["model_bytes"] == len(onnx_of(screening_version.package.path))
    assert config["model_sha256"] == screening_version.manifest["runtime"]["onnx_sha256"]
    assert config["input_size"] == screening.SCREEN_INPUT_SIZE
    assert config["mean"] == [0.5, 0.5, 0.5] and config["std"] == [0.25, 0.25, 0.25]
    assert config["labels"] == ["no_finding", "round_opacity"] and config["negative_label"] == "no_finding"
    reference = config["reference"]
    assert set(reference) == {"mean", "std", "energy"}
    assert all(low < high for low, high in reference.values())
    assert config["ort"]["wasm"].endswith("ort-wasm-simd-threaded.wasm")
    assert config["ort"]["script"].startswith("/static/vendor/onnxruntime-web/")
    assert config["route_negatives"] is True and config["negative_threshold"] == 0.9


def test_the_upload_page_of_a_screening_hospital_carries_the_config_and_the_wasm_exception(
    screening_version,  # noqa: F811
    clinician_a,
    hospital_b,
):
    screening_turn_on(clinician_a.tenant, screening_version)
    page = client_for(clinician_a).get(reverse("recognition:upload"))
    assert page.context["screening"]["version_id"] == screening_version.pk
    assert "'wasm-unsafe-eval'" in page["Content-Security-Policy"]
    other = client_for(member(hospital_b, "clinician-b2", Role.CLINICIAN)).get(reverse("recognition:upload"))
    assert other.context["screening"] is None
    assert "wasm-unsafe-eval" not in other["Content-Security-Policy"]
