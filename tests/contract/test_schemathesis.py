"""schemathesis, every check and every phase (stateful included), against a live server with a
clinician's token: zero failures and zero server errors. CI runs it once (`make contract`, after
the SQLite pass), not in both database passes; `make test` leaves it out by its marker."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings

pytestmark = [pytest.mark.contract, pytest.mark.e2e, pytest.mark.timeout(900)]

CONFIG = Path(__file__).with_name("schemathesis.toml")
# the time budget schemathesis spreads over its phases; measured: about 3 minutes on 2 cores
MAX_SECONDS = int(os.environ.get("SIGHTLINE_CONTRACT_SECONDS", "150"))


def clinician_token() -> str:
    from django.contrib.auth import get_user_model
    from rest_framework_simplejwt.tokens import AccessToken

    token = AccessToken.for_user(get_user_model().objects.get(username="clinician"))
    token.set_exp(lifetime=timedelta(seconds=MAX_SECONDS + 600))  # outlives the run
    return str(token)


def test_the_live_api_keeps_its_openapi_contract(stack, live_demo, tmp_path):
    argv = [
        str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(CONFIG), "--no-color",
        "run", f"{stack.base_url}/api/v1/schema/",
        "--checks", "all", "--max-time", str(MAX_SECONDS),
        "-H", f"Authorization: Bearer {clinician_token()}",
        "--report", "junit", "--report-dir", str(tmp_path),
    ]  # fmt: skip
    argv += shlex.split(os.environ.get("SIGHTLINE_CONTRACT_ARGS", ""))  # e.g. "--seed N" to replay a run
    env = {**os.environ, "PYTHONPATH": str(settings.BASE_DIR)}  # the hooks module
    run = subprocess.run(
        argv, cwd=settings.BASE_DIR, env=env, capture_output=True, text=True, timeout=MAX_SECONDS + 600
    )
    # zero server errors, also those a check might not see (a refusal Django logs with its
    # traceback, such as too many files, is a 400 and fine)
    web_log = (stack.logs / "web.log").read_text(errors="replace")
    server_errors = [
        line for line in web_log.splitlines() if re.search(r'HTTP/1\.1" 5\d\d |Internal Server Error', line)
    ]
    # what a reader of a failed CI run needs first: schemathesis' failures (each with its curl
    # to replay it), the server's tracebacks, then the summary with the seed
    failures = run.stdout.partition("FAILURES")[2].partition("WARNINGS")[0]
    tracebacks = "\n".join(_tracebacks(web_log)[:3])
    report = (
        f"{failures[:20_000]}\n--- web.log ---\n{tracebacks[:8_000]}\n--- end ---\n"
        f"{run.stdout[-4_000:]}{run.stderr[-2_000:]}"
    )
    assert run.returncode == 0, report
    assert not server_errors, "\n".join(server_errors[:50]) + "\n" + tracebacks[:8_000]


def _tracebacks(log: str) -> list[str]:
    """Each logged 500 ("Internal Server Error: /path") with the traceback that follows it."""
    blocks: list[str] = []
    current: list[str] | None = None
    for line in log.splitlines():
        if "Internal Server Error" in line:
            if current:
                blocks.append("\n".join(current))
            current = [line]
        elif current is not None:
            current.append(line)
            if (
                current[-2:-1]
                and not line.startswith(" ")
                and line.strip()
                and not line.startswith(("Traceback", "During handling", "The above"))
            ):  # the exception's own line ends the block
                blocks.append("\n".join(current))
                current = None
    if current:
        blocks.append("\n".join(current))
    return blocks
