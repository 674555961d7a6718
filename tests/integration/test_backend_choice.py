"""The engine's backends through the platform: registration refuses a package whose required
backend disagrees with its weights, and a worker on ``auto`` serves with what it chose."""

import pytest

from core.errors import Invalid
from recognition.models import InferenceRequest, ModelVersion, Result
from recognition.services.images import image_upload
from tests.conftest import png_bytes, upload_file
from tests.unit.test_backends import perturbed, tiny_package
from workers.engine import backends
from workers.engine.handler import Handler
from workers.model_cache import model_cache_clear, model_handler
from workers.registration import model_version_register
from workers.runner import inference_run

pytestmark = pytest.mark.django_db


def test_registration_refuses_a_package_whose_onnx_graph_disagrees_with_its_weights(tmp_path):
    good_path = tmp_path / "good.zip"
    manifest = tiny_package(good_path)
    good = backends.onnx_export(Handler.initialize(good_path, manifest["weights_sha256"]))
    shipped = tmp_path / "shipped.zip"
    tiny_package(shipped, onnx_bytes=perturbed(good), version="2", runtime={"backends": ["onnx", "eager"]})
    with pytest.raises(Invalid, match="the onnx backend answers up to .* the manifest requires it"):
        model_version_register(package_path=shipped, alias=None)
    refused = ModelVersion.objects.get(model__name="tiny", version="2")
    assert refused.status == ModelVersion.Status.REFUSED
    assert "away from eager PyTorch" in refused.refusal_reason

    fine = tmp_path / "fine.zip"
    tiny_package(fine, onnx_bytes=good, version="3", runtime={"backends": ["onnx", "eager"]})
    version, _ = model_version_register(package_path=fine, alias=None)
    assert version.status == ModelVersion.Status.READY


def test_a_worker_on_auto_serves_with_the_backend_it_chose_and_the_same_findings(clinician_a, demo_model, settings):
    image = image_upload(membership=clinician_a, upload=upload_file(png_bytes(seed=3)))
    request = InferenceRequest.objects.get(image=image)
    inference_run(request_id=request.pk)  # eager (the test settings' backend)
    eager = Result.objects.get(request=request)

    settings.SIGHTLINE_INFERENCE_BACKEND = "auto"
    model_cache_clear()
    try:
        handler = model_handler(demo_model)
        chosen = handler.wait_for_backend(timeout=120)
        assert chosen in ("eager", "onnx")
        assert handler.backend_report["candidates"]["onnx"]["max_abs_diff"] <= backends.AGREEMENT_ATOL
        again = image_upload(membership=clinician_a, upload=upload_file(png_bytes(seed=3)))
        second = InferenceRequest.objects.get(image=again)
        inference_run(request_id=second.pk)
        answer = Result.objects.get(request=second)
    finally:
        model_cache_clear()
    assert answer.top_label == eager.top_label
    for label, probability in eager.probabilities.items():
        assert abs(answer.probabilities[label] - probability) <= backends.AGREEMENT_ATOL
