"""What one upload costs the web process in statements, pinned; and the web's request threads
keep their database connection from one request to the next."""

import asyncio

import pytest
from django.db import connection
from django.db.backends.signals import connection_created
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

from accounts.models import Membership
from recognition.models import Image
from tests.conftest import jpeg_bytes, png_bytes, upload_file

pytestmark = pytest.mark.django_db(transaction=True)

# A JPEG upload with a JWT, once the membership's last-seen mark is fresh: the user with their
# membership and hospital (1, one join), the model routing (0: the process remembers it until a
# routing row changes, registry.model_routing), the interactive backlog (1), BEGIN, the study,
# series, image and read (4 INSERTs), the access-log entry (its chain's head, the entry, the new
# head: 3), COMMIT.
UPLOAD_STATEMENTS = 11


def jwt_client(membership) -> APIClient:
    client = APIClient()
    token = RefreshToken.for_user(membership.user).access_token
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def post(client, data: bytes, name: str = "scan.jpg", **headers):
    return client.post("/api/v1/images/", {"file": upload_file(data, name)}, format="multipart", **headers)


def test_an_upload_costs_a_fixed_number_of_statements(clinician_a, demo_model, django_assert_num_queries):
    client = jwt_client(clinician_a)
    assert post(client, jpeg_bytes(224)).status_code == 201  # marks the membership seen (once a minute)
    for seed in range(2):  # the next ones cost the same, whatever the image
        with django_assert_num_queries(UPLOAD_STATEMENTS):
            response = post(client, png_bytes(seed=seed, size=224 + seed * 64), "scan.png")
        assert response.status_code == 201, response.json()
    assert Image.objects.filter(state="received").count() == 3


def test_naming_the_hospital_costs_the_same(clinician_a, hospital_b, demo_model, django_assert_num_queries):
    from accounts.models import Role
    from accounts.services import membership_grant

    membership_grant(tenant=hospital_b, user=clinician_a.user, role=Role.CLINICIAN)
    client = jwt_client(clinician_a)
    assert post(client, jpeg_bytes(), HTTP_X_TENANT=hospital_b.slug).status_code == 201
    with django_assert_num_queries(UPLOAD_STATEMENTS):
        assert post(client, jpeg_bytes(), HTTP_X_TENANT=hospital_b.slug).status_code == 201
    assert Image.objects.filter(tenant=hospital_b).count() == 2


def test_a_deactivated_membership_is_refused_on_the_next_request(clinician_a, demo_model):
    """One query reads the person, the membership and the hospital on every request: nothing is
    cached, so ending access takes effect at once, on every web process."""
    client = jwt_client(clinician_a)
    assert post(client, jpeg_bytes()).status_code == 201
    Membership.objects.filter(pk=clinician_a.pk).update(is_active=False)
    refused = post(client, jpeg_bytes())
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    clinician_a.user.is_active = False
    clinician_a.user.save(update_fields=["is_active"])
    assert post(client, jpeg_bytes()).status_code == 401


def test_a_password_change_revokes_the_token(clinician_a, demo_model):
    client = jwt_client(clinician_a)
    assert post(client, jpeg_bytes()).status_code == 201
    clinician_a.user.set_password("another-correct-horse-battery")
    clinician_a.user.save()
    refused = post(client, jpeg_bytes())
    assert refused.status_code == 401


def test_the_web_process_reuses_its_database_connection_across_requests(clinician_a, settings):
    """Django's own ASGI handler runs each request on a new thread, so on a new connection."""
    from asgiref.testing import ApplicationCommunicator

    from config.asgi_threads import PooledThreadsASGIHandler

    opened = []

    def count(sender, connection, **kwargs):
        opened.append(connection.alias)

    handler = PooledThreadsASGIHandler(threads=2)
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "path": "/health/ready/",
        "raw_path": b"/health/ready/",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "scheme": "http",
    }

    async def get() -> int:
        communicator = ApplicationCommunicator(handler, scope)
        await communicator.send_input({"type": "http.request", "body": b""})
        start = await communicator.receive_output(10)
        while (await communicator.receive_output(10)).get("more_body"):
            pass
        await communicator.wait(10)
        return start["status"]

    async def sequentially(times: int) -> list[int]:
        return [await get() for _ in range(times)]

    connection_created.connect(count)
    try:
        statuses = asyncio.run(sequentially(5))
    finally:
        connection_created.disconnect(count)
    assert set(statuses) <= {200, 503}
    assert len(opened) == 1, opened  # the first request opens it; the next four reuse it
    assert connection.settings_dict["CONN_MAX_AGE"] > 0
