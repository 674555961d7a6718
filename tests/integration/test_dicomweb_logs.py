"""DICOMweb lets QIDO-RS name a PatientID or AccessionNumber in the query string; no log line
keeps them: the application's, Django's request warnings (a 400, a 404), and the web server's
access lines (uvicorn's, runserver's) as the settings configure them."""

from __future__ import annotations

import logging

import pytest
from django.conf import settings

from tests.integration.test_dicomweb import CT, CT_PATIENT_ID, client_of, read, stow

pytestmark = pytest.mark.django_db

PATIENT = "PAT-LOGGED-NEVER-7731"
ACCESSION = "ACC-LOGGED-NEVER-5512"


def test_no_log_line_of_a_qido_search_names_the_patient_or_accession(clinician_a, clinician_b, caplog):
    assert stow(client_of(clinician_a), read(CT)).status_code == 200
    client = client_of(clinician_a)
    caplog.set_level(logging.DEBUG)  # every logger, every level
    queries = [
        ("/dicomweb/studies", {"PatientID": PATIENT, "AccessionNumber": ACCESSION}, 200),
        ("/dicomweb/studies", {"PatientID": CT_PATIENT_ID}, 200),
        ("/dicomweb/instances", {"PatientID": PATIENT, "AccessionNumber": ACCESSION}, 200),
        ("/dicomweb/studies", {"PatientID": PATIENT, "StudyDate": "bad"}, 400),  # Django logs a 4xx warning
        ("/dicomweb/studies/1.2.3/series", {"AccessionNumber": ACCESSION}, 404),
        ("/dicomweb/nowhere", {"PatientID": PATIENT}, 404),
    ]
    for path, params, status in queries:
        assert client.get(path, params).status_code == status, (path, params)
    assert client_of(clinician_b).get("/dicomweb/studies", {"AccessionNumber": ACCESSION}).status_code == 200
    assert caplog.records, "the 4xx answers are logged: the capture works"
    text = "\n".join(f"{record.name} {record.getMessage()} {record.__dict__}" for record in caplog.records)
    for secret in (PATIENT, ACCESSION, CT_PATIENT_ID):
        assert secret not in text


def _formatted(logger_name: str, formatter: logging.Formatter, message: str, *args) -> str:
    """A line as ``logger_name``'s configured filters leave it, formatted as its server does."""
    logger = logging.getLogger(logger_name)
    record = logger.makeRecord(logger_name, logging.INFO, __file__, 0, message, args, None)
    for filter_ in logger.filters:
        filter_.filter(record)
    return formatter.format(record)


def test_the_web_servers_access_lines_drop_the_query_string():
    from uvicorn.logging import AccessFormatter

    assert settings.LOGGING["loggers"]["uvicorn.access"]["filters"] == ["redact_query"]
    path = f"/dicomweb/studies?PatientID={PATIENT}&AccessionNumber={ACCESSION}"
    # uvicorn's access line: client, method, path with its query, HTTP version, status
    uvicorn_line = _formatted(
        "uvicorn.access",
        AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False),
        '%s - "%s %s HTTP/%s" %d',
        "127.0.0.1:5555",
        "GET",
        path,
        "1.1",
        200,
    )
    assert "/dicomweb/studies?[redacted]" in uvicorn_line and "200" in uvicorn_line
    # Django's runserver: the request line, status and size
    runserver_line = _formatted("django.server", logging.Formatter("%(message)s"), '"%s" %s %s', f"GET {path}", 200, 9)
    assert "/dicomweb/studies?[redacted]" in runserver_line
    for line in (uvicorn_line, runserver_line):
        assert PATIENT not in line and ACCESSION not in line
