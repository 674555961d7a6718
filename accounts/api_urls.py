from django.urls import path

from . import apis

urlpatterns = [
    path("members/", apis.MemberListApi.as_view(), name="api-members"),
    path("members/<int:membership_id>/", apis.MemberDetailApi.as_view(), name="api-member-detail"),
    path("members/<int:membership_id>/deactivate/", apis.MemberDeactivateApi.as_view(), name="api-member-deactivate"),
    path("invitations/", apis.InvitationCreateApi.as_view(), name="api-invitations"),
    path("activity/", apis.ActivityApi.as_view(), name="api-activity"),
    path("service-accounts/", apis.ServiceAccountListApi.as_view(), name="api-service-accounts"),
    path(
        "service-accounts/<int:service_account_id>/",
        apis.ServiceAccountDetailApi.as_view(),
        name="api-service-account-detail",
    ),
    path(
        "service-accounts/<int:service_account_id>/revoke/",
        apis.ServiceAccountRevokeApi.as_view(),
        name="api-service-account-revoke",
    ),
    path(
        "service-accounts/<int:service_account_id>/keys/",
        apis.ServiceAccountKeyCreateApi.as_view(),
        name="api-service-account-keys",
    ),
    path("service-account-keys/<int:api_key_id>/revoke/", apis.ApiKeyRevokeApi.as_view(), name="api-key-revoke"),
]
