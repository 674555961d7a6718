"""Shadow reads: under a hospital's A/B split, a share of each arm's images is also read by the
other arm, so the two versions can be compared on the same live images.

A split sends each image to one arm (``registry.Routing``): arm B is the split's version, arm A
what the hospital gets without the split (the ``production`` alias). Once an arm's read of a
clinician's upload is stored, the worker queues the other arm's read of the same image
(``shadow_reads_queue``, called inside ``workers.outcomes.outcomes_store``'s transaction) for
the images whose shadow bucket falls under the split's ``shadow_percent``. A shadow read is an
``InferenceRequest`` with ``shadow=True`` in the bulk lane; its ``Result`` is stored like any
other but never shown to clinicians (the selectors, the study summary and the pushes leave it
out) and is counted only in the agreement page's A/B section (``recognition.agreement``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import partial

from django.db import transaction
from django.db.models import Exists, OuterRef, Subquery
from django.utils import timezone

from accounts.services import access_event_record
from core.errors import Invalid

from ..models import AIModel, InferenceRequest, ModelAlias, ModelPin, TrafficSplit
from .inference import inference_enqueue

_BUCKET_BYTES = 4  # of the digest: 32 bits, plenty to spread 0-99 evenly (as registry.split_bucket)


def traffic_split_shadow_set(
    *, tenant, model: AIModel, shadow_percent: int, changed_by=None, request=None
) -> TrafficSplit:
    """Set the share (0-100) of each arm's images of the hospital's split that the other arm also
    reads; 0 turns shadow reads off; refused (400) when the hospital does not split the model. Logged like
    the split itself (``registry.traffic_split_set`` sets the split and leaves this share alone)."""
    if not 0 <= shadow_percent <= 100:
        raise Invalid("Shadow reads take 0-100% of each arm's images.", code="bad_percent")
    with transaction.atomic():
        split = TrafficSplit.objects.for_tenant(tenant).select_for_update().filter(model=model).first()
        if split is None:  # platform staff asking: nothing here is another hospital's to hide
            raise Invalid(f"The hospital does not split {model.name}: set a split first.", code="no_split")
        split.shadow_percent = shadow_percent
        split.updated, split.updated_by = timezone.now(), changed_by or split.updated_by
        split.save(update_fields=["shadow_percent", "updated", "updated_by"])
        access_event_record(
            action="model.split_shadow_change",
            request=request,
            user=changed_by,
            tenant=tenant,
            target_type="model",
            target_id=model.pk,
        )
    return split


def shadow_bucket(image_id: int) -> int:
    """0-99, fixed per image; salted apart from ``registry.split_bucket``, so the images that get a
    shadow read are spread evenly over both arms rather than being the edge of one."""
    digest = hashlib.sha256(f"sightline-shadow:{image_id}".encode()).digest()
    return int.from_bytes(digest[:_BUCKET_BYTES], "big") % 100


def shadow_split_exists() -> Exists:
    """For an InferenceRequest queryset: whether the request's hospital splits its model with
    shadow reads on. The worker reads it with the rows it stores (no statement of its own), so a
    batch where no hospital splits costs nothing more."""
    return Exists(
        TrafficSplit.objects.filter(
            tenant=OuterRef("tenant"), model__versions=OuterRef("model_version"), shadow_percent__gt=0
        )
    )


def _split_routed(request: InferenceRequest) -> bool:
    """A clinician's upload read as routed (not a protocol read naming its version, not a bulk
    job's read of the alias it names, not itself a shadow read) that succeeded."""
    return (
        request.status == InferenceRequest.Status.DONE
        and not request.shadow
        and not request.protocol
        and request.priority == InferenceRequest.Priority.INTERACTIVE
    )


def shadow_reads_queue(requests: Iterable[InferenceRequest]) -> list[InferenceRequest]:
    """The other arm's read of each of these finished requests that is due one; created in the
    caller's transaction and woken after commit. The caller passes the requests under a split
    (``shadow_split_exists``); for them, one statement reads the splits (each with its production
    version and whether a pin overrides it), two more when some are due (the shadow reads already
    made, the INSERT). None when nothing is passed."""
    candidates = [request for request in requests if _split_routed(request)]
    if not candidates:
        return []
    production = ModelAlias.objects.filter(model=OuterRef("model"), name=ModelAlias.Name.PRODUCTION)
    pinned = ModelPin.objects.filter(tenant=OuterRef("tenant"), model=OuterRef("model"))
    splits = {
        (split.tenant_id, split.model_id): split
        for split in TrafficSplit.objects.filter(
            tenant_id__in={request.tenant_id for request in candidates},
            model_id__in={request.model_version.model_id for request in candidates},
            shadow_percent__gt=0,
        ).annotate(production_id=Subquery(production.values("version_id")[:1]), pinned=Exists(pinned))
    }
    due: list[InferenceRequest] = []
    for request in candidates:
        split = splits.get((request.tenant_id, request.model_version.model_id))
        if split is None or split.pinned or split.production_id is None:
            continue  # no split, or a pin answers for the hospital whatever the split says
        arms = (split.production_id, split.version_id)
        if request.model_version_id not in arms or split.production_id == split.version_id:
            continue  # read by a version that is neither arm (the alias moved meanwhile)
        if shadow_bucket(request.image_id) >= split.shadow_percent:
            continue
        other = arms[1] if request.model_version_id == arms[0] else arms[0]
        due.append(
            InferenceRequest(
                tenant_id=request.tenant_id,
                image_id=request.image_id,
                model_version_id=other,
                priority=InferenceRequest.Priority.BULK,
                shadow=True,
            )
        )
    if not due:
        return []
    made = set(
        InferenceRequest.objects.filter(image_id__in={shadow.image_id for shadow in due}, shadow=True).values_list(
            "image_id", "model_version_id"
        )
    )
    due = [shadow for shadow in due if (shadow.image_id, shadow.model_version_id) not in made]
    created = InferenceRequest.objects.bulk_create(due)
    # robust: a broker outage must not undo the stored results; the requests stay queued in the
    # database, which beat's reconciliation wakes
    for shadow in created:
        transaction.on_commit(partial(_wake, shadow.pk, shadow.model_version_id), robust=True)
    return created


def _wake(request_id: int, model_version_id: int) -> None:
    inference_enqueue(request_id, InferenceRequest.Priority.BULK, model_version_id=model_version_id)
