"""The agreement page's screening section: per screening version, how often the browser's screen
and the server's read agree, and how often the screen called negative what the server did not;
each hospital sees its own."""

import pytest
from django.urls import reverse

from accounts.models import Role
from recognition.agreement import screening_agreement
from recognition.models import InferenceRequest, PreliminaryResult, Result
from recognition.services.images import image_upload
from tests.conftest import member, png_bytes, upload_file
from tests.screening import screening_version

pytestmark = pytest.mark.django_db
seeds = iter(range(10_000))


def screened(membership, version, screen_label, server_label, *, model_version=None, shadow=False):
    """An image with a preliminary of ``version`` and, unless None, a server read of ``server_label``."""
    image = image_upload(membership=membership, upload=upload_file(png_bytes(seed=next(seeds), size=32)), read=False)
    p = 0.9
    PreliminaryResult.objects.create(
        tenant=image.tenant,
        image=image,
        screening_version=version,
        probabilities={screen_label: p, ("round_opacity" if screen_label == "no_finding" else "no_finding"): 1 - p},
        top_label=screen_label,
        top_probability=p,
    )
    if server_label is not None:
        request = InferenceRequest.objects.create(
            tenant=image.tenant, image=image, model_version=model_version, shadow=shadow, status="done"
        )
        Result.objects.create(
            tenant=image.tenant,
            request=request,
            image=image,
            model_version=model_version,
            probabilities={server_label: 0.8},
            top_label=server_label,
            top_probability=0.8,
        )
    return image


def test_agreement_per_screening_version_counts_images_with_both(clinician_a, clinician_b, demo_model):
    v1, v2 = screening_version("1.0.0"), screening_version("1.1.0")
    NEG, POS = "no_finding", "round_opacity"
    for screen_label, server_label in [(NEG, NEG), (NEG, NEG), (POS, POS), (NEG, POS), (POS, NEG)]:
        screened(clinician_a, v1, screen_label, server_label, model_version=demo_model)
    screened(clinician_a, v1, NEG, None)  # not read yet: not counted
    screened(clinician_a, v1, NEG, POS, model_version=demo_model, shadow=True)  # a shadow read is not the read
    screened(clinician_a, v2, POS, POS, model_version=demo_model)
    screened(clinician_b, v1, NEG, POS, model_version=demo_model)  # another hospital's

    first, second = screening_agreement(tenant=clinician_a.tenant)
    assert (first.version, first.proportion.n, first.proportion.agreed, first.screen_negative_server_positive) == (
        "1.0.0",
        5,
        3,
        1,
    )
    assert first.proportion.share_percent == "60%"
    assert (second.version, second.proportion.n, second.proportion.agreed) == ("1.1.0", 1, 1)
    (b_only,) = screening_agreement(tenant=clinician_b.tenant)
    assert (b_only.proportion.n, b_only.screen_negative_server_positive) == (1, 1)
    everyone = {row.version: row.proportion.n for row in screening_agreement()}
    assert everyone == {"1.0.0": 6, "1.1.0": 1}


def test_the_agreement_page_shows_the_section_to_the_hospitals_admin_only_for_its_own(
    client, clinician_a, clinician_b, demo_model, hospital_a, hospital_b
):
    version = screening_version()
    screened(clinician_a, version, "no_finding", "round_opacity", model_version=demo_model)
    client.force_login(member(hospital_a, "admin-agree", Role.TENANT_ADMIN).user)
    page = client.get(reverse("recognition:agreement")).content.decode()
    section = page[page.index('id="screening-agreement"') :]
    assert "sightline-screen 1.0.0" in section
    assert '<td class="screen-missed">1</td>' in section
    client.logout()
    client.force_login(member(hospital_b, "admin-agree-b", Role.TENANT_ADMIN).user)
    assert 'id="screening-agreement"' not in client.get(reverse("recognition:agreement")).content.decode()
    client.logout()
    client.force_login(clinician_a.user)
    assert client.get(reverse("recognition:agreement")).status_code == 403
