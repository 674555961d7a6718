"""urls_destinations: the pages (see dicomnet/urls.py)."""

urlpatterns: list = []
