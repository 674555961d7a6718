"""``Cache-Control: no-store`` unless a response is on a path the settings name as cacheable.

Every page, API answer, image, export and error of this platform can carry patient data, and a
shared proxy or a browser's disk cache must keep none of it. So storing is refused by default,
and the exceptions are named: ``SIGHTLINE_CACHEABLE_PATH_PREFIXES`` (static files, which
whitenoise serves with their own long-lived, hashed caching, and the model files a browser
screens with, which ship as static files too). A response outside those prefixes that asks
to be cached (a view's ``max-age``, say) is answered with ``no-store`` all the same.

First in ``MIDDLEWARE``, so the answers the other middleware give on their own (413, lockout,
the domain-error pages, whitenoise's static files) pass through it as well.
"""

from __future__ import annotations

from django.conf import settings

NO_STORE = "no-store"


def cacheable_path(path: str) -> bool:
    return any(path.startswith(prefix) for prefix in settings.SIGHTLINE_CACHEABLE_PATH_PREFIXES)


class CacheControlMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if cacheable_path(request.path):
            return response
        directives = {part.strip().lower() for part in response.get("Cache-Control", "").split(",")}
        if NO_STORE not in directives:
            # replaced, not merged: "max-age=600, no-store" would still invite some caches
            response["Cache-Control"] = NO_STORE
        return response
