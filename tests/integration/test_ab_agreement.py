"""The agreement page's A/B section: while (or after) a hospital splits its traffic between two
versions, each version's agreement with clinicians' signed verdicts with a 95% Wilson interval,
a warning while the sample cannot decide, and the two versions' agreement with each other on
shadow reads; scoped to the hospital like the rest of the page."""

from __future__ import annotations

import pytest

from accounts.models import Role
from accounts.services import membership_grant, user_get_or_create
from recognition.agreement import (
    AB_MINIMUM_SAMPLE,
    ABArm,
    ABComparison,
    Proportion,
    ab_comparisons,
    ab_svg,
    agreement_rows,
)
from recognition.models import InferenceRequest, ModelVersion, Result, Review, TrafficSplit
from recognition.services.reviews import review_save
from recognition.services.shadow import traffic_split_shadow_set
from tests.conftest import PASSWORD
from tests.integration import test_agreement, test_shadow_reads
from tests.integration.test_agreement import other_version
from tests.integration.test_shadow_reads import read_everything_queued, upload

review = test_agreement.review  # the fixtures, shared
arms = test_shadow_reads.arms

pytestmark = pytest.mark.django_db

AGREE, DISAGREE = Review.Verdict.AGREE, Review.Verdict.DISAGREE


@pytest.fixture
def split_b(demo_model, clinician_a):
    """Hospital A sends half its images to 1.1.0, a version derived from the demo model."""
    b = other_version(demo_model, "1.1.0")
    ModelVersion.objects.filter(pk=b.pk).update(status=ModelVersion.Status.READY, derived_from=demo_model)
    b.refresh_from_db()
    TrafficSplit.objects.create(tenant=clinician_a.tenant, model=demo_model.model, version=b, percent=50)
    return b


def reviews(review, membership, version, agreed: int, disagreed: int):
    made = [review(membership, version, "round_opacity", AGREE) for _ in range(agreed)]
    return made + [review(membership, version, "round_opacity", DISAGREE) for _ in range(disagreed)]


def shadow_read(shown: Review, version, label: str) -> Result:
    """The other arm's read of the image a clinician reviewed, as the worker stores it."""
    image = shown.image
    request = InferenceRequest.objects.create(
        tenant=image.tenant,
        image=image,
        model_version=version,
        priority=InferenceRequest.Priority.BULK,
        shadow=True,
        status=InferenceRequest.Status.DONE,
    )
    return Result.objects.create(
        tenant=image.tenant,
        request=request,
        image=image,
        model_version=version,
        probabilities={label: 0.9},
        top_label=label,
        top_probability=0.9,
    )


def comparisons_of(tenant):
    return ab_comparisons(tenant=tenant, rows=agreement_rows(tenant=tenant))


def test_the_wilson_interval_matches_its_textbook_values():
    assert Proportion(n=10, agreed=8).interval == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert Proportion(n=100, agreed=50).interval == pytest.approx((0.4038, 0.5962), abs=1e-4)
    low, high = Proportion(n=10, agreed=0).interval
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)  # never below 0, unlike the normal one
    assert Proportion(n=10, agreed=10).interval[1] == pytest.approx(1.0)
    assert Proportion(n=0, agreed=0).interval is None and Proportion(0, 0).interval_percent == "—"
    assert Proportion(n=10, agreed=8).interval_percent == "49%–94%"


def test_both_arms_side_by_side_with_intervals_and_a_warning_while_too_few(review, clinician_a, demo_model, split_b):
    reviews(review, clinician_a, demo_model, agreed=8, disagreed=2)
    reviews(review, clinician_a, split_b, agreed=5, disagreed=5)

    (comparison,) = comparisons_of(clinician_a.tenant)

    assert comparison.live and comparison.model == "sightline-demo"
    assert (comparison.a.version, comparison.a.role, comparison.a.serial) == ("1.0.0", "production", 1)
    assert (comparison.b.version, comparison.b.role, comparison.b.serial) == ("1.1.0", "split 50%", 2)
    assert (comparison.a.clinicians.n, comparison.a.clinicians.agreed) == (10, 8)
    assert (comparison.b.clinicians.n, comparison.b.clinicians.agreed) == (10, 5)
    assert comparison.b.clinicians.interval_percent == "24%–76%"
    assert f"at least {AB_MINIMUM_SAMPLE}" in comparison.warning and "1.0.0 has 10" in comparison.warning
    assert comparison.shadow.n == 0 and "Too few shadow reads" in comparison.shadow_warning


def test_the_warning_stays_while_the_intervals_overlap_and_goes_once_they_part(
    review, clinician_a, demo_model, split_b
):
    enough = AB_MINIMUM_SAMPLE
    reviews(review, clinician_a, demo_model, agreed=enough - 2, disagreed=2)
    reviews(review, clinician_a, split_b, agreed=enough - 4, disagreed=4)
    (close,) = comparisons_of(clinician_a.tenant)
    assert "intervals overlap" in close.warning  # 93% against 87% of 30: could be chance

    reviews(review, clinician_a, split_b, agreed=0, disagreed=enough)
    (apart,) = comparisons_of(clinician_a.tenant)
    assert apart.b.clinicians.n == 2 * enough and apart.warning == ""
    assert apart.a.clinicians.interval[0] > apart.b.clinicians.interval[1]


def test_the_two_versions_agreement_on_shadow_pairs_counts_both_directions(review, clinician_a, demo_model, split_b):
    read_by_a = reviews(review, clinician_a, demo_model, agreed=4, disagreed=0)
    read_by_b = reviews(review, clinician_a, split_b, agreed=1, disagreed=0)
    for shown in read_by_a[:3]:
        shadow_read(shown, split_b, "round_opacity")  # the same top label
    shadow_read(read_by_a[3], split_b, "no_finding")
    shadow_read(read_by_b[0], demo_model, "round_opacity")

    (comparison,) = comparisons_of(clinician_a.tenant)

    assert (comparison.shadow.n, comparison.shadow.agreed) == (5, 4)
    assert comparison.shadow.share_percent == "80%"
    assert comparison.shadow.interval == pytest.approx(Proportion(n=5, agreed=4).interval)
    # the shadow reads are in no clinician's count
    assert (comparison.a.clinicians.n, comparison.b.clinicians.n) == (4, 1)


def test_a_split_that_ended_stays_on_the_page_by_its_shadow_pairs_parent_first(
    review, clinician_a, demo_model, split_b
):
    shown = reviews(review, clinician_a, split_b, agreed=1, disagreed=0)[0]
    shadow_read(shown, demo_model, "round_opacity")
    TrafficSplit.objects.all().delete()

    (comparison,) = comparisons_of(clinician_a.tenant)

    assert not comparison.live
    assert (comparison.a.version, comparison.b.version) == ("1.0.0", "1.1.0")  # the parent is A
    assert comparison.a.role == comparison.b.role == ""
    assert (comparison.shadow.n, comparison.shadow.agreed) == (1, 1)


def test_each_hospital_sees_its_own_arms_and_staff_see_them_all(review, clinician_a, clinician_b, demo_model, split_b):
    shown = reviews(review, clinician_a, split_b, agreed=1, disagreed=0)[0]
    shadow_read(shown, demo_model, "no_finding")
    reviews(review, clinician_b, demo_model, agreed=3, disagreed=0)

    assert comparisons_of(clinician_b.tenant) == []
    (everyone,) = comparisons_of(None)
    assert everyone.a.clinicians.n == 3 and everyone.b.clinicians.n == 1 and everyone.shadow.n == 1
    (own,) = comparisons_of(clinician_a.tenant)
    assert own.a.clinicians.n == 0  # hospital B's reviews of 1.0.0 are not A's


def test_the_comparisons_cost_three_statements(review, clinician_a, demo_model, split_b, django_assert_num_queries):
    shown = reviews(review, clinician_a, demo_model, agreed=2, disagreed=1)
    shadow_read(shown[0], split_b, "round_opacity")
    rows = agreement_rows(tenant=clinician_a.tenant)
    with django_assert_num_queries(3):  # the splits, the shadow pairs, the versions
        ab_comparisons(tenant=clinician_a.tenant, rows=rows)
    TrafficSplit.objects.all().delete()
    Result.objects.filter(request__shadow=True).delete()
    with django_assert_num_queries(2):  # nothing to compare: no versions to read
        assert ab_comparisons(tenant=clinician_a.tenant, rows=rows) == []


def test_the_page_shows_both_arms_the_intervals_the_warning_and_the_shadow_pairs(
    client, review, clinician_a, hospital_a, hospital_b, demo_model, split_b
):
    shown = reviews(review, clinician_a, demo_model, agreed=8, disagreed=2)
    reviews(review, clinician_a, split_b, agreed=5, disagreed=5)
    shadow_read(shown[0], split_b, "round_opacity")
    shadow_read(shown[1], split_b, "no_finding")
    admin = membership_grant(
        tenant=hospital_a, user=user_get_or_create(username="hospital-admin", password=PASSWORD), role=Role.TENANT_ADMIN
    )
    client.force_login(admin.user)

    page = client.get("/agreement/").content.decode()

    assert "A/B: sightline-demo 1.0.0 against 1.1.0" in page
    assert "(v1, production)" in page and "(v2, split 50%)" in page
    assert "95% interval" in page and "49%–94%" in page and "24%–76%" in page
    assert f"each version needs at least {AB_MINIMUM_SAMPLE}" in page
    assert 'class="list ab-shadow"' in page and "<td>50%</td>" in page  # 1 of 2 shadow pairs agree
    assert page.count('class="ab-chart"') == 1 and page.count('class="interval"') == 3

    other_admin = membership_grant(
        tenant=hospital_b, user=user_get_or_create(username="admin-b", password=PASSWORD), role=Role.TENANT_ADMIN
    )
    client.force_login(other_admin.user)
    assert "A/B:" not in client.get("/agreement/").content.decode()
    client.force_login(clinician_a.user)
    assert client.get("/agreement/").status_code == 403


def test_the_whole_loop_split_reads_shadows_reviews_and_the_page(arms, clinician_a, hospital_a, client, settings):
    """Real reads by the worker (arm B says the other label), clinicians sign what they see."""
    a, _ = arms
    settings.SIGHTLINE_MAX_BATCH_SIZE = 4
    traffic_split_shadow_set(tenant=clinician_a.tenant, model=a.model, shadow_percent=100)
    images = upload(clinician_a, 6)
    read_everything_queued()
    for image in images:
        review_save(membership=clinician_a, image_id=image.pk, verdict=AGREE, sign_off=True)

    (comparison,) = comparisons_of(clinician_a.tenant)
    assert comparison.a.clinicians.n + comparison.b.clinicians.n == len(images)
    assert (comparison.shadow.n, comparison.shadow.agreed) == (len(images), 0)  # the swapped labels never agree

    admin = membership_grant(
        tenant=hospital_a, user=user_get_or_create(username="hospital-admin", password=PASSWORD), role=Role.TENANT_ADMIN
    )
    client.force_login(admin.user)
    page = client.get("/agreement/").content.decode()
    assert "A/B: sightline-demo 1.0.0 against 1.1.0" in page and "Too few shadow reads" in page


def test_the_chart_draws_each_share_with_its_interval_and_escapes_its_text():
    arm = ABArm(version_id=1, version="<b>1</b>", serial=1, role="", clinicians=Proportion(n=10, agreed=8))
    unreviewed = ABArm(version_id=2, version="2", serial=2, role="", clinicians=Proportion(n=0, agreed=0))
    chart = ab_svg(ABComparison(model="m&m", a=arm, b=unreviewed, shadow=Proportion(n=4, agreed=2), live=True))
    assert chart.startswith("<svg") and chart.count('class="ab-row"') == 3
    assert chart.count('class="interval"') == 2  # nothing counted, nothing drawn
    assert "<b>" not in chart and "&lt;b&gt;1&lt;/b&gt;" in chart and "m&amp;m" in chart
    assert "95% interval 49%–94%" in chart  # the numbers are in the chart's text alternative too
