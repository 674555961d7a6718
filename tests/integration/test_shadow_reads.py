"""Shadow reads under a hospital's A/B split: a share of each arm's images is read again by the
other arm, in the bulk lane, through the real worker path (``workers.runner.inference_run``);
the shadow's result is stored but never shown to clinicians (image API and page, worklist,
pushes, the review's target).

Arm B here is the demo package with its labels swapped, so that what it reads is told apart from
what arm A reads without touching any row: on every image the two disagree."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from accounts import events
from accounts.models import AccessEvent
from recognition.models import InferenceRequest, ModelPin, ModelVersion, Result, Study, TrafficSplit
from recognition.services.images import image_upload
from recognition.services.registry import traffic_split_set
from recognition.services.shadow import shadow_bucket, traffic_split_shadow_set
from recognition.services.studies import study_summary_refresh
from tests.conftest import api_client_for, png_bytes, upload_file
from tests.integration.test_registry import run, variant
from workers.runner import inference_run

pytestmark = pytest.mark.django_db

Priority = InferenceRequest.Priority
SHADOW_SHARE = 40  # larger than the default 5%, so that a few images show the rule both ways
IMAGES = 16


@pytest.fixture
def arms(demo_model, demo_package, tmp_path, clinician_a):
    """Hospital A splits 50/50 between the demo model (A, production) and a version that reads
    the other label (B), with ``SHADOW_SHARE``% shadow reads."""
    swapped = variant(demo_package, tmp_path, version="1.1.0", labels=list(reversed(demo_model.labels)))
    run("register_model", str(swapped), "--validate-here")
    b = ModelVersion.objects.get(version="1.1.0")
    traffic_split_set(tenant=clinician_a.tenant, model=demo_model.model, version=b, percent=50)
    traffic_split_shadow_set(tenant=clinician_a.tenant, model=demo_model.model, shadow_percent=SHADOW_SHARE)
    return demo_model, b


def upload(membership, count, seed=0):
    return [
        image_upload(membership=membership, upload=upload_file(png_bytes(seed=seed + i, opacity=i % 2 == 0)))
        for i in range(count)
    ]


def read_shown(settings) -> int:
    """The clinicians' reads alone: one batch per task, and a batch never mixes a clinician's
    reads with bulk work, so the shadow reads they queue still wait afterwards."""
    before = settings.SIGHTLINE_MAX_BATCH_SIZE, settings.SIGHTLINE_MAX_BATCHES_PER_TASK
    settings.SIGHTLINE_MAX_BATCH_SIZE, settings.SIGHTLINE_MAX_BATCHES_PER_TASK = IMAGES, 1
    try:
        return read_everything_queued(shadow=False)
    finally:
        settings.SIGHTLINE_MAX_BATCH_SIZE, settings.SIGHTLINE_MAX_BATCHES_PER_TASK = before


def read_everything_queued(**filters) -> int:
    """What workers do: one task per version with work waiting, until nothing waits (or the
    worker's lane takes none of what waits)."""
    done = 0
    while (waiting := InferenceRequest.objects.filter(status="queued", **filters).order_by("id").first()) is not None:
        ran = inference_run(request_id=waiting.pk)
        if not ran:
            break
        done += ran
    return done


def test_a_share_of_each_arms_images_is_read_again_by_the_other_arm_in_the_bulk_lane(arms, clinician_a, settings):
    a, b = arms
    images = upload(clinician_a, IMAGES)
    assert read_shown(settings) == IMAGES
    shown = {r.image_id: r for r in InferenceRequest.objects.filter(shadow=False)}
    assert {r.model_version_id for r in shown.values()} == {a.pk, b.pk}  # the split sent images to both arms

    shadows = list(InferenceRequest.objects.filter(shadow=True))
    expected = {image.pk for image in images if shadow_bucket(image.pk) < SHADOW_SHARE}
    assert 0 < len(expected) < IMAGES
    assert {s.image_id for s in shadows} == expected and len(shadows) == len(expected)
    for shadow in shadows:
        assert (
            shadow.priority == Priority.BULK
            and shadow.status == "queued"
            and shadow.tenant_id == shown[shadow.image_id].tenant_id
        )
        other = b.pk if shown[shadow.image_id].model_version_id == a.pk else a.pk
        assert shadow.model_version_id == other

    # a bulk-lane worker reads them (it claims bulk work only)
    settings.SIGHTLINE_WORKER_LANE = "bulk"
    assert read_everything_queued() == len(shadows)

    for shadow in InferenceRequest.objects.filter(shadow=True).select_related("result"):
        assert shadow.status == "done"
        shown_result = Result.objects.get(request=shown[shadow.image_id])
        # the other version read the same image: with its labels swapped it says the other thing
        assert shadow.result.image_id == shown_result.image_id
        assert shadow.result.model_version_id != shown_result.model_version_id
        assert shadow.result.top_label != shown_result.top_label
    # a shadow read's result asks for no shadow of its own
    assert InferenceRequest.objects.filter(shadow=True).count() == len(expected)
    assert not InferenceRequest.objects.filter(status="queued").exists()


def test_only_a_clinicians_read_routed_by_a_split_gets_a_shadow(arms, clinician_a, clinician_b):
    a, _ = arms
    traffic_split_shadow_set(tenant=clinician_a.tenant, model=a.model, shadow_percent=100)

    upload(clinician_b, 3)  # hospital B has no split
    bulk = upload(clinician_a, 2, seed=10)  # as a bulk job's reads (they name their alias)
    InferenceRequest.objects.filter(image__in=bulk).update(priority=Priority.BULK)
    read_everything_queued()
    assert not InferenceRequest.objects.filter(shadow=True).exists()

    pin = ModelPin.objects.create(tenant=clinician_a.tenant, model=a.model, version=a)
    upload(clinician_a, 2, seed=20)  # pinned: the pin answers, whatever the split says
    read_everything_queued()
    assert not InferenceRequest.objects.filter(shadow=True).exists()

    pin.delete()
    traffic_split_shadow_set(tenant=clinician_a.tenant, model=a.model, shadow_percent=0)
    upload(clinician_a, 2, seed=30)
    read_everything_queued()
    assert not InferenceRequest.objects.filter(shadow=True).exists()

    traffic_split_shadow_set(tenant=clinician_a.tenant, model=a.model, shadow_percent=100)
    every = upload(clinician_a, 3, seed=40)
    read_everything_queued()
    assert set(InferenceRequest.objects.filter(shadow=True).values_list("image_id", flat=True)) == {
        image.pk for image in every
    }


def test_setting_the_shadow_share_is_logged_and_needs_a_split(arms, clinician_a, clinician_b):
    from core.errors import Invalid

    a, _ = arms
    assert AccessEvent.objects.filter(action="model.split_shadow_change", tenant=clinician_a.tenant).count() == 1
    with pytest.raises(Invalid, match="does not split"):
        traffic_split_shadow_set(tenant=clinician_b.tenant, model=a.model, shadow_percent=5)
    with pytest.raises(Invalid):
        traffic_split_shadow_set(tenant=clinician_a.tenant, model=a.model, shadow_percent=101)


def test_a_shadow_read_is_never_shown_to_clinicians(arms, clinician_a, client, settings):
    a, b = arms
    traffic_split_shadow_set(tenant=clinician_a.tenant, model=a.model, shadow_percent=100)
    images = upload(clinician_a, 4)
    read_shown(settings)
    api = api_client_for(clinician_a)
    client.force_login(clinician_a.user)

    # queued but not read yet: the image's AI read is still the one that was done
    for image in images:
        assert InferenceRequest.objects.filter(image=image, shadow=True, status="queued").exists()
        assert api.get(f"/api/v1/images/{image.pk}/").json()["status"] == "done"
    assert set(Study.objects.filter(images__in=images).values_list("ai_status", flat=True)) == {"done"}

    read_everything_queued()
    # a shadow result more confident than what clinicians were shown still does not lead the study
    Result.objects.filter(request__shadow=True).update(top_probability=0.9999)
    study_summary_refresh({image.study_id for image in images})

    listed = {row["id"]: row for row in api.get("/api/v1/images/").json()["results"]}
    studies = {row["id"]: row for row in api.get("/api/v1/studies/").json()["results"]}
    for image in images:
        shown = Result.objects.select_related("model_version").get(image=image, request__shadow=False)
        other = b if shown.model_version_id == a.pk else a
        detail = api.get(f"/api/v1/images/{image.pk}/").json()
        assert detail["status"] == "done"
        assert [(r["model_version"], r["top_label"]) for r in detail["results"]] == [
            (shown.model_version.version, shown.top_label)
        ]
        assert (detail["top_label"], listed[image.pk]["top_label"]) == (shown.top_label, shown.top_label)
        assert studies[image.study_id]["top_label"] == shown.top_label
        assert studies[image.study_id]["top_probability"] == pytest.approx(shown.top_probability)

        page = client.get(f"/images/{image.pk}/")  # the viewer: the shown version's finding only
        assert page.status_code == 200
        assert shown.model_version.version in page.content.decode()
        assert other.version not in page.content.decode()

        # a review is of what clinicians saw
        response = api.post(f"/api/v1/images/{image.pk}/reviews/", {"verdict": "agree"}, format="json")
        assert response.status_code in (200, 201), response.content
        assert Result.objects.get(reviews__pk=response.json()["id"]).request.shadow is False


def test_a_shadow_read_pushes_nothing_to_the_hospital(arms, clinician_a, django_capture_on_commit_callbacks, settings):
    a, _ = arms
    traffic_split_shadow_set(tenant=clinician_a.tenant, model=a.model, shadow_percent=100)
    (image,) = upload(clinician_a, 1)
    with django_capture_on_commit_callbacks() as shown_read:
        read_shown(settings)
    with django_capture_on_commit_callbacks() as shadow_read:
        read_everything_queued(shadow=True)
    assert Result.objects.filter(image=image).count() == 2

    def messages_after(callbacks) -> list[dict]:
        """The hospital's group on the real channel layer, joined before the callbacks run."""
        layer, group = get_channel_layer(), events.tenant_group(clinician_a.tenant_id)

        async def collect() -> list[dict]:
            channel = await layer.new_channel()
            await layer.group_add(group, channel)
            try:
                await asyncio.get_running_loop().run_in_executor(None, lambda: [c() for c in callbacks])
                got = []
                while True:
                    try:
                        got.append(await asyncio.wait_for(layer.receive(channel), 1))
                    except TimeoutError:
                        return got
            finally:
                await layer.group_discard(group, channel)

        return async_to_sync(collect)()

    shown = Result.objects.get(image=image, request__shadow=False)
    pushed = messages_after(shown_read)
    assert [(m["type"], m.get("top_label")) for m in pushed if m["type"] == "result.ready"] == [
        ("result.ready", shown.top_label)
    ]
    assert messages_after(shadow_read) == []  # no result.ready, no study.updated


def test_staff_set_the_shadow_share_in_the_admin_and_with_the_command(
    arms, client, clinician_a, hospital_a, django_user_model
):
    a, b = arms
    staff = django_user_model.objects.create_superuser("platform", password="x")
    client.force_login(staff)
    split = TrafficSplit.objects.get()
    response = client.post(
        f"/admin/recognition/trafficsplit/{split.pk}/change/",
        {"tenant": hospital_a.pk, "model": a.model_id, "version": b.pk, "percent": 30, "shadow_percent": 20},
    )
    assert response.status_code == 302
    split.refresh_from_db()
    assert (split.percent, split.shadow_percent, split.updated_by) == (30, 20, staff)
    assert AccessEvent.objects.filter(action="model.split_shadow_change", actor=staff).count() == 1

    said = run(
        "model",
        "split",
        "sightline-demo",
        "--hospital",
        hospital_a.slug,
        "--version",
        "1.1.0",
        "--percent",
        "10",
        "--shadow-percent",
        "7",
    )
    assert "7% of each arm's images read by the other too" in said
    assert TrafficSplit.objects.values_list("percent", "shadow_percent").get() == (10, 7)
    assert "(shadow reads 7%)" in run("model", "list")
