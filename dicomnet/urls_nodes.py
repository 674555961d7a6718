"""urls_nodes: a hospital's sending nodes (tenant admins; see dicomnet/urls.py)."""

from django.urls import path

from . import views_nodes

urlpatterns = [
    path("dicom/nodes/", views_nodes.nodes_page, name="dicom-nodes"),
    path("dicom/nodes/create/", views_nodes.node_create_page, name="dicom-node-create"),
    path("dicom/nodes/<int:node_id>/deactivate/", views_nodes.node_deactivate_page, name="dicom-node-deactivate"),
    path("dicom/nodes/<int:node_id>/reactivate/", views_nodes.node_reactivate_page, name="dicom-node-reactivate"),
    path("dicom/nodes/<int:node_id>/lane/", views_nodes.node_lane_page, name="dicom-node-lane"),
]
