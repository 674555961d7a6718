"""Agreement per model version: what counts (current signed reviews), per hospital, as CSV and SVG."""

import re
from datetime import timedelta

import pytest
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.safestring import mark_safe

from recognition.agreement import AgreementRow, agreement_csv, agreement_rows, agreement_svg
from recognition.models import AIModel, InferenceRequest, ModelVersion, Result, Review
from recognition.services.images import image_upload
from tests.conftest import png_bytes, upload_file

pytestmark = pytest.mark.django_db

AGREE, DISAGREE, CORRECT = Review.Verdict.AGREE, Review.Verdict.DISAGREE, Review.Verdict.CORRECT


def other_version(demo_model, version, *, model=None, days_later=1):
    """A registry row only (nothing loads it): the demo package's fields under another version."""
    return ModelVersion.objects.create(
        model=model or demo_model.model,
        version=version,
        manifest={**demo_model.manifest, "version": version},
        package=demo_model.package.name,
        weights_sha256=demo_model.weights_sha256,
        package_sha256=demo_model.package_sha256,
        created=demo_model.created + timedelta(days=days_later),
    )


@pytest.fixture
def review(demo_model):
    """review(membership, version, ai_label, verdict): a fresh image read by ``version``, reviewed."""
    seeds = iter(range(1000))

    def make(membership, version, ai_label, verdict, *, signed=True, amends=None, label=""):
        if amends is not None:
            image, result = amends.image, amends.result
        else:
            image = image_upload(membership=membership, upload=upload_file(png_bytes(seed=next(seeds))))
            request, _ = InferenceRequest.objects.get_or_create(
                image=image, model_version=version, defaults={"tenant": image.tenant}
            )
            result = Result.objects.create(
                tenant=image.tenant,
                request=request,
                image=image,
                model_version=version,
                probabilities={ai_label: 0.9},
                top_label=ai_label,
                top_probability=0.9,
            )
        return Review.objects.create(
            tenant=membership.tenant,
            image=image,
            result=result,
            model_version=version,
            ai_label=ai_label,
            verdict=verdict,
            label=label or (ai_label if verdict == AGREE else "other"),
            author=membership.user,
            signed_off_at=timezone.now() if signed else None,
            signed_off_by=membership.user if signed else None,
            amends=amends,
        )

    return make


def as_tuples(rows):
    return [(r.model, r.version, r.label, r.reviewed, r.agreed, r.disagreed, r.corrected) for r in rows]


def test_counts_and_shares_per_version_and_per_label(review, clinician_a, demo_model):
    newer = other_version(demo_model, "1.1.0")
    for verdict in (AGREE, AGREE, AGREE, DISAGREE):
        review(clinician_a, demo_model, "round_opacity", verdict)
    review(clinician_a, demo_model, "no_finding", AGREE)
    review(clinician_a, demo_model, "no_finding", CORRECT)
    review(clinician_a, newer, "round_opacity", DISAGREE)
    review(clinician_a, newer, "round_opacity", CORRECT)

    rows = agreement_rows(tenant=clinician_a.tenant)

    assert as_tuples(rows) == [
        ("sightline-demo", "1.0.0", "", 6, 4, 1, 1),
        ("sightline-demo", "1.0.0", "no_finding", 2, 1, 0, 1),
        ("sightline-demo", "1.0.0", "round_opacity", 4, 3, 1, 0),
        ("sightline-demo", "1.1.0", "", 2, 0, 1, 1),
        ("sightline-demo", "1.1.0", "round_opacity", 2, 0, 1, 1),
    ]
    assert [row.share for row in rows] == [4 / 6, 0.5, 0.75, 0.0, 0.0]
    assert [row.share_percent for row in rows] == ["67%", "50%", "75%", "0%", "0%"]
    assert [row.is_total for row in rows] == [True, False, False, True, False]


def test_share_is_none_when_nothing_was_reviewed():
    empty = AgreementRow(model="m", version="1", label="", reviewed=0, agreed=0, disagreed=0, corrected=0)
    assert empty.share is None and empty.share_percent == "—"


def test_the_selector_is_one_query(review, clinician_a, demo_model, django_assert_num_queries):
    newer = other_version(demo_model, "1.1.0")
    review(clinician_a, demo_model, "round_opacity", AGREE)
    review(clinician_a, newer, "no_finding", DISAGREE)
    with django_assert_num_queries(1):
        rows = agreement_rows(tenant=clinician_a.tenant)
    assert len(rows) == 4


def test_versions_come_by_model_name_then_registration_not_by_version_text(review, clinician_a, demo_model):
    registered_later = other_version(demo_model, "0.9.0", days_later=2)
    alpha = other_version(demo_model, "5.0.0", model=AIModel.objects.create(name="alpha-model"), days_later=3)
    for version in (registered_later, demo_model, alpha):
        review(clinician_a, version, "round_opacity", AGREE)

    totals = [(row.model, row.version) for row in agreement_rows() if row.is_total]

    assert totals == [("alpha-model", "5.0.0"), ("sightline-demo", "1.0.0"), ("sightline-demo", "0.9.0")]


def test_drafts_do_not_count(review, clinician_a, demo_model):
    review(clinician_a, demo_model, "round_opacity", AGREE)
    review(clinician_a, demo_model, "round_opacity", DISAGREE, signed=False)
    review(clinician_a, demo_model, "no_finding", AGREE, signed=False)

    assert as_tuples(agreement_rows(tenant=clinician_a.tenant)) == [
        ("sightline-demo", "1.0.0", "", 1, 1, 0, 0),
        ("sightline-demo", "1.0.0", "round_opacity", 1, 1, 0, 0),
    ]


def test_a_review_without_an_ai_label_counts_in_its_total_only_and_one_without_a_version_not_at_all(
    review, clinician_a, demo_model
):
    review(clinician_a, demo_model, "round_opacity", AGREE)
    review(clinician_a, demo_model, "", DISAGREE)
    unattributed = review(clinician_a, demo_model, "round_opacity", DISAGREE, signed=False)
    Review.objects.filter(pk=unattributed.pk).update(model_version=None, signed_off_at=timezone.now())

    assert as_tuples(agreement_rows(tenant=clinician_a.tenant)) == [
        ("sightline-demo", "1.0.0", "", 2, 1, 1, 0),
        ("sightline-demo", "1.0.0", "round_opacity", 1, 1, 0, 0),
    ]


def test_nothing_signed_means_no_rows(review, clinician_a, demo_model):
    review(clinician_a, demo_model, "round_opacity", AGREE, signed=False)
    assert agreement_rows(tenant=clinician_a.tenant) == []


def test_a_signed_amendment_replaces_what_it_amends(review, clinician_a, demo_model):
    first = review(clinician_a, demo_model, "round_opacity", AGREE)
    second = review(clinician_a, demo_model, "round_opacity", DISAGREE, amends=first)
    review(clinician_a, demo_model, "round_opacity", CORRECT, amends=second, label="no_finding")

    assert as_tuples(agreement_rows(tenant=clinician_a.tenant)) == [
        ("sightline-demo", "1.0.0", "", 1, 0, 0, 1),
        ("sightline-demo", "1.0.0", "round_opacity", 1, 0, 0, 1),
    ]


def test_a_draft_amendment_replaces_nothing_yet(review, clinician_a, demo_model):
    first = review(clinician_a, demo_model, "round_opacity", AGREE)
    second = review(clinician_a, demo_model, "round_opacity", DISAGREE, amends=first)
    review(clinician_a, demo_model, "round_opacity", AGREE, amends=second, signed=False)

    assert as_tuples(agreement_rows(tenant=clinician_a.tenant)) == [
        ("sightline-demo", "1.0.0", "", 1, 0, 1, 0),
        ("sightline-demo", "1.0.0", "round_opacity", 1, 0, 1, 0),
    ]


def test_each_hospital_counts_only_its_own_reviews_and_staff_count_all(review, clinician_a, clinician_b, demo_model):
    review(clinician_a, demo_model, "round_opacity", AGREE)
    review(clinician_a, demo_model, "round_opacity", AGREE)
    review(clinician_b, demo_model, "round_opacity", DISAGREE)

    assert as_tuples(agreement_rows(tenant=clinician_a.tenant))[0] == ("sightline-demo", "1.0.0", "", 2, 2, 0, 0)
    assert as_tuples(agreement_rows(tenant=clinician_b.tenant))[0] == ("sightline-demo", "1.0.0", "", 1, 0, 1, 0)
    assert as_tuples(agreement_rows(tenant=None)) == [
        ("sightline-demo", "1.0.0", "", 3, 2, 1, 0),
        ("sightline-demo", "1.0.0", "round_opacity", 3, 2, 1, 0),
    ]


def test_csv_has_the_header_and_one_line_per_row(review, clinician_a, demo_model):
    for verdict in (AGREE, AGREE, DISAGREE):
        review(clinician_a, demo_model, "round_opacity", verdict)

    lines = list(agreement_csv(agreement_rows(tenant=clinician_a.tenant)))

    assert lines == [
        "model,version,label,reviewed,agreed,disagreed,corrected,agreement\r\n",
        "sightline-demo,1.0.0,,3,2,1,0,0.667\r\n",
        "sightline-demo,1.0.0,round_opacity,3,2,1,0,0.667\r\n",
    ]


def test_csv_leaves_the_share_empty_when_nothing_was_reviewed():
    empty = AgreementRow(model="m", version="1", label="", reviewed=0, agreed=0, disagreed=0, corrected=0)
    assert list(agreement_csv([empty]))[1] == "m,1,,0,0,0,0,\r\n"


def test_csv_neutralises_formulas_in_text_cells(review, clinician_a, demo_model):
    hostile = other_version(demo_model, "+1.0", model=AIModel.objects.create(name="@model"))
    review(clinician_a, hostile, "=cmd()", AGREE)
    review(clinician_a, hostile, "-2+3", DISAGREE)

    lines = list(agreement_csv(agreement_rows(tenant=clinician_a.tenant)))

    assert lines[1:] == [
        "'@model,'+1.0,,2,1,1,0,0.500\r\n",
        "'@model,'+1.0,'-2+3,1,0,1,0,0.000\r\n",
        "'@model,'+1.0,'=cmd(),1,1,0,0,1.000\r\n",
    ]


def test_the_chart_has_one_bar_per_version_and_escapes_its_text(review, clinician_a, demo_model):
    hostile = other_version(demo_model, "<script>alert(1)</script>")
    review(clinician_a, demo_model, "round_opacity", AGREE)
    review(clinician_a, demo_model, "round_opacity", DISAGREE)
    review(clinician_a, demo_model, "no_finding", AGREE)
    review(clinician_a, hostile, '"><img src=x>', AGREE)

    svg = agreement_svg(agreement_rows(tenant=clinician_a.tenant))

    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert 'role="img"' in svg and 'width="640"' in svg
    assert "<title>Agreement per model version</title>" in svg
    assert svg.count('class="share"') == 2
    assert re.findall(r'class="share" x="0" y="\d+" width="(\d+)"', svg) == ["427", "640"]
    assert "sightline-demo 1.0.0 — 67% of 3" in svg
    assert "&lt;script&gt;alert(1)&lt;/script&gt; — 100% of 1" in svg
    assert "<script" not in svg and "<img" not in svg
    aria = re.search(r'aria-label="([^"]*)"', svg).group(1)
    assert "sightline-demo 1.0.0 — 67% of 3" in aria and "&lt;script&gt;" in aria


def test_the_chart_is_empty_without_rows():
    assert agreement_svg([]) == ""


def page(**context):
    defaults = {
        "rows": [],
        "chart": "",
        "csv_url": "/agreement.csv",
        "is_staff": False,
        "tenants": [],
        "tenant_slug": "",
    }
    return render_to_string("recognition/agreement.html", {**defaults, **context})


def test_the_page_shows_the_chart_and_a_table_with_totals_in_bold(review, clinician_a, demo_model):
    review(clinician_a, demo_model, "round_opacity", AGREE)
    review(clinician_a, demo_model, "<b>odd</b>", DISAGREE)
    rows = agreement_rows(tenant=clinician_a.tenant)

    chart = mark_safe(agreement_svg(rows))  # noqa: S308  (agreement_svg escapes every text it writes)
    html = page(rows=rows, chart=chart, csv_url="/agreement.csv?tenant=x&amp=1")

    assert "Agreement per model version</h1>" in html
    assert 'href="/agreement.csv?tenant=x&amp;amp=1"' in html and "Download CSV" in html
    assert html.count('<rect class="share"') == 1
    assert '<tr class="total">' in html and "<strong>sightline-demo 1.0.0</strong>" in html
    assert html.count('<tr class="per-label">') == 2 and "&lt;b&gt;odd&lt;/b&gt;" in html
    assert "<strong>50%</strong>" in html
    assert "style=" not in html and 'name="tenant"' not in html


def test_the_page_offers_staff_a_hospital_filter(hospital_a, hospital_b):
    html = page(is_staff=True, tenants=[("demo-general", "Demo General"), ("demo-childrens", "Demo Children's")])

    assert '<select id="agreement-tenant" name="tenant">' in html
    assert '<option value="" selected>All hospitals</option>' in html
    assert '<option value="demo-general">Demo General</option>' in html
    assert "No signed-off reviews yet." in html

    chosen = page(is_staff=True, tenants=[("demo-general", "Demo General")], tenant_slug="demo-general")
    assert '<option value="demo-general" selected>Demo General</option>' in chosen
    assert '<option value="" selected>' not in chosen
