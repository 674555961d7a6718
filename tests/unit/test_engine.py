"""The engine on its own: real demo weights, no Django, no worker."""

import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from core.model_package import MANIFEST_NAME, WEIGHTS_NAME, PackageError, read_manifest, sha256_bytes
from tests.conftest import jpeg_bytes, png_bytes
from workers.engine import synthetic
from workers.engine.handler import Handler


@pytest.fixture(scope="module")
def handler(demo_package):
    return Handler.initialize(demo_package, read_manifest(demo_package).weights_sha256, device=torch.device("cpu"))


def test_one_answer_per_input_and_a_corrupt_input_fails_alone(handler):
    items = [png_bytes(opacity=True, seed=11), b"\x89PNG\r\n\x1a\n not really", png_bytes(opacity=False, seed=12)]
    results = handler.predict(items)
    assert len(results) == 3
    assert results[1].error.startswith("the image could not be decoded")
    assert not results[1].probabilities
    assert results[0].ok and results[0].top_label == "round_opacity"
    assert results[2].ok and results[2].top_label == "no_finding"
    assert sum(results[0].probabilities.values()) == pytest.approx(1.0, abs=1e-4)


def test_batched_output_order_matches_the_inputs(handler):
    rng = np.random.default_rng(99)
    flags = [bool(v) for v in rng.integers(0, 2, size=12)]
    items = [synthetic.render_png(rng, 128, flag) for flag in flags]
    batched = handler.predict(items)
    alone = [handler.predict([item])[0] for item in items]
    for together, single in zip(batched, alone, strict=True):
        assert together.top_label == single.top_label
        assert together.top_probability == pytest.approx(single.top_probability, abs=1e-3)


def test_jpeg_and_rgb_inputs_are_read(handler):
    (result,) = handler.predict([jpeg_bytes()])
    assert result.ok


def test_the_demo_model_means_something_through_the_whole_pipeline(handler):
    """Fresh images (another seed, 256 px PNGs) through decode, resize and the batched forward."""
    rng = np.random.default_rng(31337)
    flags = [i % 2 == 1 for i in range(200)]
    items = [synthetic.render_png(rng, 256, flag) for flag in flags]
    results = []
    for start in range(0, len(items), 32):
        results.extend(handler.predict(items[start : start + 32]))
    correct = sum((r.top_label == "round_opacity") == flag for r, flag in zip(results, flags, strict=True))
    assert correct / len(items) >= 0.95


def _rewrite(package, target, *, manifest=None, weights=None):
    with zipfile.ZipFile(package) as source:
        original_manifest = json.loads(source.read(MANIFEST_NAME))
        original_weights = source.read(WEIGHTS_NAME)
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr(MANIFEST_NAME, json.dumps(manifest or original_manifest))
        archive.writestr(WEIGHTS_NAME, original_weights if weights is None else weights)
    return original_manifest


def test_weights_that_changed_since_registration_are_refused(demo_package, tmp_path):
    registered = read_manifest(demo_package).weights_sha256
    tampered = tmp_path / "tampered.zip"
    buffer = io.BytesIO()
    torch.save({"not": torch.zeros(1)}, buffer)
    _rewrite(demo_package, tampered, weights=buffer.getvalue())
    with pytest.raises(PackageError, match="checksum mismatch"):
        Handler.initialize(tampered, registered, device=torch.device("cpu"))


def test_a_package_whose_manifest_was_rewritten_to_match_is_still_refused(demo_package, tmp_path):
    registered = read_manifest(demo_package).weights_sha256
    buffer = io.BytesIO()
    torch.save({"not": torch.zeros(1)}, buffer)
    manifest = json.loads(zipfile.ZipFile(demo_package).read(MANIFEST_NAME))
    manifest["weights_sha256"] = sha256_bytes(buffer.getvalue())
    forged = tmp_path / "forged.zip"
    _rewrite(demo_package, forged, manifest=manifest, weights=buffer.getvalue())
    with pytest.raises(PackageError, match="checksum mismatch"):
        Handler.initialize(forged, registered, device=torch.device("cpu"))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/sightline-pwned",))


def test_weights_are_never_unpickled(demo_package, tmp_path):
    if os.path.exists("/tmp/sightline-pwned"):
        os.remove("/tmp/sightline-pwned")
    payload = pickle.dumps({"weight": _Exploit()})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as inner:  # torch's own zip layout around a hostile pickle
        inner.writestr("archive/data.pkl", payload)
        inner.writestr("archive/version", "3\n")
    weights = buffer.getvalue()
    manifest = json.loads(zipfile.ZipFile(demo_package).read(MANIFEST_NAME))
    manifest["weights_sha256"] = sha256_bytes(weights)
    hostile = tmp_path / "hostile.zip"
    _rewrite(demo_package, hostile, manifest=manifest, weights=weights)
    with pytest.raises(PackageError, match="not a plain state_dict"):
        Handler.initialize(hostile, manifest["weights_sha256"], device=torch.device("cpu"))
    assert not os.path.exists("/tmp/sightline-pwned")


def test_weights_that_do_not_fit_the_labels_are_refused(demo_package, tmp_path):
    manifest = json.loads(zipfile.ZipFile(demo_package).read(MANIFEST_NAME))
    manifest["labels"] = ["a", "b", "c"]
    wrong = tmp_path / "wrong.zip"
    _rewrite(demo_package, wrong, manifest=manifest)
    with pytest.raises(PackageError, match="do not fit"):
        Handler.initialize(wrong, manifest["weights_sha256"], device=torch.device("cpu"))


def test_a_manifest_that_changed_since_registration_is_refused(demo_package, tmp_path):
    registered = json.loads(zipfile.ZipFile(demo_package).read(MANIFEST_NAME))
    swapped = {**registered, "labels": list(reversed(registered["labels"]))}  # same weights, findings inverted
    relabelled = tmp_path / "relabelled.zip"
    _rewrite(demo_package, relabelled, manifest=swapped)
    with pytest.raises(PackageError, match="differs from the registered one"):
        Handler.initialize(
            relabelled, registered["weights_sha256"], device=torch.device("cpu"), expected_manifest=registered
        )


def _tiny_torchscript_package(path, *, task="multi-label", thresholds=(0.5, 0.9, 0.1)):
    """A small scripted CNN whose three outputs are fixed by its bias, in a TorchScript package."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.head = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.head(torch.flatten(self.pool(x), 1))

    model = Tiny()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([2.0, 1.0, -3.0]))  # sigmoid: 0.88, 0.73, 0.05
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    weights = buffer.getvalue()
    manifest = {
        "name": "tiny",
        "version": "1",
        "architecture": "custom",
        "framework": "torchscript",
        "task": task,
        "input_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "labels": ["effusion", "nodule", "fracture"],
        "thresholds": list(thresholds),
        "weights_sha256": sha256_bytes(weights),
    }
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(MANIFEST_NAME, json.dumps(manifest))
        archive.writestr(WEIGHTS_NAME, weights)
    return manifest


def test_a_multi_label_torchscript_package_reports_each_finding_against_its_threshold(tmp_path):
    package = tmp_path / "tiny.zip"
    manifest = _tiny_torchscript_package(package)
    handler = Handler.initialize(
        package, manifest["weights_sha256"], device=torch.device("cpu"), allow_torchscript=True
    )
    (result,) = handler.predict([png_bytes(size=64)])
    assert result.probabilities["effusion"] == pytest.approx(0.8808, abs=1e-3)  # sigmoid, not softmax
    assert result.probabilities["nodule"] == pytest.approx(0.7311, abs=1e-3)
    assert result.top_label == "effusion"
    assert result.positive_labels == ("effusion",)  # nodule is under its 0.9 threshold


def test_a_torchscript_package_is_refused_in_words_unless_allowed(tmp_path, monkeypatch):
    package = tmp_path / "tiny.zip"
    manifest = _tiny_torchscript_package(package)
    loaded = []
    monkeypatch.setattr(torch.jit, "load", lambda *args, **kwargs: loaded.append(args))
    with pytest.raises(PackageError, match="TorchScript packages carry code as well as weights"):
        Handler.initialize(package, manifest["weights_sha256"], device=torch.device("cpu"))
    assert loaded == []  # refused before TorchScript's loader ever reads the archive


def test_thresholds_must_fit_the_labels(tmp_path):
    with pytest.raises(PackageError, match="thresholds"):
        _tiny_torchscript_package(tmp_path / "bad.zip", thresholds=(0.5, 0.5))
        read_manifest(tmp_path / "bad.zip")


def tiny_handler() -> Handler:
    """A small CNN behind the real Handler: compiling it takes seconds, not a minute."""
    from core.model_package import Manifest

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 2),
    ).eval()
    manifest = Manifest(
        name="tiny",
        version="1",
        architecture="custom",
        input_size=16,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        labels=("a", "b"),
        weights_sha256="0" * 64,
    )
    return Handler(manifest, model.to(memory_format=torch.channels_last), torch.device("cpu"))


def test_compiling_keeps_the_answers_for_compiled_and_other_batch_sizes():
    handler = tiny_handler()
    batch = torch.randint(0, 255, (5, 3, 16, 16), dtype=torch.uint8)
    eager = handler.infer(batch)
    handler.compile((1, 4))
    assert handler.compiled
    assert torch.allclose(handler.infer(batch[:1]), eager[:1], atol=1e-4)
    assert torch.allclose(handler.infer(batch), eager, atol=1e-4)  # 5 was not compiled for: still right


def test_a_compiled_model_that_answers_differently_is_not_used(monkeypatch):
    handler = tiny_handler()
    batch = torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8)
    eager = handler.infer(batch)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: lambda x: model(x) * torch.tensor([1.0, -1.0]))
    handler.compile((1, 2))
    assert not handler.compiled
    assert torch.equal(handler.infer(batch), eager)
