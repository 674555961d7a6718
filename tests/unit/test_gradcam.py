"""Grad-CAM on the real demo model: one map per input, batching, localisation, no side effects."""

import io
import statistics
import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from core.model_package import read_manifest
from tests.conftest import png_bytes
from workers.engine import synthetic
from workers.engine.gradcam import _normalise, gradcam, heatmaps_for, render_overlay_png
from workers.engine.handler import Handler

LAYER = "layer4"  # the resnet convention: the last convolutional stage (2x2 at the demo's 64 px)
FINE_LAYER = "layer3"  # one stage earlier: 4x4 at 64 px
CORRUPT = b"\x89PNG\r\n\x1a\n not really"


@pytest.fixture(scope="module")
def handler(demo_package):
    return Handler.initialize(demo_package, read_manifest(demo_package).weights_sha256, device=torch.device("cpu"))


def _batch(images: list[np.ndarray]) -> torch.Tensor:
    """Grayscale uint8 (H, W) images → uint8 (N, 3, H, W), as Handler.decode gives them."""
    return torch.stack([torch.from_numpy(image).expand(3, -1, -1) for image in images])


def _opacity_centre(seed: int, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """An image with an opacity and the opacity's centre (row, column): the same random state
    rendered with and without it differs by the blob (plus film grain, smoothed away)."""
    with_blob = synthetic.render(np.random.default_rng(seed), size, True)
    without = synthetic.render(np.random.default_rng(seed), size, False)
    difference = with_blob.astype(np.float32) - without.astype(np.float32)
    kernel = np.ones(5, dtype=np.float32) / 5
    for axis in (0, 1):
        difference = np.apply_along_axis(lambda row: np.convolve(row, kernel, "same"), axis, difference)
    row, column = np.unravel_index(np.argmax(difference), difference.shape)
    return with_blob, (int(row), int(column))


def _assert_no_hooks(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        for attribute in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(module, attribute, {}), f"{attribute} left on {name or 'the model'}"


def test_one_heatmap_per_input_in_order_and_a_corrupt_input_gets_none(handler):
    items = [
        png_bytes(opacity=True, seed=11),
        CORRUPT,
        png_bytes(opacity=False, seed=12),
        png_bytes(opacity=True, seed=13, size=128),
    ]
    maps = heatmaps_for(handler, items, LAYER)
    assert len(maps) == len(items)
    assert maps[1] is None
    size = handler.manifest.input_size
    results = handler.predict(items)
    for item, heatmap, result in zip(items, maps, results, strict=True):
        if heatmap is None:
            continue
        assert heatmap.shape == (size, size)
        assert heatmap.dtype == np.float32
        assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0
        assert heatmap.max() == pytest.approx(1.0) or heatmap.max() == 0.0
        # order: each map is the one this input gets alone, for the top label predict reports
        (alone,) = heatmaps_for(handler, [item], LAYER)
        np.testing.assert_allclose(heatmap, alone, atol=1e-3)
        top = handler.manifest.labels.index(result.top_label)
        direct = gradcam(handler, handler.decode(item).unsqueeze(0), [top], LAYER)[0]
        np.testing.assert_allclose(heatmap, direct, atol=1e-3)


def test_only_bad_inputs_and_no_inputs(handler):
    assert heatmaps_for(handler, [CORRUPT, b""], LAYER) == [None, None]
    assert heatmaps_for(handler, [], LAYER) == []
    empty = gradcam(handler, torch.zeros((0, 3, 64, 64), dtype=torch.uint8), [], LAYER)
    assert empty.shape == (0, 64, 64)


@pytest.mark.parametrize("layer", [LAYER, FINE_LAYER])
def test_batched_equals_one_by_one(handler, layer):
    rng = np.random.default_rng(99)
    flags = [bool(v) for v in rng.integers(0, 2, size=12)]
    batch = _batch([synthetic.render(rng, handler.manifest.input_size, flag) for flag in flags])
    classes = [i % 2 for i in range(len(flags))]  # not only the top class: each item its own
    together = gradcam(handler, batch, classes, layer)
    alone = np.stack([gradcam(handler, batch[i : i + 1], [classes[i]], layer)[0] for i in range(len(flags))])
    assert together.shape == (12, *batch.shape[-2:])
    np.testing.assert_allclose(together, alone, atol=1e-3)
    # and the classes matter: the other class gives other maps
    other = gradcam(handler, batch, [1 - c for c in classes], layer)
    assert np.abs(other - together).max() > 0.1


def _heat_ratios(handler, layer: str, images: int) -> list[float]:
    """Per image: mean heat inside a disc (radius 15% of the width) around the opacity / mean outside,
    for the round_opacity class."""
    size = handler.manifest.input_size
    rendered = [_opacity_centre(seed, size) for seed in range(500, 500 + images)]
    batch = _batch([image for image, _ in rendered])
    opacity = handler.manifest.labels.index("round_opacity")
    maps = gradcam(handler, batch, [opacity] * images, layer)
    rows, columns = np.mgrid[0:size, 0:size]
    ratios = []
    for heatmap, (_, (row, column)) in zip(maps, rendered, strict=True):
        disc = (rows - row) ** 2 + (columns - column) ** 2 <= (0.15 * size) ** 2
        ratios.append(float(heatmap[disc].mean() / max(heatmap[~disc].mean(), 1e-6)))
    print(
        f"\nGrad-CAM {layer}: mean heat inside / outside a disc of 15% of the width around the opacity, "
        f"{images} images: mean {statistics.fmean(ratios):.2f}, min {min(ratios):.2f}, "
        f"per image {[round(r, 2) for r in ratios]}"
    )
    return ratios


def test_the_heatmap_points_at_the_opacity(handler):
    ratios = _heat_ratios(handler, FINE_LAYER, 10)  # measured 2.5-3.3 on average, every image above 2.2
    assert statistics.fmean(ratios) >= 2.0
    assert min(ratios) >= 1.5


def test_the_last_stage_is_too_coarse_to_localise_at_64_px(handler):
    """Measured, not asserted: layer4 of a resnet18 at 64 px is a 2x2 map whose cells each see the
    whole image; on average it leans towards the opacity (about 1.2-1.8) but single images do not."""
    ratios = _heat_ratios(handler, LAYER, 20)
    assert all(np.isfinite(ratios))


def test_no_hooks_or_gradient_state_are_left_behind_and_predict_is_unchanged(handler):
    items = [png_bytes(opacity=True, seed=21), png_bytes(opacity=False, seed=22)]
    model = handler.model
    before = handler.predict(items)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    grad_enabled = torch.is_grad_enabled()

    heatmaps_for(handler, items, LAYER)
    with pytest.raises(ValueError, match="feature map"):  # fails after the hook was placed
        gradcam(handler, handler.preprocess(items)[0], [0, 1], "fc")

    _assert_no_hooks(model)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert torch.is_grad_enabled() == grad_enabled
    after = handler.predict(items)
    for first, second in zip(before, after, strict=True):
        assert first.top_label == second.top_label
        for label, probability in first.probabilities.items():
            assert second.probabilities[label] == pytest.approx(probability, abs=1e-6)


def test_inside_inference_mode_and_with_frozen_parameters(handler):
    items = [png_bytes(opacity=True, seed=31), png_bytes(opacity=True, seed=32, size=96)]
    expected = heatmaps_for(handler, items, LAYER)
    with torch.inference_mode():
        inside = heatmaps_for(handler, items, LAYER)
    for a, b in zip(expected, inside, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    parameters = list(handler.model.parameters())
    try:
        for p in parameters:
            p.requires_grad_(False)
        frozen = heatmaps_for(handler, items, LAYER)
        assert not any(p.requires_grad for p in parameters)
    finally:
        for p in parameters:
            p.requires_grad_(True)
    for a, b in zip(expected, frozen, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("layer", ["layer9", "layer4.7", "", "layer4.0.nope"])
def test_an_unknown_layer_is_a_value_error(handler, layer):
    with pytest.raises(ValueError, match="layer"):
        heatmaps_for(handler, [png_bytes(seed=41)], layer)
    with pytest.raises(ValueError, match="layer"):
        gradcam(handler, handler.decode(png_bytes(seed=41)).unsqueeze(0), [0], layer)
    _assert_no_hooks(handler.model)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_a_torchscript_model_is_a_value_error(handler):
    example = torch.zeros((1, 3, 64, 64))
    scripted = torch.jit.trace(torchvision.models.resnet18(num_classes=2).eval(), example)
    scripted_handler = Handler(handler.manifest, scripted, torch.device("cpu"))
    with pytest.raises(ValueError, match="TorchScript"):
        heatmaps_for(scripted_handler, [png_bytes(seed=43)], LAYER)


def test_bad_class_indices_and_inputs_are_value_errors(handler):
    batch = handler.decode(png_bytes(seed=42)).unsqueeze(0)
    with pytest.raises(ValueError, match="class indices"):
        gradcam(handler, batch, [2], LAYER)
    with pytest.raises(ValueError, match="class indices"):
        gradcam(handler, batch, [0, 1], LAYER)
    with pytest.raises(ValueError, match="uint8"):
        gradcam(handler, batch.float(), [0], LAYER)


def test_flat_maps_stay_zero_and_others_span_zero_to_one():
    maps = torch.stack([torch.full((4, 4), 3.0), torch.zeros(4, 4), torch.arange(16.0).view(4, 4) + 5])
    normalised = _normalise(maps)
    assert torch.equal(normalised[0], torch.zeros(4, 4))
    assert torch.equal(normalised[1], torch.zeros(4, 4))
    assert normalised[2].min() == 0.0 and normalised[2].max() == 1.0


def test_the_overlay_is_an_rgba_png_of_the_requested_size(handler):
    (heatmap,) = heatmaps_for(handler, [png_bytes(opacity=True, seed=51)], LAYER)
    data = render_overlay_png(heatmap, (300, 200))
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert image.mode == "RGBA"
        assert image.size == (300, 200)
        pixels = np.asarray(image)
    alpha = pixels[..., 3]
    assert alpha.min() == 0  # cold parts leave the image visible
    assert alpha.max() == round(0.6 * 255)  # the hottest part tinted, never opaque
    hottest = np.unravel_index(np.argmax(alpha), alpha.shape)
    red, green, blue, _ = pixels[hottest]
    assert red >= 120 and green < 30 and blue < 30  # the hot end of the colour map is (jet's dark) red

    with Image.open(io.BytesIO(render_overlay_png(heatmap, (300, 200), indexed=True))) as indexed:
        assert indexed.size == (300, 200)
        assert np.array_equal(np.asarray(indexed.convert("RGBA")), pixels)

    with Image.open(io.BytesIO(render_overlay_png(np.zeros((64, 64), np.float32), (17, 9)))) as blank:
        assert blank.size == (17, 9) and np.asarray(blank)[..., 3].max() == 0

    with pytest.raises(ValueError):
        render_overlay_png(np.zeros((2, 64, 64), np.float32), (10, 10))
    with pytest.raises(ValueError):
        render_overlay_png(heatmap, (0, 10))


def _median_ms(function, repeats: int = 7) -> float:
    function()  # warm-up for this shape
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def test_report_the_cost_per_image(handler):
    """Not a limit: prints the cost of Grad-CAM against plain inference, batch of 16, on this CPU."""
    rng = np.random.default_rng(61)
    items = [synthetic.render_png(rng, 512, i % 2 == 1) for i in range(16)]
    batch, _ = handler.preprocess(items)
    top = handler.infer(batch).argmax(dim=1)
    n = len(items)
    rows = {
        "predict (decode + forward)": _median_ms(lambda: handler.predict(items)) / n,
        "forward only (infer)": _median_ms(lambda: handler.infer(batch)) / n,
        f"gradcam {LAYER} (forward + backward, float32)": _median_ms(lambda: gradcam(handler, batch, top, LAYER)) / n,
        f"gradcam {FINE_LAYER}": _median_ms(lambda: gradcam(handler, batch, top, FINE_LAYER)) / n,
        f"heatmaps_for {LAYER} (decode + infer + gradcam)": _median_ms(lambda: heatmaps_for(handler, items, LAYER)) / n,
    }
    heatmap = gradcam(handler, batch[:1], top[:1], LAYER)[0]
    for side in (512, 2048):
        for indexed in (False, True):
            rows[f"overlay PNG {side}x{side}{' indexed' if indexed else ' RGBA'}"] = _median_ms(
                lambda side=side, indexed=indexed: render_overlay_png(heatmap, (side, side), indexed=indexed), repeats=3
            )
    print(f"\ncost per image, batch of {n}, {handler.manifest.input_size} px model input, 512 px PNGs, ", end="")
    print(f"{torch.get_num_threads()} torch threads on {handler.device}:")
    for name, ms in rows.items():
        print(f"  {name:<52} {ms:8.2f} ms/image")


@pytest.mark.gpu  # `make test-gpu` on a machine with CUDA
def test_cuda_gives_the_cpu_heatmaps(handler, demo_package):
    cuda = Handler.initialize(demo_package, read_manifest(demo_package).weights_sha256, device=torch.device("cuda"))
    items = [png_bytes(opacity=True, seed=71), CORRUPT, png_bytes(opacity=False, seed=72)]
    on_cpu = heatmaps_for(handler, items, FINE_LAYER)
    on_cuda = heatmaps_for(cuda, items, FINE_LAYER)
    assert on_cuda[1] is None
    for a, b in ((on_cpu[0], on_cuda[0]), (on_cpu[2], on_cuda[2])):
        np.testing.assert_allclose(a, b, atol=0.05)  # float32 on both; cuDNN may use TF32
    _assert_no_hooks(cuda.model)
