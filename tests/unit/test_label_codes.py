"""The manifest's optional standard codes for labels (``label_codes``), without Django or a model."""

import pytest

from core.model_package import Manifest, PackageError

BASE = {
    "name": "m",
    "version": "1.0.0",
    "architecture": "resnet18",
    "input_size": 64,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "labels": ["normal", "opacity"],
    "weights_sha256": "a" * 64,
}
OPACITY = {"scheme": "SCT", "value": "263716002", "meaning": "Opacity"}


def test_label_codes_round_trip_and_older_manifests_stay_unchanged():
    manifest = Manifest.from_dict({**BASE, "label_codes": {"opacity": OPACITY}})
    assert manifest.label_codes == {"opacity": OPACITY}
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert "label_codes" not in Manifest.from_dict(BASE).to_dict()


@pytest.mark.parametrize(
    ("codes", "words"),
    [
        ({"nodule": OPACITY}, "not one of the labels"),
        ({"opacity": {"scheme": "SCT", "value": "1"}}, "must be"),
        ({"opacity": {**OPACITY, "scheme": "snomed ct"}}, "coding scheme designator"),
        ({"opacity": {**OPACITY, "value": ""}}, "value must be"),
        ({"opacity": {**OPACITY, "meaning": "x" * 65}}, "meaning must be"),
        ({"opacity": {**OPACITY, "meaning": "a\\b"}}, "backslash"),
        (["opacity"], "must map labels"),
    ],
)
def test_label_codes_that_are_not_codes_are_refused_in_words(codes, words):
    with pytest.raises(PackageError, match=words):
        Manifest.from_dict({**BASE, "label_codes": codes})
