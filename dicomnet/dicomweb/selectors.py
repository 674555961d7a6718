"""DICOMweb reads: the hospital's studies, series and instances by UID, and QIDO-RS searches.

Every read goes through the member's hospital (``for_tenant``); a UID of another hospital answers
exactly like a missing one, a 404, and the attempt is logged as denied, as
``accounts.access.tenant_object_get`` does for ids. Every retrieval is logged by the caller, in
the same transaction as the read (views.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date

from django.db.models import Count, Exists, OuterRef, Q, QuerySet

from accounts.access import member_action_record
from accounts.models import AccessEvent, Membership
from core.errors import Invalid, NotFound
from core.pseudonym import PATIENT, patient_pseudonym_of, pseudonym_candidates
from recognition.models import Image, Series, Study

from ..models import DicomNode, Instance
from .dicomjson import tag_keyword

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX = 64
QIDO_LIMIT_DEFAULT = 100  # a page of studies a viewer's study browser shows
QIDO_LIMIT_MAX = 1000  # more per page is refused to a smaller page (and said in a Warning header)
QIDO_OFFSET_MAX = 10**6
RETRIEVE = "dicomweb.retrieve"
# a whole number as a query or a path writes it: ASCII digits only ("²", "٣", "1e3", "--5" are not),
# a sign only where DICOM's IS allows one; at most this many digits (IS itself is 12 characters,
# and int() of a very long string is refused by Python itself)
DIGITS = re.compile(r"[0-9]+")
SIGNED_DIGITS = re.compile(r"[+-]?[0-9]+")
WHOLE_NUMBER_DIGITS = 12
IS_MIN, IS_MAX = -(2**31), 2**31 - 1  # DICOM's IS range (PS3.5 6.2), and the columns' too


def whole_number(value: str, *, what: str, signed: bool = False, code: str = "bad_query") -> int:
    """``value`` as an int when it is a whole number written in ASCII digits; else a 400 saying so."""
    if not (SIGNED_DIGITS if signed else DIGITS).fullmatch(value) or len(value.lstrip("+-0")) > WHOLE_NUMBER_DIGITS:
        example = "a whole number such as 10 or -2" if signed else "a whole number in the digits 0-9, such as 10"
        raise Invalid(f"{what} must be {example}; {value[:20]!r} is not.", code=code)
    return int(value)


def _is_numbers(values: list[str], *, what: str) -> list[int]:
    """Integer String (IS) matching values; one outside IS's range can match nothing and is a 400."""
    numbers = [whole_number(value, what=what, signed=True) for value in values]
    if any(not IS_MIN <= number <= IS_MAX for number in numbers):
        raise Invalid(f"{what} is a DICOM integer string, between {IS_MIN} and {IS_MAX}.", code="bad_query")
    return numbers


def uid_checked(value: str, *, what: str) -> str:
    if not value or len(value) > UID_MAX or not UID.match(value):
        raise Invalid(f"{value[:80]!r} is not a DICOM UID ({what}).", code="bad_uid")
    return value


def _not_found(membership: Membership, request, *, action: str, target_type: str, uid: str, message: str) -> NotFound:
    """What another hospital's UID looks like: a missing one, the attempt logged as denied."""
    member_action_record(
        membership,
        action,
        outcome=AccessEvent.Outcome.DENIED,
        request=request,
        target_type=target_type,
        target_id=uid,
    )
    return NotFound(message)


def instances_of(membership: Membership) -> QuerySet[Instance]:
    return Instance.objects.for_tenant(membership.tenant)


def study_by_uid_get(*, membership: Membership, study_uid: str, request=None, action: str = RETRIEVE) -> Study:
    """The member's hospital's study with this Study Instance UID that holds instances; else a logged 404."""
    uid_checked(study_uid, what="Study Instance UID")
    study = (
        Study.objects.for_tenant(membership.tenant)
        .filter(study_instance_uid=study_uid, dicom_instances__isnull=False)
        .distinct()
        .first()
    )
    if study is None:
        raise _not_found(
            membership, request, action=action, target_type="study", uid=study_uid, message="No such study."
        )
    return study


def series_by_uid_get(
    *, membership: Membership, study: Study, series_uid: str, request=None, action: str = RETRIEVE
) -> Series:
    uid_checked(series_uid, what="Series Instance UID")
    series = (
        Series.objects.for_tenant(membership.tenant)
        .filter(study=study, series_instance_uid=series_uid, dicom_instances__isnull=False)
        .distinct()
        .first()
    )
    if series is None:
        raise _not_found(
            membership, request, action=action, target_type="series", uid=series_uid, message="No such series."
        )
    return series


def instance_get(
    *,
    membership: Membership,
    study_uid: str,
    series_uid: str | None = None,
    instance_uid: str,
    request=None,
    action: str = RETRIEVE,
) -> Instance:
    """One instance of the member's hospital, named by its UIDs (the series may be left out)."""
    uid_checked(study_uid, what="Study Instance UID")
    uid_checked(instance_uid, what="SOP Instance UID")
    found = (
        instances_of(membership)
        .select_related("study", "series")
        .filter(sop_instance_uid=instance_uid, study__study_instance_uid=study_uid)
    )
    if series_uid is not None:
        uid_checked(series_uid, what="Series Instance UID")
        found = found.filter(series__series_instance_uid=series_uid)
    instance = found.first()
    if instance is None:
        raise _not_found(
            membership, request, action=action, target_type="instance", uid=instance_uid, message="No such instance."
        )
    return instance


def instance_frame_image(*, instance: Instance, frame: int) -> Image | None:
    """The display copy of one frame (1-based, as DICOMweb counts) of an instance, if it was made."""
    return (
        Image.objects.for_tenant(instance.tenant_id)
        .filter(study_id=instance.study_id, sop_instance_uid=instance.sop_instance_uid, frame_number=frame - 1)
        .exclude(file="")
        .first()
    )


def is_registered_node(membership: Membership) -> bool:
    """The member is the service account of one of the hospital's active registered DICOM nodes."""
    return (
        DicomNode.objects.for_tenant(membership.tenant)
        .filter(service_account__membership=membership, service_account__revoked_at__isnull=True, is_active=True)
        .exists()
    )


# --- QIDO-RS --------------------------------------------------------------------------------------

# what a query may match on, per level (the attributes the records hold)
MATCHABLE = {
    "study": {"StudyInstanceUID", "StudyDate", "AccessionNumber", "ModalitiesInStudy", "PatientID", "StudyDescription"},
    "series": {"SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription"},
    "instance": {"SOPInstanceUID", "SOPClassUID", "InstanceNumber"},
}
# the query parameters of PS3.18 8.3.4 that are not attributes
CONTROL = {"limit", "offset", "includefield", "fuzzymatching"}


@dataclass
class Query:
    level: str
    limit: int = QIDO_LIMIT_DEFAULT
    offset: int = 0
    includefield: list[str] = field(default_factory=list)
    matches: dict[str, list[str]] = field(default_factory=dict)  # keyword → values, in the hospital's terms
    warnings: list[str] = field(default_factory=list)


def query_parse(params, *, level: str, levels: tuple[str, ...]) -> Query:
    """A QIDO query string: ``levels`` are the levels whose attributes may be matched (a search
    for all series may match study attributes too). Unsupported attributes are ignored and named
    in a Warning (PS3.18 8.3.4.1); anything that is not an attribute is a 400."""
    query = Query(level=level)
    matchable = set().union(*(MATCHABLE[name] for name in levels))
    for name in params:
        values = [value for value in params.getlist(name)]
        if name == "limit" or name == "offset":
            number = whole_number(values[-1], what=name)
            if name == "limit":
                if number < 1:
                    raise Invalid("limit must be at least 1.", code="bad_query")
                if number > QIDO_LIMIT_MAX:
                    query.warnings.append(f"limit reduced to {QIDO_LIMIT_MAX}")
                    number = QIDO_LIMIT_MAX
                query.limit = number
            else:
                if number > QIDO_OFFSET_MAX:
                    raise Invalid(f"offset must be at most {QIDO_OFFSET_MAX}.", code="bad_query")
                query.offset = number
            continue
        if name == "includefield":
            for value in values:
                query.includefield += [part.strip() for part in value.split(",") if part.strip()]
            continue
        if name == "fuzzymatching":
            if values[-1].lower() == "true":
                query.warnings.append("fuzzymatching is not supported")
            continue
        keyword = tag_keyword(name)
        if keyword is None:
            raise Invalid(
                f"{name[:64]!r} is neither a DICOM attribute (keyword or tag) nor a QIDO-RS parameter.",
                code="bad_query",
            )
        if keyword == "Modality" and "study" in levels and level == "study":
            keyword = "ModalitiesInStudy"  # what clients send at the study level as often as not
        if keyword not in matchable:
            query.warnings.append(f"{keyword} is not a supported matching key and was ignored")
            continue
        value = values[-1]
        if value in ("", "*"):  # universal matching: no condition (PS3.4 C.2.2.2.3)
            continue
        query.matches[keyword] = [part for part in re.split(r"[\\,]", value) if part]
    return query


def _wildcard(field_name: str, value: str) -> Q:
    """PS3.4 C.2.2.2.4 wild card matching ("*" any run, "?" one character), case as given."""
    if "*" not in value and "?" not in value:
        return Q(**{field_name: value})
    pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value)
    return Q(**{f"{field_name}__regex": f"^{pattern}$"})


def _any(field_name: str, values: list[str]) -> Q:
    condition = Q()
    for value in values:
        condition |= _wildcard(field_name, value)
    return condition


def _date(value: str) -> date:
    try:
        if len(value) != 8 or not DIGITS.fullmatch(value):
            raise ValueError(value)
        return date(int(value[0:4]), int(value[4:6]), int(value[6:8]))
    except ValueError:
        raise Invalid(f"{value[:20]!r} is not a DICOM date (YYYYMMDD).", code="bad_query") from None


def _date_range(field_name: str, value: str) -> Q:
    """YYYYMMDD, a range YYYYMMDD-YYYYMMDD, or an open one (-YYYYMMDD, YYYYMMDD-) (PS3.4 C.2.2.2.5)."""
    if "-" not in value:
        return Q(**{field_name: _date(value)})
    start, _, end = value.partition("-")
    condition = Q()
    if start:
        condition &= Q(**{f"{field_name}__gte": _date(start)})
    if end:
        condition &= Q(**{f"{field_name}__lte": _date(end)})
    return condition


def _uids(values: list[str], *, what: str) -> list[str]:
    return [uid_checked(value, what=what) for value in values]


def _study_conditions(query: Query, membership: Membership, prefix: str = "") -> Q:
    condition = Q()
    m = query.matches
    if "StudyInstanceUID" in m:
        condition &= Q(**{f"{prefix}study_instance_uid__in": _uids(m["StudyInstanceUID"], what="Study Instance UID")})
    if "StudyDate" in m:
        dates = Q()
        for value in m["StudyDate"]:
            dates |= _date_range(f"{prefix}study_date", value)
        condition &= dates
    if "AccessionNumber" in m:
        condition &= _any(f"{prefix}accession_number", m["AccessionNumber"])
    if "StudyDescription" in m:
        condition &= _any(f"{prefix}description", m["StudyDescription"])
    if "PatientID" in m:
        # the hospital's patient id matches by its keyed pseudonym (every key of the ring); a
        # pseudonym the platform's pages showed matches as it is
        scope = membership.tenant.pk
        candidates = [
            pseudonym
            for value in m["PatientID"]
            for pseudonym in [
                *pseudonym_candidates(value, purpose=PATIENT, scope=scope),
                patient_pseudonym_of(value, scope=scope),
            ]
        ]
        condition &= Q(**{f"{prefix}patient_pseudonym__in": candidates})
    return condition


def _series_conditions(query: Query, prefix: str = "") -> Q:
    condition = Q()
    m = query.matches
    if "SeriesInstanceUID" in m:
        uids = _uids(m["SeriesInstanceUID"], what="Series Instance UID")
        condition &= Q(**{f"{prefix}series_instance_uid__in": uids})
    if "Modality" in m:
        condition &= Q(**{f"{prefix}modality__in": m["Modality"]})
    if "SeriesNumber" in m:
        condition &= Q(**{f"{prefix}number__in": _is_numbers(m["SeriesNumber"], what="SeriesNumber")})
    if "SeriesDescription" in m:
        condition &= _any(f"{prefix}description", m["SeriesDescription"])
    return condition


def _instance_conditions(query: Query) -> Q:
    condition = Q()
    m = query.matches
    if "SOPInstanceUID" in m:
        condition &= Q(sop_instance_uid__in=_uids(m["SOPInstanceUID"], what="SOP Instance UID"))
    if "SOPClassUID" in m:
        condition &= Q(sop_class_uid__in=_uids(m["SOPClassUID"], what="SOP Class UID"))
    if "InstanceNumber" in m:
        condition &= Q(instance_number__in=_is_numbers(m["InstanceNumber"], what="InstanceNumber"))
    return condition


def qido_studies(*, membership: Membership, query: Query) -> list[Study]:
    """The hospital's studies that hold instances and match, by id, one page of them."""
    instances = Instance.objects.for_tenant(membership.tenant)
    studies = Study.objects.for_tenant(membership.tenant).filter(
        Exists(instances.filter(study=OuterRef("pk"))), _study_conditions(query, membership)
    )
    if "ModalitiesInStudy" in query.matches:
        modalities = query.matches["ModalitiesInStudy"]
        studies = studies.filter(Exists(instances.filter(study=OuterRef("pk"), modality__in=modalities)))
    studies = studies.annotate(
        instance_count=Count("dicom_instances", distinct=True),
        series_count=Count("dicom_instances__series", distinct=True),
    ).order_by("id")
    page = list(studies[query.offset : query.offset + query.limit])
    modalities_of: dict[int, set[str]] = {}
    for study_id, modality in (
        instances.filter(study__in=[s.pk for s in page])
        .exclude(modality="")
        .values_list("study_id", "modality")
        .distinct()
    ):
        modalities_of.setdefault(study_id, set()).add(modality)
    for study in page:
        study.modalities = sorted(modalities_of.get(study.pk, ()))
    return page


def qido_series(*, membership: Membership, query: Query, study: Study | None) -> list[Series]:
    instances = Instance.objects.for_tenant(membership.tenant)
    series = Series.objects.for_tenant(membership.tenant).filter(
        Exists(instances.filter(series=OuterRef("pk"))), _series_conditions(query)
    )
    if study is not None:
        series = series.filter(study=study)
    else:
        series = series.filter(_study_conditions(query, membership, prefix="study__"))
        if "ModalitiesInStudy" in query.matches:
            modalities = query.matches["ModalitiesInStudy"]
            series = series.filter(Exists(instances.filter(study=OuterRef("study"), modality__in=modalities)))
    series = (
        series.select_related("study")
        .annotate(instance_count=Count("dicom_instances", distinct=True))
        .order_by("study_id", "number", "id")
    )
    return list(series[query.offset : query.offset + query.limit])


def qido_instances(
    *, membership: Membership, query: Query, study: Study | None, series: Series | None
) -> list[Instance]:
    instances = instances_of(membership).filter(_instance_conditions(query))
    if series is not None:
        instances = instances.filter(series=series)
    elif study is not None:
        instances = instances.filter(study=study).filter(_series_conditions(query, prefix="series__"))
    else:
        instances = instances.filter(
            _study_conditions(query, membership, prefix="study__"), _series_conditions(query, prefix="series__")
        )
    instances = instances.select_related("study", "series").order_by("study_id", "series_id", "instance_number", "id")
    return list(instances[query.offset : query.offset + query.limit])


def retrieval_instances(*, membership: Membership, study: Study, series: Series | None = None) -> QuerySet[Instance]:
    """The instances a WADO-RS retrieval of a study or series sends, in order."""
    instances = instances_of(membership).filter(study=study)
    if series is not None:
        instances = instances.filter(series=series)
    return instances.select_related("study", "series").order_by("series_id", "instance_number", "id")
