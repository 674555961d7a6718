"""Browser screening, the page side: which screening model a hospital's pages load, and the one
CSP exception those pages need.

The screen runs in the reader's browser (ONNX Runtime Web, vendored under static/vendor/) before
a file is sent; its result comes back with the upload as untrusted input
(recognition/services/screening.py stores it and orders work by it). A page screens only when
its hospital turned screening on and chose a ready screening version (HospitalSettings).
"""

from __future__ import annotations

import zipfile

from django.contrib.auth.decorators import login_required
from django.http import HttpResponse, HttpResponseNotModified
from django.templatetags.static import static
from django.urls import reverse
from django.views.decorators.http import require_GET

from accounts.selectors import membership_for_session
from core.errors import NotFound
from core.model_package import ONNX_NAME, ROLE_SCREENING, PackageError, read_member, sha256_bytes

from .models import HospitalSettings, ModelVersion

ORT_VENDOR = "vendor/onnxruntime-web/"  # under static/: the runtime vendored at a pinned version
MAX_SCREENING_ONNX_BYTES = 64 * 1024 * 1024  # a screen a browser downloads: far above the demo's 6 MB

# ONNX Runtime Web compiles its WebAssembly with WebAssembly.instantiate, which CSP gates behind
# 'wasm-unsafe-eval'; only the pages that screen get it (README, security)
WASM_CSP = {"script-src": ["'self'", "'wasm-unsafe-eval'"]}


def screening_version_for(*, membership) -> tuple[HospitalSettings, ModelVersion] | None:
    """The hospital's settings and the screening version its pages run, or None when it does not
    screen: screening off, no version chosen, or one that is not (any more) a ready screening
    version whose browser distribution an operator confirmed."""
    found = hospital_settings_for(membership.tenant)
    version = found.screening_version
    if not found.screening_enabled or version is None:
        return None
    if (
        version.status != ModelVersion.Status.READY
        or version.browser_confirmed_at is None
        or version.manifest.get("role") != ROLE_SCREENING
    ):
        return None
    return found, version


def screening_page_config(*, membership) -> dict | None:
    """What a page that screens hands to static/js/screen.js, or None when its hospital does
    not screen (the page then works exactly as without screening)."""
    chosen = screening_version_for(membership=membership)
    if chosen is None:
        return None
    found, version = chosen
    manifest = version.manifest
    labels = list(manifest["labels"])
    return {
        "version_id": version.pk,
        "label": f"{version.model.name} v{version.serial} · {version.version}",
        "model_url": reverse("recognition:screening-model", args=[version.pk]),
        "model_bytes": (version.evaluation or {}).get("onnx_bytes") or manifest.get("metrics", {}).get("onnx_bytes"),
        "model_sha256": manifest["runtime"]["onnx_sha256"],
        "input_size": manifest["input_size"],
        "mean": list(manifest["mean"]),
        "std": list(manifest["std"]),
        "labels": labels,
        "negative_label": labels[0],  # the convention: a screening model's first label is its negative
        "reference": manifest.get("metrics", {}).get("reference", {}),
        "ort": {
            "script": static(ORT_VENDOR + "ort.wasm.min.js"),
            "mjs": static(ORT_VENDOR + "ort-wasm-simd-threaded.mjs"),
            "wasm": static(ORT_VENDOR + "ort-wasm-simd-threaded.wasm"),
        },
        "route_negatives": found.route_negatives_to_bulk,
        "negative_threshold": found.negative_threshold,
    }


def screening_model_get(*, membership, version_id: int) -> ModelVersion:
    """The screening version a member's pages run, by id; any other (another hospital's choice,
    a reads model, screening off) is a 404, as if it did not exist."""
    chosen = screening_version_for(membership=membership)
    if chosen is None or chosen[1].pk != version_id:
        raise NotFound("There is no such screening model for this hospital.", code="not_found")
    return chosen[1]


def screening_onnx(version: ModelVersion) -> bytes:
    """``model.onnx`` from the stored package, checked against the manifest's ``onnx_sha256``."""
    expected = version.manifest["runtime"]["onnx_sha256"]
    with version.package.open("rb") as handle:
        try:
            with zipfile.ZipFile(handle) as archive:
                data = read_member(archive, ONNX_NAME, MAX_SCREENING_ONNX_BYTES)
        except zipfile.BadZipFile as exc:
            raise PackageError(f"the stored package of {version} is not a readable zip archive") from exc
    if sha256_bytes(data) != expected:
        raise PackageError(f"the stored {ONNX_NAME} of {version} does not match its manifest; not served")
    return data


@login_required
@require_GET
def screening_model_file(request, version_id: int) -> HttpResponse:
    """The screening graph the hospital's pages load (ONNX Runtime Web fetches it once and the
    browser keeps it: private, revalidated by its checksum)."""
    membership = membership_for_session(request)
    version = screening_model_get(membership=membership, version_id=version_id)
    etag = f'"{version.manifest["runtime"]["onnx_sha256"]}"'
    if etag in [tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")]:
        response: HttpResponse = HttpResponseNotModified()
    else:
        response = HttpResponse(screening_onnx(version), content_type="application/octet-stream")
    response["ETag"] = etag
    response["Cache-Control"] = "private, no-cache"  # no-cache: kept, but asked again (a 304) each load
    return response


def allow_wasm(response: HttpResponse, config: dict | None) -> HttpResponse:
    """The CSP exception, on a page that screens only."""
    if config is not None:
        response._csp_update = WASM_CSP  # django-csp merges it into this response's policy
    return response


def hospital_settings_for(tenant):
    """The hospital's own settings: its row, or an unsaved one holding the defaults."""
    found = HospitalSettings.objects.for_tenant(tenant).select_related("screening_version__model").first()
    return found or HospitalSettings(tenant=tenant)
