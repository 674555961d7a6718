from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from accounts.apis import TokenObtainApi, TokenRefreshApi
from recognition import health

api_v1 = [
    path("auth/token/", TokenObtainApi.as_view(), name="token-obtain"),
    path("auth/token/refresh/", TokenRefreshApi.as_view(), name="token-refresh"),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    # the split view serves its start-up script as a file: no inline script for the CSP to allow
    path("docs/", SpectacularSwaggerSplitView.as_view(url_name="schema"), name="api-docs"),
    path("", include("accounts.api_urls")),
    path("", include("audit.api_urls")),
    path("", include("recognition.api_urls")),
]

urlpatterns = [
    path("health/live/", health.live, name="health-live"),
    path("health/ready/", health.ready, name="health-ready"),
    path("health/workers/", health.workers, name="health-workers"),
    path("metrics", health.metrics, name="metrics"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    # staff sign in like everyone else: lockout and second factor apply
    path("admin/login/", RedirectView.as_view(pattern_name="login", query_string=True), name="admin-login"),
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    # the model servers' own protocols (KServe v2, …): their formats and errors, not the API's
    path("", include("protocols.urls")),
    # DICOMweb (STOW/QIDO/WADO-RS): DICOM's own formats and statuses, outside /api/v1/ too
    path("dicomweb/", include("dicomnet.dicomweb.urls")),
    path("", include("dicomnet.urls")),
    path("", include("accounts.urls")),
    path("", include("audit.urls")),
    path("", include("recognition.urls")),
]

# Django's own error answers (no route matched, a request refused before any view): the API's in
# the one error shape, the pages' as pages
handler400 = "core.errors.bad_request"
handler403 = "core.errors.permission_denied"
handler404 = "core.errors.page_not_found"
handler500 = "core.errors.server_error"
