"""The patient pseudonym key: a key of its own, 128 bits of output, a ring for rotation.

Rotation as an operator does it: studies made under key A, then SIGHTLINE_PSEUDONYM_KEY=B with
A in SIGHTLINE_PSEUDONYM_KEY_FALLBACKS; and DJANGO_SECRET_KEY rotated on its own, which must
not touch a single pseudonym.
"""

from __future__ import annotations

import hashlib
import hmac
import subprocess
import sys

import pytest
from pydicom.uid import generate_uid

from core.pseudonym import PATIENT, key_id_of, pseudonym_candidates, pseudonym_for
from recognition.models import Image, Study
from tests.conftest import PRODUCTION_SECRET, api_client_for, production_env
from tests.integration.test_workspace import post_file
from tests.unit.test_dicom import PATIENT_ID, ct_dataset, to_bytes

pytestmark = pytest.mark.django_db

KEY_A = "pseudonym-key-A-" + "a" * 40
KEY_B = "pseudonym-key-B-" + "b" * 40


def upload_ct(membership, **attrs) -> Image:
    response = post_file(api_client_for(membership), to_bytes(ct_dataset(**attrs)))
    assert response.status_code == 201, response.json()
    return Image.objects.select_related("study").get(pk=response.json()["id"])


def test_the_pseudonym_has_a_key_of_its_own_and_128_bits(settings, clinician_a, demo_model):
    settings.SIGHTLINE_PSEUDONYM_KEY = KEY_A
    study = upload_ct(clinician_a).study
    prefix, key_id, digest = study.patient_pseudonym.split("-")
    assert (prefix, key_id) == ("P", key_id_of(KEY_A))
    assert len(digest) == 32 and int(digest, 16) >= 0  # 128 bits, hex
    old_scheme = hmac.new(
        settings.SECRET_KEY.encode(), f"{clinician_a.tenant_id}:{PATIENT_ID}".encode(), hashlib.sha256
    ).hexdigest()
    assert old_scheme[:12].upper() not in study.patient_pseudonym and PATIENT_ID not in study.patient_pseudonym
    # the site secret plays no part: rotating it leaves the pseudonym as it was
    settings.SECRET_KEY = "an-entirely-different-site-secret-" + "x" * 40
    assert pseudonym_for(PATIENT_ID, purpose=PATIENT, scope=clinician_a.tenant_id) == study.patient_pseudonym


def test_after_rotation_a_new_file_of_an_old_study_joins_it_and_a_new_study_uses_the_new_key(
    settings, clinician_a, demo_model
):
    settings.SIGHTLINE_PSEUDONYM_KEY = KEY_A
    first = upload_ct(clinician_a, AccessionNumber="ACC-ROT", SeriesNumber=1)
    # a study found by accession only: it has no Study Instance UID (one with another UID would be
    # another study, refused)
    by_accession = upload_ct(clinician_a, AccessionNumber="ACC-ROT-2", StudyInstanceUID="")
    under_a = first.study.patient_pseudonym

    settings.SIGHTLINE_PSEUDONYM_KEY, settings.SIGHTLINE_PSEUDONYM_KEY_FALLBACKS = KEY_B, [KEY_A]
    same_study = upload_ct(
        clinician_a, AccessionNumber="ACC-ROT", SeriesNumber=2, StudyInstanceUID=first.study.study_instance_uid
    )
    assert same_study.study_id == first.study_id  # no 409, no second identity
    assert Study.objects.get(pk=first.study_id).patient_pseudonym == under_a
    again = upload_ct(clinician_a, AccessionNumber="ACC-ROT-2", StudyInstanceUID=generate_uid())
    assert again.study_id == by_accession.study_id  # the accession's study, made under A

    new_study = upload_ct(clinician_a, AccessionNumber="ACC-NEW")
    assert new_study.study.patient_pseudonym == pseudonym_for(PATIENT_ID, purpose=PATIENT, scope=clinician_a.tenant_id)
    assert new_study.study.patient_pseudonym.split("-")[1] == key_id_of(KEY_B) != key_id_of(KEY_A)

    # a search by the patient's own id finds the studies under both keys
    client = api_client_for(clinician_a)
    found = client.post("/api/v1/studies/search/", {"q": PATIENT_ID}, format="json").json()["results"]
    assert {row["accession_number"] for row in found} == {"ACC-ROT", "ACC-ROT-2", "ACC-NEW"}


def test_without_the_old_key_in_the_ring_the_old_study_is_another_patients(settings, clinician_a, demo_model):
    settings.SIGHTLINE_PSEUDONYM_KEY = KEY_A
    first = upload_ct(clinician_a, AccessionNumber="ACC-GONE")
    settings.SIGHTLINE_PSEUDONYM_KEY, settings.SIGHTLINE_PSEUDONYM_KEY_FALLBACKS = KEY_B, []
    refused = post_file(
        api_client_for(clinician_a),
        to_bytes(ct_dataset(AccessionNumber="ACC-GONE", StudyInstanceUID=first.study.study_instance_uid)),
    )
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "study_patient_mismatch"


def test_the_legacy_48_bit_pseudonyms_are_found_but_never_made(settings, clinician_a, demo_model):
    old_secret = "the-site-secret-before-the-upgrade-" + "z" * 30
    tenant_id = clinician_a.tenant_id
    digest = hmac.new(old_secret.encode(), f"{tenant_id}:{PATIENT_ID}".encode(), hashlib.sha256).hexdigest()
    legacy = "P-" + digest[:12].upper()  # what the old release computed
    first = upload_ct(clinician_a, AccessionNumber="ACC-LEGACY")
    Study.objects.filter(pk=first.study_id).update(patient_pseudonym=legacy)  # as an old release stored it

    settings.SIGHTLINE_PSEUDONYM_LEGACY_SECRET_KEYS = [old_secret]
    assert legacy in pseudonym_candidates(PATIENT_ID, purpose=PATIENT, scope=tenant_id)
    assert pseudonym_for(PATIENT_ID, purpose=PATIENT, scope=tenant_id) != legacy
    joined = upload_ct(clinician_a, AccessionNumber="ACC-LEGACY", StudyInstanceUID=first.study.study_instance_uid)
    assert joined.study_id == first.study_id


def test_a_development_key_is_labelled_and_the_ring_refuses_a_short_key(settings):
    from django.core.exceptions import ImproperlyConfigured

    from config.settings import local, test

    assert "not-a-secret" in test.SIGHTLINE_PSEUDONYM_KEY and "not-a-secret" in local.SIGHTLINE_PSEUDONYM_KEY
    settings.SIGHTLINE_PSEUDONYM_KEY = "too-short"
    with pytest.raises(ImproperlyConfigured, match="at least 32"):
        pseudonym_for("x", purpose=PATIENT)
    settings.SIGHTLINE_PSEUDONYM_KEY = None
    with pytest.raises(ImproperlyConfigured, match="SIGHTLINE_PSEUDONYM_KEY"):
        pseudonym_for("x", purpose=PATIENT)


def production_process(code: str, **environment) -> subprocess.CompletedProcess:
    """Python started the way a bare worker is: the project's default settings, its environment."""
    unset = dict.fromkeys(("DJANGO_SETTINGS_MODULE", "DJANGO_SECRET_KEY", "SIGHTLINE_PSEUDONYM_KEY", "ALLOWED_HOSTS"))
    env = production_env(**{**unset, **environment})
    from django.conf import settings

    return subprocess.run(
        [sys.executable, "-c", code], cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=120
    )


SECRET = PRODUCTION_SECRET
WORKER = (
    "import workers.celery, django; django.setup(); from django.conf import settings; print(settings.SETTINGS_MODULE)"
)


def test_a_worker_started_bare_runs_production_settings_and_refuses_to_start_without_the_key():
    missing = production_process(WORKER, DJANGO_SECRET_KEY=SECRET, ALLOWED_HOSTS="sightline.example.org")
    assert missing.returncode != 0 and "SIGHTLINE_PSEUDONYM_KEY" in missing.stderr
    site_secret = production_process(
        WORKER, DJANGO_SECRET_KEY=SECRET, ALLOWED_HOSTS="sightline.example.org", SIGHTLINE_PSEUDONYM_KEY=SECRET
    )
    assert site_secret.returncode != 0 and "must differ from DJANGO_SECRET_KEY" in site_secret.stderr
    short = production_process(
        WORKER, DJANGO_SECRET_KEY=SECRET, ALLOWED_HOSTS="sightline.example.org", SIGHTLINE_PSEUDONYM_KEY="short"
    )
    assert short.returncode != 0 and "at least 32" in short.stderr
    started = production_process(
        WORKER, DJANGO_SECRET_KEY=SECRET, ALLOWED_HOSTS="sightline.example.org", SIGHTLINE_PSEUDONYM_KEY=KEY_A
    )
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == "config.settings.production"


def test_the_site_secret_rotates_with_fallbacks_from_the_environment():
    code = "import django; django.setup(); from django.conf import settings; print(settings.SECRET_KEY_FALLBACKS)"
    shown = production_process(
        code,
        DJANGO_SETTINGS_MODULE="config.settings.test",
        DJANGO_SECRET_KEY=SECRET,
        DJANGO_SECRET_KEY_FALLBACKS="old-secret-one,old-secret-two",
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "['old-secret-one', 'old-secret-two']"


def test_a_session_survives_a_site_secret_rotation_while_the_old_secret_is_a_fallback(clinician_a, settings):
    from django.test import Client

    kept, dropped = Client(), Client()
    for client in (kept, dropped):
        client.force_login(clinician_a.user)
        assert client.get("/worklist/").status_code == 200
    old = settings.SECRET_KEY
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = "a-new-site-secret-" + "n" * 40, [old]
    assert kept.get("/worklist/").status_code == 200  # verified with the fallback, moved to the new key
    settings.SECRET_KEY_FALLBACKS = []
    assert kept.get("/worklist/").status_code == 200
    assert dropped.get("/worklist/").status_code == 302  # never seen under the new key: signed out


def test_a_patient_id_a_client_sends_is_stored_hashed_and_a_shown_pseudonym_as_it_was(clinician_a, demo_model):
    from tests.conftest import png_bytes

    client = api_client_for(clinician_a)
    first = post_file(client, png_bytes(seed=3, size=64), name="x.png", patient_id="MRN-0042", accession_number="A-1")
    assert first.status_code == 201, first.json()
    shown = first.json()["study"]["patient_id"]
    assert shown == pseudonym_for("MRN-0042", purpose=PATIENT, scope=clinician_a.tenant_id)
    assert not Study.objects.filter(patient_pseudonym__contains="MRN-0042").exists()
    # a client that echoes back the pseudonym it was shown names the same patient, not a new one
    again = post_file(client, png_bytes(seed=4, size=64), name="x.png", patient_id=shown, accession_number="A-1")
    assert again.status_code == 201, again.json()
    assert again.json()["study"]["id"] == first.json()["study"]["id"]
    found = client.post("/api/v1/studies/search/", {"q": "MRN-0042"}, format="json").json()["results"]
    assert [row["accession_number"] for row in found] == ["A-1"]
