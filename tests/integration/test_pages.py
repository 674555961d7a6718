"""Browser pages through Django's test client: login, list, detail, upload, isolation."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command

from accounts.models import AccessEvent, Membership, Tenant
from dicomnet.models import DicomNode, HospitalAETitle
from recognition.models import Image, Study
from recognition.services.images import image_upload
from tests.conftest import PASSWORD, png_bytes, upload_file

pytestmark = pytest.mark.django_db


@pytest.fixture
def signed_in(client):
    def sign_in(membership):
        client.force_login(membership.user)
        return client

    return sign_in


def test_login_page_signs_in_and_logs_the_event(client, clinician_a, demo_model):
    response = client.post("/accounts/login/", {"username": "clinician", "password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == "/"
    assert AccessEvent.objects.filter(action="auth.login", outcome="success", actor=clinician_a.user).exists()


def test_a_failed_login_says_so_without_naming_the_cause(client, clinician_a):
    wrong = client.post("/accounts/login/", {"username": "clinician", "password": "nope"})
    unknown = client.post("/accounts/login/", {"username": "nobody", "password": "nope"})
    assert wrong.status_code == unknown.status_code == 200
    assert b"did not match" in wrong.content and b"did not match" in unknown.content
    assert AccessEvent.objects.filter(action="auth.login", outcome="failed").count() == 2


def test_pages_need_a_login(client):
    for url in ("/", "/images/", "/upload/", "/images/1/", "/images/1/file/"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_the_list_shows_only_the_own_hospitals_images(signed_in, clinician_a, clinician_b, demo_model):
    mine = image_upload(membership=clinician_a, upload=upload_file(png_bytes()))
    theirs = image_upload(membership=clinician_b, upload=upload_file(png_bytes()))
    page = signed_in(clinician_a).get("/images/")
    assert page.status_code == 200
    assert f'data-image="{mine.pk}"'.encode() in page.content
    assert f'data-image="{theirs.pk}"'.encode() not in page.content
    assert b"queued" in page.content


def test_another_hospitals_image_page_and_file_are_404(signed_in, clinician_a, clinician_b, demo_model):
    theirs = image_upload(membership=clinician_b, upload=upload_file(png_bytes()))
    client = signed_in(clinician_a)
    assert client.get(f"/images/{theirs.pk}/").status_code == 404
    assert client.get(f"/images/{theirs.pk}/file/").status_code == 404
    assert client.get("/images/999999/").status_code == 404


def test_the_image_page_shows_the_image_and_its_result(signed_in, clinician_a, demo_model):
    from workers.runner import inference_run

    image = image_upload(membership=clinician_a, upload=upload_file(png_bytes(opacity=True, seed=8)))
    inference_run(request_id=image.inference_requests.get().pk)
    client = signed_in(clinician_a)
    page = client.get(f"/images/{image.pk}/")
    assert page.status_code == 200
    assert b"round_opacity" in page.content and "sightline-demo v1 · 1.0.0".encode() in page.content
    assert b"not a diagnosis" in page.content
    file = client.get(f"/images/{image.pk}/file/")
    assert file.status_code == 200 and file["Cache-Control"] == "private, no-store"


def test_upload_of_several_files_stores_the_good_ones_and_names_the_bad(signed_in, clinician_a, demo_model):
    files = [
        SimpleUploadedFile("first.png", png_bytes(seed=1)),
        SimpleUploadedFile("broken.png", b"definitely not a png"),
        SimpleUploadedFile("third.png", png_bytes(seed=3)),
    ]
    response = signed_in(clinician_a).post("/upload/", {"files": files}, follow=True)
    assert response.status_code == 200
    assert Image.objects.count() == 2
    text = response.content.decode()
    assert "broken.png: The file is not an image" in text
    assert "2 images uploaded" in text


def test_a_viewer_sees_no_upload_form_and_cannot_post(signed_in, viewer_a, demo_model):
    client = signed_in(viewer_a)
    assert b'type="file"' not in client.get("/upload/").content
    response = client.post("/upload/", {"files": [SimpleUploadedFile("a.png", png_bytes())]}, follow=True)
    assert Image.objects.count() == 0
    assert b"does not allow this" in response.content


def test_seeding_twice_changes_nothing(demo_model):
    call_command("seed_demo")
    counts = (Tenant.objects.count(), Membership.objects.count(), Study.objects.count(), Image.objects.count())
    events = AccessEvent.objects.count()
    call_command("seed_demo")
    # 5 people and the demo DICOM node's service account; 7 PNG studies, and one CT study of three frames
    assert counts == (2, 6, 8, 10)
    titles = dict(HospitalAETitle.objects.values_list("tenant__slug", "ae_title"))
    assert titles == {"demo-general": "SL_GENERAL", "demo-childrens": "SL_CHILDRENS"}
    (node,) = DicomNode.objects.all()
    assert (node.tenant.slug, node.ae_title, node.host, node.is_active) == (
        "demo-general",
        "DEMO_MODALITY",
        "127.0.0.1",
        True,
    )
    ct = Study.objects.get(accession_number="DEMO-CT-0001")
    assert ct.modality == "CT" and ct.image_count == 3 and ct.patient_pseudonym.startswith("P-")
    assert (Tenant.objects.count(), Membership.objects.count(), Study.objects.count(), Image.objects.count()) == counts
    assert AccessEvent.objects.count() == events
    assert set(Tenant.objects.values_list("slug", flat=True)) == {"demo-general", "demo-childrens"}


@pytest.mark.parametrize(
    ("role", "landing"),
    [
        ("clinician", "/worklist/"),
        ("viewer", "/worklist/"),
        ("tenant_admin", "/hospital/members/"),
        ("auditor", "/hospital/access-log/"),
    ],
)
def test_each_role_starts_on_its_own_page(client, hospital_a, role, landing):
    from accounts.services import membership_grant, user_get_or_create

    member = membership_grant(
        tenant=hospital_a, user=user_get_or_create(username=f"u-{role}", password=PASSWORD), role=role
    )
    client.force_login(member.user)
    response = client.get("/", follow=True)
    assert response.redirect_chain[-1][0] == landing
    assert response.status_code == 200


def test_the_admin_sign_in_is_the_sites_own(client):
    response = client.get("/admin/login/?next=/admin/")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/admin/"


def test_model_versions_are_immutable_in_the_admin_and_alias_moves_are_logged(client, demo_model):
    from django.contrib.auth import get_user_model

    from recognition.models import ModelAlias

    staff = get_user_model().objects.create_superuser("staff", password=PASSWORD)
    client.force_login(staff)
    assert client.get("/admin/recognition/modelversion/add/").status_code == 403
    assert client.post(f"/admin/recognition/modelversion/{demo_model.pk}/change/", {}).status_code == 403
    alias = ModelAlias.objects.get()
    response = client.post(
        f"/admin/recognition/modelalias/{alias.pk}/change/",
        {"model": demo_model.model_id, "name": "canary", "version": demo_model.pk},
    )
    assert response.status_code == 302
    assert ModelAlias.objects.filter(name="canary", version=demo_model).exists()
    assert AccessEvent.objects.filter(action="model.alias_move", actor=staff).count() == 1


def test_an_invitation_for_someone_already_a_member_changes_nothing(client, clinician_a, hospital_a):
    from accounts.models import Invitation, Membership, Role
    from accounts.services import invitation_create, membership_grant, user_get_or_create

    admin = membership_grant(
        tenant=hospital_a, user=user_get_or_create(username="admin-a", password=PASSWORD), role=Role.TENANT_ADMIN
    )
    _, token = invitation_create(actor=admin, email="c@example.org", role=Role.VIEWER)
    client.force_login(clinician_a.user)
    response = client.post(f"/invitations/{token}/", follow=True)
    assert b"already a member" in response.content
    assert Membership.objects.get(pk=clinician_a.pk).role == Role.CLINICIAN
    assert Invitation.objects.get().accepted_at is None  # still usable by the right person


def test_an_invitation_to_a_malformed_address_is_refused(hospital_a):
    from accounts.models import Role
    from accounts.services import invitation_create, membership_grant, user_get_or_create
    from core.errors import Invalid

    admin = membership_grant(
        tenant=hospital_a, user=user_get_or_create(username="admin-a", password=PASSWORD), role=Role.TENANT_ADMIN
    )
    with pytest.raises(Invalid, match="not an e-mail address"):
        invitation_create(actor=admin, email="not-an-address", role=Role.VIEWER)


def test_the_heatmap_is_served_to_the_hospital_and_logged(signed_in, clinician_a, clinician_b, demo_model):
    from recognition.models import Result
    from workers.heatmaps import heatmap_compute
    from workers.runner import inference_run

    image = image_upload(membership=clinician_a, upload=upload_file(png_bytes(opacity=True, seed=9)))
    inference_run(request_id=image.inference_requests.get().pk)
    client = signed_in(clinician_a)
    page = client.get(f"/images/{image.pk}/")
    assert b'id="heatmap-toggle"' in page.content and b"data-heatmap-url" in page.content
    assert client.get(f"/images/{image.pk}/heatmap/").status_code == 202  # asked for: a worker makes it
    heatmap_compute(result_id=Result.objects.get().pk)
    heatmap = client.get(f"/images/{image.pk}/heatmap/")
    assert heatmap.status_code == 200 and heatmap["Content-Type"] == "image/png"
    assert AccessEvent.objects.filter(action="image.heatmap", target_id=str(image.pk)).count() == 2
    assert signed_in(clinician_b).get(f"/images/{image.pk}/heatmap/").status_code == 404
