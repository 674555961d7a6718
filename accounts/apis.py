"""JWT endpoints. A successful token grant is a login and is logged like one."""

from rest_framework_simplejwt.serializers import TokenObtainPairSerializer
from rest_framework_simplejwt.views import TokenObtainPairView

from .services import access_event_record


class AuditedTokenObtainPairSerializer(TokenObtainPairSerializer):
    def validate(self, attrs):
        data = super().validate(attrs)  # a failure raises; django.contrib.auth logs it
        access_event_record(action="auth.token", request=self.context.get("request"), user=self.user)
        return data


class TokenObtainApi(TokenObtainPairView):
    serializer_class = AuditedTokenObtainPairSerializer
