"""JSON-lines logs from every process, live: uvicorn, a Celery worker, beat and the DICOM receiver
started as a deployment starts them, with SIGHTLINE_LOG_FORMAT=json. Every line each one writes
parses as one JSON object naming its role; an upload's request id is in the web's line for it and
in the worker's line for the task the upload queued; beat writes a line per task it sends; the
receiver one per association, under an association id of its own."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
from django.conf import settings

from config.webserver import web_server_argv
from tests.conftest import PASSWORD, png_bytes
from tests.e2e.conftest import (
    VENV_BIN,
    Processes,
    database_url,
    free_port,
    redis_server_binary,
    wait_for_line,
    wait_for_port,
)

pytestmark = [pytest.mark.e2e, pytest.mark.heavy_any_db]

HOSPITAL_AE = "SL_JSONLOGS"
NODE_AE = "JSONSCU"
WAIT_S = 120


def json_lines(log: Path) -> tuple[list[dict], list[str]]:
    parsed, bad = [], []
    for line in log.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        (parsed if isinstance(record, dict) else bad).append(record if isinstance(record, dict) else line)
    return parsed, bad


def wait_for_record(log: Path, predicate, what: str) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for record in json_lines(log)[0]:
            if predicate(record):
                return record
        time.sleep(0.3)
    raise AssertionError(f"never saw {what} in {log.name}:\n{log.read_text(errors='replace')[-3000:]}")


def echo_from_the_node(port: int) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=NODE_AE)
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", port, ae_title=HOSPITAL_AE)
    assert association.is_established
    status = association.send_c_echo()
    assert status.Status == 0x0000
    association.release()


def test_every_process_writes_json_lines_and_an_upload_shares_its_request_id_with_its_task(live_demo, tmp_path):
    from accounts.models import Role, Tenant
    from accounts.services import membership_grant, user_get_or_create
    from dicomnet.nodes import dicom_node_create, hospital_ae_title_assign

    tenant = Tenant.objects.get(slug="demo-general")
    hospital_ae_title_assign(tenant=tenant, ae_title=HOSPITAL_AE)
    admin = membership_grant(
        tenant=tenant, user=user_get_or_create(username="admin-json", password=PASSWORD), role=Role.TENANT_ADMIN
    )
    node = dicom_node_create(actor=admin, name="json-logs echo", ae_title=NODE_AE, host="127.0.0.1")

    processes = Processes(tmp_path)
    redis_port, web_port, dicom_port = free_port(), free_port(), free_port()
    env = {
        **{key: value for key, value in os.environ.items() if key != "DJANGO_ALLOW_ASYNC_UNSAFE"},
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url(),
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "SIGHTLINE_CACHE_PREFIX": settings.CACHES["default"]["KEY_PREFIX"],
        "SIGHTLINE_VAR_DIR": str(settings.VAR_DIR),
        "SIGHTLINE_MAX_WAIT_MS": "10",
        "SIGHTLINE_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }
    celery = [str(VENV_BIN / "celery"), "--quiet", "-A", "workers.celery"]  # --quiet: no text banner
    try:
        redis, redis_log = processes.start(
            "redis",
            [redis_server_binary(), "--port", str(redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"],
            env,
        )  # fmt: skip
        wait_for_port(redis_port, redis, redis_log)
        worker, worker_log = processes.start(
            "worker",
            [*celery, "worker", "-P", "prefork", "-c", "1", "-Q", "interactive,maintenance,bulk",
             "-n", "jsonlogs@%h", "--without-gossip", "--without-mingle", "-l", "info"],
            env,
        )  # fmt: skip
        web, web_log = processes.start("web", web_server_argv(bin_dir=VENV_BIN, port=web_port), env)
        beat, beat_log = processes.start(
            "beat", [*celery, "beat", "-l", "info", "-s", str(tmp_path / "celerybeat-schedule")], env
        )
        dicom, dicom_log = processes.start(
            "dicom",
            [str(VENV_BIN / "python"), "manage.py", "dicom_scp", "--host", "127.0.0.1", "--port", str(dicom_port)],
            env,
        )
        wait_for_port(web_port, web, web_log)
        wait_for_line(" ready.", worker, worker_log)
        wait_for_line("DICOM SCP listening", dicom, dicom_log)

        with httpx.Client(base_url=f"http://127.0.0.1:{web_port}", timeout=60) as client:
            token = client.post("/api/v1/auth/token/", json={"username": "clinician", "password": PASSWORD})
            assert token.status_code == 200, token.text
            uploaded = client.post(
                "/api/v1/images/?from=json-logs-test",
                files={"file": ("scan.png", png_bytes(seed=11), "image/png")},
                headers={"Authorization": f"Bearer {token.json()['access']}"},
            )
        assert uploaded.status_code == 201, uploaded.text
        request_id = uploaded.headers["X-Request-ID"]

        web_line = wait_for_record(
            web_log,
            lambda r: r.get("logger") == "sightline.request" and r.get("request_id") == request_id,
            "the upload's web line",
        )
        assert (web_line["method"], web_line["path"], web_line["status"]) == ("POST", "/api/v1/images/", 201)
        assert web_line["user_id"] is not None and web_line["tenant_id"] == tenant.pk
        assert web_line["role"] == "web" and web_line["duration_ms"] > 0
        task_line = wait_for_record(
            worker_log,
            lambda r: r.get("logger") == "sightline.task" and r.get("request_id") == request_id,
            "the worker's line for the upload's task",
        )
        assert task_line["state"] == "SUCCESS" and task_line["role"] == "worker"
        assert task_line["task"] and task_line["task_id"] and task_line["runtime_ms"] >= 0

        sent = wait_for_record(
            beat_log, lambda r: r.get("logger") == "sightline.task" and r.get("task"), "beat's line per send"
        )
        assert sent["role"] == "beat" and sent["request_id"] == sent["task_id"]

        echo_from_the_node(dicom_port)
        association = wait_for_record(dicom_log, lambda r: "calling_ae" in r, "the receiver's line for the association")
        assert (association["calling_ae"], association["called_ae"]) == (NODE_AE, HOSPITAL_AE)
        assert (association["stored"], association["refused"], association["node_id"]) == (0, 0, node.pk)
        assert association["request_id"].startswith("assoc-") and association["duration_ms"] >= 0
        assert association["role"] == "dicom"
    finally:
        processes.stop_all()  # their shutdown lines are checked too

    all_lines = 0
    for name, role in (("web", "web"), ("worker", "worker"), ("beat", "beat"), ("dicom", "dicom")):
        parsed, bad = json_lines(tmp_path / f"{name}.log")
        assert not bad, f"{name} wrote lines that are not JSON objects: {bad[:5]}"
        assert parsed, f"{name} wrote nothing"
        assert {record["role"] for record in parsed} == {role}
        for record in parsed:
            assert {"time", "level", "logger", "message", "role"} <= set(record), record
        all_lines += len(parsed)
    web_text = (tmp_path / "web.log").read_text()
    assert "json-logs-test" not in web_text  # the query string is in no line
    assert "clinician" not in web_text  # no username either
    print(f"{all_lines} JSON lines from 4 processes")
