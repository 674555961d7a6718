"""The engine's backends: each agrees with eager PyTorch, auto keeps one that does, a backend
that disagrees is refused or not used, and the manifest's runtime fields round-trip."""

import gc
import io
import json
import zipfile

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from core.model_package import MANIFEST_NAME, ONNX_NAME, WEIGHTS_NAME, Manifest, PackageError, Runtime, read_manifest
from core.model_package import sha256_bytes as sha256
from tests.conftest import png_bytes
from tests.unit.test_engine import tiny_handler
from workers.engine import backends
from workers.engine.handler import Handler, build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def demo(demo_package):
    return Handler.initialize(demo_package, read_manifest(demo_package).weights_sha256, device=CPU)


def tiny_package(path, *, onnx_bytes: bytes | None = None, onnx_sha256: str = "", **manifest_fields) -> dict:
    """A stock torchvision architecture (mobilenet_v3_small: depthwise convolutions, hardswish,
    squeeze-excitation) with seeded random weights at 32 px, optionally shipping a model.onnx."""
    torch.manual_seed(3)
    model = build_model("mobilenet_v3_small", 3).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    weights = buffer.getvalue()
    manifest = {
        "name": "tiny",
        "version": "1",
        "architecture": "mobilenet_v3_small",
        "input_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "labels": ["a", "b", "c"],
        "weights_sha256": sha256(weights),
        **manifest_fields,
    }
    if onnx_bytes is not None:
        manifest.setdefault("runtime", {})["onnx_sha256"] = onnx_sha256 or sha256(onnx_bytes)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(MANIFEST_NAME, json.dumps(manifest))
        archive.writestr(WEIGHTS_NAME, weights)
        if onnx_bytes is not None:
            archive.writestr(ONNX_NAME, onnx_bytes)
    return manifest


def perturbed(onnx_bytes: bytes) -> bytes:
    """The same graph with the classifier's bias shifted: loads and runs, answers otherwise."""
    graph = onnx.load_from_string(onnx_bytes)
    (bias,) = [init for init in graph.graph.initializer if list(init.dims) == [3]]  # one per label
    array = numpy_helper.to_array(bias) + np.array([2.0, 0.0, -2.0], dtype=np.float32)
    bias.CopyFrom(numpy_helper.from_array(array, bias.name))
    return graph.SerializeToString()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny package, and its graph as exported from the weights (exported once: seconds)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.zip"
    manifest = tiny_package(path)
    exported = backends.onnx_export(Handler.initialize(path, manifest["weights_sha256"], device=CPU))
    return path, manifest, exported


def test_each_backend_agrees_with_eager_on_the_demo_model(demo):
    diffs = backends.agreement(demo)
    assert set(diffs) == {"eager", "onnx"}  # compile is checked only where listed (slow to build)
    assert diffs["eager"] <= 1e-6  # eager at batch 1 vs batch 4: other kernels, same answers
    assert diffs["onnx"] <= backends.AGREEMENT_ATOL


def test_each_backend_agrees_on_a_multi_label_torchvision_model(tmp_path):
    path = tmp_path / "tiny.zip"
    manifest = tiny_package(path, task="multi-label")
    handler = Handler.initialize(path, manifest["weights_sha256"], device=CPU, backend="onnx")
    assert handler.backend == "onnx"
    probe = backends.probe_batch(handler, 3)
    eager = handler.torch_infer(handler.model, probe)
    got = handler.infer(probe)
    assert (got - eager).abs().max().item() <= backends.AGREEMENT_ATOL
    assert not torch.allclose(got.sum(dim=1), torch.ones(3))  # sigmoid per label, not a softmax


def test_auto_runs_a_backend_that_agrees_and_reports_what_it_measured(demo_package, demo):
    handler = Handler.initialize(demo_package, read_manifest(demo_package).weights_sha256, device=CPU, backend="auto")
    report = handler.backend_report
    assert handler.backend in ("eager", "onnx")
    assert report["backend"] == handler.backend and report["requested"] == "auto"
    assert set(report["candidates"]) == {"eager", "onnx"}
    chosen = report["candidates"][handler.backend]
    assert chosen["status"] == "agrees" and chosen["max_abs_diff"] <= report["atol"]
    assert all(entry["ms_per_batch"] > 0 for entry in report["candidates"].values())
    items = [png_bytes(opacity=True, seed=5), png_bytes(opacity=False, seed=6)]
    for auto, eager in zip(handler.predict(items), demo.predict(items), strict=True):
        assert auto.top_label == eager.top_label
        assert auto.top_probability == pytest.approx(eager.top_probability, abs=backends.AGREEMENT_ATOL)


def test_a_disagreeing_optional_onnx_graph_is_not_used(tmp_path, tiny, monkeypatch):
    path, manifest, good = tiny
    wrong = perturbed(good)
    monkeypatch.setattr(backends, "onnx_export", lambda handler: wrong)
    handler = Handler.initialize(path, manifest["weights_sha256"], device=CPU, backend="auto")
    assert handler.backend == "eager"
    assert handler.backend_report["candidates"]["onnx"]["status"].startswith("disagrees")
    assert handler.backend_report["candidates"]["onnx"]["max_abs_diff"] > backends.AGREEMENT_ATOL
    assert backends.agreement(handler)["onnx"] > backends.AGREEMENT_ATOL


def test_a_required_backend_that_disagrees_refuses_the_model(tmp_path, tiny):
    _, _, good = tiny
    shipped = tmp_path / "shipped.zip"
    manifest = tiny_package(shipped, onnx_bytes=perturbed(good), runtime={"backends": ["onnx", "eager"]})
    with pytest.raises(PackageError, match="the onnx backend answers up to .* the manifest requires it"):
        Handler.initialize(shipped, manifest["weights_sha256"], device=CPU, backend="auto")
    eager_only = Handler.initialize(shipped, manifest["weights_sha256"], device=CPU)  # as registration loads it
    with pytest.raises(PackageError, match="the onnx backend answers up to"):
        backends.verify(eager_only)


def test_a_shipped_onnx_graph_is_checked_against_the_weights(tmp_path, tiny):
    _, _, good = tiny
    shipped = tmp_path / "shipped.zip"
    manifest = tiny_package(shipped, onnx_bytes=good)
    handler = Handler.initialize(shipped, manifest["weights_sha256"], device=CPU, backend="onnx")
    assert handler.backend == "onnx"
    assert backends.verify(handler)["onnx"] <= backends.AGREEMENT_ATOL

    wrong = tmp_path / "wrong.zip"
    manifest = tiny_package(wrong, onnx_bytes=perturbed(good))  # optional, but shipped: refused at registration
    with pytest.raises(PackageError, match="model.onnx answers up to"):
        backends.verify(Handler.initialize(wrong, manifest["weights_sha256"], device=CPU))

    swapped = tmp_path / "swapped.zip"  # model.onnx changed after the manifest named its checksum
    manifest = tiny_package(swapped, onnx_bytes=perturbed(good), onnx_sha256=sha256(good))
    with pytest.raises(PackageError, match="model.onnx does not match the checksum"):
        Handler.initialize(swapped, manifest["weights_sha256"], device=CPU, backend="onnx")


def test_choosing_in_the_background_serves_eager_meanwhile(tmp_path, tiny):
    _, _, good = tiny
    shipped = tmp_path / "shipped.zip"
    manifest = tiny_package(shipped, onnx_bytes=good)
    handler = Handler.initialize(shipped, manifest["weights_sha256"], device=CPU, backend="auto", background=True)
    assert handler.selection_thread is not None
    batch = backends.probe_batch(handler, 2)
    eager = handler.torch_infer(handler.model, batch)
    assert (handler.infer(batch) - eager).abs().max().item() <= backends.AGREEMENT_ATOL  # whichever runs
    assert handler.wait_for_backend(timeout=120) in ("eager", "onnx")
    assert set(handler.backend_report["candidates"]) == {"eager", "onnx"}
    assert (handler.infer(batch) - eager).abs().max().item() <= backends.AGREEMENT_ATOL

    wrong = tmp_path / "wrong.zip"  # required and disagreeing: found in the background, eager stays
    manifest = tiny_package(wrong, onnx_bytes=perturbed(good), runtime={"backends": ["onnx", "eager"]})
    handler = Handler.initialize(wrong, manifest["weights_sha256"], device=CPU, backend="auto", background=True)
    assert handler.wait_for_backend(timeout=120) == "eager"
    assert "the manifest requires it" in handler.backend_report["error"]


def test_a_manifest_listing_only_eager_never_runs_onnx(tmp_path):
    path = tmp_path / "eager.zip"
    manifest = tiny_package(path, runtime={"backends": ["eager"]})
    handler = Handler.initialize(path, manifest["weights_sha256"], device=CPU, backend="onnx")
    assert handler.backend == "eager"
    assert set(handler.backend_report["candidates"]) == {"eager"}


def test_compiling_in_the_background_switches_without_changing_answers():
    """One small torch.compile (a few seconds): answers while compiling come from eager, after
    the switch from the compiled graph, the same within the tolerance."""
    handler = tiny_handler()  # the engine tests' small CNN: compiling it takes seconds
    batch = torch.randint(0, 255, (3, 3, 16, 16), dtype=torch.uint8)
    eager = handler.infer(batch)
    thread = handler.compile_in_background((1, 3))
    seen = set()
    while thread.is_alive():
        seen.add(handler.backend)
        assert torch.allclose(handler.infer(batch), eager, atol=backends.AGREEMENT_ATOL)
    thread.join()
    assert handler.backend == "compile" and handler.compiled
    assert handler.backend_report["candidates"]["compile"]["status"] == "agrees"
    assert torch.allclose(handler.infer(batch), eager, atol=backends.AGREEMENT_ATOL)
    assert seen <= {"eager", "compile"}


# --- the manifest's runtime fields ----------------------------------------------------------------

BASE = {
    "name": "m",
    "version": "2",
    "architecture": "resnet18",
    "input_size": 64,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "labels": ["a", "b"],
    "weights_sha256": "a" * 64,
}


def test_a_manifest_without_runtime_fields_round_trips_unchanged():
    manifest = Manifest.from_dict(BASE)
    assert manifest.runtime == Runtime() and manifest.targets == ("server",)
    assert not {"runtime", "derived_from", "transform", "targets"} & set(manifest.to_dict())
    assert Manifest.from_dict(manifest.to_dict()) == manifest


def test_runtime_and_derivation_fields_round_trip():
    data = {
        **BASE,
        "runtime": {"backends": ["onnx", "compile", "eager"], "atol": 0.002, "onnx_sha256": "B" * 64},
        "derived_from": {"version": "1", "weights_sha256": "c" * 64},
        "transform": "int8-dynamic",
        "targets": ["server", "browser"],
    }
    manifest = Manifest.from_dict(data)
    assert manifest.runtime.backends == ("onnx", "compile", "eager")
    assert manifest.runtime.onnx_sha256 == "b" * 64
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert json.loads(json.dumps(manifest.to_dict())) == manifest.to_dict()


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"runtime": ["onnx"]}, "runtime must be an object"),
        ({"runtime": {"backends": ["tensorrt"]}}, r"runtime.backends names \['tensorrt'\]"),
        ({"runtime": {"backends": "onnx"}}, "runtime.backends must be a list"),
        ({"runtime": {"backends": ["onnx", "onnx"]}}, "names a backend twice"),
        ({"runtime": {"atol": 0}}, "runtime.atol must be a number above 0"),
        ({"runtime": {"atol": 0.5}}, "at most 0.05"),
        ({"runtime": {"atol": "small"}}, "runtime.atol must be a number"),
        ({"runtime": {"onnx_sha256": "abc"}}, "runtime.onnx_sha256 must be the 64 hex digits"),
        ({"runtime": {"backend": ["onnx"]}}, r"runtime has unknown fields \['backend'\]"),
        ({"derived_from": {"version": "1", "weights_sha256": "c" * 64}}, "derived_from and transform go together"),
        ({"transform": "int8"}, "derived_from and transform go together"),
        ({"derived_from": {"version": "1"}, "transform": "int8"}, "derived_from must be"),
        ({"derived_from": {"version": "1", "weights_sha256": "z"}, "transform": "int8"}, "64 hex digits"),
        ({"derived_from": {"version": "1", "weights_sha256": "c" * 64}, "transform": "Int 8!"}, "short lowercase name"),
        ({"targets": ["phone"]}, r"targets \['phone'\] are not among"),
        ({"targets": []}, "at least one"),
        ({"targets": ["server", "server"]}, "at most once"),
    ],
)
def test_runtime_fields_are_validated_in_words(fields, words):
    with pytest.raises(PackageError, match=words):
        Manifest.from_dict({**BASE, **fields})


def test_unknown_backend_names_are_refused():
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        backends.select(object(), "tensorrt")  # type: ignore[arg-type]


def test_probe_batch_is_fixed(demo):
    assert torch.equal(backends.probe_batch(demo), backends.probe_batch(demo))
    assert backends.probe_batch(demo).dtype == torch.uint8
    assert np.unique(backends.probe_batch(demo)[1].numpy()).size > 16  # a gradient, not a flat image


def test_a_runner_that_outlives_its_handler_says_the_model_was_evicted():
    handler = tiny_handler()
    runner = backends.eager_runner(handler)
    batch = torch.randint(0, 255, (1, 3, 16, 16), dtype=torch.uint8)
    assert runner(batch).shape == (1, 2)
    del handler  # the runner holds it weakly: an evicted model's memory is not kept by its runner
    gc.collect()
    with pytest.raises(RuntimeError, match="evicted"):
        runner(batch)
