"""``/ws/events/``: live notifications for the hospitals a user subscribes to.

Protocol (JSON): the server greets with ``{"type": "hello"}``; the client sends
``{"type": "subscribe", "tenant": "<slug>"}`` and gets ``subscribed`` or an ``error``; then
the messages accounts.events.PUSHED defines arrive for that hospital: ``result.ready`` (an image's
AI read ended), ``heatmap.ready`` (a heatmap asked for is made, or cannot be), ``study.updated``
(a worklist row changed) and ``job.progress`` (a bulk job's counts changed).
Every subscription is authorised with the same table as the API; losing access closes the
hospital's feed, and the socket when no feed is left.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import suppress
from importlib import import_module

from asgiref.sync import async_to_sync
from channels.generic.websocket import JsonWebsocketConsumer
from django.conf import settings

from accounts.events import PUSHED, api_key_group, session_group, tenant_group, user_group
from accounts.middleware import session_expired
from accounts.models import AccessEvent
from accounts.permissions import Action, can
from accounts.selectors import memberships_active
from accounts.service_accounts import api_key_is_live
from accounts.services import access_event_record
from core.transient import is_transient

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_ACCESS_REVOKED = 4403
CLOSE_TRY_AGAIN = 1012  # RFC 6455's "service restart": the client reconnects and subscribes again
# how often a long-lived socket re-reads its browser session (idle and absolute limits)
SESSION_RECHECK_SECONDS = 60
TENANT_KEY_CHARS = 64  # a subscribe message's tenant is cut to a slug's width before it is looked up


def browser_message(event: dict) -> dict:
    """What a socket sends its browser of a pushed message: its type and the fields PUSHED names."""
    kind = event["type"]
    return {"type": kind, **{key: event[key] for key in PUSHED[kind]}}


class EventsConsumer(JsonWebsocketConsumer):
    async def __call__(self, scope, receive, send):
        """Redis (the channel layer) gone away ends the socket with a close frame saying "try
        again", not a traceback and a dropped connection: the socket's groups lived in Redis, so
        it could hear nothing more; the client reconnects and subscribes again (feed.js does)."""
        self._send_here = send  # the server's own send, for dispatch's pushes on this loop
        try:
            await super().__call__(scope, receive, send)
        except Exception as exc:
            if not is_transient(exc):
                raise
            logger.warning("events socket closed for the client to reconnect: %s: %s", type(exc).__name__, exc)
            with suppress(Exception):  # the client may be gone already
                await send({"type": "websocket.close", "code": CLOSE_TRY_AGAIN})

    async def dispatch(self, message):
        """A pushed message is forwarded here on the server's loop while nothing in the check
        before it needs the database (the token's expiry is in the scope; the session is re-read
        only every SESSION_RECHECK_SECONDS): the consumer's other messages, and a forward that is
        due a session re-read, go to a thread as a sync consumer's do. A thread per message was
        most of what the web process spent on a push, and every image makes three."""
        if message.get("type") in PUSHED and self._forwards_here():
            await self._send_here({"type": "websocket.send", "text": json.dumps(browser_message(message))})
            return
        await super().dispatch(message)

    def _forwards_here(self) -> bool:
        if not hasattr(self, "feeds") or not self.feeds:  # not connected, or no hospital subscribed
            return False
        expires = self.scope.get("token_expires")
        if expires is not None and time.time() >= expires:
            return False  # forward closes the socket, in the thread
        return self.scope.get("session") is None or time.monotonic() - self.session_checked <= SESSION_RECHECK_SECONDS

    def connect(self):
        user = self.scope.get("user")
        session = self.scope.get("session")
        if user is None or not user.is_authenticated or (session is not None and session_expired(session)):
            self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        self.feeds: dict[int, str] = {}
        self.own_groups = [user_group(user.pk)]
        if session is not None and session.session_key:
            self.own_groups.append(session_group(session.session_key))
        api_key_id = self.scope.get("api_key_id")
        if api_key_id is not None:  # a service account's key: revoking it closes this socket
            self.own_groups.append(api_key_group(api_key_id))
        self.session_checked = time.monotonic()
        self.accept()
        for group in self.own_groups:
            async_to_sync(self.channel_layer.group_add)(group, self.channel_name)
        if api_key_id is not None and not api_key_is_live(api_key_id=api_key_id):
            self.close(code=CLOSE_ACCESS_REVOKED)  # revoked between the handshake and joining its group
            return
        self.send_json({"type": "hello"})

    def disconnect(self, code):
        for group in [*getattr(self, "own_groups", []), *getattr(self, "feeds", {}).values()]:
            async_to_sync(self.channel_layer.group_discard)(group, self.channel_name)

    def _still_signed_in(self) -> bool:
        """The token has not expired; the browser session has not ended (re-read now and then)."""
        expires = self.scope.get("token_expires")
        if expires is not None and time.time() >= expires:
            return False
        session = self.scope.get("session")
        if session is not None and time.monotonic() - self.session_checked > SESSION_RECHECK_SECONDS:
            self.session_checked = time.monotonic()
            store = import_module(settings.SESSION_ENGINE).SessionStore
            fresh = store(session.session_key)
            if not fresh.exists(session.session_key) or session_expired(fresh):
                return False
        return True

    def receive_json(self, content, **kwargs):
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == "subscribe":
            self._subscribe(str(content.get("tenant", ""))[:TENANT_KEY_CHARS])
        elif kind == "ping":
            self.send_json({"type": "pong"})
        else:
            self.send_json({"type": "error", "code": "unknown_message", "message": "Send subscribe or ping."})

    def _subscribe(self, slug: str) -> None:
        if not self._still_signed_in():
            self.close(code=CLOSE_UNAUTHENTICATED)
            return
        membership = memberships_active(user=self.user).filter(tenant__slug=slug).first()
        if membership is None or not can(membership, Action.EVENTS_SUBSCRIBE):
            access_event_record(
                action=str(Action.EVENTS_SUBSCRIBE),
                outcome=AccessEvent.Outcome.DENIED,
                user=self.user,
                tenant=membership.tenant if membership else None,
                target_type="tenant",
                target_id=slug,
                key_id=self.scope.get("api_key_public_id", ""),
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
        """Tenant None: the user or this browser session is done. Otherwise re-check the feeds."""
        if event.get("tenant") is None:
            self.close(code=CLOSE_ACCESS_REVOKED)
            return
        allowed = {m.tenant_id for m in memberships_active(user=self.user) if can(m, Action.EVENTS_SUBSCRIBE)}
        removed = [t for t in self.feeds if t not in allowed]
        for tenant_id in removed:
            async_to_sync(self.channel_layer.group_discard)(self.feeds.pop(tenant_id), self.channel_name)
        if removed and not self.feeds:
            self.close(code=CLOSE_ACCESS_REVOKED)

    def forward(self, event):
        """Every message ``PUSHED`` names (result.ready, heatmap.ready, study.updated,
        job.progress) goes to the browser with the fields it carries, while the socket is still
        signed in; the page fetches what changed."""
        if not self._still_signed_in():
            self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.send_json(browser_message(event))

    # Channels calls the method named after a message's type ("result.ready" → result_ready)
    result_ready = heatmap_ready = study_updated = job_progress = forward
