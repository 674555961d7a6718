"""``/ws/events/``: live notifications for the hospitals a user subscribes to.

Protocol (JSON): the server greets with ``{"type": "hello"}``; the client sends
``{"type": "subscribe", "tenant": "<slug>"}`` and gets ``subscribed`` or an ``error``; then
``result.ready`` messages arrive for that hospital. Every subscription is authorised with
the same table as the API; losing access closes the hospital's feed, and the socket when no
feed is left.
"""

from __future__ import annotations

from asgiref.sync import async_to_sync
from channels.generic.websocket import JsonWebsocketConsumer

from accounts.events import tenant_group, user_group
from accounts.middleware import session_expired
from accounts.models import AccessEvent
from accounts.permissions import Action, can
from accounts.selectors import memberships_active
from accounts.services import access_event_record

CLOSE_UNAUTHENTICATED = 4401
CLOSE_ACCESS_REVOKED = 4403


class EventsConsumer(JsonWebsocketConsumer):
    def connect(self):
        user = self.scope.get("user")
        session = self.scope.get("session")
        if user is None or not user.is_authenticated or (session is not None and session_expired(session)):
            self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        self.feeds: dict[int, str] = {}
        self.accept()
        async_to_sync(self.channel_layer.group_add)(user_group(user.pk), self.channel_name)
        self.send_json({"type": "hello"})

    def disconnect(self, code):
        if hasattr(self, "user"):
            async_to_sync(self.channel_layer.group_discard)(user_group(self.user.pk), self.channel_name)
        for group in getattr(self, "feeds", {}).values():
            async_to_sync(self.channel_layer.group_discard)(group, self.channel_name)

    def receive_json(self, content, **kwargs):
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == "subscribe":
            self._subscribe(str(content.get("tenant", ""))[:64])
        elif kind == "ping":
            self.send_json({"type": "pong"})
        else:
            self.send_json({"type": "error", "code": "unknown_message", "message": "Send subscribe or ping."})

    def _subscribe(self, slug: str) -> None:
        membership = memberships_active(user=self.user).filter(tenant__slug=slug).first()
        if membership is None or not can(membership, Action.EVENTS_SUBSCRIBE):
            access_event_record(
                action=str(Action.EVENTS_SUBSCRIBE),
                outcome=AccessEvent.Outcome.DENIED,
                user=self.user,
                tenant=membership.tenant if membership else None,
                target_type="tenant",
                target_id=slug,
            )
            if membership is None:  # not a member: indistinguishable from no such hospital
                self.send_json({"type": "error", "code": "not_found", "message": "No such hospital."})
            else:
                self.send_json({"type": "error", "code": "forbidden", "message": "Your role does not include this."})
            return
        group = tenant_group(membership.tenant_id)
        async_to_sync(self.channel_layer.group_add)(group, self.channel_name)
        self.feeds[membership.tenant_id] = group
        self.send_json({"type": "subscribed", "tenant": slug})

    def access_revoked(self, event):
        if event.get("tenant") is None:  # the user was deactivated
            self.close(code=CLOSE_ACCESS_REVOKED)
            return
        allowed = {m.tenant_id for m in memberships_active(user=self.user) if can(m, Action.EVENTS_SUBSCRIBE)}
        for tenant_id in [t for t in self.feeds if t not in allowed]:
            async_to_sync(self.channel_layer.group_discard)(self.feeds.pop(tenant_id), self.channel_name)
        if not self.feeds:
            self.close(code=CLOSE_ACCESS_REVOKED)

    def result_ready(self, event):
        self.send_json({key: event[key] for key in ("type", "image", "status", "top_label", "probability")})
