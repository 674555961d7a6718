"""Who and what an access-log entry is about: a person, a patient, a study, as query conditions.

A person is a user or the name typed at a failed sign-in; a patient or a study is every study,
image and review of theirs (the log names targets by type and id as text). The lookups read
recognition's records, which is why they live here, above both apps, and not in accounts/.
"""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.db.models import Q, QuerySet

from accounts.models import Tenant
from core.errors import Invalid
from core.pseudonym import PATIENT, USERNAME, pseudonym_candidates
from recognition.models import Image, Review, Study

# A patient's or study's targets go into the query as id lists, one per kind. Three lists of
# this many stay far inside SQLite's 32,766 parameters per statement; a patient with more
# images than this is refused with a hint to filter by study, never silently cut short.
ACCESS_LOG_TARGETS_MAX = 5000


def person_match(person: str) -> Q:
    """Entries by the user of that name, or failed sign-ins that typed it: a failed sign-in keeps
    the keyed hash of the name typed, so what is asked is hashed under every key of the ring
    (and the name itself, for entries written before names were hashed)."""
    labels = [person, *pseudonym_candidates(person, purpose=USERNAME)]
    by_label = Q(actor__isnull=True, actor_label__in=labels)
    user_id = get_user_model().objects.filter(username=person).values_list("pk", flat=True).first()
    return Q(actor_id=user_id) | by_label if user_id is not None else by_label


def _target_ids(queryset: QuerySet, kind: str) -> list[str]:
    ids = list(queryset.values_list("pk", flat=True)[: ACCESS_LOG_TARGETS_MAX + 1])
    if len(ids) > ACCESS_LOG_TARGETS_MAX:
        raise Invalid(
            f"This matches more than {ACCESS_LOG_TARGETS_MAX:,} {kind}; filter by one study instead.",
            code="too_many_targets",
        )
    return [str(pk) for pk in ids]


def _patient_pseudonyms(*, tenant_id: int | None, patient: str) -> Q:
    """The patient as shown (a pseudonym) or as the hospital knows them (a raw patient id, hashed
    under every key of the pseudonym ring for each hospital in scope: pseudonyms are per hospital)."""
    tenant_ids = [tenant_id] if tenant_id is not None else list(Tenant.objects.values_list("pk", flat=True))
    match = Q(patient_pseudonym=patient)
    for pk in tenant_ids:
        match |= Q(tenant_id=pk, patient_pseudonym__in=pseudonym_candidates(patient, purpose=PATIENT, scope=pk))
    return match


def about_targets(*, tenant_id: int | None, patient: str, study: int | None) -> Q:
    """Entries whose target is one of the patient's (or the study's) studies, their images or
    those images' reviews. Targets are logged as (type, id as text), so the ids are listed."""
    studies = Study.objects.all() if tenant_id is None else Study.objects.for_tenant(tenant_id)
    if patient:
        studies = studies.filter(_patient_pseudonyms(tenant_id=tenant_id, patient=patient))
    if study is not None:
        studies = studies.filter(pk=study)
    study_ids = _target_ids(studies, "studies")
    if study is not None and not patient:
        # the id itself too: a denied attempt on a study that is not (or no longer) there
        study_ids = [str(study)]
    images = Image.objects.filter(study_id__in=study_ids)
    image_ids = _target_ids(images if tenant_id is None else images.filter(tenant_id=tenant_id), "images")
    reviews = Review.objects.filter(image_id__in=image_ids)
    review_ids = _target_ids(reviews if tenant_id is None else reviews.filter(tenant_id=tenant_id), "reviews")
    about = Q(pk__in=[])
    for kind, ids in (("study", study_ids), ("image", image_ids), ("review", review_ids)):
        if ids:
            about |= Q(target_type=kind, target_id__in=ids)
    return about
