"""The drill's load client: runs on the deployment's ``client`` host and talks to the edge only
(https and wss through nginx), as a hospital's integration would.

    multihost.sh exec client -- .venv/bin/python -m tests.drill.client --out DIR ...

It keeps uploading (interactive JWT uploads, each with its own ``Idempotency-Key``, retried with
the same key after any error), runs one bulk job, and keeps WebSocket clients subscribed that
reconnect with feed.js's backoff and refetch the image list after each reconnection. Everything it
sees goes to ``DIR/events.jsonl`` (one JSON object a line); ``DIR/client.json`` is its summary.
It stops uploading when ``DIR/stop`` appears, and its WebSocket clients stop at ``DIR/stop-ws``.

No Django here: it is a client, and imports only what a client would.
"""

from __future__ import annotations

import argparse
import io
import json
import ssl
import threading
import time
import uuid
import zipfile
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

RETRYABLE = {429, 502, 503, 504}  # what the platform and its proxy answer for "try again"
UPLOAD_GIVE_UP_SECONDS = 180  # one upload's retries, all together: past this the drill reports it
REQUEST_TIMEOUT_SECONDS = 30  # a request the client waits longer for counts as a hang
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 8.0  # feed.js's reconnection: 0.5 s, doubling
TENANT = "demo-general"


def png(seed: int, size: int) -> bytes:
    """A PNG no other upload of the run has (its own noise): one file, one fingerprint."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def clear_error(response: httpx.Response) -> bool:
    """A retryable answer in the platform's error shape (nginx's own 502/504 included); Django's
    503 and 429 also say when to come back."""
    if response.status_code not in RETRYABLE:
        return False
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    if not isinstance(error, dict) or not {"code", "message", "detail"} <= set(error):
        return False
    if response.status_code in (429, 503):  # Django's own "come back later" says when
        return response.headers.get("Retry-After", "").isdigit()
    return True  # nginx's 502/504: the replica went away or did not answer in time


class Log:
    def __init__(self, path: Path):
        self.file = path.open("a", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, kind: str, **fields) -> None:
        with self.lock:
            self.file.write(json.dumps({"t": round(time.time(), 3), "kind": kind, **fields}) + "\n")


class Api:
    """JWT over HTTP/2 to the edge; signs in again when the access token runs out."""

    def __init__(self, base: str, ca: str, username: str, password: str, log: Log):
        self.base, self.ca, self.username, self.password, self.log = base, ca, username, password, log
        self.local = threading.local()
        self.lock = threading.Lock()
        self.access = ""

    @property
    def http(self) -> httpx.Client:
        """Each thread its own HTTP/2 connection, as each of a hospital's clients has."""
        if not hasattr(self.local, "http"):
            self.local.http = httpx.Client(verify=self.ca, http2=True, timeout=REQUEST_TIMEOUT_SECONDS)
        return self.local.http

    def sign_in(self) -> str:
        with self.lock:
            deadline = time.monotonic() + UPLOAD_GIVE_UP_SECONDS
            while True:
                try:
                    response = self.http.post(
                        f"{self.base}/api/v1/auth/token/", json={"username": self.username, "password": self.password}
                    )
                    if response.status_code == 200:
                        self.access = response.json()["access"]
                        return self.access
                    self.log("sign_in_error", status=response.status_code, clear=clear_error(response))
                except httpx.HTTPError as exc:
                    self.log("sign_in_error", status=None, error=type(exc).__name__)
                if time.monotonic() > deadline:
                    raise RuntimeError("could not sign in")
                time.sleep(1)

    def call(self, method: str, path: str, *, token: str | None = None, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token or self.access}", **kwargs.pop("headers", {})}
        response = self.http.request(method, f"{self.base}{path}", headers=headers, **kwargs)
        if response.status_code == 401:
            self.sign_in()
            headers["Authorization"] = f"Bearer {self.access}"
            response = self.http.request(method, f"{self.base}{path}", headers=headers, **kwargs)
        return response


def uploader(api: Api, log: Log, stop: Path, number: int, run: str, pause: float, go: threading.Event) -> None:
    go.wait()  # once the job has started: its archive is unpacked with the machine to itself
    sent = 0
    while not stop.exists():
        key = f"drill-{run}-{number}-{sent}"
        body = png(seed=hash((run, number, sent)) & 0xFFFFFFFF, size=64)
        upload_once(api, log, key, body)
        sent += 1
        time.sleep(pause)


def upload_once(api: Api, log: Log, key: str, body: bytes) -> None:
    """One upload, tried again with the same key until it is accepted (or the drill gives up)."""
    started, attempt, delay = time.monotonic(), 0, BACKOFF_FIRST
    while True:
        attempt += 1
        try:
            response = api.call(
                "POST", "/api/v1/images/", files={"file": (f"{key}.png", body, "image/png")},
                headers={"Idempotency-Key": key},
            )  # fmt: skip
        except httpx.TimeoutException as exc:
            log("attempt", key=key, attempt=attempt, status="timeout", error=type(exc).__name__, clear=False)
        except httpx.HTTPError as exc:  # the connection to the edge itself broke
            log(
                "attempt",
                key=key,
                attempt=attempt,
                status="transport",
                error=f"{type(exc).__name__}: {exc}",
                clear=False,
            )
        else:
            if response.status_code in (200, 201, 202):
                image = response.json()
                log("accepted", key=key, attempt=attempt, status=response.status_code, image=image["id"],
                    images=[i["id"] for i in image["images"]])  # fmt: skip
                return
            clear = clear_error(response)
            retry_after = response.headers.get("Retry-After")
            log("attempt", key=key, attempt=attempt, status=response.status_code, clear=clear,
                retry_after=retry_after, body=response.text[:300])  # fmt: skip
            if response.status_code not in RETRYABLE:
                log("rejected", key=key, status=response.status_code)
                return
            if retry_after and retry_after.isdigit():
                delay = max(delay, float(retry_after))
        if time.monotonic() - started > UPLOAD_GIVE_UP_SECONDS:
            log("abandoned", key=key, attempts=attempt)
            return
        time.sleep(delay)
        delay = min(delay * 2, BACKOFF_MAX)


def retried(api: Api, log: Log, what: str, method: str, path: str, **kwargs) -> httpx.Response:
    """A call that is safe to repeat (a read, a create with an Idempotency-Key, a start that is
    a no-op the second time): tried until it answers something other than 'try again'."""
    deadline, delay = time.monotonic() + UPLOAD_GIVE_UP_SECONDS, BACKOFF_FIRST
    while True:
        try:
            response = api.call(method, path, **kwargs)
            if response.status_code not in RETRYABLE:
                return response
            log("call_error", what=what, status=response.status_code, clear=clear_error(response))
        except httpx.HTTPError as exc:
            log("call_error", what=what, status="transport", error=f"{type(exc).__name__}: {exc}", clear=False)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: no answer for {UPLOAD_GIVE_UP_SECONDS} s")
        time.sleep(delay)
        delay = min(delay * 2, BACKOFF_MAX)


def bulk_job(api: Api, log: Log, images: int, run: str, stop_ws: Path, go: threading.Event) -> None:
    """One job of ``images`` images in one zip, added before the faults; started, then watched."""
    try:
        _bulk_job(api, log, images, run, stop_ws, go)
    finally:
        go.set()  # the uploads go on whatever became of the job (the drill reports it)


def _bulk_job(api: Api, log: Log, images: int, run: str, stop_ws: Path, go: threading.Event) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for number in range(images):
            archive.writestr(f"drill/{number:05d}.png", png(seed=10_000_000 + number, size=48))
    job = retried(
        api, log, "job.create", "POST", "/api/v1/batches/", json={"name": f"drill {run}"},
        headers={"Idempotency-Key": f"drill-job-{run}"},
    ).json()  # fmt: skip
    response = api.call(
        "POST",
        f"/api/v1/batches/{job['id']}/items/",
        files={"archive": ("drill.zip", buffer.getvalue(), "application/zip")},
    )
    if response.status_code != 202:
        log("job_error", step="items", status=response.status_code, body=response.text[:300])
        return
    while True:
        state = retried(api, log, "job.get", "GET", f"/api/v1/batches/{job['id']}/").json()
        if state["uploads_pending"] == 0:
            break
        time.sleep(1)
    started = retried(api, log, "job.start", "POST", f"/api/v1/batches/{job['id']}/start/")
    log("job_started", job=job["id"], status=started.status_code, total=state["total"], counts=state["counts"])
    go.set()
    while not stop_ws.exists():
        state = retried(api, log, "job.get", "GET", f"/api/v1/batches/{job['id']}/").json()
        log("job", job=job["id"], state=state["state"], counts=state["counts"], total=state["total"])
        if state["state"] in ("finished", "cancelled"):
            return
        time.sleep(2)


class Watcher:
    """One WebSocket client: subscribed to the hospital, reconnecting with a backoff, refetching
    the image list after every reconnection (the database is the truth; messages are hints)."""

    def __init__(self, api: Api, log: Log, ws_base: str, ca: str, origin: str, number: int, stop: Path):
        self.api, self.log, self.ws_base, self.origin, self.number, self.stop = api, log, ws_base, origin, number, stop
        self.ssl = ssl.create_default_context(cafile=ca)
        self.live: set[int] = set()  # images whose result.ready arrived
        self.refetched: set[int] = set()  # images found done (or failed) by a refetch
        self.connections = 0
        self.closes: list = []
        self.attempts: list[dict] = []  # when each connection began and how long it lasted: the timeline

    def run(self) -> None:
        delay = BACKOFF_FIRST
        while not self.stop.exists():
            began, closes = time.time(), len(self.closes)
            try:
                with connect(
                    f"{self.ws_base}/ws/events/?token={self.api.access}", ssl=self.ssl, open_timeout=10,
                    additional_headers={"Origin": self.origin},
                ) as socket:  # fmt: skip
                    assert json.loads(socket.recv(timeout=10))["type"] == "hello"
                    socket.send(json.dumps({"type": "subscribe", "tenant": TENANT}))
                    subscribed = json.loads(socket.recv(timeout=10))
                    if subscribed.get("type") != "subscribed":
                        raise ConnectionError(f"not subscribed: {subscribed}")
                    self.connections += 1
                    delay = BACKOFF_FIRST
                    if self.connections > 1:
                        self.refetch()
                    self.listen(socket)
            except InvalidStatus as exc:
                self.closes.append(f"http {exc.response.status_code}")
                if exc.response.status_code in (401, 403):
                    self.api.sign_in()
            except ConnectionClosed as exc:
                self.closes.append(exc.rcvd.code if exc.rcvd else "no close frame")
            except (OSError, TimeoutError, ConnectionError, AssertionError, ValueError) as exc:
                self.closes.append(type(exc).__name__)
            ended = str((self.closes[closes:] or ["stop"])[0])
            self.attempts.append({"t": round(began, 3), "lasted": round(time.time() - began, 3), "end": ended})
            if self.stop.exists():
                break
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
        self.log("watcher", number=self.number, connections=self.connections, closes=[str(c) for c in self.closes],
                 attempts=self.attempts, live=sorted(self.live), refetched=sorted(self.refetched))  # fmt: skip

    def listen(self, socket) -> None:
        while not self.stop.exists():
            try:
                message = json.loads(socket.recv(timeout=1))
            except TimeoutError:
                continue
            if message.get("type") == "result.ready" and message.get("status") in ("done", "failed"):
                self.live.add(message["image"])

    def refetch(self) -> None:
        """What it missed while it was away: every page of the hospital's images."""
        cursor_url = "/api/v1/images/?page_size=200"
        while cursor_url:
            page = retried(self.api, self.log, "images.list", "GET", cursor_url).json()
            for image in page["results"]:
                if image["status"] in ("done", "failed"):
                    self.refetched.add(image["id"])
            following = page.get("next")
            cursor_url = following[following.index("/api/") :] if following else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True, help="https://edge:port")
    parser.add_argument("--ws", required=True, help="wss://edge:port")
    parser.add_argument("--ca", required=True)
    parser.add_argument("--username", default="clinician")
    parser.add_argument("--password", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--uploaders", type=int, default=2)
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between one uploader's uploads")
    parser.add_argument("--watchers", type=int, default=2)
    parser.add_argument("--bulk-images", type=int, default=2000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "events.jsonl")
    stop, stop_ws = args.out / "stop", args.out / "stop-ws"
    run = uuid.uuid4().hex[:8]
    api = Api(args.base, args.ca, args.username, args.password, log)
    api.sign_in()
    log("started", run=run)
    watchers = [Watcher(api, log, args.ws, args.ca, args.base, n, stop_ws) for n in range(args.watchers)]
    threads = [threading.Thread(target=w.run, name=f"watcher-{w.number}") for w in watchers]
    go = threading.Event()
    threads.append(threading.Thread(target=bulk_job, args=(api, log, args.bulk_images, run, stop_ws, go), name="bulk"))
    threads += [
        threading.Thread(target=uploader, args=(api, log, stop, n, run, args.pause, go), name=f"uploader-{n}")
        for n in range(args.uploaders)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log("finished", run=run)


if __name__ == "__main__":
    main()
