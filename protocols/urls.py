"""The model servers' protocols, outside /api/v1/ and its OpenAPI document (config/openapi.py
keeps /api/v1/ only). KServe v2 here; TF Serving and TorchServe add theirs."""

from django.urls import path, re_path

from . import kserve

app_name = "protocols"

_model = "v2/models/<str:name>"
_version = "v2/models/<str:name>/versions/<str:version>"

urlpatterns = [
    path("v2/health/live", kserve.health_live, name="kserve-live"),
    path("v2/health/ready", kserve.health_ready, name="kserve-ready"),
    path("v2", kserve.server_metadata, name="kserve-server"),
    path(_model, kserve.model_metadata, name="kserve-model"),
    path(_version, kserve.model_metadata, name="kserve-model-version"),
    path(f"{_model}/ready", kserve.model_ready, name="kserve-model-ready"),
    path(f"{_version}/ready", kserve.model_ready, name="kserve-model-version-ready"),
    path(f"{_model}/infer", kserve.infer, name="kserve-infer"),
    path(f"{_version}/infer", kserve.infer, name="kserve-infer-version"),
    re_path(r"^v2/(?P<rest>.*)$", kserve.not_found),  # the protocol's 404, not the pages'
]
