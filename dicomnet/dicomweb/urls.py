"""DICOMweb (STOW-RS, QIDO-RS, WADO-RS) under /dicomweb/, outside /api/v1/ and its OpenAPI document."""

app_name = "dicomweb"

urlpatterns: list = []
