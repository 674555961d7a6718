"""Real DICOM peers for the tests, from Debian's packages: Orthanc (a hospital PACS, with its
DICOMweb plugin) and DCMTK's command-line tools. Started on free ports, stopped by pid; a test
that needs one fails (not skips) when it is missing: `.ci/run` installs them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
ORTHANC_AE_TITLE = "ORTHANC"
STARTUP_SECONDS = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dcmtk(tool: str) -> str:
    """The path of a DCMTK tool (echoscu, storescu, dsrdump, dcmdump); an AssertionError that says
    what to install when it is missing."""
    path = shutil.which(tool)
    assert path, f"DCMTK's {tool} is not installed: apt-get install dcmtk (.ci/run does)"
    return path


@dataclass
class Orthanc:
    """A running Orthanc: its REST/DICOMweb base URL and DICOM port."""

    http_port: int
    dicom_port: int
    ae_title: str
    directory: Path
    process: subprocess.Popen
    modalities: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def get(self, path: str, *, accept: str = "application/json"):
        request = urllib.request.Request(self.url + path, headers={"Accept": accept})
        with urllib.request.urlopen(request, timeout=30) as answer:
            body = answer.read()
        return json.loads(body) if accept.endswith("json") else body

    def post(self, path: str, payload: object, *, timeout: float = 120):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            body = answer.read()
        try:
            return json.loads(body)
        except ValueError:
            return body

    def instances(self) -> list[dict]:
        """Every instance Orthanc holds, with its main DICOM tags (simplified)."""
        return [self.get(f"/instances/{oid}/simplified-tags") for oid in self.get("/instances")]

    def instance_file(self, sop_instance_uid: str) -> bytes:
        found = self.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}})
        assert found, f"Orthanc holds no instance {sop_instance_uid}"
        return self.get(f"/instances/{found[0]}/file", accept="application/dicom")

    def upload(self, data: bytes) -> dict:
        return self.post("/instances", data)

    def store_to(self, modality: str, resources: list[str]) -> dict:
        """C-STORE from Orthanc to a configured modality (the platform's SCP)."""
        return self.post(f"/modalities/{modality}/store", {"Resources": resources, "Synchronous": True})


@contextmanager
def orthanc_running(directory: Path, *, modalities: dict[str, list] | None = None) -> Iterator[Orthanc]:
    """Start Orthanc in ``directory`` with ``modalities`` ({name: [AET, host, port]}: where it may
    C-STORE to) and stop it afterwards."""
    assert Path(ORTHANC).exists(), "Orthanc is not installed: apt-get install orthanc orthanc-dicomweb (.ci/run does)"
    assert Path(ORTHANC_DICOMWEB_PLUGIN).exists(), "Orthanc's DICOMweb plugin is missing: install orthanc-dicomweb"
    directory.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "sightline-test-pacs",
        "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AE_TITLE,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomModalities": modalities or {},
        "Plugins": [ORTHANC_DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "StableAge": 1,
    }
    config_path = directory / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = (directory / "orthanc.log").open("wb")
    process = subprocess.Popen(
        [ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=directory
    )
    orthanc = Orthanc(http_port, dicom_port, ORTHANC_AE_TITLE, directory, process, modalities or {})
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited early:\n{(directory / 'orthanc.log').read_text()[-3000:]}")
            try:
                orthanc.get("/system")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError("Orthanc did not answer on its REST port") from None
                time.sleep(0.2)
        yield orthanc
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()
