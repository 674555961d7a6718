"""How the web process is started, in one place for the tests and the benchmarks (the Procfile
and the Kubernetes manifests spell the same command).

uvicorn, not daphne: uvicorn stops reading a request body while the application has not taken
the last piece (flow control), so a 400 MB archive passes through the web process in small pieces
and Django spools it to disk; daphne reads the whole body into memory first. Forwarded headers
are trusted only when a deployment says so (see README, "Behind a proxy").
"""

from pathlib import Path


def web_server_argv(
    *, bin_dir: Path, port: int, host: str = "127.0.0.1", forwarded_allow_ips: str | None = None
) -> list[str]:
    """uvicorn's command line. ``forwarded_allow_ips``: the proxy's address(es), comma-separated;
    only connections from there may set the client address and scheme (X-Forwarded-For, which
    nginx overwrites with the address it saw, and X-Forwarded-Proto). None: trust no one."""
    if forwarded_allow_ips is not None and not forwarded_allow_ips.strip():
        raise ValueError("forwarded_allow_ips names the proxy's address; None trusts no forwarded headers")
    proxy = (
        ["--no-proxy-headers"]
        if forwarded_allow_ips is None
        else ["--proxy-headers", "--forwarded-allow-ips", forwarded_allow_ips]
    )
    return [
        str(bin_dir / "uvicorn"),
        "config.asgi:application",
        "--host", host,
        "--port", str(port),
        "--lifespan", "off",  # Channels' router does not speak the lifespan protocol
        *proxy,
        "--no-server-header",
    ]  # fmt: skip
