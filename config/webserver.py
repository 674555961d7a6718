"""How the web process is started, in one place for the tests and the benchmarks (the Procfile
and the Kubernetes manifests spell the same command).

uvicorn, not daphne: uvicorn stops reading a request body while the application has not taken
the last piece (flow control), so a 400 MB archive passes through the web process in small pieces
and Django spools it to disk; daphne reads the whole body into memory first. Forwarded headers
are trusted only when a deployment says so (see README, "Behind a proxy").
"""

from pathlib import Path


def web_server_argv(*, bin_dir: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    return [
        str(bin_dir / "uvicorn"),
        "config.asgi:application",
        "--host", host,
        "--port", str(port),
        "--lifespan", "off",  # Channels' router does not speak the lifespan protocol
        "--no-proxy-headers",
        "--no-server-header",
    ]  # fmt: skip
