"""The screening model's package: its ONNX graph answers what the PyTorch model answers, its
manifest's role is validated, and the server preprocesses a screened image as the browser will."""

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from core.model_package import MANIFEST_NAME, ONNX_NAME, Manifest, PackageError, read_manifest
from tests.conftest import png_bytes
from tests.screening_fixtures import screening_package  # noqa: F401
from workers.engine import backends, screening, synthetic
from workers.engine.handler import Handler, build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def loaded(screening_package):  # noqa: F811
    manifest = read_manifest(screening_package)
    handler = Handler.initialize(screening_package, manifest.weights_sha256, device=CPU)
    return handler, screening.read_onnx(screening_package)


def screening_fields(**changes) -> dict:
    fields = {
        "name": "a-screen",
        "version": "1",
        "architecture": "mobilenet_v3_small",
        "input_size": 64,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "labels": ["no_finding", "round_opacity"],
        "weights_sha256": "0" * 64,
        "role": "screening",
        "targets": ["browser"],
        "runtime": {"onnx_sha256": "1" * 64},
    }
    return {**fields, **changes}


def test_the_packaged_onnx_agrees_with_the_pytorch_model_on_probabilities_and_logits(loaded):
    handler, graph = loaded
    images, _ = synthetic.dataset(11, 32, screening.SCREEN_INPUT_SIZE)
    pixels = np.repeat(images[:, None], 3, axis=1)
    probe = backends.probe_batch(handler).numpy()  # noise and gradients: far from saturated outputs
    for batch in (pixels, probe, pixels[:1]):
        diff = screening.onnx_vs_pytorch(handler.model, graph, np.ascontiguousarray(batch))
        assert diff <= backends.AGREEMENT_ATOL
    # the report measured the same
    assert read_manifest(handler.package_path).metrics["onnx_max_abs_diff"] <= backends.AGREEMENT_ATOL


def test_the_graph_takes_uint8_pixels_with_a_dynamic_batch_and_answers_probabilities_first(loaded):
    _, graph = loaded
    session = screening.session(graph)
    (pixels,) = session.get_inputs()
    assert (pixels.name, pixels.type, pixels.shape[1:]) == ("pixels", "tensor(uint8)", [3, 64, 64])
    assert [o.name for o in session.get_outputs()] == ["probabilities", "logits"]
    batch = np.zeros((5, 3, 64, 64), dtype=np.uint8)
    probabilities, logits = screening.run_graph(session, batch)
    assert probabilities.shape == logits.shape == (5, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probabilities, torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-5)


def test_a_wrong_graph_is_told_apart_from_the_right_one(loaded):
    handler, graph = loaded
    other = build_model(screening.SCREEN_ARCHITECTURE, 2).eval()  # untrained: another model
    images, _ = synthetic.dataset(12, 8, 64)
    assert screening.onnx_vs_pytorch(other, graph, np.repeat(images[:, None], 3, axis=1)) > 1e-2


def test_the_server_backend_reads_probabilities_from_the_two_output_graph(loaded):
    handler, graph = loaded
    runner = backends.onnx_runner(graph)
    probe = backends.probe_batch(handler)
    assert backends.max_abs_diff(runner, handler.infer(probe), probe) <= backends.AGREEMENT_ATOL


def test_the_manifest_carries_the_contracts_role_targets_and_reference(screening_package):  # noqa: F811
    manifest = read_manifest(screening_package)
    assert manifest.screening and manifest.targets == ("browser",) and "onnx" in manifest.runtime.backends
    assert manifest.labels[0] == screening.NEGATIVE_LABEL
    reference = manifest.metrics["reference"]
    assert set(reference) == {"mean", "std", "energy"}
    assert 0 <= reference["mean"][0] < reference["mean"][1] <= 255
    assert 0 <= reference["std"][0] < reference["std"][1]
    assert reference["energy"][0] < reference["energy"][1]
    assert manifest.metrics["accuracy"] >= screening.REQUIRED_ACCURACY
    with zipfile.ZipFile(screening_package) as archive:
        written = json.loads(archive.read(MANIFEST_NAME))
        assert written["role"] == "screening" and written["targets"] == ["browser"]
        assert archive.getinfo(ONNX_NAME).file_size == manifest.metrics["onnx_bytes"]


def test_a_screening_manifest_round_trips_and_its_rules_are_checked():
    manifest = Manifest.from_dict(screening_fields())
    assert manifest.screening and Manifest.from_dict(manifest.to_dict()) == manifest
    with pytest.raises(PackageError, match='targets must include "browser"'):
        Manifest.from_dict(screening_fields(targets=["server"]))
    with pytest.raises(PackageError, match="single-label"):
        Manifest.from_dict(screening_fields(task="multi-label"))
    with pytest.raises(PackageError, match="carries model.onnx"):
        Manifest.from_dict(screening_fields(runtime={}))
    with pytest.raises(PackageError, match="role 'triage' is not among"):
        Manifest.from_dict(screening_fields(role="triage"))
    with pytest.raises(PackageError, match="its versions are screening"):
        Manifest.from_dict(screening_fields(name="sightline-screen", role="reads", targets=["server"]))
    reads = Manifest.from_dict(screening_fields(role="reads", targets=["server"], runtime={}))
    assert not reads.screening and "role" not in reads.to_dict()  # a reads manifest writes no role


def test_energy_is_minus_logsumexp():
    logits = np.array([[2.0, -1.0], [30.0, 29.0], [0.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(screening.energy(logits), -torch.logsumexp(torch.from_numpy(logits), 1).numpy())


def test_reference_statistics_are_percentiles_of_the_inputs():
    pixels = np.stack([np.full((3, 4, 4), value, dtype=np.uint8) for value in range(100)])
    logits = np.zeros((100, 2), dtype=np.float32)
    reference = screening.reference_statistics(pixels, logits)
    assert reference["mean"] == [pytest.approx(0.99), pytest.approx(98.01)]
    assert reference["std"] == [0.0, 0.0]
    assert reference["energy"] == [pytest.approx(-np.log(2), abs=1e-4)] * 2


def large_jpeg(size: int = 512) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(5)
    Image.fromarray(synthetic.render(rng, size, True)).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_a_screening_handler_decodes_a_jpeg_in_full_as_the_browser_does(loaded, demo_package):
    """PIL's draft() scales a JPEG down inside the DCT: a browser cannot, so a screening model's
    handler decodes in full, and matches the screen's server preprocessing byte for byte."""
    handler, _ = loaded
    data = large_jpeg()
    full = handler.decode(data).numpy()
    np.testing.assert_array_equal(full, screening.server_pixels(data))
    reads = Handler.initialize(demo_package, read_manifest(demo_package).weights_sha256, device=CPU)
    drafted = reads.decode(data).numpy()
    assert np.abs(drafted.astype(int) - full.astype(int)).max() > 0  # the reads model still drafts


def test_the_server_tensor_is_the_normalised_input_of_the_graph():
    data = png_bytes(size=200, seed=4)
    tensor = screening.server_tensor(data)
    pixels = screening.server_pixels(data)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor, (pixels / 255.0 - 0.5) / 0.25, atol=1e-6)


def test_screen_images_answers_one_probability_row_per_image_in_order(screening_package):  # noqa: F811
    graph = screening.read_onnx(screening_package)
    images = [png_bytes(opacity=bool(i % 2), size=128, seed=20 + i) for i in range(8)]
    results = screening.screen_images(graph, images)
    assert len(results) == len(images)
    assert screening.screen_images(graph, []) == []
    probabilities = np.stack([p for p, _ in results])
    alone = screening.screen_images(graph, images[3:4])[0][0]
    np.testing.assert_allclose(probabilities[3], alone, atol=1e-5)
    labels = probabilities.argmax(1)
    assert (labels == np.arange(8) % 2).mean() >= 0.75  # a screen, not the reads model: most, not all
