from django.urls import path

from . import views

urlpatterns = [
    path("hospital/access-log/", views.access_log_page, name="access-log"),
    path("hospital/access-log.csv", views.access_log_csv, name="access-log-csv"),
    path("hospital/access-log/<int:entry_id>/", views.access_log_entry_page, name="access-log-entry"),
]
