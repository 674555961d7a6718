"""Screening-routing benchmark: what the browser screen's routing moves, on a burst of generated images.

    .venv/bin/python bench/screening_routing.py [--images 500] [--quick] [--json bench/screening_routing.json]

A benchmark, not a test: it prints a table and writes JSON. On a throw-away SQLite database (in a
temporary folder) it registers the demo model (the server's reads) and the screening model
(sightline-screen, workers/engine/screening.py, the ONNX graph the browser runs), then, three times on
the same ``--images`` generated images (30% with the finding, workers/engine/synthetic.py, 128 px):

* no screen: every image uploaded without a screen (as today);
* screen, negatives in order: each uploaded with its screen (the same ONNX run server-side through
  onnxruntime, as the parity test compares with the browser's), the hospital screening with the
  default settings: suspicious images first within the hospital's turns;
* screen, negatives to bulk: the same, with "send confident negatives to the bulk lane" on at the
  default threshold (0.95) and maximum wait.

Each run is a burst: every image is uploaded (the service path of POST /api/v1/images/) before the
worker starts; then one worker of both lanes ("all", as `make run`'s single worker) drains the queue
in this process through the real claim → batch → forward → store path (workers.runner). Wake-ups
are not sent (no broker: this process is the worker). Measured: the share of interactive-lane work
the routing moves to the bulk lane; from the worker's start, the seconds until the last image with
the finding has its server result, and until every image has; and the screen-vs-server agreement
(recognition.agreement.screening_agreement) and the screen's own accuracy on the ground truth.
The server still reads every image in both runs: what moves is the order, not the work.

The model is loaded (one warm-up read) before either run is timed. Runtime on 2 cores: about
3 minutes at 500 images, about 1 with --quick (150).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (name, the hospital screens, confident negatives to the bulk lane)
OFF, FIRST_ONLY, ON = "no screen", "screen, negatives in order", "screen, negatives to bulk"
RUNS = ((OFF, False, False), (FIRST_ONLY, True, False), (ON, True, True))
POSITIVE_SHARE = 0.3  # the mixed set: 30% with the finding
IMAGE_SIZE = 128  # px: a small radiograph-like texture; the demo model reads at 64
SEED = 1717
QUICK_IMAGES = 150


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} images")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "screening_routing.json")
    args = parser.parse_args()
    count = QUICK_IMAGES if args.quick else args.images
    workdir = tempfile.mkdtemp(prefix="sightline-screening-routing-")
    os.environ["SIGHTLINE_VAR_DIR"] = workdir
    os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings.test"
    os.environ.setdefault("SIGHTLINE_WORKER_LANE", "all")
    import django

    django.setup()
    from django.db import connection
    from django.test.utils import setup_test_environment

    setup_test_environment()
    old_name = connection.creation.create_test_db(verbosity=0)
    try:
        report = run(count)
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
    args.json.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwritten to {args.json}")
    return 0


def _packages() -> tuple[Path, Path]:
    """The demo and screening packages, from the tests' cache (built there when missing)."""
    from tests.conftest import PACKAGE_CACHE
    from tests.screening_fixtures import cached_screening_package
    from workers.engine import training

    if not PACKAGE_CACHE.exists():
        training.train_demo_model(PACKAGE_CACHE)
    return PACKAGE_CACHE, cached_screening_package()


def _images(count: int):
    import numpy as np

    from workers.engine import synthetic

    rng = np.random.default_rng(SEED)
    positives = set(rng.choice(count, size=round(count * POSITIVE_SHARE), replace=False).tolist())
    return [(synthetic.render_png(rng, IMAGE_SIZE, i in positives), i in positives) for i in range(count)]


def _screens(onnx: bytes, images, manifest: dict, version_id: int) -> list[str]:
    """Each image's screen as the browser sends it. The quality gate here is the energy band of the
    manifest's reference (the browser's out-of-distribution heuristic); the generated set has no
    blank or saturated images, so the pixel heuristics would not fire."""
    import numpy as np

    from workers.engine import screening

    labels = manifest["labels"]
    low, high = manifest["metrics"]["reference"]["energy"]
    outputs = screening.screen_images(onnx, [data for data, _ in images])
    screens = []
    for probabilities, logits in outputs:
        score = float(screening.energy(np.asarray(logits)[None, :])[0])
        flags = ["unfamiliar"] if not low <= score <= high else []
        screens.append(
            json.dumps(
                {
                    "version_id": version_id,
                    "probabilities": {
                        label: round(float(p), 6) for label, p in zip(labels, probabilities, strict=True)
                    },
                    "latency_ms": 0,
                    "quality": {"flags": flags, "ood_score": None},
                }
            )
        )
    return screens


def run(count: int) -> dict:
    import recognition.services.images as images_service
    import recognition.services.inference as inference_service
    from accounts.models import Role, Tenant
    from accounts.services import membership_grant, user_get_or_create
    from recognition.agreement import screening_agreement
    from recognition.models import HospitalSettings, InferenceRequest, PreliminaryResult
    from recognition.services.images import image_upload
    from recognition.services.screening import screen_parse
    from tests.conftest import upload_file
    from workers.engine import screening
    from workers.registration import model_version_register
    from workers.runner import inference_run

    # no broker: this process is the worker (see the docstring)
    inference_service.task_send = images_service.task_send = lambda *a, **k: True
    demo_package, screen_package = _packages()
    demo, _ = model_version_register(package_path=demo_package)
    screen, _ = model_version_register(package_path=screen_package, alias=None, browser_distribution_allowed=True)
    images = _images(count)
    started = time.perf_counter()
    screens = _screens(screening.read_onnx(screen_package), images, screen.manifest, screen.pk)
    screen_seconds = time.perf_counter() - started

    user = user_get_or_create(username="bench-clinician", password=secrets.token_urlsafe())
    # the model loads once per worker process: one read first, so neither run pays for it
    warm_tenant = Tenant.objects.create(name="Bench warm-up", slug="warm-up")
    warm = image_upload(
        membership=membership_grant(tenant=warm_tenant, user=user, role=Role.CLINICIAN),
        upload=upload_file(images[0][0], "warm.png"),
    )
    inference_run(request_id=InferenceRequest.objects.get(image=warm).pk)
    results = {}
    for name, routed, to_bulk in RUNS:
        tenant = Tenant.objects.create(name=f"Bench {name}", slug=name.replace(" ", "-").replace(",", ""))
        membership = membership_grant(tenant=tenant, user=user, role=Role.CLINICIAN)
        if routed:
            HospitalSettings.objects.create(
                tenant=tenant, screening_enabled=True, screening_version=screen, route_negatives_to_bulk=to_bulk
            )
        positive_images, uploaded = set(), time.perf_counter()
        for index, (data, positive) in enumerate(images):
            image = image_upload(
                membership=membership,
                upload=upload_file(data, f"{index}.png"),
                screen=screen_parse(screens[index]) if routed else None,
            )
            if positive:
                positive_images.add(image.pk)
        upload_seconds = time.perf_counter() - uploaded
        requests = InferenceRequest.objects.filter(tenant=tenant)
        bulk = requests.filter(priority=InferenceRequest.Priority.BULK).count()
        first = requests.filter(screen_order=0).count()
        # the claim order's first request: the worker's wake-up names it (first_id puts it first)
        head = requests.order_by("priority", "screen_order", "id").values_list("id", flat=True).first()
        t0 = time.perf_counter()
        from django.utils import timezone

        t0_wall = timezone.now()
        inference_run(request_id=head)
        while (
            left := requests.filter(status="queued").order_by("id").values_list("id", flat=True).first()
        ) is not None:
            inference_run(request_id=left)  # nothing should be left; a safety net, not the measurement
        drain = time.perf_counter() - t0
        finished = dict(requests.values_list("image_id", "finished_at"))
        last_positive = max(finished[i] for i in positive_images)
        last_any = max(finished.values())
        waits = sorted((finished[i] - t0_wall).total_seconds() for i in positive_images)
        results[name] = {
            "images": count,
            "positives": len(positive_images),
            "upload_seconds": round(upload_seconds, 1),
            "requests_read_by_server": requests.filter(status="done").count(),
            "interactive_requests": requests.filter(priority=InferenceRequest.Priority.INTERACTIVE).count(),
            "moved_to_bulk": bulk,
            "moved_to_bulk_share": round(bulk / count, 3),
            "screened_suspicious_first": first,
            "seconds_to_last_positive": round((last_positive - t0_wall).total_seconds(), 2),
            "seconds_to_median_positive": round(waits[len(waits) // 2], 2),
            "seconds_to_90pct_of_positives": round(waits[int(len(waits) * 0.9) - 1], 2),
            "seconds_to_all": round((last_any - t0_wall).total_seconds(), 2),
            "drain_seconds": round(drain, 2),
        }
        if routed and to_bulk:
            (agreement,) = screening_agreement(tenant=tenant)
            prelims = dict(PreliminaryResult.objects.for_tenant(tenant).values_list("image_id", "top_label"))
            negative = screen.labels[0]
            correct = sum((prelims[i] != negative) == (i in positive_images) for i in prelims)
            missed_to_bulk = requests.filter(image_id__in=positive_images, image__preliminary__route="bulk").count()
            results[name]["screen"] = {
                "screened": len(prelims),
                "agreement_with_server": round(agreement.proportion.share or 0.0, 4),
                "agreement_n": agreement.proportion.n,
                "screen_negative_server_positive": agreement.screen_negative_server_positive,
                "accuracy_on_ground_truth": round(correct / len(prelims), 4),
                "positives_sent_to_bulk": missed_to_bulk,
                "server_side_screen_seconds": round(screen_seconds, 2),
            }
    off, on = results[OFF], results[ON]
    return {
        "images": count,
        "positive_share": POSITIVE_SHARE,
        "image_size": IMAGE_SIZE,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "demo_model": f"{demo.model.name} {demo.version}",
        "screening_model": f"{screen.model.name} {screen.version}",
        "screen_stand_in": None,  # the real screening ONNX, run server-side; no stand-in
        "runs": results,
        "last_positive_speedup": round(off["seconds_to_last_positive"] / max(on["seconds_to_last_positive"], 1e-9), 2),
        "server_reads_saved": off["requests_read_by_server"] - on["requests_read_by_server"],
    }


def print_table(report: dict) -> None:
    runs = report["runs"]
    print(
        f"\nScreening routing, {report['images']} generated images ({report['positive_share']:.0%} with the finding), "
        f"{report['cpu_cores']} cores, one in-process worker for both lanes:"
    )
    names = [name for name, _, _ in RUNS]
    print(f"{'':<36}" + "".join(f"{name:>28}" for name in names))
    rows = [
        ("server reads", "requests_read_by_server", "{}"),
        ("moved to the bulk lane", "moved_to_bulk_share", "{:.1%}"),
        ("suspicious, first in its turns", "screened_suspicious_first", "{}"),
        ("s until half the positives are read", "seconds_to_median_positive", "{:.1f}"),
        ("s until 90% of the positives", "seconds_to_90pct_of_positives", "{:.1f}"),
        ("s until the last positive", "seconds_to_last_positive", "{:.1f}"),
        ("s until every image is read", "seconds_to_all", "{:.1f}"),
    ]
    for title, key, fmt in rows:
        print(f"{title:<36}" + "".join(f"{fmt.format(runs[name][key]):>28}" for name in names))
    screen = runs[ON]["screen"]
    print(
        f"\nscreen vs server: {screen['agreement_with_server']:.1%} agree on {screen['agreement_n']} images; "
        f"{screen['screen_negative_server_positive']} screen-negative but server-positive; "
        f"screen accuracy on the ground truth {screen['accuracy_on_ground_truth']:.1%}; "
        f"positives the screen sent to the bulk lane: {screen['positives_sent_to_bulk']}"
    )
    print(
        f"last positive: {report['last_positive_speedup']}x as soon with the screen; server reads saved: "
        f"{report['server_reads_saved']} (every image is still read)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
