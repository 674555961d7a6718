"""Optimised versions, end to end on the real demo model: ``optimise_model`` exports (and for
int8 quantises) it, registers the result as a new version of the same model, the registration
checks measure it against its parent and store the numbers; a tampered graph is refused; a
version under the agreement floor keeps away from production unless forced (logged)."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from accounts.models import AccessEvent
from core.errors import Conflict
from core.model_package import MANIFEST_NAME, ONNX_NAME, WEIGHTS_NAME
from recognition.models import ModelAlias, ModelVersion, RolloutChange
from recognition.services.registry import model_alias_move
from tests.conftest import api_client_for
from workers.engine import synthetic
from workers.model_cache import model_cache_clear, model_handler

pytestmark = pytest.mark.django_db

INT8 = "1.0.0+onnx-int8"
FP32 = "1.0.0+onnx-fp32"
HOLDOUT_IMAGES = 24
HOLDOUT_SEED = 404
IMAGE_SIZE = 96


def run(*args) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.fixture(scope="session")
def int8_package(demo_package) -> Path:
    """The demo model's int8 package, made once (as optimise_model makes it) and reused."""
    import torch

    from core.model_package import read_manifest
    from workers.engine import optimise
    from workers.engine.handler import Handler

    cached = demo_package.with_name(f"sightline-demo-{INT8}.zip")
    if not cached.exists():
        parent = Handler.initialize(
            demo_package, read_manifest(demo_package).weights_sha256, device=torch.device("cpu")
        )
        calibration, _ = optimise.demo_images(optimise.DEMO_CALIBRATION_SEED, 64, parent.manifest.input_size)
        optimise.optimise(parent, cached, transform="onnx-int8", calibration=calibration)
    return cached


def repacked(package: Path, target: Path, **changes) -> Path:
    """``package`` with its manifest changed and each member's bytes passed through ``changes``."""
    with zipfile.ZipFile(package) as source:
        members = {name: source.read(name) for name in source.namelist()}
    manifest = json.loads(members.pop(MANIFEST_NAME))
    changes.pop("manifest", lambda m: m)(manifest)
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr(MANIFEST_NAME, json.dumps(manifest))
        for name, data in members.items():
            archive.writestr(name, changes.get(name, lambda d: d)(data))
    return target


@pytest.fixture
def int8(demo_model) -> ModelVersion:
    model_alias_move(model=demo_model.model, alias="production", version=demo_model)
    out = run("optimise_model", "sightline-demo", "1.0.0", "--to", "onnx-int8", "--validate-here")
    assert f"Registered v2 · {INT8} (ready), derived from v1 · 1.0.0" in out
    assert '"agreement"' in out  # the worker's numbers, printed
    return ModelVersion.objects.get(version=INT8)


def test_optimise_model_makes_a_measured_int8_version_that_runs_only_its_graph(int8, demo_model):
    assert int8.status == "ready" and int8.derived_from == demo_model and int8.serial == 2
    manifest = int8.manifest
    assert manifest["transform"] == "onnx-int8"
    assert manifest["derived_from"] == {"version": "1.0.0", "weights_sha256": demo_model.weights_sha256}
    assert manifest["runtime"]["backends"] == ["onnx"] and len(manifest["runtime"]["onnx_sha256"]) == 64
    with zipfile.ZipFile(int8.package.path) as archive:
        assert sorted(archive.namelist()) == sorted([MANIFEST_NAME, WEIGHTS_NAME, ONNX_NAME])
        graph = archive.getinfo(ONNX_NAME).file_size
        weights = archive.getinfo(WEIGHTS_NAME).file_size

    evaluation = int8.evaluation
    assert evaluation["holdout"].startswith("demo generator, seed")
    assert evaluation["images"] == 512
    assert evaluation["agreement"] >= 0.97  # noqa: PLR2004  (the floor's default)
    assert 0 < evaluation["mean_abs_diff"] <= evaluation["max_abs_diff"] < 1
    assert evaluation["derived"]["backend"] == "onnx"
    assert evaluation["derived"]["model_bytes"] == graph
    assert evaluation["parent"]["model_bytes"] == weights
    assert evaluation["size_ratio"] < 0.3  # noqa: PLR2004  (int8 weights: a quarter of fp32's, plus the graph)
    for arm in ("derived", "parent"):
        assert evaluation[arm]["images_per_second"] > 0
        assert evaluation[arm]["accuracy"] > 0.9  # noqa: PLR2004  (the demo model's held-out accuracy is ~0.97)

    # served like any version, by its graph alone: never the eager weights it carries
    model_cache_clear()
    handler = model_handler(int8)
    assert handler.backend == "onnx"
    assert handler.backend_report["candidates"].keys() == {"onnx"}
    assert model_alias_move(model=int8.model, alias="production", version=int8).version == int8


def test_the_admin_page_shows_the_numbers_and_the_serial(int8, admin_client):
    page = admin_client.get(f"/admin/recognition/modelversion/{int8.pk}/change/").content.decode()
    assert f"v2 · {INT8}" in page
    assert "top-label agreement" in page and f"{int8.evaluation['agreement']:.2%}" in page
    assert "images/s" in page and "may be promoted" in page
    listing = admin_client.get("/admin/recognition/modelversion/").content.decode()
    assert "v1 · 1.0.0" in listing and f"{int8.evaluation['agreement']:.1%}" in listing


def test_under_the_floor_production_is_refused_unless_forced_and_forcing_is_logged(int8, demo_model):
    model = demo_model.model
    with override_settings(SIGHTLINE_DERIVED_AGREEMENT_FLOOR=1.01):  # above any measured agreement
        with pytest.raises(Conflict, match=r"agrees with 1\.0\.0 on .* held-out images \(floor 101%") as refused:
            model_alias_move(model=model, alias="production", version=int8)
        assert refused.value.detail["evaluation"]["agreement"] == int8.evaluation["agreement"]
        assert ModelAlias.objects.get(model=model, name="production").version == demo_model
        with pytest.raises(CommandError, match="cannot be given the production alias without force"):
            run("model", "alias", "sightline-demo", "production", INT8)
        assert run("model", "alias", "sightline-demo", "canary", INT8)  # only production has a floor

        run("model", "alias", "sightline-demo", "production", INT8, "--force")
    assert ModelAlias.objects.get(model=model, name="production").version == int8
    change = RolloutChange.objects.filter(kind="alias", name="production").latest("id")
    assert change.forced and change.before == {"version": demo_model.pk} and change.after == {"version": int8.pk}
    assert AccessEvent.objects.filter(action="model.alias_move_forced").count() == 1

    out = run("rollout_undo", "sightline-demo", "--kind", "alias")
    assert "back from v2 · 1.0.0+onnx-int8 to v1 · 1.0.0" in out
    assert ModelAlias.objects.get(model=model, name="production").version == demo_model


def test_staff_force_production_on_the_admin_alias_page(int8, demo_model, admin_client):
    alias = ModelAlias.objects.get(model=demo_model.model, name="production")
    form = {"model": demo_model.model_id, "name": "production", "version": int8.pk}
    url = f"/admin/recognition/modelalias/{alias.pk}/change/"
    with override_settings(SIGHTLINE_DERIVED_AGREEMENT_FLOOR=1.01):
        refused = admin_client.post(url, form, follow=True).content.decode()
        assert "cannot be given the production alias without force" in refused
        alias.refresh_from_db()
        assert alias.version == demo_model
        admin_client.post(url, {**form, "force": "on"}, follow=True)
    alias.refresh_from_db()
    assert alias.version == int8
    assert RolloutChange.objects.filter(kind="alias", forced=True).count() == 1


def test_the_api_gives_each_version_its_integer(int8, clinician_a):
    listed = api_client_for(clinician_a).get("/api/v1/model-versions/").json()["results"]
    assert [(row["version"], row["serial"]) for row in listed] == [(INT8, 2), ("1.0.0", 1)]


def test_a_tampered_graph_is_refused(demo_model, int8_package, tmp_path):
    def flip_last_byte(data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 0xFF])

    def tampered_version(manifest):
        manifest["version"] = "1.0.0+onnx-int8.tampered"

    tampered = repacked(
        int8_package, tmp_path / "tampered.zip", manifest=tampered_version, **{ONNX_NAME: flip_last_byte}
    )
    with pytest.raises(CommandError, match="model.onnx does not match the checksum in the manifest"):
        run("register_model", str(tampered), "--validate-here")
    assert ModelVersion.objects.get(version="1.0.0+onnx-int8.tampered").status == "refused"


def test_a_derived_version_whose_parent_is_not_registered_is_refused(db, int8_package, tmp_path):
    def of_another_parent(manifest):
        manifest["version"], manifest["derived_from"]["version"] = "0.9.0+onnx-int8", "0.9.0"

    orphan = repacked(int8_package, tmp_path / "orphan.zip", manifest=of_another_parent)
    with pytest.raises(CommandError, match="which is not a registered version of this model"):
        run("register_model", str(orphan), "--validate-here")


def holdout_folder(folder: Path) -> Path:
    """A small labelled held-out set as an operator would bring one: PNGs and a labels CSV."""
    rng = np.random.default_rng(HOLDOUT_SEED)
    folder.mkdir()
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "label"])
        for index in range(HOLDOUT_IMAGES):
            label = index % len(synthetic.LABELS)
            (folder / f"image-{index}.png").write_bytes(synthetic.render_png(rng, IMAGE_SIZE, bool(label)))
            writer.writerow([f"image-{index}.png", synthetic.LABELS[label]])
    return folder / "labels.csv"


def test_fp32_with_an_operator_held_out_set_carried_in_the_package(demo_model, tmp_path):
    labels = holdout_folder(tmp_path / "holdout")
    out = run(
        "optimise_model", "sightline-demo", "1.0.0", "--to", "onnx-fp32", "--holdout", str(labels), "--validate-here"
    )
    assert f"Registered v2 · {FP32} (ready)" in out
    fp32 = ModelVersion.objects.get(version=FP32)
    assert fp32.manifest["holdout"] == "holdout/labels.csv"
    with zipfile.ZipFile(fp32.package.path) as archive:
        assert len([n for n in archive.namelist() if n.endswith(".png")]) == HOLDOUT_IMAGES
    evaluation = fp32.evaluation
    assert evaluation["holdout"] == "holdout/labels.csv" and evaluation["images"] == HOLDOUT_IMAGES
    # the same arithmetic in another order: the same decisions, probabilities within 1e-3
    assert evaluation["agreement"] == 1.0 and evaluation["max_abs_diff"] < 1e-3  # noqa: PLR2004
    assert evaluation["derived"]["accuracy"] == evaluation["parent"]["accuracy"]


def test_the_command_refuses_what_it_cannot_measure(demo_model, tmp_path):
    with pytest.raises(CommandError, match="no version '2.0.0'"):
        run("optimise_model", "sightline-demo", "2.0.0", "--to", "onnx-int8")
    with pytest.raises(CommandError, match="is not a labels CSV"):
        run("optimise_model", "sightline-demo", "1.0.0", "--to", "onnx-int8", "--holdout", str(tmp_path / "none.csv"))


def test_a_derived_version_registered_for_production_under_the_floor_is_ready_but_not_promoted(
    demo_model, int8_package
):
    from workers.registration import model_version_register

    with override_settings(SIGHTLINE_DERIVED_AGREEMENT_FLOOR=1.01):
        version, _ = model_version_register(package_path=int8_package, alias="production")
    assert version.status == "ready" and version.evaluation["agreement"] > 0
    assert ModelAlias.objects.get(model=demo_model.model, name="production").version == demo_model
