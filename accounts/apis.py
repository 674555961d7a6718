"""API for people: JWT (a grant is a login and is logged like one), members, invitations,
the hospital's activity (the access log's API is the audit app's: audit/apis.py)."""

from __future__ import annotations

from axes.handlers.proxy import AxesProxyHandler
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework_simplejwt.serializers import TokenObtainPairSerializer, TokenObtainSerializer
from rest_framework_simplejwt.views import TokenObtainPairView, TokenRefreshView

from core.errors import Conflict, Forbidden, Gone, Invalid, Locked, NotFound
from core.inputs import ApiInput
from core.pagination import NewestFirstPagination

from .lockout import ACCOUNT_LOCKED_MESSAGE, known_address_record, sign_in_second_factor_failed
from .models import Role
from .selectors import activity_list, membership_get, membership_list, membership_resolve
from .service_accounts import (
    API_KEY_RATE_MAX,
    API_KEYS_PER_ACCOUNT,
    SERVICE_ACCOUNT_ROLE_CHOICES,
    api_key_create,
    api_key_get,
    api_key_revoke,
    service_account_create,
    service_account_get,
    service_account_list,
    service_account_revoke,
)
from .services import access_event_record, invitation_create, membership_change_role, membership_deactivate
from .two_factor import AMR_OTP, AMR_PASSWORD, confirmed_device, second_factor_verify

TENANT_HEADER = OpenApiParameter(
    "X-Tenant",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    description="Hospital slug; needed only when the user belongs to several hospitals.",
)


class TenantApi(APIView):
    """Resolves ``request.membership`` after authentication, from ``X-Tenant`` or the only one."""

    # what choosing the hospital answers, for every API under it (config/openapi.py): several
    # hospitals and no X-Tenant, not a member of any, or not of the one named
    api_errors = (Invalid, Forbidden, NotFound)

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        request.membership = membership_resolve(
            user=request.user, tenant_slug=request.headers.get("X-Tenant"), request=request
        )


class AuditedTokenObtainPairSerializer(TokenObtainPairSerializer):
    """Password, then the second factor for a user who has one: a valid, unused authenticator
    code or an unused recovery code in ``otp``. Tokens carry ``amr`` (RFC 8176): ``["pwd"]`` or
    ``["pwd", "otp"]``; a refreshed access token keeps it."""

    otp = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=64,
        write_only=True,
        help_text="Needed when the account has two-factor sign-in: the six-digit code from the "
        "authenticator app (each code works once), or one of the recovery codes.",
    )
    access = serializers.CharField(read_only=True)
    refresh = serializers.CharField(read_only=True)

    def validate(self, attrs):
        TokenObtainSerializer.validate(self, attrs)  # the password; a failure raises and is counted
        request = self.context.get("request")
        amr = [AMR_PASSWORD]
        if confirmed_device(self.user) is not None:
            code = attrs.get("otp", "")
            if not second_factor_verify(user=self.user, code=code, request=request):
                sign_in_second_factor_failed(request=request, user=self.user)
                if not code:
                    raise AuthenticationFailed(
                        "This account uses two-factor sign-in: send the current code from the "
                        "authenticator app (or a recovery code) in `otp`.",
                        code="otp_required",
                    )
                raise AuthenticationFailed(
                    "That one-time code is not valid or has been used. Codes change every 30 seconds "
                    "and each works once.",
                    code="otp_invalid",
                )
            amr.append(AMR_OTP)
        refresh = self.get_token(self.user)
        refresh["amr"] = amr
        access_event_record(action="auth.token", request=request, user=self.user)
        known_address_record(user=self.user, request=request)
        # simplejwt sends no user_logged_in: tell axes of the success, so it resets the count
        # exactly as a page sign-in does
        AxesProxyHandler.user_logged_in(sender=type(self), request=request, user=self.user)
        return {"refresh": str(refresh), "access": str(refresh.access_token)}


class TokenPairOutput(serializers.Serializer):
    access = serializers.CharField(help_text="Send as `Authorization: Bearer <access>`; short-lived.")
    refresh = serializers.CharField(help_text="Exchange at /api/v1/auth/token/refresh/ for a new pair, once.")


class TokenObtainApi(TokenObtainPairView):
    serializer_class = AuditedTokenObtainPairSerializer
    api_errors = (AuthenticationFailed, Locked)  # wrong credentials or code; too many failures

    # the serializer's own fields are what is sent; what comes back is the pair
    @extend_schema(responses=TokenPairOutput)
    def post(self, request, *args, **kwargs):
        try:
            return super().post(request, *args, **kwargs)
        except AuthenticationFailed:
            if getattr(request, "axes_locked_out", False):  # set by the axes backend
                raise Locked(
                    "Too many failed sign-in attempts for this username from this address. Try again later."
                ) from None
            if getattr(request, "sightline_account_locked", False):  # accounts.lockout
                raise Locked(ACCOUNT_LOCKED_MESSAGE) from None
            raise


class TokenRefreshApi(TokenRefreshView):
    api_errors = (AuthenticationFailed,)  # an expired, revoked or already rotated refresh token


class MemberOutput(serializers.Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField(source="user.username")
    role = serializers.CharField()
    is_active = serializers.BooleanField()
    last_seen = serializers.DateTimeField(allow_null=True)
    created = serializers.DateTimeField()


class MemberRoleInput(ApiInput):
    role = serializers.ChoiceField(choices=Role.choices)


class InvitationInput(ApiInput):
    email = serializers.EmailField()
    role = serializers.ChoiceField(choices=Role.choices)


class InvitationOutput(serializers.Serializer):
    id = serializers.IntegerField()
    email = serializers.EmailField()
    role = serializers.CharField()
    expires_at = serializers.DateTimeField()


class EventOutput(serializers.Serializer):
    id = serializers.IntegerField()
    created = serializers.DateTimeField()
    actor = serializers.CharField(source="actor_label")
    action = serializers.CharField()
    target_type = serializers.CharField()
    target_id = serializers.CharField()
    outcome = serializers.CharField()
    ip_address = serializers.CharField(allow_null=True)


class NewestFirst(NewestFirstPagination):
    page_size = 100


class MemberListApi(TenantApi):
    pagination_class = NewestFirst

    @extend_schema(parameters=[TENANT_HEADER], responses=MemberOutput(many=True))
    def get(self, request):
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(membership_list(actor=request.membership, request=request), request)
        return paginator.get_paginated_response(MemberOutput(page, many=True).data)


class MemberDetailApi(TenantApi):
    @extend_schema(parameters=[TENANT_HEADER], request=MemberRoleInput, responses=MemberOutput)
    def patch(self, request, membership_id: int):
        membership = membership_get(actor=request.membership, membership_id=membership_id, request=request)
        data = MemberRoleInput(data=request.data)
        data.is_valid(raise_exception=True)
        membership = membership_change_role(
            actor=request.membership, membership=membership, role=data.validated_data["role"], request=request
        )
        return Response(MemberOutput(membership).data)


class MemberDeactivateApi(TenantApi):
    @extend_schema(parameters=[TENANT_HEADER], request=None, responses=MemberOutput)
    def post(self, request, membership_id: int):
        membership = membership_get(actor=request.membership, membership_id=membership_id, request=request)
        membership = membership_deactivate(actor=request.membership, membership=membership, request=request)
        return Response(MemberOutput(membership).data)


class InvitationCreateApi(TenantApi):
    @extend_schema(
        parameters=[TENANT_HEADER],
        request=InvitationInput,
        responses={201: InvitationOutput},
        description="E-mails a single-use link; the link itself is never returned.",
    )
    def post(self, request):
        data = InvitationInput(data=request.data)
        data.is_valid(raise_exception=True)
        invitation, _ = invitation_create(actor=request.membership, request=request, **data.validated_data)
        return Response(InvitationOutput(invitation).data, status=status.HTTP_201_CREATED)


class ActivityApi(TenantApi):
    pagination_class = NewestFirst

    @extend_schema(parameters=[TENANT_HEADER], responses=EventOutput(many=True))
    def get(self, request):
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(activity_list(actor=request.membership, request=request), request)
        return paginator.get_paginated_response(EventOutput(page, many=True).data)


# --- service accounts (tenant admins) -----------------------------------------------------------


class ServiceAccountKeyOutput(serializers.Serializer):
    id = serializers.IntegerField()
    key_id = serializers.CharField(source="public_id", help_text="The key's public id, as the access log names it.")
    rate = serializers.IntegerField(help_text="Requests per minute.")
    created = serializers.DateTimeField()
    last_used = serializers.DateTimeField(allow_null=True, help_text="To the minute.")
    revoked_at = serializers.DateTimeField(allow_null=True)


class ServiceAccountOutput(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    username = serializers.CharField(source="user.username")
    role = serializers.CharField(source="membership.role")
    description = serializers.CharField()
    interactive = serializers.BooleanField(help_text="Its protocol reads go to the interactive lane.")
    created = serializers.DateTimeField()
    revoked_at = serializers.DateTimeField(allow_null=True)
    keys = ServiceAccountKeyOutput(many=True, source="keys.all")


class ServiceAccountInput(ApiInput):
    name = serializers.CharField(max_length=50, help_text="Lowercase letters, digits and hyphens.")
    role = serializers.ChoiceField(choices=SERVICE_ACCOUNT_ROLE_CHOICES, help_text="Never hospital admin.")
    description = serializers.CharField(max_length=200, required=False, default="", allow_blank=True)
    interactive = serializers.BooleanField(
        required=False,
        default=False,
        help_text="Its model-server protocol reads (KServe v2, TF Serving, TorchServe) go to the interactive lane, "
        "where a person waits; otherwise to the bulk lane with batch jobs.",
    )


class ApiKeyInput(ApiInput):
    rate = serializers.IntegerField(
        min_value=1,
        max_value=API_KEY_RATE_MAX,
        required=False,
        allow_null=True,
        default=None,
        help_text="Requests per minute; the deployment's default when left out.",
    )


class ApiKeyCreatedOutput(ServiceAccountKeyOutput):
    key = serializers.CharField(
        help_text="Send as `Authorization: Bearer <key>`. Shown this once; only its hash is kept."
    )


def _no_store(response: Response) -> Response:
    response["Cache-Control"] = "no-store"
    return response


class ServiceAccountListApi(TenantApi):
    pagination_class = NewestFirst
    # for the OpenAPI contract (issue 11): a name already taken
    api_errors = {"post": (Conflict,)}

    @extend_schema(parameters=[TENANT_HEADER], responses=ServiceAccountOutput(many=True))
    def get(self, request):
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(service_account_list(actor=request.membership, request=request), request)
        return paginator.get_paginated_response(ServiceAccountOutput(page, many=True).data)

    @extend_schema(
        parameters=[TENANT_HEADER],
        request=ServiceAccountInput,
        responses={201: ServiceAccountOutput},
        description="A service account of the hospital with one role (never hospital admin). It has no key "
        "until one is created; it can never sign in with a password or open a page.",
    )
    def post(self, request):
        data = ServiceAccountInput(data=request.data)
        data.is_valid(raise_exception=True)
        account = service_account_create(actor=request.membership, request=request, **data.validated_data)
        account = service_account_get(actor=request.membership, service_account_id=account.pk, request=request)
        return Response(ServiceAccountOutput(account).data, status=status.HTTP_201_CREATED)


class ServiceAccountDetailApi(TenantApi):
    @extend_schema(parameters=[TENANT_HEADER], responses=ServiceAccountOutput)
    def get(self, request, service_account_id: int):
        account = service_account_get(actor=request.membership, service_account_id=service_account_id, request=request)
        return Response(ServiceAccountOutput(account).data)


class ServiceAccountRevokeApi(TenantApi):
    @extend_schema(
        parameters=[TENANT_HEADER],
        request=None,
        responses=ServiceAccountOutput,
        description="For good: its membership ends, every key is revoked and its open sockets close.",
    )
    def post(self, request, service_account_id: int):
        account = service_account_get(actor=request.membership, service_account_id=service_account_id, request=request)
        service_account_revoke(actor=request.membership, service_account=account, request=request)
        account = service_account_get(actor=request.membership, service_account_id=service_account_id, request=request)
        return Response(ServiceAccountOutput(account).data)


class ServiceAccountKeyCreateApi(TenantApi):
    api_errors = (Conflict, Gone)  # a third live key; a revoked account

    @extend_schema(
        parameters=[TENANT_HEADER],
        request=ApiKeyInput,
        responses={201: ApiKeyCreatedOutput},
        description=f"A new API key; the answer is the only time the key is shown. At most "
        f"{API_KEYS_PER_ACCOUNT} live keys per account (the one in use and its replacement).",
    )
    def post(self, request, service_account_id: int):
        account = service_account_get(actor=request.membership, service_account_id=service_account_id, request=request)
        data = ApiKeyInput(data=request.data)
        data.is_valid(raise_exception=True)
        key, raw = api_key_create(
            actor=request.membership, service_account=account, rate=data.validated_data["rate"], request=request
        )
        body = {**ServiceAccountKeyOutput(key).data, "key": raw}
        return _no_store(Response(body, status=status.HTTP_201_CREATED))


class ApiKeyRevokeApi(TenantApi):
    @extend_schema(
        parameters=[TENANT_HEADER],
        request=None,
        responses=ServiceAccountKeyOutput,
        description="Takes effect at once: the key's next request is refused and its open sockets close.",
    )
    def post(self, request, api_key_id: int):
        key = api_key_get(actor=request.membership, api_key_id=api_key_id, request=request)
        key = api_key_revoke(actor=request.membership, api_key=key, request=request)
        return Response(ServiceAccountKeyOutput(key).data)
