"""People and browser sessions against the real database: platform staff creating hospitals in
the admin, the hospital switcher, CSRF on browser forms, the lockout's cool-off, equal work for
unknown users and wrong passwords, server-owned fields the API ignores, and the members page's
roles and last activity."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from unittest import mock

import pytest
from axes.models import AccessAttempt
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core import mail
from django.test import Client
from django.utils import timezone
from django.utils.module_loading import import_string
from rest_framework.test import APIClient

from accounts.models import AccessEvent, Invitation, Membership, Role, Tenant
from accounts.services import membership_grant, user_get_or_create
from accounts.signals import username_tried
from recognition.models import BatchJob, Image, InferenceRequest, Review
from recognition.services.images import image_upload
from tests.conftest import PASSWORD, api_client_for, member, png_bytes, upload_file
from workers.runner import inference_run

pytestmark = pytest.mark.django_db

LOGIN_URL = "/accounts/login/"
TOKEN_URL = "/api/v1/auth/token/"
IMAGES_API = "/api/v1/images/"
BATCHES_API = "/api/v1/batches/"
MEMBERS_PAGE = "/hospital/members/"
SWITCH_URL = "/hospital/"
TENANT_ADD = "/admin/accounts/tenant/add/"


@pytest.fixture
def admin_a(hospital_a):
    return member(hospital_a, "hospital-admin", Role.TENANT_ADMIN)


def named_png(seed=1, name="scan.png"):
    return upload_file(png_bytes(seed=seed, size=64), name)


def csrf_token(client) -> str:
    return client.cookies["csrftoken"].value


def error_lines(response) -> list[str]:
    return [line.strip() for line in response.content.decode().splitlines() if 'class="error"' in line]


# --- 1. Platform staff create hospitals in the admin ---------------------------------------


def tenant_form(name, slug, **extra):
    now = timezone.now()
    return {
        "name": name,
        "slug": slug,
        "is_active": "on",
        "audit_retention_days": "",
        "created_0": now.strftime("%Y-%m-%d"),
        "created_1": now.strftime("%H:%M:%S"),
        "_save": "Save",
        **extra,
    }


@pytest.fixture
def platform_staff(db):
    user = get_user_model().objects.create_user(username="platform-staff", password=PASSWORD, is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="accounts", codename__in=["add_tenant", "view_tenant"])
    )
    return user


def test_platform_staff_with_the_add_permission_create_a_hospital_in_the_admin(client, platform_staff):
    client.force_login(platform_staff)
    assert client.get(TENANT_ADD).status_code == 200
    response = client.post(TENANT_ADD, tenant_form("Demo Eye Clinic", "demo-eye-clinic"))
    assert response.status_code == 302, response.content.decode()[:2000]
    tenant = Tenant.objects.get(slug="demo-eye-clinic")
    assert tenant.name == "Demo Eye Clinic" and tenant.is_active and not tenant.require_admin_two_factor
    event = AccessEvent.objects.get(action="tenant.create", target_id=str(tenant.pk))
    assert event.actor == platform_staff and event.tenant == tenant and event.outcome == "success"


def test_staff_without_the_add_permission_are_refused_the_add_page(client, platform_staff):
    platform_staff.user_permissions.remove(Permission.objects.get(codename="add_tenant"))
    client.force_login(platform_staff)
    assert client.get(TENANT_ADD).status_code == 403
    assert client.post(TENANT_ADD, tenant_form("Sneaky", "sneaky")).status_code == 403
    assert not Tenant.objects.filter(slug="sneaky").exists()


def test_a_hospital_admin_who_is_not_staff_cannot_reach_the_tenant_admin(client, admin_a):
    client.force_login(admin_a.user)
    for response in (client.get(TENANT_ADD), client.post(TENANT_ADD, tenant_form("Sneaky", "sneaky"))):
        # the admin sends non-staff to its login, which is the site's own sign-in page
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/?next=")
    assert not Tenant.objects.filter(slug="sneaky").exists()
    onward = client.get(f"/admin/login/?next={TENANT_ADD}")
    assert onward.status_code == 302 and onward["Location"].startswith(LOGIN_URL)
    assert client.get("/admin/accounts/tenant/").status_code == 302
    assert not AccessEvent.objects.filter(action="tenant.create").exists()


# --- 2. The hospital switcher ----------------------------------------------------------------


@pytest.fixture
def traveller(hospital_a, hospital_b):
    """A clinician in Demo General and a viewer in Demo Children's."""
    user = user_get_or_create(username="traveller", password=PASSWORD)
    in_a = membership_grant(tenant=hospital_a, user=user, role=Role.CLINICIAN)
    in_b = membership_grant(tenant=hospital_b, user=user, role=Role.VIEWER)
    return in_a, in_b


def switch(client, slug):
    return client.post(SWITCH_URL, {"tenant": slug})


def image_rows(response) -> set[int]:
    return {int(i) for i in re.findall(r'data-image="(\d+)"', response.content.decode())}


def selected_hospital(response) -> str:
    switcher = re.search(r'<select id="tenant" name="tenant".*?</select>', response.content.decode(), re.S)
    assert switcher is not None, "the switcher is shown to members of several hospitals"
    return re.findall(r'<option value="([^"]+)" selected>', switcher.group(0))[0]


def test_switching_hospital_changes_the_data_and_the_role_in_effect(
    client, traveller, clinician_b, hospital_a, hospital_b, demo_model
):
    in_a, in_b = traveller
    a_image = image_upload(membership=in_a, upload=named_png(1))
    b_image = image_upload(membership=clinician_b, upload=named_png(2))
    client.force_login(in_a.user)

    response = switch(client, "demo-general")
    assert response.status_code == 302 and response["Location"] == "/"
    assert client.session["tenant_slug"] == "demo-general"
    page = client.get("/images/")
    assert page.status_code == 200 and selected_hospital(page) == "demo-general"
    assert image_rows(page) == {a_image.pk}
    assert b'class="button primary" href="/upload/"' in page.content  # a clinician here
    assert b'id="upload-form"' in client.get("/upload/").content
    uploaded = client.post("/upload/", {"files": [named_png(3)]})
    assert uploaded.status_code == 302 and uploaded["Location"] == "/images/"
    assert Image.objects.filter(tenant=hospital_a, uploaded_by=in_a.user).count() == 2

    assert switch(client, "demo-childrens").status_code == 302
    assert client.session["tenant_slug"] == "demo-childrens"
    page = client.get("/images/")
    assert page.status_code == 200 and selected_hospital(page) == "demo-childrens"
    assert image_rows(page) == {b_image.pk}
    assert b"Images <small>Demo Children&#x27;s</small>" in page.content
    assert b'href="/upload/">Upload images' not in page.content  # a viewer here
    assert client.get(f"/images/{a_image.pk}/").status_code == 404  # A's image is not in this hospital
    upload_page = client.get("/upload/")
    assert b'id="upload-form"' not in upload_page.content
    assert b"does not include uploading" in upload_page.content
    refused = client.post("/upload/", {"files": [named_png(4)]})
    assert refused.status_code == 200 and b"does not allow this" in refused.content
    assert Image.objects.filter(tenant=hospital_b).count() == 1
    assert Image.objects.filter(uploaded_by=in_a.user).count() == 2
    denied = AccessEvent.objects.filter(action="image.upload", outcome="denied", actor=in_a.user, tenant=hospital_b)
    assert denied.count() == 1

    assert switch(client, "demo-general").status_code == 302
    page = client.get("/images/")
    assert selected_hospital(page) == "demo-general"
    assert b_image.pk not in image_rows(page) and a_image.pk in image_rows(page)
    assert len(image_rows(page)) == 2
    assert client.post("/upload/", {"files": [named_png(5)]}).status_code == 302
    assert Image.objects.filter(tenant=hospital_a, uploaded_by=in_a.user).count() == 3


def test_switching_to_a_hospital_one_does_not_belong_to_is_404_and_keeps_the_current_one(client, traveller):
    in_a, _ = traveller
    Tenant.objects.create(name="Demo Elsewhere", slug="demo-elsewhere")
    client.force_login(in_a.user)
    switch(client, "demo-general")
    for slug in ("demo-elsewhere", "no-such-hospital"):
        assert switch(client, slug).status_code == 404
        assert client.session["tenant_slug"] == "demo-general"
    assert selected_hospital(client.get("/images/")) == "demo-general"
    assert AccessEvent.objects.filter(action="tenant.select", outcome="denied", actor=in_a.user).count() == 2


def test_switching_needs_a_post(client, traveller):
    client.force_login(traveller[0].user)
    switch(client, "demo-general")
    assert client.get(SWITCH_URL, {"tenant": "demo-childrens"}).status_code == 405
    assert client.session["tenant_slug"] == "demo-general"


# --- 3. CSRF on browser forms -----------------------------------------------------------------


@pytest.fixture
def csrf_client():
    return Client(enforce_csrf_checks=True)


def test_an_upload_without_the_csrf_token_is_refused_and_stores_nothing(csrf_client, clinician_a, demo_model):
    csrf_client.force_login(clinician_a.user)
    assert csrf_client.get("/upload/").status_code == 200  # sets the CSRF cookie
    refused = csrf_client.post("/upload/", {"files": [named_png(1)]})
    assert refused.status_code == 403
    assert Image.objects.count() == InferenceRequest.objects.count() == 0
    assert not AccessEvent.objects.filter(action="image.upload").exists()
    # a wrong token is no better than none
    forged = csrf_client.post("/upload/", {"files": [named_png(1)], "csrfmiddlewaretoken": "x" * 64})
    assert forged.status_code == 403 and Image.objects.count() == 0
    # the control: the same form with the page's token goes through
    accepted = csrf_client.post("/upload/", {"files": [named_png(1)], "csrfmiddlewaretoken": csrf_token(csrf_client)})
    assert accepted.status_code == 302 and Image.objects.count() == 1


def test_an_invitation_without_the_csrf_token_is_refused_and_sends_nothing(csrf_client, admin_a):
    csrf_client.force_login(admin_a.user)
    assert csrf_client.get(MEMBERS_PAGE).status_code == 200
    form = {"email": "new.person@example.org", "role": Role.CLINICIAN}
    assert csrf_client.post("/hospital/members/invite/", form).status_code == 403
    assert Invitation.objects.count() == 0 and mail.outbox == []
    accepted = csrf_client.post("/hospital/members/invite/", {**form, "csrfmiddlewaretoken": csrf_token(csrf_client)})
    assert accepted.status_code == 302
    assert Invitation.objects.filter(email="new.person@example.org", tenant=admin_a.tenant).count() == 1


def test_a_hospital_switch_without_the_csrf_token_is_refused(csrf_client, traveller):
    csrf_client.force_login(traveller[0].user)
    csrf_client.get("/images/")
    first = csrf_client.session["tenant_slug"]
    other = "demo-general" if first == "demo-childrens" else "demo-childrens"
    assert csrf_client.post(SWITCH_URL, {"tenant": other}).status_code == 403
    assert csrf_client.session["tenant_slug"] == first
    switched = csrf_client.post(SWITCH_URL, {"tenant": other, "csrfmiddlewaretoken": csrf_token(csrf_client)})
    assert switched.status_code == 302
    assert csrf_client.session["tenant_slug"] == other


def test_the_login_form_without_the_csrf_token_is_refused(csrf_client, clinician_a):
    assert csrf_client.get(LOGIN_URL).status_code == 200
    refused = csrf_client.post(LOGIN_URL, {"username": "clinician", "password": PASSWORD})
    assert refused.status_code == 403
    assert "_auth_user_id" not in csrf_client.session
    assert not AccessEvent.objects.filter(action="auth.login").exists()
    assert csrf_client.get("/images/").status_code == 302
    accepted = csrf_client.post(
        LOGIN_URL, {"username": "clinician", "password": PASSWORD, "csrfmiddlewaretoken": csrf_token(csrf_client)}
    )
    assert accepted.status_code == 302
    assert csrf_client.session["_auth_user_id"] == str(clinician_a.user.pk)


# --- 4. The lockout's cool-off ------------------------------------------------------------------


def page_sign_in(client, password):
    return client.post(LOGIN_URL, {"username": "clinician", "password": password})


def token_sign_in(client, password):
    return client.post(TOKEN_URL, {"username": "clinician", "password": password}, format="json")


def age_attempts(by: timedelta) -> int:
    """Move the stored failure times back, as if that much time had passed since."""
    # axes keeps the keyed hash of the username (issue 11, ids)
    return AccessAttempt.objects.filter(username=username_tried("clinician")).update(attempt_time=timezone.now() - by)


@pytest.mark.parametrize(
    ("make_client", "sign_in", "signed_in"),
    [
        (Client, page_sign_in, lambda client, r: r.status_code == 302 and "_auth_user_id" in client.session),
        (APIClient, token_sign_in, lambda client, r: r.status_code == 200 and "access" in r.json()),
    ],
    ids=["login-page", "token-endpoint"],
)
def test_the_right_password_works_again_only_after_the_cool_off(clinician_a, settings, make_client, sign_in, signed_in):
    limit, cool_off = settings.AXES_FAILURE_LIMIT, settings.AXES_COOLOFF_TIME
    assert limit >= 2 and cool_off >= timedelta(minutes=2)
    client = make_client()
    answers = [sign_in(client, "wrong-password").status_code for _ in range(limit)]
    assert answers[-1] == 429 and 429 not in answers[:-1]

    assert sign_in(client, PASSWORD).status_code == 429  # locked: the right password too

    assert age_attempts(cool_off - timedelta(minutes=1)) == 1
    still = sign_in(client, PASSWORD)  # a minute before the cool-off ends
    assert still.status_code == 429 and not signed_in(client, still)

    assert age_attempts(cool_off + timedelta(minutes=1)) == 1
    again = sign_in(client, PASSWORD)
    assert signed_in(client, again), again.content[:500]
    typed = username_tried("clinician")  # what axes and the access log keep of the name (issue 11, ids)
    assert not AccessAttempt.objects.filter(username=typed).exists()  # the success resets the count
    assert AccessEvent.objects.filter(action="auth.lockout", outcome="denied", actor_label=typed).exists()


def test_after_the_cool_off_the_count_starts_again_from_zero(client, clinician_a, settings):
    limit, cool_off = settings.AXES_FAILURE_LIMIT, settings.AXES_COOLOFF_TIME
    for _ in range(limit):
        page_sign_in(client, "wrong-password")
    age_attempts(cool_off + timedelta(minutes=1))
    # one more failure is a first failure, not the limit plus one
    failed = page_sign_in(client, "wrong-password")
    assert failed.status_code == 200 and b"did not match" in failed.content
    assert page_sign_in(client, PASSWORD).status_code == 302


# --- 5. Unknown users and wrong passwords cost the same -----------------------------------------


@pytest.fixture
def hash_calls(settings):
    """Counts calls to the configured (first) password hasher's encode, which still runs."""
    hasher = import_string(settings.PASSWORD_HASHERS[0])
    with mock.patch.object(hasher, "encode", autospec=True, side_effect=hasher.encode) as encode:
        yield encode


def calls_for(hash_calls, attempt) -> tuple[int, object]:
    hash_calls.reset_mock()
    response = attempt()
    return hash_calls.call_count, response


def test_the_login_page_hashes_as_often_for_an_unknown_user_as_for_a_wrong_password(client, clinician_a, hash_calls):
    wrong_count, wrong = calls_for(hash_calls, lambda: page_sign_in(client, "wrong-password"))
    unknown_count, unknown = calls_for(
        hash_calls, lambda: client.post(LOGIN_URL, {"username": "nobody-here", "password": "wrong-password"})
    )
    assert wrong_count == unknown_count > 0
    assert wrong.status_code == unknown.status_code == 200
    assert error_lines(wrong) == error_lines(unknown) != []
    assert "_auth_user_id" not in client.session
    right_count, right = calls_for(hash_calls, lambda: page_sign_in(client, PASSWORD))  # the control
    assert right.status_code == 302 and right_count > 0


def test_the_token_endpoint_hashes_as_often_for_an_unknown_user_as_for_a_wrong_password(clinician_a, hash_calls):
    client = APIClient()
    wrong_count, wrong = calls_for(hash_calls, lambda: token_sign_in(client, "wrong-password"))
    unknown_count, unknown = calls_for(
        hash_calls,
        lambda: client.post(TOKEN_URL, {"username": "nobody-here", "password": "wrong-password"}, format="json"),
    )
    assert wrong_count == unknown_count > 0
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert wrong.json()["error"]["message"]


# --- 6. Clients cannot set server-owned fields ----------------------------------------------------


def test_an_upload_ignores_status_hospital_owner_and_uploader_fields(clinician_a, clinician_b, demo_model):
    other = clinician_b.user
    response = api_client_for(clinician_a).post(
        IMAGES_API,
        {
            "file": named_png(1),
            "status": "done",
            "ai_status": "done",
            "top_label": "round_opacity",
            "tenant": clinician_b.tenant_id,
            "hospital": clinician_b.tenant.slug,
            "uploaded_by": other.pk,
            "owner": other.pk,
            "sha256": "0" * 64,
        },
        format="multipart",
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["status"] == "queued"
    image = Image.objects.get(pk=body["id"])
    assert image.tenant == clinician_a.tenant and image.study.tenant == clinician_a.tenant
    assert image.uploaded_by == clinician_a.user
    assert image.sha256 != "0" * 64
    (read,) = InferenceRequest.objects.filter(image=image)
    assert read.status == InferenceRequest.Status.QUEUED and read.tenant == clinician_a.tenant
    assert Image.objects.filter(tenant=clinician_b.tenant).count() == 0
    assert api_client_for(clinician_b).get(f"{IMAGES_API}{image.pk}/").status_code == 404


def test_a_batch_job_ignores_status_state_hospital_and_creator_fields(clinician_a, clinician_b, demo_model):
    response = api_client_for(clinician_a).post(
        BATCHES_API,
        {
            "name": "night films",
            "status": "running",
            "state": "finished",
            "tenant": clinician_b.tenant_id,
            "hospital": clinician_b.tenant.slug,
            "created_by": clinician_b.user_id,
            "owner": clinician_b.user_id,
            "started_at": "2020-01-01T00:00:00Z",
        },
        format="json",
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["status"] == "open" and body["state"] == "open" and body["started_at"] is None
    job = BatchJob.objects.get(pk=body["id"])
    assert job.tenant == clinician_a.tenant and job.created_by == clinician_a.user
    assert job.status == BatchJob.Status.OPEN and job.started_at is None
    assert api_client_for(clinician_b).get(f"{BATCHES_API}{job.pk}/").status_code == 404


def test_a_review_ignores_author_hospital_sign_off_and_ai_label_fields(clinician_a, clinician_b, demo_model):
    client = api_client_for(clinician_a)
    image_id = client.post(IMAGES_API, {"file": named_png(7)}, format="multipart").json()["id"]
    inference_run(request_id=InferenceRequest.objects.get(image_id=image_id).pk)
    result = Image.objects.get(pk=image_id).results.get()
    fake_label = next(label for label in result.model_version.labels if label != result.top_label)
    response = client.post(
        f"{IMAGES_API}{image_id}/reviews/",
        {
            "verdict": "agree",
            "author": clinician_b.user_id,
            "tenant": clinician_b.tenant_id,
            "signed_off_at": "2020-01-01T00:00:00Z",
            "signed_off_by": clinician_b.user_id,
            "ai_label": fake_label,
            "amends": 999999,
            "image": 999999,
            "created": "2020-01-01T00:00:00Z",
        },
        format="json",
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["author"] == "clinician" and body["signed_off_at"] is None and body["signed_off_by"] is None
    review = Review.objects.get(pk=body["id"])
    assert review.tenant == clinician_a.tenant and review.author == clinician_a.user
    assert review.image_id == image_id and review.amends is None
    assert review.signed_off_at is None and review.signed_off_by is None
    assert review.ai_label == result.top_label and review.result == result
    assert review.created > timezone.now() - timedelta(minutes=5)


# --- 7. The members page: roles and last activity -------------------------------------------------


def member_row(page, username) -> str:
    row = re.search(rf'<tr data-member="{re.escape(username)}">(.*?)</tr>', page.content.decode(), re.S)
    assert row is not None, f"{username} is listed"
    return row.group(1)


def shown_role(row) -> str:
    return re.findall(r'<option value="([^"]+)" selected>', row)[0]


def shown_activity(row) -> datetime | None:
    stamp = re.search(r'<time datetime="([^"]+)">', row)
    if stamp is None:
        assert "—" in row
        return None
    return datetime.fromisoformat(stamp.group(1))


def test_the_members_page_shows_each_role_and_last_activity_and_follows_activity(client, admin_a, clinician_a):
    viewer = member(admin_a.tenant, "viewer", Role.VIEWER)
    client.force_login(admin_a.user)
    page = client.get(MEMBERS_PAGE)
    assert page.status_code == 200
    assert shown_role(member_row(page, "hospital-admin")) == Role.TENANT_ADMIN
    assert shown_role(member_row(page, "clinician")) == Role.CLINICIAN
    assert shown_role(member_row(page, "viewer")) == Role.VIEWER
    assert shown_activity(member_row(page, "clinician")) is None  # never active yet
    assert shown_activity(member_row(page, "viewer")) is None
    assert shown_activity(member_row(page, "hospital-admin")) is not None  # this very visit

    # the clinician signs in in their own browser and lands on their start page
    before = timezone.now()
    clinician_browser = Client()
    landed = clinician_browser.post(LOGIN_URL, {"username": "clinician", "password": PASSWORD}, follow=True)
    assert landed.status_code == 200 and landed.redirect_chain
    seen = shown_activity(member_row(client.get(MEMBERS_PAGE), "clinician"))
    assert seen is not None and before - timedelta(seconds=1) <= seen <= timezone.now()
    clinician_a.refresh_from_db()
    assert seen == clinician_a.last_seen
    assert shown_activity(member_row(client.get(MEMBERS_PAGE), "viewer")) is None  # only who acted

    # hours later the clinician uses the API with a token: the page moves with it
    long_ago = timezone.now() - timedelta(hours=3)
    Membership.objects.filter(pk=clinician_a.pk).update(last_seen=long_ago)
    assert shown_activity(member_row(client.get(MEMBERS_PAGE), "clinician")) == long_ago
    access = APIClient().post(TOKEN_URL, {"username": "clinician", "password": PASSWORD}, format="json").json()
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {access['access']}")
    assert api.get(IMAGES_API).status_code == 200
    page = client.get(MEMBERS_PAGE)
    latest = shown_activity(member_row(page, "clinician"))
    assert latest is not None and latest > long_ago + timedelta(hours=2)
    listed = {m["username"]: m for m in api_client_for(admin_a).get("/api/v1/members/").json()["results"]}
    assert datetime.fromisoformat(listed["clinician"]["last_seen"].replace("Z", "+00:00")) == latest
    assert listed["viewer"]["last_seen"] is None and listed["viewer"]["role"] == Role.VIEWER

    # a role change shows on the page
    changed = client.post(f"/hospital/members/{viewer.pk}/role/", {"role": Role.CLINICIAN})
    assert changed.status_code == 302
    assert shown_role(member_row(client.get(MEMBERS_PAGE), "viewer")) == Role.CLINICIAN
