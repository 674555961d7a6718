from django.urls import path

from . import views

app_name = "recognition"

urlpatterns = [
    path("", views.home, name="home"),
    path("images/", views.image_list_page, name="image-list"),
    path("upload/", views.upload_page, name="upload"),
    path("images/<int:image_id>/", views.image_detail_page, name="image-detail"),
    path("images/<int:image_id>/file/", views.image_file, name="image-file"),
    path("images/<int:image_id>/heatmap/", views.image_heatmap, name="image-heatmap"),
    path("hospital/", views.tenant_switch, name="tenant-switch"),
]
