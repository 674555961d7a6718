"""Keyed pseudonyms: the one way the platform turns an identifier into something it may keep.

A DICOM Patient ID becomes a patient pseudonym, a username typed at a failed sign-in becomes a
username pseudonym. Both are HMAC-SHA256 under ``SIGHTLINE_PSEUDONYM_KEY``, a key of their own
(never ``SECRET_KEY``: rotating the site secret must not split a patient in two, and a leaked
site secret must not undo the pseudonyms), cut to 128 bits.

The key is a ring. ``pseudonym_for`` makes a new pseudonym under the current key only;
``pseudonym_candidates`` gives the value's pseudonym under every key of the ring (current,
``SIGHTLINE_PSEUDONYM_KEY_FALLBACKS``, and the legacy scheme for lookups only), so rows made
under an older key are still found after a rotation. Each pseudonym names the key that made it
(``P-<key id>-<hash>``), so an operator can count the rows still under an old key before
retiring it from the ring.

The legacy scheme is what the platform did before this module: HMAC keyed with the
``DJANGO_SECRET_KEY`` of the day over ``"<hospital id>:<patient id>"``, 48 bits, ``P-`` and 12
hex digits. It cannot be migrated (the raw ids are not kept), so
``SIGHTLINE_PSEUDONYM_LEGACY_SECRET_KEYS`` lists the old site secrets under which such rows were
made; lookups try them, nothing new is ever made with them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

PATIENT = "patient"
USERNAME = "username"
_PREFIXES = {PATIENT: "P", USERNAME: "U"}
_KEY_ID_DIGITS = 4  # hex digits naming a key: enough to tell the current key from its fallbacks
_LEGACY_DIGITS = 12  # hex digits of a pseudonym made before key ids (issue 11)
_RINGS_CACHED = 8  # (current, fallbacks) pairs; one in production, a few in tests
KEY_MIN_LENGTH = 32  # characters: an env value of 32 random characters carries well over 128 bits
OUTPUT_BYTES = 16  # 128 bits: no collision among any hospital's patients in practice (birthday at 2**64)


@dataclass(frozen=True)
class _Key:
    key_id: str
    secret: bytes


def key_id_of(secret: str) -> str:
    """A short, stable, non-secret name for a key (4 hex digits), derived from the key."""
    return hmac.new(secret.encode(), b"sightline pseudonym key id", hashlib.sha256).hexdigest()[:_KEY_ID_DIGITS].upper()


@lru_cache(maxsize=_RINGS_CACHED)
def _ring(current: str | None, fallbacks: tuple[str, ...]) -> tuple[_Key, ...]:
    if not current:
        raise ImproperlyConfigured(
            "SIGHTLINE_PSEUDONYM_KEY is not set: every process that ingests images needs the pseudonym key."
        )
    keys = []
    for secret in (current, *fallbacks):
        if len(secret) < KEY_MIN_LENGTH:
            raise ImproperlyConfigured(f"A pseudonym key has at least {KEY_MIN_LENGTH} characters.")
        keys.append(_Key(key_id_of(secret), secret.encode()))
    return tuple(keys)


def _keys() -> tuple[_Key, ...]:
    return _ring(
        getattr(settings, "SIGHTLINE_PSEUDONYM_KEY", None),
        tuple(getattr(settings, "SIGHTLINE_PSEUDONYM_KEY_FALLBACKS", ())),
    )


def _normalise(value: str, purpose: str) -> str:
    # a username is compared the way Django's sign-in form reads it (NFKC), so the auditor's
    # filter finds what was typed
    return unicodedata.normalize("NFKC", value) if purpose == USERNAME else value


def _make(key: _Key, value: str, purpose: str, scope: str) -> str:
    if purpose not in _PREFIXES:
        raise ValueError(f"unknown pseudonym purpose {purpose!r}")
    message = json.dumps(["sightline-pseudonym-v2", purpose, scope, value]).encode()
    digest = hmac.new(key.secret, message, hashlib.sha256).hexdigest()[: OUTPUT_BYTES * 2].upper()
    return f"{_PREFIXES[purpose]}-{key.key_id}-{digest}"


def _legacy(secret: str, value: str, scope: str) -> str:
    digest = hmac.new(secret.encode(), f"{scope}:{value}".encode(), hashlib.sha256)
    return "P-" + digest.hexdigest()[:_LEGACY_DIGITS].upper()


def pseudonym_for(value: str, *, purpose: str, scope: object = "") -> str:
    """The pseudonym a new row gets: under the current key. ``scope`` separates namespaces
    (a patient's hospital id: the same patient has different pseudonyms in two hospitals)."""
    if not value:
        return ""
    return _make(_keys()[0], _normalise(value, purpose), purpose, str(scope))


def pseudonym_candidates(value: str, *, purpose: str, scope: object = "") -> list[str]:
    """The value's pseudonym under every key of the ring, the current key's first: what a
    lookup matches, so rows made before a rotation are still found."""
    if not value:
        return []
    value, scope = _normalise(value, purpose), str(scope)
    candidates = [_make(key, value, purpose, scope) for key in _keys()]
    if purpose == PATIENT:
        candidates += [_legacy(secret, value, scope) for secret in settings.SIGHTLINE_PSEUDONYM_LEGACY_SECRET_KEYS]
    return candidates


_SHOWN_PATIENT = re.compile(r"P-(?:(?P<key_id>[0-9A-F]{4})-[0-9A-F]{32}|[0-9A-F]{12})")


def patient_pseudonym_of(value: str, *, scope: object) -> str:
    """What a client names a patient by, as a row keeps it: a pseudonym the platform showed (one
    of the ring's keys, or the earlier scheme's) stays as it is; anything else is the hospital's
    own patient id and is hashed, so no identifier a client sends is ever stored."""
    value = value.strip()
    shown = _SHOWN_PATIENT.fullmatch(value)
    if shown and (shown["key_id"] is None or shown["key_id"] in {key.key_id for key in _keys()}):
        return value
    return pseudonym_for(value, purpose=PATIENT, scope=scope)


def pseudonym_key_check() -> None:
    """Raise ImproperlyConfigured unless the ring is usable (production settings call this at
    start, so a process without the key refuses to start rather than hash with a default)."""
    _keys()
