"""HTTP and WebSockets in one ASGI application."""

import os

from config.asgi_threads import pooled_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.production")
django_asgi_app = pooled_asgi_application()  # before importing anything that touches models

from channels.routing import ProtocolTypeRouter  # noqa: E402

from accounts.ws_auth import websocket_auth  # noqa: E402
from core.body_limit import BodySizeLimit  # noqa: E402
from recognition.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": BodySizeLimit(django_asgi_app),
        "websocket": websocket_auth(websocket_urlpatterns),
    }
)
