"""The ``precision`` option (worker/compute/precision.py): ``exact`` is the article's
computation and the CPU default; ``fast`` decodes JPEGs in draft mode and stays within a
measured tolerance of ``exact`` on camera-size photos; every manifest and caption says which
one ran."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.errors import InvalidOption
from shared.imaging import decode
from shared.options import JobOptions
from tests.photos import camera_jpeg, png_bytes, scene
from worker.compute.pipeline import process_image, process_images
from worker.compute.precision import DRAFT_SIDE, compare_maps, resolve, tf32

LIMIT = 10**8
# What docs/benchmarks.md "Precision" reports as measured for fast against exact on camera
# photos (≤ 0.9 % of a map's range, correlation ≥ 0.9999), with a margin for other photos.
MAX_RELATIVE_DIFFERENCE = 0.02
MIN_CORRELATION = 0.9995


@pytest.fixture(scope="module")
def camera_photos() -> list[bytes]:
    # 12 MP with EXIF orientation 6, and a 4:3 one left as stored; 3-6 MB each.
    return [camera_jpeg(seed=1), camera_jpeg(3264, 2448, orientation=None, seed=2)]


def test_auto_is_exact_on_the_cpu_and_fast_on_cuda():
    assert resolve("auto", torch.device("cpu")).describe() == {
        "mode": "exact",
        "decoder": "pillow",
        "tf32": False,
        "on_device": False,
    }
    assert resolve("auto", torch.device("cuda")).describe() == {
        "mode": "fast",
        "decoder": "torchvision",
        "tf32": True,
        "on_device": True,
    }
    exact_on_cuda = resolve("exact", torch.device("cuda"))
    assert exact_on_cuda.tf32 is False and exact_on_cuda.on_device is False
    assert resolve("fast", torch.device("cpu")).describe() == {
        "mode": "fast",
        "decoder": "pillow-draft",
        "tf32": False,
        "on_device": False,
    }
    assert resolve("fast", torch.device("cpu"), on_device=True).decoder == "torchvision"


def test_an_unknown_precision_is_refused_with_the_allowed_values():
    with pytest.raises(InvalidOption, match="precision='half' is not one of: auto, exact, fast"):
        JobOptions.from_mapping({"precision": "half"})


def test_tf32_flags_are_set_for_the_block_and_restored():
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    for allowed in (True, False):
        with tf32(allowed):
            assert torch.backends.cudnn.allow_tf32 is allowed
            assert torch.backends.cuda.matmul.allow_tf32 is allowed
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_draft_decode_scales_a_camera_jpeg_and_reports_its_full_size(camera_photos):
    decoded = decode(camera_photos[0], max_pixels=LIMIT, draft_side=DRAFT_SIDE)
    # 4000×3000 stored, orientation 6: upright 3000×4000, decoded at 1/4 (both sides ≥ 448).
    assert decoded.describe()["width"] == 3000 and decoded.describe()["height"] == 4000
    assert decoded.image.size == (750, 1000)
    assert decoded.describe()["decoded_size"] == [750, 1000]
    full = decode(camera_photos[0], max_pixels=LIMIT)
    assert full.image.size == (3000, 4000) and "decoded_size" not in full.describe()


def test_draft_leaves_other_formats_alone():
    data = png_bytes(scene(1200, 900))
    decoded = decode(data, max_pixels=LIMIT, draft_side=DRAFT_SIDE)
    assert decoded.image.size == (1200, 900) and "decoded_size" not in decoded.describe()


def test_the_cpu_default_is_exact_bit_for_bit(random_model, camera_photos):
    default, exact = (
        process_images(random_model, camera_photos, JobOptions(precision=p), max_pixels=LIMIT)
        for p in ("auto", "exact")
    )
    for a, b in zip(default, exact, strict=True):
        assert a.manifest["precision"]["mode"] == "exact"
        assert a.figure == b.figure
        for name in a.maps:
            np.testing.assert_array_equal(a.maps[name], b.maps[name])


def test_fast_stays_within_the_measured_tolerance_of_exact(random_model, camera_photos):
    fast, exact = (
        process_images(random_model, camera_photos, JobOptions(precision=p), max_pixels=LIMIT)
        for p in ("fast", "exact")
    )
    for f, e in zip(fast, exact, strict=True):
        assert f.manifest["precision"]["decoder"] == "pillow-draft"
        assert "decoded_size" in f.manifest["input"]
        assert f.manifest["input"]["width"] == e.manifest["input"]["width"]
        difference = compare_maps(e.maps, f.maps)
        assert difference["max_abs_difference_over_range"] <= MAX_RELATIVE_DIFFERENCE
        assert difference["min_correlation"] >= MIN_CORRELATION
        assert difference["max_abs_difference_over_range"] > 0, "fast gave exact's maps"


def test_the_caption_states_the_precision(random_model, camera_photos, captions):
    for precision in ("auto", "fast"):
        process_image(
            random_model, camera_photos[1], JobOptions(precision=precision), max_pixels=LIMIT
        )
    assert captions[0].endswith("precision=exact")
    assert captions[1].endswith("precision=fast")


def test_compare_maps_on_constant_and_equal_maps():
    flat, ramp = np.zeros((4, 4), np.float32), np.arange(16, dtype=np.float32).reshape(4, 4)
    assert compare_maps({"a": ramp}, {"a": ramp}) == {
        "max_abs_difference_over_range": 0.0,
        "min_correlation": 1.0,
    }
    assert compare_maps({"a": flat}, {"a": flat})["min_correlation"] == 1.0
    assert compare_maps({"a": flat}, {"a": ramp})["min_correlation"] == 0.0
    assert compare_maps({"a": ramp}, {"a": ramp + 1.5})["max_abs_difference_over_range"] == 0.1
