"""The isolation proof: every route, every role, every method, as a member of another hospital.

The routes are read from the URL configuration, so a new route is swept without editing this
file; a route the sweep cannot classify fails it until it is classified below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from rest_framework.test import APIClient

from accounts.apis import TenantApi
from accounts.models import AccessEvent, Membership, Role
from accounts.permissions import ROLE_ACTIONS, Action, can
from accounts.service_accounts import api_key_create, service_account_create
from accounts.services import invitation_create, membership_grant, user_get_or_create
from dicomnet.models import Delivery, Destination, Instance
from recognition.services.images import StudyFields, image_upload
from recognition.services.jobs import batch_job_create
from recognition.services.reviews import review_save
from tests.conftest import PASSWORD, png_bytes, upload_file
from tests.screening_fixtures import screening_package, screening_turn_on, screening_version  # noqa: F401
from workers.runner import inference_run

pytestmark = pytest.mark.django_db

METHODS = ("get", "post", "put", "patch", "delete", "options")

# Routes that take an object id: the kind of object, by the name of the id argument.
OBJECT_KINDS = {
    "image_id": "image",
    "membership_id": "membership",
    "study_id": "study",
    "review_id": "review",
    "job_id": "batch_job",
    "entry_id": "access_event",
    "service_account_id": "service_account",
    "api_key_id": "api_key",
    "node_id": "dicom_node",
    "destination_id": "destination",  # dicomnet: a PACS destination
    "delivery_id": "delivery",  # dicomnet: one made object's send to one destination
    # the screening model a hospital's settings choose: its ONNX is served to that hospital's members only
    "version_id": "screening_version",
}

# Every route without an object id, by name, and why it cannot show hospital A to hospital B.
ROUTES_WITHOUT_IDS = {
    # lists of the active hospital's data: swept for A's markers as every role of B
    "image-list": "list",
    "api-images": "list",
    "worklist": "list",
    "api-studies": "list",
    "api-batches": "list",
    "jobs": "list",
    "agreement": "list",
    "agreement-csv": "list",
    "members": "list",
    "api-members": "list",
    "api-activity": "list",
    "api-access-log": "list",
    "access-log": "list",
    "access-log-csv": "list",
    "service-accounts": "list",
    "destinations": "list",  # dicomnet: the hospital's PACS destinations and what is not sent
    "api-service-accounts": "list",  # GET lists; POST creates in the caller's own hospital
    "dicom-nodes": "list",  # the hospital's DICOM sending nodes
    # act on the caller's own hospital, chosen by session or X-Tenant (swept with A's slug)
    "upload": "own-hospital",
    "api-study-search": "own-hospital",  # a POSTed worklist search
    "api-access-log-search": "own-hospital",  # a POSTed access-log search (identifiers stay out of URLs)
    "member-invite": "own-hospital",
    "api-invitations": "own-hospital",
    "service-account-create": "own-hospital",
    "dicom-node-create": "own-hospital",
    "destination-create": "own-hospital",  # dicomnet
    "tenant-switch": "own-hospital",
    "hospital-settings": "own-hospital",  # the active hospital's own settings (tenant admins)
    # no hospital data at all
    "home": "public",  # a redirect to the role's first page
    "admin-login": "public",  # a redirect to the site's own sign-in
    "health-live": "public",  # process up
    "health-ready": "public",  # database, broker: no hospital data
    "health-workers": "public",  # a worker serves the production model: no hospital data
    "metrics": "public",  # totals across hospitals, no identifiers; SIGHTLINE_METRICS_TOKEN guards it
    "login": "public",
    "logout": "public",
    "two-factor": "own-account",
    "two-factor-verify": "own-account",
    "token-obtain": "public",
    "token-refresh": "public",
    "schema": "public",
    "api-docs": "public",
    "api-model-versions": "platform",  # the model registry: platform-wide versions and their status
    # the model servers' protocols (protocols/): their hospital checks (another hospital's
    # X-Tenant 404, a version the hospital may not name 404, a viewer 403) are tested in each
    # protocol's own shape in tests/integration/test_protocol_core.py and tests/e2e/test_protocol_*
    "kserve-live": "public",  # probes: no token, no hospital or model named
    "kserve-ready": "public",
    "kserve-server": "public",  # the server's name, version and extensions
    "tfserving-live": "public",
    "tfserving-ready": "public",
    "torchserve-ping": "public",
    "kserve-unknown": "public",  # each protocol's own 404 for a path it does not serve
    "tfserving-unknown": "public",
    "torchserve-unknown": "public",
    "kserve-model": "platform",  # a model's metadata: platform-wide, as the hospital may name it
    "kserve-model-version": "platform",
    "kserve-model-ready": "platform",
    "kserve-model-version-ready": "platform",
    "tfserving-status": "platform",  # the versions this hospital may use, by the registry's rule
    "tfserving-metadata": "platform",
    "torchserve-models": "platform",
    "torchserve-model": "platform",
    "torchserve-model-version": "platform",
    "torchserve-set-default": "platform",  # refused (403): registration stays with platform staff
    "kserve-infer": "own-hospital",  # a read stored in the caller's own hospital
    "kserve-infer-version": "own-hospital",
    "tfserving-verb": "own-hospital",
    "torchserve-predict": "own-hospital",
    "torchserve-predict-version": "own-hospital",
    # DICOMweb (dicomnet/dicomweb/): its searches are lists of the active hospital (swept here); its
    # UID routes name objects by DICOM UID, not id: B's 404 (logged) for A's UID on every one of
    # them, and B's X-Tenant naming A, are tested in tests/integration/test_dicomweb.py
    "dicomweb-studies": "list",  # QIDO-RS; POST is STOW-RS into the caller's own hospital
    "dicomweb-all-series": "list",
    "dicomweb-all-instances": "list",
    "dicomweb-study": "dicom-uid",
    "dicomweb-study-metadata": "dicom-uid",
    "dicomweb-study-series": "dicom-uid",
    "dicomweb-study-instances": "dicom-uid",
    "dicomweb-series": "dicom-uid",
    "dicomweb-series-metadata": "dicom-uid",
    "dicomweb-series-instances": "dicom-uid",
    "dicomweb-instance": "dicom-uid",
    "dicomweb-instance-metadata": "dicom-uid",
    "dicomweb-instance-rendered": "dicom-uid",
    "dicomweb-frame-rendered": "dicom-uid",
    "dicomweb-unknown": "public",  # DICOMweb's own 404 for a path it does not serve
    # special case: the token in the link is the credential itself (single use, expiring,
    # only its hash stored); holding it is what entitles someone to join.
    "invitation-accept": "bearer-link",
}

MARKERS = ("A-MARKER-PATIENT", "A-MARKER-ACC", "a-marker-admin", "invitee@a-marker.example", "a-marker-robot")


@dataclass
class Route:
    name: str
    namespace: str
    pattern: str
    callback: object

    def url(self, **kwargs) -> str:
        return reverse(f"{self.namespace}:{self.name}" if self.namespace else self.name, kwargs=kwargs)

    @property
    def object_args(self) -> list[str]:
        return re.findall(r"<(?:\w+:)?(\w+_id)>", self.pattern)

    @property
    def is_api(self) -> bool:
        return self.pattern.startswith("api/")

    @property
    def is_tenant_api(self) -> bool:
        view_class = getattr(self.callback, "view_class", None)
        return bool(view_class and issubclass(view_class, TenantApi))


def all_routes() -> list[Route]:
    def walk(patterns, prefix="", namespace=""):
        for entry in patterns:
            if isinstance(entry, URLResolver):
                yield from walk(entry.url_patterns, prefix + str(entry.pattern), entry.namespace or namespace)
            elif isinstance(entry, URLPattern):
                yield Route(entry.name or "", namespace, prefix + str(entry.pattern), entry.callback)

    return list(walk(get_resolver().url_patterns))


@pytest.fixture
def world(hospital_a, hospital_b, demo_model, screening_version):  # noqa: F811
    """Hospital A full of marked data; hospital B with one member of every role."""
    screening_turn_on(hospital_a, screening_version)
    admin_a = membership_grant(
        tenant=hospital_a, user=user_get_or_create(username="a-marker-admin", password=PASSWORD), role=Role.TENANT_ADMIN
    )
    clinician_a = membership_grant(
        tenant=hospital_a, user=user_get_or_create(username="a-clinician", password=PASSWORD), role=Role.CLINICIAN
    )
    image = image_upload(
        membership=clinician_a,
        upload=upload_file(png_bytes()),
        study=StudyFields(patient_pseudonym="A-MARKER-PATIENT", accession_number="A-MARKER-ACC"),
    )
    inference_run(request_id=image.inference_requests.get().pk)
    review = review_save(membership=clinician_a, image_id=image.pk, verdict="agree", comment="A-MARKER-PATIENT")
    job, _ = batch_job_create(membership=clinician_a, name="A-MARKER-ACC job")
    invitation_create(actor=admin_a, email="invitee@a-marker.example", role=Role.VIEWER)
    robot = service_account_create(actor=admin_a, name="a-marker-robot", role=Role.CLINICIAN)
    robot_key, _ = api_key_create(actor=admin_a, service_account=robot)
    from dicomnet.nodes import dicom_node_create

    node = dicom_node_create(actor=admin_a, name="a-marker-robot scanner", ae_title="A_MARKER", host="10.0.0.9")
    pacs = Destination.objects.create(tenant=hospital_a, name="A-MARKER-ACC pacs", kind="dimse", host="h", port=104)
    sr = Instance.objects.create(
        tenant=hospital_a, study=image.study, series=image.series, sop_instance_uid="2.25.1", origin="created"
    )
    delivery = Delivery.objects.create(tenant=hospital_a, instance=sr, destination=pacs, error="A-MARKER-ACC")
    b_members = {
        role: membership_grant(
            tenant=hospital_b, user=user_get_or_create(username=f"b-{role}", password=PASSWORD), role=role
        )
        for role in Role.values
    }
    return {
        "a": hospital_a,
        "image": image,
        "membership": admin_a,
        "b": b_members,
        "objects": {
            "image": image.pk,
            "membership": admin_a.pk,
            "study": image.study_id,
            "review": review.pk,
            "batch_job": job.pk,
            "access_event": AccessEvent.objects.filter(tenant=hospital_a).latest("id").pk,
            "service_account": robot.pk,
            "api_key": robot_key.pk,
            "dicom_node": node.pk,
            "destination": pacs.pk,
            "delivery": delivery.pk,
            "screening_version": screening_version.pk,
        },
    }


def client_for(route: Route, membership: Membership, tenant_slug: str | None = None):
    if route.is_api:
        client = APIClient()
        client.force_authenticate(membership.user)
        if tenant_slug:
            client.credentials(HTTP_X_TENANT=tenant_slug)
        return client
    client = APIClient()  # a plain Django test client with force_login would do the same
    client.force_login(membership.user)
    return client


def call(client, method, url):
    return getattr(client, method)(url, {}, format="json") if method != "get" else client.get(url)


def test_every_route_is_classified():
    unclassified = [
        f"{r.pattern} ({r.name})"
        for r in all_routes()
        if r.namespace != "admin"
        and not (r.object_args and all(arg in OBJECT_KINDS for arg in r.object_args))
        and r.name not in ROUTES_WITHOUT_IDS
    ]
    assert not unclassified, f"classify these routes in {__name__}: {unclassified}"


def test_hospital_b_gets_404_for_every_object_of_hospital_a(world, capsys):
    objects = world["objects"]
    missing = 987654321
    covered, swept = 0, set()
    for route in [r for r in all_routes() if r.namespace != "admin" and r.object_args]:
        swept.add(route.name)
        kwargs = {arg: objects[OBJECT_KINDS[arg]] for arg in route.object_args}
        url = route.url(**kwargs)
        missing_url = route.url(**{arg: missing for arg in route.object_args})
        for role, member in world["b"].items():
            for method in METHODS:
                theirs = call(client_for(route, member), method, url)
                nothing = call(client_for(route, member), method, missing_url)
                covered += 1
                assert theirs.status_code in (403, 404, 405), (route.pattern, role, method, theirs.status_code)
                # an answer that differs from "does not exist" would confirm that A's object exists
                assert theirs.status_code == nothing.status_code, (route.pattern, role, method)
                if theirs.status_code == 403:
                    assert not any(
                        can(member, action) for action in ROLE_ACTIONS[role] & ROUTE_ACTION.get(route.name, set())
                    )
                for marker in MARKERS:
                    assert marker.encode() not in theirs.content, (route.pattern, role, method, marker)
    # the most privileged role for each route must see exactly 404 or 405
    for route in [r for r in all_routes() if r.namespace != "admin" and r.object_args]:
        kwargs = {arg: objects[OBJECT_KINDS[arg]] for arg in route.object_args}
        url = route.url(**kwargs)
        privileged = [world["b"][role] for role in Role.values if ROLE_ACTIONS[role] & ROUTE_ACTION[route.name]]
        assert privileged, route.name
        for method in METHODS:
            response = call(client_for(route, privileged[0]), method, url)
            assert response.status_code in (404, 405), (route.pattern, method, response.status_code)
    # a sweep that found no routes (or lost some) would pass everything above
    assert swept == set(ROUTE_ACTION), swept ^ set(ROUTE_ACTION)
    assert covered == len(ROUTE_ACTION) * len(world["b"]) * len(METHODS) > 0
    with capsys.disabled():
        print(f"\nsweep: object routes × {len(world['b'])} roles × {len(METHODS)} methods = {covered} requests")


# Which action protects each object route; the sweep above asserts every object route is here.
ROUTE_ACTION = {
    # any member of the hospital that screens with it (its upload and jobs pages load it)
    "screening-model": {Action.IMAGE_VIEW, Action.IMAGE_UPLOAD, Action.BATCH_SUBMIT},
    "api-image-detail": {Action.IMAGE_VIEW},
    "api-image-file": {Action.IMAGE_VIEW},
    "image-detail": {Action.IMAGE_VIEW},
    "image-file": {Action.IMAGE_VIEW},
    "image-heatmap": {Action.IMAGE_VIEW},
    "api-image-heatmap": {Action.IMAGE_VIEW},
    "api-image-pixels": {Action.IMAGE_VIEW},
    "image-pixels": {Action.IMAGE_VIEW},
    "api-image-reviews": {Action.REVIEW_WRITE},  # GET needs image.view; a viewer's POST is the 403 here
    "image-review": {Action.REVIEW_WRITE},
    "api-review-sign-off": {Action.REVIEW_WRITE},
    "review-sign-off": {Action.REVIEW_WRITE},
    "api-study-detail": {Action.IMAGE_VIEW},
    "api-study-fhir": {Action.IMAGE_VIEW},
    "worklist-row": {Action.IMAGE_VIEW},
    "study-open": {Action.IMAGE_VIEW},
    "api-batch-detail": {Action.IMAGE_VIEW},
    "access-log-entry": {Action.AUDIT_VIEW},
    "api-batch-results": {Action.IMAGE_VIEW},
    "api-batch-items": {Action.BATCH_SUBMIT},
    "api-batch-start": {Action.BATCH_SUBMIT},
    "api-batch-cancel": {Action.BATCH_SUBMIT},
    "api-batch-retry": {Action.BATCH_SUBMIT},
    "job-items": {Action.BATCH_SUBMIT},
    "job-start": {Action.BATCH_SUBMIT},
    "job-cancel": {Action.BATCH_SUBMIT},
    "job-retry": {Action.BATCH_SUBMIT},
    "job-results": {Action.IMAGE_VIEW},
    "api-member-detail": {Action.MEMBERS_MANAGE},
    "api-member-deactivate": {Action.MEMBERS_MANAGE},
    "member-role": {Action.MEMBERS_MANAGE},
    "member-deactivate": {Action.MEMBERS_MANAGE},
    "member-enrolment-code": {Action.MEMBERS_MANAGE},
    "member-two-factor-reset": {Action.MEMBERS_MANAGE},
    "api-service-account-detail": {Action.MEMBERS_MANAGE},
    "api-service-account-revoke": {Action.MEMBERS_MANAGE},
    "api-service-account-keys": {Action.MEMBERS_MANAGE},
    "api-key-revoke": {Action.MEMBERS_MANAGE},
    "service-account-key-create": {Action.MEMBERS_MANAGE},
    "service-account-revoke": {Action.MEMBERS_MANAGE},
    "api-key-revoke-page": {Action.MEMBERS_MANAGE},
    "dicom-node-deactivate": {Action.MEMBERS_MANAGE},
    "dicom-node-reactivate": {Action.MEMBERS_MANAGE},
    "dicom-node-lane": {Action.MEMBERS_MANAGE},
    "destination-edit": {Action.MEMBERS_MANAGE},
    "destination-test": {Action.MEMBERS_MANAGE},
    "destination-delete": {Action.MEMBERS_MANAGE},
    "delivery-resend": {Action.REVIEW_WRITE, Action.MEMBERS_MANAGE},  # a clinician or a tenant admin
}


def test_nothing_of_hospital_a_appears_in_any_list_hospital_b_sees(world, capsys):
    covered, swept = 0, set()
    for route in [r for r in all_routes() if ROUTES_WITHOUT_IDS.get(r.name) == "list"]:
        swept.add(route.name)
        for role, member in world["b"].items():
            response = client_for(route, member).get(route.url())
            covered += 1
            assert response.status_code in (200, 403), (route.pattern, role, response.status_code)
            body = b"".join(response.streaming_content) if response.streaming else response.content
            for marker in MARKERS:
                assert marker.encode() not in body, (route.pattern, role, marker)
            if route.name == "api-images" and response.status_code == 200:
                assert response.json()["results"] == []
    assert swept == {name for name, kind in ROUTES_WITHOUT_IDS.items() if kind == "list"}
    assert covered == len(swept) * len(world["b"]) > 0
    with capsys.disabled():
        print(f"sweep: list routes × roles = {covered} requests")


def test_naming_hospital_a_in_x_tenant_is_404_on_every_hospital_api(world, capsys):
    covered, swept = 0, set()
    for route in [r for r in all_routes() if r.is_tenant_api]:
        swept.add(route.name)
        kwargs = {arg: world["objects"][OBJECT_KINDS[arg]] for arg in route.object_args}
        url = route.url(**kwargs)
        for role, member in world["b"].items():
            for method in METHODS:
                response = call(client_for(route, member, tenant_slug=world["a"].slug), method, url)
                covered += 1
                assert response.status_code in (404, 405), (route.pattern, role, method, response.status_code)
    # the hospital APIs are found by their base class: a sweep that found none proves nothing
    assert {"api-images", "api-studies", "api-batches", "api-members", "api-access-log"} <= swept, swept
    assert covered == len(swept) * len(world["b"]) * len(METHODS)
    with capsys.disabled():
        print(f"sweep: hospital APIs with X-Tenant of hospital A × roles × methods = {covered} requests")


def test_switching_the_browser_to_hospital_a_is_404(world):
    client = APIClient()
    client.force_login(world["b"][Role.CLINICIAN].user)
    response = client.post(reverse("recognition:tenant-switch"), {"tenant": world["a"].slug})
    assert response.status_code == 404
    assert client.get(reverse("recognition:image-list")).status_code == 200


def test_the_admin_is_for_platform_staff_only(world):
    client = APIClient()
    client.force_login(world["b"][Role.TENANT_ADMIN].user)
    for url in ("/admin/", f"/admin/accounts/membership/{world['membership'].pk}/change/", "/admin/auth/user/"):
        response = client.get(url)
        assert response.status_code == 302 and "/admin/login/" in response["Location"], url


# Part two: the role → action table against the real endpoints, as members of hospital A.
HTTP_PROBES = {
    Action.IMAGE_VIEW: [("api", "get", "api-image-detail", 200), ("page", "get", "recognition:image-detail", 200)],
    Action.IMAGE_UPLOAD: [("api", "post", "api-images", 201)],
    Action.REVIEW_WRITE: [("api", "post", "api-image-reviews", 201)],
    Action.BATCH_SUBMIT: [("api", "post", "api-batches", 201)],
    Action.AGREEMENT_VIEW: [("page", "get", "recognition:agreement", 200)],
    Action.HOSPITAL_SETTINGS: [("page", "get", "recognition:hospital-settings", 200)],
    Action.MEMBERS_MANAGE: [("api", "get", "api-members", 200), ("page", "get", "members", 200)],
    Action.ACTIVITY_VIEW: [("api", "get", "api-activity", 200)],
    Action.AUDIT_VIEW: [("api", "get", "api-access-log", 200), ("page", "get", "access-log", 200)],
}
# Covered against the live server in tests/e2e/test_revocation.py with the same table.
WEBSOCKET_ACTIONS = {Action.EVENTS_SUBSCRIBE}


def test_every_action_has_a_probe():
    assert set(HTTP_PROBES) | WEBSOCKET_ACTIONS == set(Action)


def test_each_role_can_do_exactly_what_the_table_says(world, capsys):
    covered = 0
    image = world["image"]
    for role in Role.values:
        member = membership_grant(
            tenant=world["a"], user=user_get_or_create(username=f"a-{role}", password=PASSWORD), role=role
        )
        for action, probes in HTTP_PROBES.items():
            expected_allowed = action in ROLE_ACTIONS[role]
            for kind, method, name, success in probes:
                kwargs = {"image_id": image.pk} if "image-detail" in name or "image-reviews" in name else {}
                url = reverse(name, kwargs=kwargs)
                client = APIClient()
                if kind == "api":
                    client.force_authenticate(member.user)
                else:
                    client.force_login(member.user)
                if name == "api-images":
                    response = client.post(url, {"file": upload_file(png_bytes())}, format="multipart")
                elif name == "api-batches":
                    response = client.post(url, {"name": f"probe {role}"}, format="json")
                elif method == "post":
                    response = client.post(url, {"verdict": "agree"}, format="json")
                else:
                    response = client.get(url)
                covered += 1
                expected = success if expected_allowed else 403
                assert response.status_code == expected, (role, action, name, response.status_code)
    assert covered == len(Role.values) * sum(len(p) for p in HTTP_PROBES.values()) > 0
    with capsys.disabled():
        print(f"role table: {len(Role.values)} roles × {sum(len(p) for p in HTTP_PROBES.values())} probes = {covered}")


# Part three: the WebSocket routes, walked from the routing like the URLs above. A socket names
# no object in its path; what a socket may hear is chosen by the hospital it subscribes to.
WEBSOCKET_ROUTES = {
    "ws/events/": "hospital-feed",  # {"type": "subscribe", "tenant": <slug>}: membership decides
}


def websocket_routes() -> list[str]:
    from recognition.routing import websocket_urlpatterns

    return [str(route.pattern) for route in websocket_urlpatterns]


def test_every_websocket_route_is_classified():
    routes = websocket_routes()
    assert routes, "no WebSocket routes"
    for pattern in routes:
        assert pattern in WEBSOCKET_ROUTES, f"classify the WebSocket route {pattern!r} in WEBSOCKET_ROUTES"
        # a route with an object id in its path would need the object sweep: extend this part first
        assert "<" not in pattern, f"{pattern!r} takes a parameter: sweep it against hospital A's objects"


@pytest.mark.django_db(transaction=True)
def test_hospital_b_hears_nothing_of_hospital_a_on_any_websocket_route(hospital_a, hospital_b, settings, capsys):
    """The real ASGI application (token auth, routing, the consumer), in this process with an
    in-memory channel layer; across processes it is tests/e2e/test_revocation.py's job."""
    import json

    from asgiref.sync import async_to_sync
    from asgiref.testing import ApplicationCommunicator
    from channels.layers import get_channel_layer
    from rest_framework_simplejwt.tokens import AccessToken

    from accounts.events import tenant_group, user_group
    from config.asgi import application

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    b_members = {
        role: membership_grant(
            tenant=hospital_b, user=user_get_or_create(username=f"ws-b-{role}", password=PASSWORD), role=role
        )
        for role in Role.values
    }
    layer = get_channel_layer()
    ready = {"type": "result.ready", "image": 1, "status": "done", "top_label": "A-MARKER", "probability": 0.9}
    heatmap = {"type": "heatmap.ready", "image": 1, "result": 1, "status": "ready"}
    # every kind of hospital message the consumer forwards, as hospital A would send them
    a_messages = [ready, heatmap, {"type": "study.updated", "study": 1}, {"type": "job.progress", "job": 1}]
    covered = 0

    class Socket(ApplicationCommunicator):  # the ASGI WebSocket protocol, spoken directly
        async def receive_json_from(self):
            message = await self.receive_output(5)
            assert message["type"] == "websocket.send", message
            return json.loads(message["text"])

        async def send_json_to(self, data):
            await self.send_input({"type": "websocket.receive", "text": json.dumps(data)})

    async def hears_nothing_of_a(socket: Socket, member: Membership) -> None:
        """A's messages, then one to this socket's own user: a channel delivers in order, so
        if the next message is that one, none of A's reached this socket. Awaited, not slept."""
        for message in a_messages:
            await layer.group_send(tenant_group(hospital_a.pk), message)
        barrier = {**ready, "top_label": f"barrier for {member.user.username}"}
        await layer.group_send(user_group(member.user_id), barrier)
        assert await socket.receive_json_from() == barrier

    async def sweep(pattern: str, member: Membership) -> None:
        token = str(AccessToken.for_user(member.user))
        scope = {"type": "websocket", "path": f"/{pattern}", "query_string": f"token={token}".encode(), "headers": []}
        socket = Socket(application, scope)
        await socket.send_input({"type": "websocket.connect"})
        assert (await socket.receive_output(5))["type"] == "websocket.accept"
        assert await socket.receive_json_from() == {"type": "hello"}
        for slug in (hospital_a.slug, "no-such-hospital"):  # A answers exactly like a hospital that is not there
            await socket.send_json_to({"type": "subscribe", "tenant": slug})
            assert await socket.receive_json_from() == {
                "type": "error",
                "code": "not_found",
                "message": "No such hospital.",
            }
        await hears_nothing_of_a(socket, member)
        if can(member, Action.EVENTS_SUBSCRIBE):  # the socket works: its own hospital is heard
            await socket.send_json_to({"type": "subscribe", "tenant": hospital_b.slug})
            assert await socket.receive_json_from() == {"type": "subscribed", "tenant": hospital_b.slug}
            await layer.group_send(tenant_group(hospital_b.pk), {**ready, "top_label": "B"})
            assert (await socket.receive_json_from())["top_label"] == "B"
            await layer.group_send(tenant_group(hospital_b.pk), {**heatmap, "image": 2})
            assert await socket.receive_json_from() == {**heatmap, "image": 2}
            await hears_nothing_of_a(socket, member)  # subscribed to B, still nothing of A
        await socket.send_input({"type": "websocket.disconnect", "code": 1000})
        await socket.wait(5)

    for pattern in websocket_routes():
        for member in b_members.values():
            async_to_sync(sweep)(pattern, member)
            covered += 1
    assert covered == len(websocket_routes()) * len(Role.values) > 0
    with capsys.disabled():
        print(f"sweep: WebSocket routes × {len(b_members)} roles = {covered} sockets")
