"""The C-STORE SCP as a process of its own beside the e2e stack, and a hospital set up to send to
it: its called AE title and its registered nodes (committed, for the SCP process to read)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.conf import settings
from django.core.cache import cache

from tests.e2e.conftest import VENV_BIN, free_port, wait_for_line

HOSPITAL_AE = "SL_GENERAL"
NODE_AE = "STORESCU"
ADDRESS = "127.0.0.1"
REJECTIONS_PER_WINDOW = 3  # the SCP's throttle in these tests


@dataclass
class Scp:
    port: int
    log: Path
    process: subprocess.Popen

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def clear_rejections(address: str = ADDRESS) -> None:
    cache.delete_many([f"dicom:rejections:{address}", f"dicom:throttle-logged:{address}"])


def scp_env(stack, **extra: str) -> dict:
    """The stack's environment, with this process's cache (so the test sees the SCP's counters)."""
    return {
        **stack.env,
        "SIGHTLINE_CACHE_URL": settings.CACHES["default"]["LOCATION"],
        "SIGHTLINE_CACHE_PREFIX": settings.CACHES["default"]["KEY_PREFIX"],
        "SIGHTLINE_DICOM_REJECTIONS_PER_WINDOW": str(REJECTIONS_PER_WINDOW),
        "SIGHTLINE_DICOM_TIMEOUT": "15",
        **extra,
    }


@pytest.fixture(scope="module")
def dicom_scp(stack, tmp_path_factory) -> Iterator[Scp]:
    """``manage.py dicom_scp`` on a free port with the stack's database and broker."""
    port = free_port()
    log = tmp_path_factory.mktemp("dicom-scp") / "dicom-scp.log"
    process = subprocess.Popen(
        [str(VENV_BIN / "python"), "manage.py", "dicom_scp", "--host", ADDRESS, "--port", str(port)],
        env=scp_env(stack),
        cwd=settings.BASE_DIR,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_line("DICOM SCP listening", process, log)
        yield Scp(port, log, process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def dicom_hospital(live_demo):
    """Demo General called SL_GENERAL, with the node STORESCU at 127.0.0.1 registered by its admin."""
    from accounts.models import Role, Tenant
    from accounts.services import membership_grant, user_get_or_create
    from dicomnet.nodes import dicom_node_create, hospital_ae_title_assign
    from tests.conftest import PASSWORD

    clear_rejections()
    tenant = Tenant.objects.get(slug="demo-general")
    hospital_ae_title_assign(tenant=tenant, ae_title=HOSPITAL_AE)
    admin = membership_grant(
        tenant=tenant, user=user_get_or_create(username="admin-general", password=PASSWORD), role=Role.TENANT_ADMIN
    )
    node = dicom_node_create(actor=admin, name="DCMTK storescu", ae_title=NODE_AE, host=ADDRESS)
    yield {"tenant": tenant, "admin": admin, "node": node}
    clear_rejections()
