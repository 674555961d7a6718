from django.urls import path

from . import screening, views

app_name = "recognition"

urlpatterns = [
    path("", views.home, name="home"),
    path("images/", views.image_list_page, name="image-list"),
    path("upload/", views.upload_page, name="upload"),
    path("images/<int:image_id>/", views.image_detail_page, name="image-detail"),
    path("images/<int:image_id>/file/", views.image_file, name="image-file"),
    path("images/<int:image_id>/heatmap/", views.image_heatmap, name="image-heatmap"),
    path("images/<int:image_id>/pixels/", views.image_pixels, name="image-pixels"),
    path("images/<int:image_id>/review/", views.image_review, name="image-review"),
    path("reviews/<int:review_id>/sign-off/", views.review_sign_off_view, name="review-sign-off"),
    path("worklist/", views.worklist_page, name="worklist"),
    path("worklist/rows/<int:study_id>/", views.worklist_row, name="worklist-row"),
    path("studies/<int:study_id>/", views.study_open, name="study-open"),
    path("agreement/", views.agreement_page, name="agreement"),
    path("settings/", views.hospital_settings_page, name="hospital-settings"),
    path("jobs/", views.jobs_page, name="jobs"),
    path("jobs/<int:job_id>/items/", views.job_action, {"action": "items"}, name="job-items"),
    path("jobs/<int:job_id>/start/", views.job_action, {"action": "start"}, name="job-start"),
    path("jobs/<int:job_id>/cancel/", views.job_action, {"action": "cancel"}, name="job-cancel"),
    path("jobs/<int:job_id>/retry/", views.job_action, {"action": "retry"}, name="job-retry"),
    path("jobs/<int:job_id>/results.csv", views.job_results, name="job-results"),
    path("agreement.csv", views.agreement_csv_view, name="agreement-csv"),
    path("hospital/", views.tenant_switch, name="tenant-switch"),
    path("screening/models/<int:version_id>/model.onnx", screening.screening_model_file, name="screening-model"),
]
