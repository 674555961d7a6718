"""registry.model_routing is remembered per process, tagged with the shared cache's routing
generation: read once, then answered without a query until a routing row changes, in this
process at once and in every other after commit."""

from __future__ import annotations

import pytest
from django.core.cache import cache
from django.db import transaction

from recognition.models import ModelPin, ModelVersion
from recognition.services import registry
from recognition.services.registry import ROUTING_GENERATION_KEY, model_alias_move, model_routing
from tests.integration.test_registry import run, variant

pytestmark = pytest.mark.django_db(transaction=True)
NAME = "sightline-demo"


@pytest.fixture
def two_versions(demo_model, demo_package, tmp_path):
    run("register_model", str(variant(demo_package, tmp_path, version="1.1.0")), "--validate-here")
    return demo_model, ModelVersion.objects.get(version="1.1.0")


def test_read_once_then_again_after_a_change_here_or_in_another_process(
    two_versions, clinician_a, django_assert_num_queries
):
    production, newer = two_versions
    tenant = clinician_a.tenant
    assert model_routing(tenant=tenant, model_name=NAME).production == production
    with django_assert_num_queries(0):
        assert model_routing(tenant=tenant, model_name=NAME).production == production
    before = cache.get(ROUTING_GENERATION_KEY, 0)
    held_elsewhere = dict(registry._routing_remembered)  # what another web process remembers

    model_alias_move(model=production.model, alias="production", version=newer)

    assert cache.get(ROUTING_GENERATION_KEY) > before  # counted up after commit
    assert model_routing(tenant=tenant, model_name=NAME).production == newer  # forgotten here
    registry._routing_remembered.clear()
    registry._routing_remembered.update(held_elsewhere)  # the other process, its old answer
    assert model_routing(tenant=tenant, model_name=NAME).production == newer  # generation moved

    ModelPin.objects.create(tenant=tenant, model=production.model, version=production)
    assert model_routing(tenant=tenant, model_name=NAME).version_for(1) == production  # a pin too


def test_what_a_transaction_read_is_not_remembered(demo_model, clinician_a, django_assert_num_queries):
    with transaction.atomic():  # it may still roll back what it read
        assert model_routing(tenant=clinician_a.tenant, model_name=NAME).production == demo_model
    with django_assert_num_queries(1):
        model_routing(tenant=clinician_a.tenant, model_name=NAME)


def test_with_the_shared_cache_away_every_upload_reads_the_database(
    demo_model, clinician_a, settings, django_assert_num_queries
):
    import socket

    with socket.socket() as probe:  # bound, then closed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings.CACHES = {
        "default": {"BACKEND": "core.redis_cache.SharedPoolRedisCache", "LOCATION": f"redis://127.0.0.1:{port}/0"}
    }
    for _ in range(2):
        with django_assert_num_queries(1):
            assert model_routing(tenant=clinician_a.tenant, model_name=NAME).production == demo_model
