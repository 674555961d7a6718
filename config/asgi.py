"""HTTP and WebSockets in one ASGI application."""

import os

from config.asgi_threads import pooled_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.production")
django_asgi_app = pooled_asgi_application()  # before importing anything that touches models

from channels.routing import ProtocolTypeRouter  # noqa: E402

from accounts.ws_auth import websocket_auth  # noqa: E402
from core.body_limit import BodySizeLimit  # noqa: E402
from core.errors import websocket_unavailable_guard  # noqa: E402
from core.request_log import RequestLog  # noqa: E402
from protocols.asgi import is_protocol_path, protocol_asgi_application  # noqa: E402
from recognition.routing import websocket_urlpatterns  # noqa: E402

protocols_asgi_app = protocol_asgi_application()  # async middleware only: a waiting read holds no thread


async def http_application(scope, receive, send):
    app = protocols_asgi_app if is_protocol_path(scope["path"]) else django_asgi_app
    return await app(scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": RequestLog(BodySizeLimit(http_application)),  # outermost: one line per request, a 413 too
        "websocket": websocket_unavailable_guard(websocket_auth(websocket_urlpatterns)),
    }
)
