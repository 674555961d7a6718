"""``registry.version_for``, the one answer to "which model version": a named version, a named
alias, else the hospital's pin, split (per image) and production alias; the platform's
production alias when no hospital asks. Job creation, uploads, health and the worker's warm-up
all ask it."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command

from accounts.models import AccessEvent
from core.errors import Conflict, NotFound
from recognition.models import Image, InferenceRequest, ModelAlias, ModelAllowance, ModelPin, ModelVersion, TrafficSplit
from recognition.services.registry import model_routing, split_bucket, version_for, versions_available
from tests.conftest import api_client_for, png_bytes
from tests.integration.test_registry import run, variant

pytestmark = pytest.mark.django_db


@pytest.fixture
def two_versions(demo_model, demo_package, tmp_path):
    run("register_model", str(variant(demo_package, tmp_path, version="1.1.0")), "--validate-here")
    return demo_model, ModelVersion.objects.get(version="1.1.0")


def test_with_no_hospital_it_is_the_production_alias_in_one_query(demo_model, django_assert_num_queries):
    with django_assert_num_queries(1):
        assert version_for() == demo_model
    ModelAlias.objects.all().delete()
    assert version_for() is None


def test_a_pin_wins_for_jobs_and_a_split_only_places_images(two_versions, clinician_a, django_assert_num_queries):
    production, newer = two_versions
    with django_assert_num_queries(1):  # the upload's common case: no pin, no split, one statement
        assert version_for(tenant=clinician_a.tenant) == production
    TrafficSplit.objects.create(tenant=clinician_a.tenant, model=production.model, version=newer, percent=50)
    routing = model_routing(tenant=clinician_a.tenant, model_name="sightline-demo")
    for image_id in range(1, 20):  # read once per upload, asked per image without a query
        expected = newer if split_bucket(image_id) < 50 else production
        assert version_for(tenant=clinician_a.tenant, image_id=image_id, routing=routing) == expected
    assert version_for(tenant=clinician_a.tenant) == production  # a job has no image to place
    ModelPin.objects.create(tenant=clinician_a.tenant, model=production.model, version=newer)
    assert version_for(tenant=clinician_a.tenant, image_id=1) == newer
    assert version_for(tenant=clinician_a.tenant, version="1.1.0") == newer  # its pin, named
    with pytest.raises(NotFound) as pinned:  # a pinned hospital reads with its pin alone
        version_for(tenant=clinician_a.tenant, alias="production")
    assert pinned.value.code == "version_not_allowed"
    assert version_for(alias="production") == production  # no hospital asking: no rule


def test_what_is_missing_is_a_404_that_says_which(demo_model, clinician_a):
    with pytest.raises(NotFound) as model:
        version_for(tenant=clinician_a.tenant, model_name="nope", required=True)
    assert model.value.code == "unknown_model"
    with pytest.raises(NotFound) as version:
        version_for(tenant=clinician_a.tenant, version="9.9.9")
    assert version.value.code == "unknown_version"
    with pytest.raises(NotFound) as alias:
        version_for(tenant=clinician_a.tenant, alias="staging")
    assert alias.value.code == "unknown_alias"
    ModelAlias.objects.all().delete()
    assert version_for(tenant=clinician_a.tenant) is None
    with pytest.raises(NotFound) as production:
        version_for(tenant=clinician_a.tenant, required=True)
    assert production.value.code == "unknown_alias"


def test_a_named_version_must_be_ready(demo_model, clinician_a):
    ModelVersion.objects.filter(pk=demo_model.pk).update(status=ModelVersion.Status.VALIDATING)
    with pytest.raises(Conflict):
        version_for(tenant=clinician_a.tenant, version=demo_model.version)


def test_a_hospital_names_only_production_its_split_and_what_an_operator_allowed(
    two_versions, clinician_a, clinician_b, tmp_path
):
    """Item 5 of the protocols issue: the rule lives in version_for, for every caller."""
    production, newer = two_versions
    tenant, other = clinician_a.tenant, clinician_b.tenant
    assert version_for(tenant=tenant, alias="production") == production
    assert version_for(tenant=tenant, serial=production.serial) == production
    for named in ({"version": "1.1.0"}, {"serial": newer.serial}):
        with pytest.raises(NotFound) as refused:
            version_for(tenant=tenant, **named)
        assert refused.value.code == "version_not_allowed"
        assert "not available to this hospital" in refused.value.message
    ModelAlias.objects.create(model=production.model, name="canary", version=newer)
    with pytest.raises(NotFound):
        version_for(tenant=tenant, alias="canary")
    # its split's version may be named
    TrafficSplit.objects.create(tenant=tenant, model=production.model, version=newer, percent=10)
    assert version_for(tenant=tenant, version="1.1.0") == newer
    assert version_for(tenant=tenant, alias="canary") == newer  # the alias points at its split's version
    TrafficSplit.objects.all().delete()
    # an operator's allowance, for that hospital only
    call_command("model_allow", "sightline-demo", "--hospital", tenant.slug, "--alias", "canary", stdout=StringIO())
    assert version_for(tenant=tenant, alias="canary") == newer
    with pytest.raises(NotFound):
        version_for(tenant=tenant, version="1.1.0")  # the alias was allowed, not the version by name
    with pytest.raises(NotFound):
        version_for(tenant=other, alias="canary")  # another hospital's allowance is not its own
    call_command(
        "model_allow", "sightline-demo", "--hospital", tenant.slug, "--model-version", "1.1.0", stdout=StringIO()
    )
    assert version_for(tenant=tenant, version="1.1.0") == newer
    listing = StringIO()
    call_command("model_allow", "sightline-demo", "--hospital", tenant.slug, "--list", stdout=listing)
    assert f"v{newer.serial} 1.1.0" in listing.getvalue() and f"v{production.serial} 1.0.0" in listing.getvalue()
    assert [v.version for v in versions_available(tenant=other, model=production.model)] == ["1.0.0"]
    call_command(
        "model_allow",
        "sightline-demo",
        "--hospital",
        tenant.slug,
        "--model-version",
        "1.1.0",
        "--revoke",
        stdout=StringIO(),
    )
    call_command(
        "model_allow", "sightline-demo", "--hospital", tenant.slug, "--alias", "canary", "--revoke", stdout=StringIO()
    )
    with pytest.raises(NotFound):
        version_for(tenant=tenant, version="1.1.0")
    assert AccessEvent.objects.filter(action="model.allowance_change", tenant=tenant).count() == 4


def test_versions_are_numbered_in_registration_order(two_versions):
    production, newer = two_versions
    assert (production.serial, newer.serial) == (1, 2)
    assert version_for(serial=2) == newer


def test_the_upload_api_takes_the_same_choice_under_the_same_rule(two_versions, clinician_a):
    from tests.integration.test_api import upload

    production, newer = two_versions
    client = api_client_for(clinician_a)
    refused = upload(client, png_bytes(), version="1.1.0")
    assert refused.status_code == 404, refused.json()
    assert refused.json()["error"]["code"] == "version_not_allowed"
    assert not Image.objects.filter(tenant=clinician_a.tenant).exists()  # refused before storing anything
    assert upload(client, png_bytes(), model="no-such-model").json()["error"]["code"] == "unknown_model"
    assert upload(client, png_bytes(), version="1.1.0", alias="canary").status_code == 400
    ModelAllowance.objects.create(tenant=clinician_a.tenant, model=production.model, version=newer)
    chosen = upload(client, png_bytes(seed=2), version="1.1.0")
    assert chosen.status_code == 201, chosen.json()
    assert InferenceRequest.objects.get(image_id=chosen.json()["id"]).model_version == newer
    named = upload(client, png_bytes(seed=3), alias="production")
    assert InferenceRequest.objects.get(image_id=named.json()["id"]).model_version == production
