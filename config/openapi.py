"""The OpenAPI document as a contract: what each operation can answer, derived, not hand-listed.

``ContractAutoSchema`` (REST_FRAMEWORK's DEFAULT_SCHEMA_CLASS) adds to every operation the error
answers it can really give, each with the one error shape (``ErrorResponse``, core/errors.py):

- 401 and 403 where the view needs an authenticated user; 404 where the path names an object;
  400, 413 and 415 where it takes a body (the request-size cap answers 413 before any view runs);
  413, 415 and 422 where the body carries a file (uploads are checked by content); 429 where the
  view is throttled;
- whatever is declared once, as ``api_errors`` (domain errors, DRF exceptions or plain statuses),
  on the view class or any class above it (``TenantApi`` declares what choosing a hospital can
  answer), on its authentication, permission and throttle classes, and on its paginator.
  ``api_errors`` may also map a method ("post") to its own tuple.

A view that answers a list sets ``pagination_class`` (core/pagination.py), so its 200 is
documented as the page envelope. Only /api/v1/ is in the document: endpoints that speak another
protocol's own format live elsewhere and are tested with that protocol's clients.
tests/contract/test_schema.py holds every operation to these rules.
"""

from __future__ import annotations

from collections.abc import Iterable

from drf_spectacular.openapi import AutoSchema
from rest_framework import exceptions as drf_exceptions
from rest_framework import serializers
from rest_framework.permissions import AllowAny

from core.errors import DomainError

API_PREFIX = "/api/v1/"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

DESCRIPTIONS = {
    400: "The request is invalid; `error.detail` names the fields.",
    401: "No valid credentials: sign in (POST /api/v1/auth/token/) and send `Authorization: Bearer <access>`.",
    403: "The credentials are valid but do not allow this here (role, membership or CSRF).",
    404: "Nothing here: no such object, or one of another hospital (the two look the same).",
    405: "The method is not allowed here.",
    409: "The request conflicts with the object's current state; `error.code` says which.",
    410: "Gone: the link has expired or was already used.",
    413: "The request, the file or the image is too large.",
    415: "The body or the file is of a type this operation does not take.",
    422: "The file is of a taken type but damaged, empty or cannot be read.",
    423: "The object is locked for now.",
    429: "Too many requests or failed attempts; try again later.",
    503: "The service cannot do this now (e.g. no model is registered); try again later.",
}


class ErrorBody(serializers.Serializer):
    code = serializers.CharField(help_text="Machine-readable, e.g. `not_found`, `too_large`, `job_started`.")
    message = serializers.CharField(help_text="In words, for a person.")
    detail = serializers.JSONField(allow_null=True, help_text="Per-field errors or other specifics; often null.")


class ErrorResponse(serializers.Serializer):
    error = ErrorBody()


def status_of(error) -> int:
    """The HTTP status a declared error answers: a DomainError, a DRF exception, or an int."""
    if isinstance(error, int):
        return error
    if isinstance(error, type) and issubclass(error, DomainError):
        return error.status
    if isinstance(error, type) and issubclass(error, drf_exceptions.APIException):
        return error.status_code
    raise TypeError(f"api_errors takes domain errors, DRF exceptions or statuses, not {error!r}")


def declared_statuses(owner, method: str) -> set[int]:
    """``api_errors`` of a class (or an instance's class) and every class above it."""
    cls = owner if isinstance(owner, type) else type(owner)
    statuses: set[int] = set()
    for klass in cls.__mro__:
        declared = klass.__dict__.get("api_errors")
        if not declared:
            continue
        if isinstance(declared, dict):
            declared = declared.get(method.lower(), ())
        statuses |= {status_of(error) for error in declared}
    return statuses


def _serializers_in(request) -> Iterable:
    if isinstance(request, dict):
        yield from (s for s in request.values() if s is not None)
    elif request is not None:
        yield request


def _carries_a_file(serializer) -> bool:
    if isinstance(serializer, type):
        serializer = serializer()
    fields = getattr(serializer, "fields", None)
    if fields is None:
        return False
    return any(
        isinstance(field, serializers.FileField)
        or (isinstance(field, serializers.ListField) and isinstance(field.child, serializers.FileField))
        for field in fields.values()
    )


# DRF's CharField refuses NUL characters, and a value blank once trimmed unless the field allows
# blanks: the request schema says so, so such strings are not "valid" there either
TEXT_PATTERN = r"^[^\x00]*$"
# what str.strip() removes, spelled out: regex engines disagree on what \s covers
_WHITESPACE = r"\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NON_BLANK_PATTERN = rf"^[^\x00]*[^\x00{_WHITESPACE}][^\x00]*$"


class ContractAutoSchema(AutoSchema):
    def _map_serializer_field(self, field, direction, bypass_extensions=False):
        schema = super()._map_serializer_field(field, direction, bypass_extensions)
        if (
            direction == "request"
            and isinstance(field, serializers.CharField)
            and schema.get("type") == "string"
            and not {"pattern", "format", "enum"} & set(schema)
        ):
            blank_ok = field.allow_blank or not field.trim_whitespace
            schema["pattern"] = TEXT_PATTERN if blank_ok else NON_BLANK_PATTERN
        return schema

    def _insert_field_validators(self, field, schema):
        super()._insert_field_validators(field, schema)
        # drf-spectacular offers "" as a second branch of a blank-allowed field with a pattern;
        # TEXT_PATTERN already takes "", and "" matching both branches would make it invalid
        branches = schema.get("oneOf")
        if branches and len(branches) == 2 and branches[0].get("pattern") == TEXT_PATTERN:
            del schema["oneOf"]
            schema.update(branches[0])

    def error_statuses(self) -> set[int]:
        view, method = self.view, self.method
        statuses = declared_statuses(view, method)
        for component in [*view.get_authenticators(), *view.get_permissions(), *view.get_throttles()]:
            statuses |= declared_statuses(component, method)
        if not all(isinstance(permission, AllowAny) for permission in view.get_permissions()):
            statuses |= {401, 403}
        if "{" in self.path:
            statuses.add(404)
        if view.get_throttles():
            statuses.add(429)
        if self._is_list_view() and self._get_paginator() is not None:
            statuses |= declared_statuses(self._get_paginator(), method)
        if self.method in BODY_METHODS:
            request = self.get_request_serializer()
            if any(True for _ in _serializers_in(request)):
                statuses |= {400, 413, 415}
            if any(_carries_a_file(s) for s in _serializers_in(request)):
                statuses |= {413, 415, 422}
        if any(p.get("in") == "query" for p in self._get_parameters()):
            statuses.add(400)
        return statuses

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        for status in sorted(self.error_statuses()):
            if str(status) in responses:
                continue
            response = self._get_response_for_code(ErrorResponse, str(status), ["application/json"], direction)
            response["description"] = DESCRIPTIONS.get(status, "An error; see `error.message`.")
            responses[str(status)] = response
        return dict(sorted(responses.items()))


def only_api_v1(endpoints, **kwargs):
    """PREPROCESSING_HOOKS: the document is the /api/v1/ contract and nothing else."""
    return [endpoint for endpoint in endpoints if endpoint[0].startswith(API_PREFIX)]
