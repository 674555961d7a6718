"""The real nginx in front of real uvicorn replicas, for the tests and the bench.

nginx is rendered with platform/nginx/render.sh exactly as a deployment renders it, listens on a
free loopback port with a certificate from a throwaway CA (trustme), and connects to the replicas
from its own loopback address (``PROXY_ADDRESS``), the only address the replicas take forwarded
headers from. Clients connect from another (``CLIENT_ADDRESS``), so every assertion about "the
client's address" can tell the client, the proxy and a direct caller apart.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from django.conf import settings

from config.webserver import web_server_argv
from tests.e2e.conftest import VENV_BIN, Processes, free_port, wait_for_port

RENDER = Path(settings.BASE_DIR) / "platform" / "nginx" / "render.sh"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
PROXY_ADDRESS = "127.0.0.2"  # nginx's proxy_bind: the one address uvicorn trusts
CLIENT_ADDRESS = "127.0.0.3"  # the tests' client
OTHER_CLIENT_ADDRESS = "127.0.0.4"  # another client, for "the lockout counts the client"


@dataclass
class Tls:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_pem))
        return context


def tls_files(directory: Path) -> Tls:
    """A CA and a server certificate for 127.0.0.1 and localhost, as the operator would supply."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    tls = Tls(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    ca.cert_pem.write_to_path(str(tls.ca_pem))
    with tls.cert_pem.open("wb") as chain:
        for blob in server.cert_chain_pems:
            chain.write(blob.bytes())
    server.private_key_pem.write_to_path(str(tls.key_pem))
    return tls


def collect_static(root: Path) -> dict[str, str]:
    """collectstatic into ``root`` with hashed names (Django's manifest storage, as production
    has it); returns the manifest: source name -> hashed name."""
    from django.core.management import call_command
    from django.test import override_settings

    manifest_storage = {"BACKEND": "django.contrib.staticfiles.storage.ManifestStaticFilesStorage"}
    with override_settings(STATIC_ROOT=str(root), STORAGES={**settings.STORAGES, "staticfiles": manifest_storage}):
        call_command("collectstatic", interactive=False, verbosity=0)
    return json.loads((root / "staticfiles.json").read_text())["paths"]


@dataclass
class Nginx:
    prefix: Path
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    def access_log(self) -> list[dict]:
        path = self.prefix / "logs" / "access.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def entry(self, **fields) -> dict:
        """The one access-log line with these fields (nginx writes it just after the answer)."""
        deadline = time.monotonic() + 5
        while True:
            found = [line for line in self.access_log() if all(line.get(k) == v for k, v in fields.items())]
            if found or time.monotonic() > deadline:
                assert len(found) == 1, (fields, found)
                return found[0]
            time.sleep(0.05)

    def log_text(self) -> str:
        """Everything nginx wrote: its access log and its error log."""
        return "".join(
            path.read_text(errors="replace")
            for path in (self.prefix / "logs" / "access.log", self.prefix / "logs" / "error.log")
            if path.exists()
        )

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return [int(pid) for pid in children]


def nginx_start(
    processes: Processes,
    *,
    prefix: Path,
    upstreams: list[str],
    tls: Tls,
    static_root: Path,
    max_request_bytes: int,
    **options: str,
) -> Nginx:
    """Render the platform's config into ``prefix`` with render.sh and run nginx from there.
    ``options``: more SIGHTLINE_NGINX_* variables (their names without the prefix, lower case)."""
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "SIGHTLINE_NGINX_LISTEN": f"127.0.0.1:{port}",
        "SIGHTLINE_NGINX_UPSTREAMS": " ".join(upstreams),
        "SIGHTLINE_NGINX_CERT": str(tls.cert_pem),
        "SIGHTLINE_NGINX_KEY": str(tls.key_pem),
        "SIGHTLINE_STATIC_ROOT": str(static_root),
        "SIGHTLINE_MAX_REQUEST_BYTES": str(max_request_bytes),
        "SIGHTLINE_NGINX_PROXY_BIND": PROXY_ADDRESS,
        # pytest's temporary folders are private to this user: the workers run as it too
        "SIGHTLINE_NGINX_USER": getpass.getuser(),
        **{f"SIGHTLINE_NGINX_{name.upper()}": value for name, value in options.items()},
    }
    rendered = subprocess.run(["sh", str(RENDER), str(prefix)], env=env, capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    argv = [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "logs" / "error.log")]
    process, log = processes.start(f"nginx-{prefix.name}", [*argv, "-g", "daemon off;"], env)
    wait_for_port(port, process, log)
    return Nginx(prefix, port, process)


def proxied_web_start(processes: Processes, env: dict, *, name: str = "web-proxied") -> tuple[subprocess.Popen, int]:
    """A web replica as it runs behind nginx: forwarded headers trusted from PROXY_ADDRESS only."""
    port = free_port()
    process, log = processes.start(
        name, web_server_argv(bin_dir=VENV_BIN, port=port, forwarded_allow_ips=PROXY_ADDRESS), env
    )
    wait_for_port(port, process, log)
    return process, port


def https_client(nginx: Nginx, tls: Tls, *, local_address: str = CLIENT_ADDRESS, http2: bool = True) -> httpx.Client:
    """An HTTPS client of nginx, connecting from ``local_address``."""
    transport = httpx.HTTPTransport(http2=http2, verify=tls.client_context(), local_address=local_address)
    return httpx.Client(transport=transport, base_url=nginx.url, timeout=30)


def tls_socket(nginx: Nginx, tls: Tls, *, local_address: str = CLIENT_ADDRESS) -> ssl.SSLSocket:
    """A raw HTTP/1.1-over-TLS connection to nginx, for requests a client library would not send
    the way the test needs (a body sent in parts, a declared length never sent)."""
    raw = socket.create_connection(("127.0.0.1", nginx.port), timeout=30, source_address=(local_address, 0))
    context = tls.client_context()
    context.set_alpn_protocols(["http/1.1"])
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def read_response(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = connection.recv(65536)
        assert piece, f"the server closed the connection without an answer: {data!r}"
        data += piece
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in header_lines)}
    while len(body) < int(headers.get("content-length", "0")):
        piece = connection.recv(65536)
        if not piece:
            break
        body += piece
    return int(status_line.split()[1]), headers, body
