"""Registry rows for browser-screening tests: a screening version as registration leaves it
(nothing loads its weights in these tests; the ONNX itself is tests/integration/test_screening_*)."""

from __future__ import annotations

import json

from django.utils import timezone

from recognition.models import AIModel, ModelVersion
from tests.screening_fixtures import screening_turn_on as screening_on  # noqa: F401  (one way to turn it on)

SCREEN_LABELS = ["no_finding", "round_opacity"]  # labels[0] is the negative one (CONTRACT17.md)


def screening_version(version: str = "1.0.0", *, ready=True, confirmed=True, role="screening") -> ModelVersion:
    model, _ = AIModel.objects.get_or_create(name="sightline-screen")
    serial = ModelVersion.objects.filter(model=model).count() + 1
    return ModelVersion.objects.create(
        model=model,
        version=version,
        serial=serial,
        manifest={
            "name": "sightline-screen",
            "version": version,
            "labels": SCREEN_LABELS,
            "task": "single-label",
            "role": role,
            "targets": ["browser"],
            "input_size": 64,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
            "runtime": {"backends": ["onnx"], "onnx_sha256": "0" * 64},
        },
        package=f"models/sightline-screen-{version}.zip",
        weights_sha256="0" * 64,
        status=ModelVersion.Status.READY if ready else ModelVersion.Status.VALIDATING,
        browser_confirmed_at=timezone.now() if confirmed else None,
    )


def screen_json(version: ModelVersion, p_negative: float, *, flags=(), latency_ms=41) -> str:
    return json.dumps(
        {
            "version_id": version.pk,
            "probabilities": {"no_finding": p_negative, "round_opacity": round(1 - p_negative, 6)},
            "latency_ms": latency_ms,
            "quality": {"flags": list(flags), "ood_score": 0.1},
        }
    )
