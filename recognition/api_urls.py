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
    path("batches/", apis.BatchJobListCreateApi.as_view(), name="api-batches"),
    path("batches/<int:job_id>/", apis.BatchJobDetailApi.as_view(), name="api-batch-detail"),
    path("batches/<int:job_id>/items/", apis.BatchItemsApi.as_view(), name="api-batch-items"),
    path("batches/<int:job_id>/start/", apis.BatchJobActionApi.as_view(action="start"), name="api-batch-start"),
    path("batches/<int:job_id>/cancel/", apis.BatchJobActionApi.as_view(action="cancel"), name="api-batch-cancel"),
    path("batches/<int:job_id>/retry/", apis.BatchJobActionApi.as_view(action="retry"), name="api-batch-retry"),
    path("batches/<int:job_id>/results/", apis.BatchResultsApi.as_view(), name="api-batch-results"),
    path("studies/search/", apis.StudySearchApi.as_view(), name="api-study-search"),
    path("studies/<int:study_id>/", apis.StudyDetailApi.as_view(), name="api-study-detail"),
    path("studies/<int:study_id>/fhir/", apis.StudyFhirApi.as_view(), name="api-study-fhir"),
    path("model-versions/", apis.ModelVersionListApi.as_view(), name="api-model-versions"),
]
