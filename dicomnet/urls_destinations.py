"""urls_destinations: the PACS destinations pages and the resend button (see dicomnet/urls.py)."""

from django.urls import path

from . import views_destinations as views

urlpatterns = [
    path("hospital/destinations/", views.destinations_page, name="destinations"),
    path("hospital/destinations/create/", views.destination_create_page, name="destination-create"),
    path("hospital/destinations/<int:destination_id>/", views.destination_edit_page, name="destination-edit"),
    path("hospital/destinations/<int:destination_id>/test/", views.destination_test_page, name="destination-test"),
    path(
        "hospital/destinations/<int:destination_id>/delete/", views.destination_delete_page, name="destination-delete"
    ),
    path("hospital/deliveries/<int:delivery_id>/resend/", views.delivery_resend_page, name="delivery-resend"),
]
