"""The DICOM pages of the app (a hospital's sending nodes; its PACS destinations)."""

from django.urls import include, path

urlpatterns = [
    path("", include("dicomnet.urls_nodes")),
    path("", include("dicomnet.urls_destinations")),
]
