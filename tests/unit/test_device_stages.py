"""The device data path (worker/compute/device_stages.py), run here on the CPU with the same torch
functions a GPU worker runs: batched torchvision decode, torch resize, the torch renderer
and torchvision's JPEG encoder. It must give exact's inputs and errors, maps within the
measured tolerance, the host renderer's figure up to JPEG encoding, and no warnings."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from shared.options import JobOptions
from tests.photos import camera_jpeg, cmyk_jpeg, png_bytes, scene
from worker.compute.pipeline import ImageResult, process_images
from worker.compute.precision import compare_maps

LIMIT = 10**8
MAX_RELATIVE_DIFFERENCE = 0.02
MIN_CORRELATION = 0.9995


@pytest.fixture(scope="module")
def inputs() -> dict[str, bytes]:
    camera = camera_jpeg(seed=3)
    return {
        "camera_rotated": camera,  # 12 MP, EXIF orientation 6: batched decode
        "camera_upright": camera_jpeg(2400, 1800, orientation=None, seed=4),
        "png": png_bytes(scene(900, 700)),  # another format: Pillow
        "cmyk": cmyk_jpeg(1200, 800),  # not YCbCr: Pillow
        "broken": b"\xff\xd8\xff\xe0 not a jpeg at all",
        "truncated": camera[: len(camera) // 2],
    }


def run(model, inputs: dict[str, bytes], **options) -> tuple[dict, dict]:
    images = list(inputs.values())
    fast = process_images(
        model, images, JobOptions(precision="fast", **options), max_pixels=LIMIT, on_device=True
    )
    exact = process_images(
        model, images, JobOptions(precision="exact", **options), max_pixels=LIMIT
    )
    return dict(zip(inputs, fast, strict=True)), dict(zip(inputs, exact, strict=True))


@pytest.fixture(scope="module")
def results(random_model, inputs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = run(random_model, inputs)
    return (*outcome, caught)


def test_bad_inputs_fail_as_in_the_host_path(results):
    fast, exact, _ = results
    for name in ("broken", "truncated"):
        assert not isinstance(fast[name], ImageResult)
        assert fast[name].code == exact[name].code, name
    assert fast["truncated"].code == "truncated_image"


def test_inputs_are_described_as_in_the_host_path(results):
    fast, exact, _ = results
    for name in ("camera_rotated", "camera_upright", "png", "cmyk"):
        assert fast[name].manifest["input"] == exact[name].manifest["input"], name
        assert fast[name].manifest["precision"] == {
            "mode": "fast",
            "decoder": "torchvision",
            "tf32": False,
            "on_device": True,
            "dtype": "float32",
            "memory_format": "contiguous",
        }
    assert fast["camera_rotated"].manifest["input"]["width"] == 3000  # upright


def test_maps_stay_within_the_tolerance_of_exact(results):
    fast, exact, _ = results
    for name in ("camera_rotated", "camera_upright", "png", "cmyk"):
        difference = compare_maps(exact[name].maps, fast[name].maps)
        assert difference["max_abs_difference_over_range"] <= MAX_RELATIVE_DIFFERENCE, name
        assert difference["min_correlation"] >= MIN_CORRELATION, name


def test_the_figure_is_the_host_renderers_up_to_jpeg_encoding(results):
    fast, exact, _ = results
    for name in ("camera_rotated", "png"):
        device_figure = np.asarray(Image.open(io.BytesIO(fast[name].figure)), dtype=np.int16)
        host_figure = np.asarray(Image.open(io.BytesIO(exact[name].figure)), dtype=np.int16)
        assert device_figure.shape == host_figure.shape
        # Same canvas (the renderers agree pixel for pixel), other maps by < 2 % and another
        # JPEG encoder at the same quality: close on average, never a different picture.
        assert np.abs(device_figure - host_figure).mean() < 3.0, name


def test_no_deprecation_or_tensor_warning_escapes(results):
    *_, caught = results
    assert [str(w.message) for w in caught] == []


def test_other_figure_formats_are_drawn_on_the_host(random_model, inputs):
    fast, _ = run(random_model, {"camera": inputs["camera_upright"]}, format="png")
    assert fast["camera"].figure.startswith(b"\x89PNG")
    assert fast["camera"].manifest["precision"]["on_device"] is True


def test_a_jobs_input_preview_is_small_and_upright(random_model, inputs):
    (result,) = process_images(
        random_model,
        [inputs["camera_rotated"]],
        JobOptions(precision="fast"),
        max_pixels=LIMIT,
        input_previews=True,
        on_device=True,
    )
    preview = Image.open(io.BytesIO(result.input_preview))
    assert preview.format == "JPEG" and preview.size == (480, 640)
