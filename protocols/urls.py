"""The model servers' protocols, outside /api/v1/ and its OpenAPI document (config/openapi.py
keeps /api/v1/ only): KServe v2, TF Serving REST, TorchServe's inference and management APIs."""

from django.urls import path, re_path

from . import kserve, tfserving, torchserve

app_name = "protocols"

_model = "v2/models/<str:name>"
_version = "v2/models/<str:name>/versions/<str:version>"
# TF Serving: /v1/models/{name}[/versions/{n}|/labels/{label}], then "", "/metadata" or ":{verb}"
_tf = r"^v1/models/(?P<name>[^/:]+)(?:/versions/(?P<serial>[0-9]+)|/labels/(?P<label>[^/:]+))?"

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
    re_path(r"^v2/(?P<rest>.*)$", kserve.not_found, name="kserve-unknown"),  # the protocol's 404, not the pages'
    # TF Serving REST
    path("v1/health/live", tfserving.health_live_view, name="tfserving-live"),
    path("v1/health/ready", tfserving.health_ready_view, name="tfserving-ready"),
    re_path(_tf + r"$", tfserving.model_status_view, name="tfserving-status"),
    re_path(_tf + r"/metadata$", tfserving.metadata_view, name="tfserving-metadata"),
    re_path(_tf + r":(?P<verb>predict|classify|regress)$", tfserving.verb_view, name="tfserving-verb"),
    re_path(r"^v1/(?P<rest>.*)$", tfserving.not_found_view, name="tfserving-unknown"),
    # TorchServe: inference API, and the management API's reads
    path("ping", torchserve.ping_view, name="torchserve-ping"),
    path("predictions/<str:name>", torchserve.predictions_view, name="torchserve-predict"),
    path("predictions/<str:name>/<str:version>", torchserve.predictions_view, name="torchserve-predict-version"),
    path("models", torchserve.models_view, name="torchserve-models"),
    path("models/<str:name>", torchserve.model_view, name="torchserve-model"),
    path("models/<str:name>/<str:version>", torchserve.model_view, name="torchserve-model-version"),
    path("models/<str:name>/<str:version>/set-default", torchserve.management_view, name="torchserve-set-default"),
    re_path(r"^(?:predictions|models)(?:/(?P<rest>.*))?$", torchserve.not_found_view, name="torchserve-unknown"),
]
