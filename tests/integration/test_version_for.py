"""``registry.version_for``, the one answer to "which model version": a named version, a named
alias, else the hospital's pin, split (per image) and production alias; the platform's
production alias when no hospital asks. Job creation, uploads, health and the worker's warm-up
all ask it."""

from __future__ import annotations

import pytest

from core.errors import Conflict, NotFound
from recognition.models import ModelAlias, ModelPin, ModelVersion, TrafficSplit
from recognition.services.registry import model_routing, split_bucket, version_for
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
    assert version_for(tenant=clinician_a.tenant, alias="production") == production  # a named alias: no pin
    assert version_for(tenant=clinician_a.tenant, version="1.0.0") == production


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
