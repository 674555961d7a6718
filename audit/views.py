"""Pages for auditors: the access log (keyset pages, filters POSTed), one entry, the CSV."""

from __future__ import annotations

from datetime import date

from django.contrib.auth.decorators import login_required
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods

from accounts.models import AccessEvent, Membership
from core.cursor import identifiers_refused_in_query
from core.errors import Invalid
from core.streaming import streaming_response

from .exports import access_log_csv_lines
from .selectors import (
    AccessLogFilters,
    access_log_actor,
    access_log_entry_get,
    access_log_export,
    access_log_hospitals,
    access_log_list,
)


def _access_log_filters(data) -> AccessLogFilters:
    def day(name: str) -> date | None:
        try:
            return date.fromisoformat(data[name]) if data.get(name) else None
        except ValueError:
            raise Invalid(f"{name.replace('_', ' ').capitalize()} is not a date (YYYY-MM-DD).") from None

    study = data.get("study", "").strip()
    if study and not study.isdigit():
        raise Invalid("Study is a study id (a number).")
    return AccessLogFilters(
        person=data.get("person", "").strip(),
        patient=data.get("patient", "").strip(),
        study=int(study) if study else None,
        action=data.get("action", "").strip(),
        outcome=data.get("outcome", ""),
        date_from=day("date_from"),
        date_to=day("date_to"),
        hospital=data.get("hospital", ""),
    )


def _access_log_request_data(request):
    """The filters of a page or CSV request: a POST body (the page's forms), or a query string
    that names no person or patient (identifiers never go into URLs: refused in words)."""
    if request.method == "POST":
        return request.POST
    identifiers_refused_in_query(request.GET)
    return request.GET


@login_required
@require_http_methods(["GET", "POST"])
def access_log_page(request):
    """The auditor's view of the log, newest first, keyset pages. The filter form, the next page
    and the CSV download POST the filters, so a person or patient filter never reaches a URL;
    the cursor is opaque (core.cursor)."""
    actor = access_log_actor(request)
    data = _access_log_request_data(request)
    filters = _access_log_filters(data)
    entries, next_cursor = access_log_list(actor=actor, filters=filters, cursor=data.get("cursor", ""), request=request)
    is_platform = not isinstance(actor, Membership)
    query = filters.as_query()
    return render(
        request,
        "audit/access_log.html",
        {
            "actor": actor,
            "is_platform": is_platform,
            "hospitals": access_log_hospitals() if is_platform else [],
            "entries": entries,
            "filters": filters,
            "outcomes": AccessEvent.Outcome.values,
            "next_fields": sorted({**query, "cursor": next_cursor}.items()) if next_cursor else [],
            "csv_fields": sorted(query.items()),
        },
    )


@login_required
@require_GET
def access_log_entry_page(request, entry_id: int):
    entry = access_log_entry_get(actor=access_log_actor(request), entry_id=entry_id, request=request)
    return render(request, "audit/access_log_entry.html", {"entry": entry})


@login_required
@require_http_methods(["GET", "POST"])
def access_log_csv(request):
    """The filtered log as CSV, streamed row by row; the export is logged before it starts. The
    page's download button POSTs the filters (a person or patient filter never reaches a URL)."""
    actor = access_log_actor(request)
    filters = _access_log_filters(_access_log_request_data(request))
    entries = access_log_export(actor=actor, filters=filters, request=request)
    return streaming_response(
        request,
        access_log_csv_lines(entries),
        content_type="text/csv; charset=utf-8",
        filename=f"access-log-{timezone.now():%Y%m%d-%H%M%S}.csv",
    )
