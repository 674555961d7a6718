"""The one page cursor of the platform, and the rule that URLs carry no patient identifiers.

A keyset cursor holds the last row's sort value, which can be a patient pseudonym or an
accession number. Signing would stop tampering but still show the value, so the cursor is
encrypted: AES-256-GCM under a key derived from ``SECRET_KEY`` and a purpose string, with a
random nonce (two cursors of the same row differ), the purpose bound in as associated data (a
worklist cursor is not an access-log cursor). Old site secrets in ``SECRET_KEY_FALLBACKS`` still
open cursors made before a rotation. Anything else, tampered, truncated, made for another purpose
or plain garbage, is a 400 that says to start from the first page.

DRF's ``CursorPagination`` encodes its position the same way here (``OpaqueCursorPagination``),
so every cursor the API hands out comes from this module.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings
from django.utils.crypto import salted_hmac
from rest_framework.pagination import Cursor, CursorPagination
from rest_framework.utils.urls import replace_query_param

from .errors import Invalid

_VERSION = b"\x01"
_NONCE_BYTES = 12
_TAG_BYTES = 16  # AES-GCM's authentication tag
_BASE64_QUANTUM = 4  # base64 comes in groups of 4 characters; the padding is stripped
CURSOR_MAX_CHARS = 1024  # a cursor is a few dozen bytes of state; anything longer is not one
BAD_CURSOR = "The page cursor is not valid (it may be from another list or an old link); start from the first page."

# Query-string names that would carry a patient or person identifier. A GET that names one is
# refused in words: identifiers go in a POST body, never in a URL (proxies, browser history and
# access logs keep URLs).
IDENTIFIER_PARAMETERS = frozenset(
    {"q", "patient", "patient_id", "patient_pseudonym", "accession", "accession_number", "person", "username"}
)


def _key(secret: str, purpose: str) -> bytes:
    return salted_hmac(f"sightline.cursor:{purpose}", "aes-256-gcm key", secret=secret, algorithm="sha256").digest()


def cursor_encode(state: object, *, purpose: str) -> str:
    """An opaque, URL-safe cursor for ``state`` (anything JSON can hold)."""
    nonce = os.urandom(_NONCE_BYTES)
    plain = json.dumps(state, separators=(",", ":")).encode()
    sealed = AESGCM(_key(settings.SECRET_KEY, purpose)).encrypt(nonce, plain, purpose.encode())
    return base64.urlsafe_b64encode(_VERSION + nonce + sealed).decode().rstrip("=")


def cursor_decode(cursor: str, *, purpose: str) -> object:
    """The state ``cursor_encode`` sealed for ``purpose``; 400 for anything else."""
    if not isinstance(cursor, str) or not cursor or len(cursor) > CURSOR_MAX_CHARS:
        raise Invalid(BAD_CURSOR, code="bad_cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % _BASE64_QUANTUM))
    except (ValueError, binascii.Error):
        raise Invalid(BAD_CURSOR, code="bad_cursor") from None
    if raw[:1] != _VERSION or len(raw) < len(_VERSION) + _NONCE_BYTES + _TAG_BYTES:
        raise Invalid(BAD_CURSOR, code="bad_cursor")
    nonce, sealed = raw[1 : 1 + _NONCE_BYTES], raw[1 + _NONCE_BYTES :]
    for secret in (settings.SECRET_KEY, *settings.SECRET_KEY_FALLBACKS):
        try:
            plain = AESGCM(_key(secret, purpose)).decrypt(nonce, sealed, purpose.encode())
        except InvalidTag:
            continue
        try:
            return json.loads(plain)
        except ValueError:
            break
    raise Invalid(BAD_CURSOR, code="bad_cursor")


def identifiers_refused_in_query(query: Mapping, *, names: Iterable[str] = IDENTIFIER_PARAMETERS) -> None:
    """400 for a query string that names a patient or person identifier (even an empty one: the
    client is sending them the wrong way)."""
    named = sorted(name for name in names if name in query)
    if named:
        raise Invalid(
            f"{', '.join(named)} must not be sent in the URL: patient and person identifiers are kept out of "
            "URLs. Send the same fields in the body of a POST instead.",
            code="identifier_in_url",
            detail={"fields": named},
        )


class OpaqueCursorPagination(CursorPagination):
    """DRF's cursor pagination with its position sealed by ``cursor_encode``: the position is the
    last row's ordering value, opaque here whatever the ordering. A bad cursor is a 400 in words
    (DRF answers 404)."""

    purpose = "drf"

    def _purpose(self) -> str:
        ordering = ",".join(self.ordering) if isinstance(self.ordering, list | tuple) else str(self.ordering)
        return f"{self.purpose}:{ordering}"

    def decode_cursor(self, request):
        encoded = request.query_params.get(self.cursor_query_param)
        if encoded is None:
            return None
        state = cursor_decode(encoded, purpose=self._purpose())
        try:
            offset, reverse, position = state
            offset, reverse = int(offset), bool(reverse)
            if offset < 0 or offset > self.offset_cutoff or not (position is None or isinstance(position, str)):
                raise ValueError(state)
        except (TypeError, ValueError):
            raise Invalid(BAD_CURSOR, code="bad_cursor") from None
        return Cursor(offset=offset, reverse=reverse, position=position)

    def encode_cursor(self, cursor):
        encoded = cursor_encode([cursor.offset, bool(cursor.reverse), cursor.position], purpose=self._purpose())
        return replace_query_param(self.base_url, self.cursor_query_param, encoded)
