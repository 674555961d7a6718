"""The request id every request carries (the access log and the logs name it)."""

from django.utils.functional import SimpleLazyObject, empty

from core.logging import REQUEST_ID_FORM, new_request_id, request_id_bound
from core.request_log import note_requester

__all__ = ["REQUEST_ID_FORM", "RequestIdMiddleware", "new_request_id"]


class RequestIdMiddleware:
    """Every request carries an id, taken from X-Request-ID when well-formed: under ASGI the web
    line's layer (core/request_log.py) has put its own id there, so both name the same one. On the
    way out it tells that layer which user and hospital the request turned out to be."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.request_id = new_request_id(request.headers.get("X-Request-ID", ""))
        with request_id_bound(request.request_id):  # the same id the ASGI layer bound; WSGI's too
            response = self.get_response(request)
        response["X-Request-ID"] = request.request_id
        _note_requester(request, response)
        return response


def _note_requester(request, response) -> None:
    # never evaluate a lazy user here (a query for a log line): only one authentication found
    user = request.__dict__.get("user")
    if isinstance(user, SimpleLazyObject):
        user = None if user._wrapped is empty else user._wrapped
    user_id = getattr(user, "pk", None) if getattr(user, "is_authenticated", False) else None
    # an API view's DRF request knows the membership it resolved (accounts/apis.py)
    drf_request = (getattr(response, "renderer_context", None) or {}).get("request")
    membership = getattr(drf_request, "membership", None) if drf_request is not None else None
    note_requester(user_id=user_id, tenant_id=getattr(membership, "tenant_id", None))
