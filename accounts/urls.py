from django.urls import path

from . import views

urlpatterns = [
    path("accounts/login/", views.SignInView.as_view(), name="login"),
    path("accounts/two-factor/verify/", views.two_factor_verify, name="two-factor-verify"),
    path("accounts/two-factor/", views.two_factor_setup, name="two-factor"),
    path("hospital/members/", views.members_page, name="members"),
    path("hospital/members/invite/", views.member_invite, name="member-invite"),
    path("hospital/members/<int:membership_id>/role/", views.member_role, name="member-role"),
    path("hospital/members/<int:membership_id>/deactivate/", views.member_deactivate, name="member-deactivate"),
    path(
        "hospital/members/<int:membership_id>/enrolment-code/",
        views.member_enrolment_code,
        name="member-enrolment-code",
    ),
    path(
        "hospital/members/<int:membership_id>/two-factor-reset/",
        views.member_two_factor_reset,
        name="member-two-factor-reset",
    ),
    path("hospital/service-accounts/", views.service_accounts_page, name="service-accounts"),
    path("hospital/service-accounts/create/", views.service_account_create_page, name="service-account-create"),
    path(
        "hospital/service-accounts/<int:service_account_id>/keys/",
        views.service_account_key_create_page,
        name="service-account-key-create",
    ),
    path(
        "hospital/service-accounts/<int:service_account_id>/revoke/",
        views.service_account_revoke_page,
        name="service-account-revoke",
    ),
    path(
        "hospital/service-account-keys/<int:api_key_id>/revoke/", views.api_key_revoke_page, name="api-key-revoke-page"
    ),
    path("invitations/<str:token>/", views.invitation_accept_page, name="invitation-accept"),
]
