from django.urls import path

from . import apis

urlpatterns = [
    path("images/", apis.ImageListCreateApi.as_view(), name="api-images"),
    path("images/<int:image_id>/", apis.ImageDetailApi.as_view(), name="api-image-detail"),
    path("images/<int:image_id>/file/", apis.ImageFileApi.as_view(), name="api-image-file"),
    path("images/<int:image_id>/heatmap/", apis.ImageHeatmapApi.as_view(), name="api-image-heatmap"),
]
