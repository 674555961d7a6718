"""DICOMweb (STOW-RS, QIDO-RS, WADO-RS) under /dicomweb/, outside /api/v1/ and its OpenAPI document
(config/openapi.py keeps /api/v1/ only). PS3.18 names the resources; UIDs travel in the paths."""

from django.urls import path, re_path

from . import views

app_name = "dicomweb"

_study = "studies/<str:study>"
_series = f"{_study}/series/<str:series>"
_instance = f"{_series}/instances/<str:instance>"

urlpatterns = [
    path("studies", views.StudiesView.as_view(), name="dicomweb-studies"),  # QIDO; POST: STOW
    path("series", views.SeriesSearchView.as_view(), name="dicomweb-all-series"),
    path("instances", views.InstanceSearchView.as_view(), name="dicomweb-all-instances"),
    path(_study, views.RetrieveView.as_view(), name="dicomweb-study"),  # WADO; POST: STOW into the study
    path(f"{_study}/metadata", views.MetadataView.as_view(), name="dicomweb-study-metadata"),
    path(f"{_study}/series", views.SeriesSearchView.as_view(), name="dicomweb-study-series"),
    path(f"{_study}/instances", views.InstanceSearchView.as_view(), name="dicomweb-study-instances"),
    path(_series, views.RetrieveView.as_view(), name="dicomweb-series"),
    path(f"{_series}/metadata", views.MetadataView.as_view(), name="dicomweb-series-metadata"),
    path(f"{_series}/instances", views.InstanceSearchView.as_view(), name="dicomweb-series-instances"),
    path(_instance, views.RetrieveView.as_view(), name="dicomweb-instance"),
    path(f"{_instance}/metadata", views.MetadataView.as_view(), name="dicomweb-instance-metadata"),
    path(f"{_instance}/rendered", views.RenderedView.as_view(), name="dicomweb-instance-rendered"),
    path(f"{_instance}/frames/<str:frame>/rendered", views.RenderedView.as_view(), name="dicomweb-frame-rendered"),
    re_path(r"^(?P<rest>.*)$", views.not_found, name="dicomweb-unknown"),  # DICOMweb's 404, not the pages'
]
