from django.urls import path

from . import apis

urlpatterns = [
    path("members/", apis.MemberListApi.as_view(), name="api-members"),
    path("members/<int:membership_id>/", apis.MemberDetailApi.as_view(), name="api-member-detail"),
    path("members/<int:membership_id>/deactivate/", apis.MemberDeactivateApi.as_view(), name="api-member-deactivate"),
    path("invitations/", apis.InvitationCreateApi.as_view(), name="api-invitations"),
    path("activity/", apis.ActivityApi.as_view(), name="api-activity"),
    path("access-log/", apis.AccessLogApi.as_view(), name="api-access-log"),
    path("access-log/search/", apis.AccessLogSearchApi.as_view(), name="api-access-log-search"),
]
