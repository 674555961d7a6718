"""The drill's verification queries, run on a web host with the deployment's own settings:

    multihost.sh exec web1 -- .venv/bin/python -m tests.drill.verify --run RUN [--job ID]

Prints one JSON object: for the run's upload keys, the images each key made, their requests and
results (none lost, none doubled); for the job, its items by status and their results. Read-only.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True, help="the client's run id (its keys are drill-RUN-…)")
    parser.add_argument("--job", type=int)
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.production")
    import django

    django.setup()
    from recognition.models import BatchItem, InferenceRequest, Result, UploadKey

    keys = {key.key: list(key.image_ids) for key in UploadKey.objects.filter(key__startswith=f"drill-{args.run}-")}
    image_ids = [image_id for ids in keys.values() for image_id in ids]
    requests = InferenceRequest.objects.filter(image_id__in=image_ids, shadow=False)
    per_image = Counter(requests.values_list("image_id", flat=True))
    results = Counter(
        Result.objects.filter(image_id__in=image_ids, request__shadow=False).values_list("image_id", flat=True)
    )
    report = {
        "keys": keys,
        "requests_by_status": dict(Counter(requests.values_list("status", flat=True))),
        "images_without_request": sorted(set(image_ids) - set(per_image)),
        "images_with_several_requests": sorted(i for i, n in per_image.items() if n > 1),
        "images_without_result": sorted(set(image_ids) - set(results)),
        "images_with_several_results": sorted(i for i, n in results.items() if n > 1),
        "max_attempts": max(requests.values_list("attempts", flat=True), default=0),
    }
    if args.job:
        items = BatchItem.objects.filter(job_id=args.job)
        done = items.filter(status="done")
        item_results = Counter(
            Result.objects.filter(request__batch_items__in=done).values_list("request_id", flat=True)
        )
        report["job"] = {
            "items": items.count(),
            "items_by_status": dict(Counter(items.values_list("status", flat=True))),
            "done_items_without_result": done.exclude(request__result__isnull=False).count(),
            "requests_with_several_results": sum(1 for n in item_results.values() if n > 1),
            "results": sum(item_results.values()),
            "max_attempts": max(
                InferenceRequest.objects.filter(batch_items__job_id=args.job).values_list("attempts", flat=True),
                default=0,
            ),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
