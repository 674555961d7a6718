"""Nothing the platform answers may be stored by a browser or a proxy, except the named static
paths: pages, API answers, errors and the answers middleware give on their own are no-store."""

import pytest
from django.http import HttpResponse
from django.test import RequestFactory, override_settings

from core.cache_control import CacheControlMiddleware
from tests.conftest import api_client_for

pytestmark = pytest.mark.django_db


def directives(response) -> set[str]:
    return {part.strip() for part in response.get("Cache-Control", "").split(",") if part.strip()}


@pytest.mark.parametrize(
    "path",
    ["/accounts/login/", "/api/v1/images/", "/health/live/", "/metrics", "/no-such-page/", "/admin/"],
)
def test_pages_api_answers_and_errors_are_not_stored(client, path):
    assert "no-store" in directives(client.get(path))


def test_a_members_api_answer_is_not_stored(clinician_a):
    response = api_client_for(clinician_a).get("/api/v1/images/")
    assert response.status_code == 200 and "no-store" in directives(response)


@override_settings(SIGHTLINE_MAX_REQUEST_BYTES=10)
def test_an_answer_another_middleware_gives_on_its_own_is_not_stored(client):
    response = client.post("/api/v1/images/", data=b"x" * 100, content_type="application/octet-stream")
    assert response.status_code == 413 and "no-store" in directives(response)


def test_static_files_keep_their_caching(client):
    response = client.get("/static/css/site.css")
    assert response.status_code == 200
    assert "no-store" not in directives(response)
    assert any(part.startswith("max-age=") for part in directives(response))


def test_a_view_that_asks_to_be_cached_is_answered_no_store_outside_the_named_prefixes():
    def cacheable_view(request):
        response = HttpResponse("patient data")
        response["Cache-Control"] = "public, max-age=600"
        return response

    middleware = CacheControlMiddleware(cacheable_view)
    assert middleware(RequestFactory().get("/images/1/"))["Cache-Control"] == "no-store"
    assert middleware(RequestFactory().get("/static/app.js"))["Cache-Control"] == "public, max-age=600"
    with override_settings(SIGHTLINE_CACHEABLE_PATH_PREFIXES=["/static/", "/screen-models/"]):
        assert middleware(RequestFactory().get("/screen-models/m.onnx"))["Cache-Control"] == "public, max-age=600"


def test_a_view_that_already_refuses_storage_keeps_its_own_words():
    def private_view(request):
        response = HttpResponse("x")
        response["Cache-Control"] = "private, no-store"
        return response

    assert CacheControlMiddleware(private_view)(RequestFactory().get("/x/"))["Cache-Control"] == "private, no-store"
