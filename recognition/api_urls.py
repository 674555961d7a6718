from django.urls import path

from . import apis

urlpatterns = [
    path("images/", apis.ImageListCreateApi.as_view(), name="api-images"),
    path("images/<int:image_id>/", apis.ImageDetailApi.as_view(), name="api-image-detail"),
    path("images/<int:image_id>/file/", apis.ImageFileApi.as_view(), name="api-image-file"),
    path("images/<int:image_id>/heatmap/", apis.ImageHeatmapApi.as_view(), name="api-image-heatmap"),
    path("images/<int:image_id>/pixels/", apis.ImagePixelsApi.as_view(), name="api-image-pixels"),
    path("images/<int:image_id>/reviews/", apis.ImageReviewsApi.as_view(), name="api-image-reviews"),
    path("reviews/<int:review_id>/sign-off/", apis.ReviewSignOffApi.as_view(), name="api-review-sign-off"),
    path("studies/", apis.StudyListApi.as_view(), name="api-studies"),
    path("studies/search/", apis.StudySearchApi.as_view(), name="api-study-search"),
    path("studies/<int:study_id>/", apis.StudyDetailApi.as_view(), name="api-study-detail"),
]
