"""urls_nodes: the pages (see dicomnet/urls.py)."""

urlpatterns: list = []
