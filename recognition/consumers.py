"""``/ws/events/``: live notifications for the hospitals the user belongs to."""

from __future__ import annotations

from asgiref.sync import async_to_sync
from channels.generic.websocket import JsonWebsocketConsumer

from accounts.permissions import Action, can
from accounts.selectors import memberships_active

from .events import tenant_group

CLOSE_UNAUTHENTICATED = 4401


class EventsConsumer(JsonWebsocketConsumer):
    def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.joined = [
            tenant_group(m.tenant_id) for m in memberships_active(user=user) if can(m, Action.EVENTS_SUBSCRIBE)
        ]
        self.accept()
        for group in self.joined:
            async_to_sync(self.channel_layer.group_add)(group, self.channel_name)
        self.send_json({"type": "hello", "tenants": len(self.joined)})

    def disconnect(self, code):
        for group in getattr(self, "joined", []):
            async_to_sync(self.channel_layer.group_discard)(group, self.channel_name)

    def receive_json(self, content, **kwargs):
        if content.get("type") == "ping":
            self.send_json({"type": "pong"})

    def result_ready(self, event):
        self.send_json({key: event[key] for key in ("type", "image", "status", "top_label", "probability")})
