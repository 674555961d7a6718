"""The API's two page envelopes, each describing itself to the OpenAPI document.

A view that answers a list sets ``pagination_class``; drf-spectacular then documents its 200 as
the envelope this class builds (``get_paginated_response_schema``) instead of a bare array, and
tests/contract/test_schema.py fails any list operation that has none.

- ``NewestFirstPagination``: the platform's opaque cursor pagination (core/cursor.py) over
  (created, id), ``{"next", "previous", "results"}`` where next/previous are links.
- ``NextCursorPage``: the keyset pages the selectors build themselves (the worklist, the access
  log), ``{"next_cursor", "results"}``; the view's input serializer declares ``cursor``/``page_size``.
"""

from __future__ import annotations

from rest_framework.pagination import BasePagination
from rest_framework.response import Response

from core.cursor import OpaqueCursorPagination
from core.errors import Invalid

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


class NewestFirstPagination(OpaqueCursorPagination):
    ordering = ("-created", "-id")
    page_size = PAGE_SIZE
    max_page_size = MAX_PAGE_SIZE
    page_size_query_param = "page_size"
    # what this class itself can answer (a bad page_size or cursor), read by config.openapi
    api_errors = (Invalid,)

    def get_page_size(self, request):
        # DRF silently falls back to the default for "abc" or 0, and clips 10_000: a client that
        # asked for something else learns it, and the documented bounds are the enforced ones
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size
        if not raw.isdigit() or not 1 <= int(raw) <= self.max_page_size:
            raise Invalid(
                f"page_size must be a whole number from 1 to {self.max_page_size}.",
                code="bad_page_size",
            )
        return int(raw)

    def decode_cursor(self, request):
        # an empty cursor is the first page, as in the worklist and the access log (a client that
        # keeps `cursor=<next>` in its query sends `cursor=` first)
        if request.query_params.get(self.cursor_query_param) == "":
            return None
        return super().decode_cursor(request)

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": self.max_page_size}
        return parameters


class NextCursorPage(BasePagination):
    """Describes (and builds) ``{"next_cursor": str | null, "results": [...]}``."""

    api_errors = (Invalid,)

    def get_paginated_response(self, data, next_cursor: str = ""):
        return Response({"next_cursor": next_cursor or None, "results": data})

    def get_paginated_response_schema(self, schema):
        return {
            "type": "object",
            "required": ["next_cursor", "results"],
            "properties": {
                "next_cursor": {
                    "type": "string",
                    "nullable": True,
                    "description": "Pass back as `cursor` for the next page; null on the last page.",
                },
                "results": schema,
            },
        }

    def get_schema_operation_parameters(self, view):
        return []  # the view's input serializer declares cursor and page_size
