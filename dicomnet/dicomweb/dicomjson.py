"""DICOM JSON (PS3.18 F.2) for QIDO-RS answers built from the records, and the STOW-RS answer.

The records keep no patient name and only a keyed pseudonym for the patient id (core/pseudonym.py),
so a QIDO answer carries neither (see README, "DICOMweb"); the identifiers stay in the stored
originals, which WADO-RS serves to the hospital's reading roles and its registered nodes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

# the numeric string VRs DICOM JSON writes as JSON numbers (PS3.18 F.2.3)
_NUMBER_VRS = {"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"}


def element(keyword: str, *values) -> tuple[str, dict]:
    """One attribute in DICOM JSON: (its tag as 8 hex digits, {"vr", "Value"}); no value → empty."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    vr = dictionary_VR(tag)
    kept = [value for value in values if value not in (None, "")]
    attribute: dict = {"vr": vr}
    if kept:
        if vr in _NUMBER_VRS:
            attribute["Value"] = [int(value) if vr not in {"DS", "FL", "FD"} else float(value) for value in kept]
        elif vr == "PN":
            attribute["Value"] = [{"Alphabetic": str(value)} for value in kept]
        elif vr == "SQ":
            attribute["Value"] = kept
        else:
            attribute["Value"] = [str(value) for value in kept]
    return f"{tag:08X}", attribute


def dataset(pairs: Iterable[tuple[str, dict]]) -> dict:
    return dict(sorted(pairs))


def tag_keyword(name: str) -> str | None:
    """The keyword a query names by keyword ("StudyDate") or tag ("00080020"); None if neither."""
    if tag_for_keyword(name) is not None:
        return name
    if len(name) == 8:
        try:
            keyword = keyword_for_tag(int(name, 16))
        except ValueError:
            return None
        return keyword or None
    return None


@dataclass(frozen=True)
class Level:
    """What a QIDO query at one level returns by default, and what ``includefield`` may add."""

    default: tuple[str, ...]
    optional: tuple[str, ...]


STUDY_DEFAULT = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "RetrieveURL",
)
SERIES_DEFAULT = (
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesInstanceUID",
    "NumberOfSeriesRelatedInstances",
    "RetrieveURL",
)
INSTANCE_DEFAULT = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "RetrieveURL",
)
LEVELS = {
    "study": Level(STUDY_DEFAULT, ("StudyDescription",)),
    "series": Level(SERIES_DEFAULT, ("StudyInstanceUID", "StudyDate", "AccessionNumber", "StudyDescription")),
    "instance": Level(
        INSTANCE_DEFAULT,
        ("AvailableTransferSyntaxUID", "Modality", "SeriesNumber", "StudyDate", "AccessionNumber"),
    ),
}
# identifiers of a level a client needs to address what it found: always in the answer
ALWAYS = {
    "study": ("StudyInstanceUID",),
    "series": ("StudyInstanceUID", "SeriesInstanceUID"),
    "instance": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}


def included(level: str, includefield: list[str]) -> set[str]:
    """The attributes a QIDO answer at ``level`` carries: the defaults, plus what ``includefield``
    names among the optional ones ("all": every optional one). Names the records cannot answer are
    left out (the query's Warning header says which)."""
    spec = LEVELS[level]
    wanted = set(spec.default) | set(ALWAYS[level])
    for name in includefield:
        if name == "all":
            wanted |= set(spec.optional)
        elif (keyword := tag_keyword(name)) in spec.optional:
            wanted.add(keyword)
    return wanted


def stow_response(*, referenced: list[dict], failed: list[dict], retrieve_url: str | None) -> dict:
    """The STOW-RS answer (PS3.18 10.5.3): the stored, the failed (with FailureReason), the study."""
    pairs = []
    if retrieve_url:
        pairs.append(element("RetrieveURL", retrieve_url))
    if failed:
        pairs.append(element("FailedSOPSequence", *failed))
    pairs.append(element("ReferencedSOPSequence", *referenced))
    return dataset(pairs)


def referenced_item(*, sop_class_uid: str, sop_instance_uid: str, retrieve_url: str, warning: int | None) -> dict:
    pairs = [
        element("ReferencedSOPClassUID", sop_class_uid),
        element("ReferencedSOPInstanceUID", sop_instance_uid),
        element("RetrieveURL", retrieve_url),
    ]
    if warning:
        pairs.append(element("WarningReason", warning))
    return dataset(pairs)


def failed_item(*, sop_class_uid: str, sop_instance_uid: str, reason: int) -> dict:
    return dataset(
        [
            element("ReferencedSOPClassUID", sop_class_uid),
            element("ReferencedSOPInstanceUID", sop_instance_uid),
            element("FailureReason", reason),
        ]
    )
