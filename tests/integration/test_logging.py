"""Log lines: JSON (or plain) from one formatter, each with its process role and request id; the
web's one line per request; the request id carried from a publish into the task's lines; the
query-string redaction still working when the lines are JSON."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from core.logging import (
    ContextFilter,
    JsonFormatter,
    PlainFormatter,
    _role_from_argv,
    logging_config,
    request_id_bound,
)
from core.request_log import RequestLog, note_requester

TOKEN = "eyJ-secret-token-never-logged"


def _emit(logger_name: str, message: str, *args, formatter=None, **kwargs) -> str:
    """Format one record through the settings' handler chain (context filter, then formatter)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter or JsonFormatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        logger.info(message, *args, **kwargs)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
    return stream.getvalue()


def test_a_json_line_names_time_level_logger_message_role_and_the_bound_request_id():
    with request_id_bound("req-1"):
        line = _emit("sightline.test", "hello %s", "world")
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record["message"] == "hello world"
    assert record["level"] == "INFO"
    assert record["logger"] == "sightline.test"
    assert record["request_id"] == "req-1"
    assert record["role"] in ("web", "worker", "beat", "dicom", "manage")
    assert record["time"].endswith("+00:00")


def test_a_line_outside_any_request_has_no_request_id_and_a_records_own_id_wins():
    assert "request_id" not in json.loads(_emit("sightline.test", "tick"))
    with request_id_bound("outer"):
        record = json.loads(_emit("sightline.test", "assoc", extra={"request_id": "assoc-9", "stored": 3}))
    assert record["request_id"] == "assoc-9"
    assert record["stored"] == 3


def test_a_traceback_stays_inside_its_one_json_line():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("sightline.test.exc")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert "ValueError: boom" in json.loads(lines[0])["exc_info"]


def test_the_plain_line_names_the_role_and_request_id():
    with request_id_bound("req-2"):
        line = _emit("sightline.test", "hello", formatter=PlainFormatter())
    assert "sightline.test hello [req-2]" in line


def test_the_query_string_redaction_still_holds_in_json():
    from core.log_filters import RedactQueryStrings

    logger = logging.getLogger("uvicorn.error.test-redaction")
    redaction = RedactQueryStrings()
    logger.addFilter(redaction)
    try:
        line = _emit(logger.name, '%s - "WebSocket %s" [accepted]', "127.0.0.1:5", f"/ws/events/?token={TOKEN}")
    finally:
        logger.removeFilter(redaction)
    assert TOKEN not in line
    assert "/ws/events/?[redacted]" in json.loads(line)["message"]


def test_the_settings_send_uvicorn_through_the_one_handler_and_keep_its_access_log_off():
    config = logging_config(log_format="json", level="INFO")
    assert config["handlers"]["console"]["formatter"] == "json"
    assert config["loggers"]["uvicorn.access"]["level"] == "WARNING"
    assert config["loggers"]["uvicorn.error"]["handlers"] == ["console"]
    assert config["loggers"]["uvicorn.error"]["filters"] == ["redact_query"]
    assert config["loggers"]["django.security.csrf"]["filters"] == ["redact_request_query"]
    with pytest.raises(ValueError):
        logging_config(log_format="xml", level="INFO")


def test_production_defaults_to_json_and_test_settings_to_plain(settings):
    assert settings.SIGHTLINE_LOG_FORMAT == "plain"
    assert settings.LOGGING["handlers"]["console"]["formatter"] == "plain"


@pytest.mark.parametrize(
    ("argv", "role"),
    [
        (["/venv/bin/uvicorn", "config.asgi:application"], "web"),
        (["/venv/bin/celery", "-A", "workers.celery", "worker", "-Q", "bulk"], "worker"),
        (["/venv/bin/celery", "--quiet", "-A", "workers.celery", "beat"], "beat"),
        (["manage.py", "dicom_scp"], "dicom"),
        (["manage.py", "backup_create"], "manage"),
    ],
)
def test_the_process_role_is_read_from_the_command_line(argv, role):
    assert _role_from_argv(argv) == role


def _run_asgi(app, path: bytes, query: bytes = b"", headers=()) -> tuple[list[dict], list[logging.LogRecord]]:
    scope = {
        "type": "http",
        "method": "GET",
        "path": path.decode(),
        "query_string": query,
        "headers": list(headers),
    }
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    keep = Keep()
    request_logger = logging.getLogger("sightline.request")
    request_logger.addHandler(keep)
    try:
        asyncio.run(RequestLog(app)(scope, receive, send))
    finally:
        request_logger.removeHandler(keep)
    return sent, records


def test_the_web_line_is_one_per_request_without_the_query_string_and_names_who_asked():
    seen = {}

    async def app(scope, receive, send):
        seen["request_id"] = dict(scope["headers"])[b"x-request-id"].decode()
        note_requester(user_id=7, tenant_id=3)
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    _, records = _run_asgi(app, b"/api/v1/images/", f"token={TOKEN}".encode(), [(b"x-request-id", b"from-proxy-1")])
    assert len(records) == 1
    line = records[0]
    assert (line.method, line.path, line.status) == ("GET", "/api/v1/images/", 201)
    assert line.request_id == seen["request_id"] == "from-proxy-1"
    assert (line.user_id, line.tenant_id) == (7, 3)
    assert line.duration_ms >= 0
    assert TOKEN not in json.dumps(records[0].__dict__, default=str)


def test_a_malformed_request_id_from_outside_is_replaced_and_a_failed_app_still_gets_its_line():
    async def app(scope, receive, send):
        raise RuntimeError("the app failed before answering")

    with pytest.raises(RuntimeError):
        _run_asgi(app, b"/x", headers=[(b"x-request-id", b"bad id with spaces")])
    _, records = _run_asgi(
        lambda scope, receive, send: _answer(send, 200), b"/x", headers=[(b"x-request-id", b"bad id!")]
    )
    assert len(records) == 1 and records[0].request_id != "bad id!" and len(records[0].request_id) == 32


def _json_line(record: logging.LogRecord) -> str:
    record.role = "web"
    return JsonFormatter().format(record)


def test_an_invitation_link_is_redacted_in_the_json_web_line():
    # the link itself is the credential (accounts/urls.py): whoever holds it joins the hospital
    _, records = _run_asgi(lambda scope, receive, send: _answer(send, 410), f"/invitations/{TOKEN}/".encode())
    assert len(records) == 1
    line = _json_line(records[0])
    assert TOKEN not in line
    assert json.loads(line)["path"] == "/invitations/[redacted]/"
    assert json.loads(line)["message"] == "GET /invitations/[redacted]/ 410"


@pytest.mark.parametrize(
    "path, logged",
    [
        (f"/invitations/{TOKEN}", "/invitations/[redacted]"),
        (f"/invitations/{TOKEN}/extra/", "/invitations/[redacted]/extra/"),
        ("/invitations/", "/invitations/"),  # nothing to hide
        ("/api/v1/invitations/", "/api/v1/invitations/"),  # the API's create endpoint: no token in it
        (f"/api/v1/images?token={TOKEN}", "/api/v1/images"),  # a decoded %3F reads as a query: dropped
    ],
)
def test_the_web_line_path_never_carries_a_secret_segment_or_a_query(path, logged):
    _, records = _run_asgi(lambda scope, receive, send: _answer(send, 200), path.encode())
    assert records[0].path == logged
    assert TOKEN not in _json_line(records[0])


def test_a_websocket_handshake_gets_no_web_line_and_its_token_is_never_logged_by_it():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope)

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    keep = Keep()
    request_logger = logging.getLogger("sightline.request")
    request_logger.addHandler(keep)
    scope = {"type": "websocket", "path": "/ws/events/", "query_string": f"token={TOKEN}".encode(), "headers": []}
    try:
        asyncio.run(RequestLog(app)(scope, None, None))
    finally:
        request_logger.removeHandler(keep)
    assert seen == [scope] and records == []  # uvicorn.error's handshake line: redact_query (above)


def test_uvicorns_access_line_redacts_an_invitation_link_too():
    from core.log_filters import RedactQueryStrings

    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", f"/invitations/{TOKEN}/?next=/", "1.1", 410), None,
    )  # fmt: skip
    RedactQueryStrings().filter(record)
    assert record.getMessage() == '127.0.0.1:5 - "GET /invitations/[redacted]/?[redacted] HTTP/1.1" 410'


@pytest.mark.django_db
def test_djangos_own_warnings_about_an_invitation_path_do_not_name_its_token(caplog):
    from django.test import Client

    with caplog.at_level(logging.WARNING):
        gone = Client().get(f"/invitations/{TOKEN}/")  # unknown token: 410, "Gone: <path>"
        refused = Client(enforce_csrf_checks=True).post(f"/invitations/{TOKEN}/")  # "Forbidden (CSRF …): <path>"
    assert (gone.status_code, refused.status_code) == (410, 403)
    names = {record.name for record in caplog.records}
    assert {"django.request", "django.security.csrf"} <= names
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
        assert TOKEN not in repr(getattr(record, "request", ""))
    assert "/invitations/[redacted]/" in caplog.text


async def _answer(send, status):
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@pytest.mark.django_db
def test_django_names_the_same_request_id_and_answers_it(client):
    response = client.get("/accounts/login/", HTTP_X_REQUEST_ID="abc-123")
    assert response["X-Request-ID"] == "abc-123"


def test_a_task_published_during_a_request_carries_its_id_and_the_worker_line_names_it(caplog):
    from workers.celery import REQUEST_ID_HEADER, _carry_request_id, _task_finished, _task_started, app

    headers: dict = {"id": "task-1"}
    with request_id_bound("req-upload-1"):
        _carry_request_id(sender="workers.tasks.infer", headers=headers)
    assert headers[REQUEST_ID_HEADER] == "req-upload-1"

    import workers.tasks  # noqa: F401  registers the app's tasks (not the loader: it would set Django up again)

    task = app.tasks["workers.tasks.infer"]
    task.push_request(id="task-1", **{REQUEST_ID_HEADER: headers[REQUEST_ID_HEADER]})
    caplog.set_level(logging.INFO, logger="sightline.task")
    try:
        _task_started(task_id="task-1", task=task)
        from core.logging import current_request_id

        assert current_request_id() == "req-upload-1"  # the task's own lines name it too
        _task_finished(task_id="task-1", task=task, state="SUCCESS")
    finally:
        task.pop_request()
    (line,) = [record for record in caplog.records if record.name == "sightline.task"]
    assert (line.task, line.task_id, line.state) == ("workers.tasks.infer", "task-1", "SUCCESS")
    assert line.request_id == "req-upload-1"
    assert line.runtime_ms >= 0
    from core.logging import current_request_id

    assert current_request_id() == ""  # unbound after the task


def test_a_task_with_no_request_behind_it_logs_under_its_own_task_id(caplog):
    import workers.tasks  # noqa: F401
    from workers.celery import _task_finished, _task_started, app

    task = app.tasks["workers.tasks.audit_verify"]
    task.push_request(id="task-2")
    caplog.set_level(logging.INFO, logger="sightline.task")
    try:
        _task_started(task_id="task-2", task=task)
        _task_finished(task_id="task-2", task=task, state="FAILURE")
    finally:
        task.pop_request()
    (line,) = [record for record in caplog.records if record.name == "sightline.task"]
    assert line.request_id == "task-2" and line.state == "FAILURE"
