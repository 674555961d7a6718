"""API for auditors: the hospital's access log, newest first, keyset pages; the identifier
filters (person, patient) only ever in a POST body."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from accounts.apis import TENANT_HEADER, TenantApi
from accounts.models import AccessEvent
from core.cursor import identifiers_refused_in_query
from core.inputs import ApiInput
from core.pagination import NextCursorPage

from .selectors import ACCESS_LOG_PAGE, ACCESS_LOG_PAGE_MAX, AccessLogFilters, access_log_list


class AccessLogListInput(ApiInput):
    study = serializers.IntegerField(
        min_value=1,
        required=False,
        default=None,
        help_text="A study id: entries about it, its images and their reviews.",
    )
    action = serializers.CharField(
        max_length=64,
        required=False,
        default="",
        allow_blank=True,
        help_text='Exact, or a prefix ending in "." such as "auth.".',
    )
    outcome = serializers.ChoiceField(choices=AccessEvent.Outcome.values, required=False, allow_blank=True, default="")
    date_from = serializers.DateField(required=False, default=None, help_text="Inclusive, in the site's time zone.")
    date_to = serializers.DateField(required=False, default=None, help_text="Inclusive, in the site's time zone.")
    cursor = serializers.CharField(
        required=False, allow_blank=True, default="", help_text="`next_cursor` of the previous page (opaque)."
    )
    page_size = serializers.IntegerField(
        min_value=1, max_value=ACCESS_LOG_PAGE_MAX, required=False, default=ACCESS_LOG_PAGE
    )


class AccessLogSearchInput(AccessLogListInput):
    """The list's filters and the identifier filters, which only ever travel in a POST body."""

    person = serializers.CharField(
        max_length=150,
        required=False,
        default="",
        allow_blank=True,
        help_text="A username, or the name typed at a failed sign-in (matched through its keyed hash).",
    )
    patient = serializers.CharField(
        max_length=64,
        required=False,
        default="",
        allow_blank=True,
        help_text="A patient id, as shown or the hospital's own: entries about their studies, images and reviews.",
    )


class AccessLogEntryOutput(serializers.Serializer):
    id = serializers.IntegerField()
    created = serializers.DateTimeField()
    hospital = serializers.CharField(source="tenant.slug", allow_null=True, default=None)
    actor = serializers.CharField(source="actor_label")
    action = serializers.CharField()
    target_type = serializers.CharField()
    target_id = serializers.CharField()
    outcome = serializers.CharField()
    ip_address = serializers.CharField(allow_null=True)
    user_agent = serializers.CharField()
    request_id = serializers.CharField()
    chain = serializers.CharField()
    sequence = serializers.IntegerField()
    previous_hash = serializers.CharField()
    entry_hash = serializers.CharField()


def _access_log_page(request, fields: dict) -> Response:
    filters = AccessLogFilters(
        person=fields.get("person", ""),
        patient=fields.get("patient", ""),
        study=fields["study"],
        action=fields["action"],
        outcome=fields["outcome"],
        date_from=fields["date_from"],
        date_to=fields["date_to"],
    )
    entries, cursor = access_log_list(
        actor=request.membership,
        filters=filters,
        cursor=fields["cursor"],
        limit=fields["page_size"],
        request=request,
    )
    return Response({"next_cursor": cursor or None, "results": AccessLogEntryOutput(entries, many=True).data})


class AccessLogApi(TenantApi):
    pagination_class = NextCursorPage

    @extend_schema(
        parameters=[TENANT_HEADER, AccessLogListInput],
        responses=AccessLogEntryOutput(many=True),
        description="The hospital's access log, newest first, for its auditors; reading it is itself logged. "
        "Pass `next_cursor` back as `cursor` for the next page (null: the last page); cursors are opaque. "
        "Filtering by person or patient is a POST to /access-log/search/: a GET naming `person` or `patient` "
        "is refused with 400 `identifier_in_url`, so identifiers stay out of URLs and logs.",
    )
    def get(self, request):
        identifiers_refused_in_query(request.query_params)
        data = AccessLogListInput(data=request.query_params)
        data.is_valid(raise_exception=True)
        return _access_log_page(request, data.validated_data)


class AccessLogSearchApi(TenantApi):
    pagination_class = NextCursorPage

    @extend_schema(
        parameters=[TENANT_HEADER],
        request=AccessLogSearchInput,
        responses=AccessLogEntryOutput(many=True),
        description="The access log filtered by person or patient (and the list's filters), the filters in the "
        "body. The next page is the same body with `cursor` set to the previous page's `next_cursor`.",
    )
    def post(self, request):
        data = AccessLogSearchInput(data=request.data)
        data.is_valid(raise_exception=True)
        return _access_log_page(request, data.validated_data)
