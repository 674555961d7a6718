"""The multi-host drill: the deployment of platform/multihost.sh (nginx in front of two web
replicas, a worker host, beat and the DICOM receiver, PostgreSQL, Redis and S3, each a host of its
own) under load from the client host, while the test kills and restarts its parts:

- ``kill -9`` the bulk-lane worker in the middle of the bulk job, then starts it again;
- ``kill -9`` one web replica, then starts it again (as a supervisor would);
- restarts Redis;
- stops PostgreSQL for 10 s (``pg_ctl stop -m fast``: live connections drop), then starts it.

Afterwards: every upload the client saw accepted has exactly one image with exactly one result
(none lost, none doubled; a retry with the same Idempotency-Key is the same upload); every failure
the client saw was a clear answer it could retry (nginx's 502/504 JSON, Django's 503/429 with
Retry-After), never a bare 500 or a hang; the bulk job finished with one result per item; the
access-log chains verify; each WebSocket client reconnected and, with its refetches, missed no
result. The counts are printed and written to ``$SIGHTLINE_MULTIHOST_DIR/drill.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multihost, pytest.mark.e2e, pytest.mark.timeout(900)]  # up, the drill, down

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "platform" / "multihost.sh"
PYTHON = str(Path(sys.executable))
BULK_IMAGES = 2000
POSTGRES_DOWN_SECONDS = 10
LOAD_AFTER_FAULTS_SECONDS = 10  # uploads keep coming once everything is back
DRAIN_SECONDS = 300  # for the job and every accepted read to finish after the load stops
# the drill's own settings, beside production's: the reconciliation every 5 s instead of every minute
DRILL_ENV = {"SIGHTLINE_RECONCILE_SECONDS": "5", "SIGHTLINE_MAX_WAIT_MS": "10"}


def script(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )
    if check and done.returncode != 0:
        raise AssertionError(f"multihost.sh {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {key: value.strip("'") for key, value in pairs}


def events(out: Path) -> list[dict]:
    path = out / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, monkeypatch_module):
    import trustme

    state = Path(os.environ.get("SIGHTLINE_MULTIHOST_DIR", ROOT / "var" / "multihost"))
    certs = tmp_path_factory.mktemp("edge-cert")
    ca = trustme.CA()
    # both addresses the edge can have (netns or loopback mode): the mode is the script's choice
    cert = ca.issue_cert("sightline.test", "10.231.0.10", "127.77.0.10")
    cert.private_key_pem.write_to_path(certs / "key.pem")
    cert.cert_chain_pems[0].write_to_path(certs / "cert.pem")
    ca.cert_pem.write_to_path(certs / "ca.pem")
    extra = certs / "drill.env"
    extra.write_text("".join(f"{key}={value}\n" for key, value in DRILL_ENV.items()))
    for key, value in {
        "SIGHTLINE_MULTIHOST_DIR": str(state),
        "SIGHTLINE_NGINX_CERT": str(certs / "cert.pem"),
        "SIGHTLINE_NGINX_KEY": str(certs / "key.pem"),
        "SIGHTLINE_MULTIHOST_EXTRA_ENV": str(extra),
    }.items():
        monkeypatch_module.setenv(key, value)
    try:
        started = time.monotonic()
        script("up", timeout=900)
        print(f"\nup in {time.monotonic() - started:.0f} s, mode {(state / 'state' / 'mode').read_text().strip()}")
        yield {
            "dir": state,
            "ca": certs / "ca.pem",
            **read_env(state / "topology.env"),
            **read_env(state / "secrets.env"),
        }
    finally:
        script("down", timeout=300, check=False)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def job_progress(out: Path) -> dict | None:
    progress = [e for e in events(out) if e["kind"] == "job"]
    return progress[-1] if progress else None


def verify(deployment, run: str, job: int | None) -> dict:
    args = ["exec", "web1", "--", PYTHON, "-m", "tests.drill.verify", "--run", run]
    return json.loads(script(*args, *(["--job", str(job)] if job else []), timeout=120).stdout)


def log_tail(path: Path, lines: int = 25, skip: str = "over capacity") -> str:
    """The last ``lines`` lines of one of the deployment's logs, each cut to 300 characters."""
    if not path.exists():
        return f"({path.name}: none)"
    kept = [line[:300] for line in path.read_text(errors="replace").splitlines() if skip not in line]
    return f"--- {path.name}\n" + "\n".join(kept[-lines:])


def dump_worker_stacks() -> None:
    """Every Celery pool process (a celery worker whose parent is one) writes its threads' stacks
    to its worker's log (SIGUSR2: workers/celery.py); the main processes are left alone."""
    processes: dict[int, tuple[int, str]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            processes[int(proc.name)] = (parent, (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
    celery = {  # the drill's two workers only (multihost.sh names them LANE@worker)
        pid
        for pid, (_, cmdline) in processes.items()
        if "workers.celery worker" in cmdline and ("-n bulk@worker" in cmdline or "-n interactive@worker" in cmdline)
    }
    for pid in celery:
        if processes[pid][0] in celery:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR2)
    time.sleep(2)


def stalled(deployment, last: dict) -> str:
    """What a drain that timed out left behind: the job's last counts, the reads' states, every
    request the database holds by status, lane and claim, and the tail of each worker's log."""
    reads = last.get("reads") or {}
    queue = script(
        "exec", "web1", "--", PYTHON, "manage.py", "shell", "-c",
        "from collections import Counter; from recognition.models import InferenceRequest as R; "
        "print(dict(Counter(R.objects.values_list('status', 'priority', 'claimed_by'))))",
        check=False, timeout=120,
    )  # fmt: skip
    dump_worker_stacks()
    logs = deployment["dir"] / "log"
    return "\n".join(
        [
            f"job: {last.get('job')}",
            f"reads: {reads.get('requests_by_status')}, without request: {reads.get('images_without_request')}",
            f"every request by (status, priority, claimed_by): {queue.stdout.strip()[-2000:]} {queue.stderr[-500:]}",
            *(log_tail(logs / name) for name in ("worker.bulk.log", "worker.interactive.log", "svc.beat.log")),
        ]
    )


def test_hosts_killed_under_load_lose_and_double_nothing(deployment):
    out = deployment["dir"] / "client"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    client_log = (deployment["dir"] / "log" / "client.drill.log").open("wb")
    client = subprocess.Popen(
        [
            str(SCRIPT), "exec", "client", "--", PYTHON, "-m", "tests.drill.client",
            "--base", deployment["SIGHTLINE_PUBLIC_URL"], "--ws", deployment["SIGHTLINE_PUBLIC_WS_URL"],
            "--ca", str(deployment["ca"]), "--password", deployment["SIGHTLINE_DEMO_PASSWORD"],
            "--out", str(out), "--bulk-images", str(BULK_IMAGES),
        ],
        cwd=ROOT, stdout=client_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    faults: list[dict] = []
    try:
        started = wait_for(lambda: [e for e in events(out) if e["kind"] == "job_started"], 240, "the job's start")[0]
        job = started["job"]

        # the bulk worker, mid-batch: some of the job done, most still to do
        wait_for(lambda: (job_progress(out) or {}).get("counts", {}).get("done", 0) > 0, 120, "the job's first results")
        script("kill", "worker", "bulk", "KILL")
        faults.append({"fault": "kill -9 worker/bulk", "job_done_then": job_progress(out)["counts"]["done"]})
        time.sleep(2)
        script("start", "worker", "bulk")

        script("kill", "web1", "web", "KILL")
        faults.append({"fault": "kill -9 web1/web"})
        time.sleep(2)
        script("start", "web1", "web")

        script("stop", "redis", "redis")
        faults.append({"fault": "restart redis"})
        time.sleep(2)
        script("start", "redis", "redis")

        script("stop", "db", "postgres")
        faults.append({"fault": f"stop postgres {POSTGRES_DOWN_SECONDS} s"})
        time.sleep(POSTGRES_DOWN_SECONDS)
        script("start", "db", "postgres")

        time.sleep(LOAD_AFTER_FAULTS_SECONDS)
        (out / "stop").touch()
        run = [e for e in events(out) if e["kind"] == "started"][0]["run"]

        last: dict = {}

        def drained():
            last["job"] = progress = job_progress(out) or {}
            if progress.get("state") != "finished":
                return None
            last["reads"] = report = verify(deployment, run, job)
            waiting = sum(n for status, n in report["requests_by_status"].items() if status not in ("done", "failed"))
            return report if waiting == 0 and report["images_without_request"] == [] else None

        try:
            wait_for(drained, DRAIN_SECONDS, "the job and every accepted read to finish", interval=3)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{stalled(deployment, last)}") from None
        time.sleep(3)  # the last result.ready on its way to the sockets
        (out / "stop-ws").touch()
        client.wait(timeout=120)
    finally:
        (out / "stop").touch()
        (out / "stop-ws").touch()
        try:
            client.wait(timeout=60)
        except subprocess.TimeoutExpired:
            client.kill()
    assert client.returncode == 0, (deployment["dir"] / "log" / "client.drill.log").read_text()[-3000:]

    seen = events(out)
    run = [e for e in seen if e["kind"] == "started"][0]["run"]
    report = verify(deployment, run, job)
    audit = script("exec", "web1", "--", PYTHON, "manage.py", "verify_audit_log", check=False)

    accepted = {e["key"]: e for e in seen if e["kind"] == "accepted"}
    attempts = [e for e in seen if e["kind"] == "attempt"]
    call_errors = [e for e in seen if e["kind"] in ("call_error", "sign_in_error")]
    watchers = [e for e in seen if e["kind"] == "watcher"]
    accepted_images = {e["image"] for e in accepted.values()}
    counts = {
        "mode": (deployment["dir"] / "state" / "mode").read_text().strip(),
        "faults": faults,
        "accepted": len(accepted),
        "retried": sum(1 for e in accepted.values() if e["attempt"] > 1),
        "accepted_on_a_retry_as_the_same_upload": sum(1 for e in accepted.values() if e["status"] == 200),
        "errors_by_status": dict(Counter(str(e["status"]) for e in attempts + call_errors)),
        "unclear_errors": [e for e in attempts + call_errors if not e.get("clear")][:20],
        "rejected": [e for e in seen if e["kind"] == "rejected"],
        "abandoned": [e for e in seen if e["kind"] == "abandoned"],
        "results": len(accepted_images) - len(report["images_without_result"]),
        "lost": sorted(set(report["images_without_result"]) | set(report["images_without_request"])),
        "duplicates": {
            "images_per_key_over_one": sorted(k for k, ids in report["keys"].items() if len(ids) > 1),
            "images_with_several_requests": report["images_with_several_requests"],
            "images_with_several_results": report["images_with_several_results"],
            "job_requests_with_several_results": report["job"]["requests_with_several_results"],
        },
        "stored_but_never_acknowledged": sorted(set(report["keys"]) - set(accepted)),
        "requests_by_status": report["requests_by_status"],
        "job_items": report["job"],
        "websockets": [
            {
                "connections": w["connections"],
                "closes": w["closes"],
                "live": len(set(w["live"]) & accepted_images),
                "refetched_only": len((set(w["refetched"]) - set(w["live"])) & accepted_images),
                "missed": sorted(accepted_images - set(w["live"]) - set(w["refetched"])),
                "attempts": w["attempts"],  # each connection's start (epoch s), length and end
            }
            for w in watchers
        ],
        "verify_audit_log": {"returncode": audit.returncode, "output": (audit.stdout + audit.stderr)[-500:]},
    }
    (deployment["dir"] / "drill.json").write_text(json.dumps(counts, indent=2))
    print(json.dumps({k: v for k, v in counts.items() if k != "unclear_errors"}, indent=2))

    assert accepted, "the client got nothing accepted"
    assert not counts["rejected"] and not counts["abandoned"], (counts["rejected"], counts["abandoned"])
    # every accepted upload: its key made exactly the one image the client was told of, read once
    for key, event in accepted.items():
        assert report["keys"].get(key) == event["images"], (key, report["keys"].get(key), event)
    assert counts["lost"] == [] and not any(counts["duplicates"].values()), counts
    assert counts["stored_but_never_acknowledged"] == []
    assert set(report["requests_by_status"]) <= {"done"}, report["requests_by_status"]
    # every failure the client saw was one it could retry: no bare 500, no hang, no broken connection
    assert counts["unclear_errors"] == [], counts["unclear_errors"]
    assert "500" not in counts["errors_by_status"]
    job_items = report["job"]
    assert job_items["items"] == BULK_IMAGES and job_items["items_by_status"] == {"done": BULK_IMAGES}, job_items
    assert job_items["results"] == BULK_IMAGES and job_items["done_items_without_result"] == 0
    assert audit.returncode == 0, counts["verify_audit_log"]
    assert len(watchers) == 2
    for watcher in counts["websockets"]:
        assert watcher["connections"] >= 2, watcher  # Redis's restart closed every socket: each came back
        assert watcher["missed"] == [], watcher
