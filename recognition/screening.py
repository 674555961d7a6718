"""Browser screening, the page side: which screening model a hospital's pages load, and the one
CSP exception those pages need.

The screen runs in the reader's browser (ONNX Runtime Web, vendored under static/vendor/) before
a file is sent; its result comes back with the upload as untrusted input
(recognition/services/screening.py stores it and orders work by it). A page screens only when
its hospital turned screening on and chose a ready screening version (HospitalSettings).
"""

from __future__ import annotations

from django.http import HttpResponse

from .models import HospitalSettings

# ONNX Runtime Web compiles its WebAssembly with WebAssembly.instantiate, which CSP gates behind
# 'wasm-unsafe-eval'; only the pages that screen get it (README, security)
WASM_CSP = {"script-src": ["'self'", "'wasm-unsafe-eval'"]}


def screening_page_config(*, membership) -> dict | None:
    """What a page that screens hands to static/js/screen.js, or None when its hospital does
    not screen (the page then works exactly as without screening)."""
    return None  # filled in by the screening-model work (issue 17)


def allow_wasm(response: HttpResponse, config: dict | None) -> HttpResponse:
    """The CSP exception, on a page that screens only."""
    if config is not None:
        response._csp_update = WASM_CSP  # django-csp merges it into this response's policy
    return response


def hospital_settings_for(tenant):
    """The hospital's own settings: its row, or an unsaved one holding the defaults."""
    found = HospitalSettings.objects.for_tenant(tenant).select_related("screening_version__model").first()
    return found or HospitalSettings(tenant=tenant)
