from django.urls import path

from . import apis

urlpatterns = [
    path("access-log/", apis.AccessLogApi.as_view(), name="api-access-log"),
    path("access-log/search/", apis.AccessLogSearchApi.as_view(), name="api-access-log-search"),
]
