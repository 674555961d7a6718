"""The manifest fields of a derived version, without Django or a model."""

import pytest

from core.model_package import Manifest, PackageError

BASE = {
    "name": "m",
    "version": "1.0.0+onnx-int8",
    "architecture": "resnet18",
    "input_size": 64,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "labels": ["a", "b"],
    "weights_sha256": "a" * 64,
}
DERIVED = {"derived_from": {"version": "1.0.0", "weights_sha256": "a" * 64}, "transform": "onnx-int8"}


def test_a_derived_manifest_round_trips_with_its_held_out_set():
    manifest = Manifest.from_dict({**BASE, **DERIVED, "holdout": "holdout/labels.csv"})
    assert manifest.lossy and manifest.to_dict()["holdout"] == "holdout/labels.csv"
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert "holdout" not in Manifest.from_dict({**BASE, **DERIVED}).to_dict()  # older manifests unchanged


def test_fp32_is_not_lossy_and_a_plain_version_has_no_held_out_set():
    assert not Manifest.from_dict({**BASE, **DERIVED, "transform": "onnx-fp32"}).lossy
    with pytest.raises(PackageError, match="holdout names a labels CSV inside a derived package"):
        Manifest.from_dict({**BASE, "holdout": "holdout/labels.csv"})
    with pytest.raises(PackageError, match="holdout names a labels CSV"):
        Manifest.from_dict({**BASE, **DERIVED, "holdout": "../../etc/passwd"})
