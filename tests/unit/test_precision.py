"""The ``precision`` option (worker/compute/precision.py): ``exact`` is the article's
computation and the CPU default; ``fast`` decodes JPEGs in draft mode and runs the model on a
channels-last copy, in bfloat16 where the CPU has it natively, and stays within a measured
tolerance of ``exact`` on camera-size photos; every manifest and caption says which one
ran."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from shared.errors import InvalidOption
from shared.imaging import decode
from shared.options import JobOptions
from tests.photos import camera_jpeg, png_bytes, scene
from worker.compute import precision as precision_module
from worker.compute.features import reduce_channels, resize_input, to_batch
from worker.compute.pipeline import process_image, process_images
from worker.compute.precision import DRAFT_SIDE, compare_maps, native_bf16, resolve, tf32

LIMIT = 10**8
# What docs/benchmarks.md "Precision" reports as measured for fast (draft decode and
# bfloat16) against exact, with a margin for other photos: chain mode within 2.0 % of a
# map's range over bench/datapath.py's photos (1.2 % on these two), correlation ≥ 0.9996;
# forward mode (batch norm, ReLU and the residual adds in bfloat16 too) within 3.2 %,
# correlation ≥ 0.999.
TOLERANCE = {"chain": (0.03, 0.999), "forward": (0.045, 0.998)}


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
        "dtype": "float32",
        "memory_format": "contiguous",
    }
    assert resolve("auto", torch.device("cuda")).describe() == {
        "mode": "fast",
        "decoder": "torchvision",
        "tf32": True,
        "on_device": True,
        "dtype": "float32",
        "memory_format": "contiguous",
    }
    exact_on_cuda = resolve("exact", torch.device("cuda"))
    assert exact_on_cuda.tf32 is False and exact_on_cuda.on_device is False
    assert resolve("fast", torch.device("cpu")).describe() == {
        "mode": "fast",
        "decoder": "pillow-draft",
        "tf32": False,
        "on_device": False,
        "dtype": "bfloat16" if native_bf16() else "float32",
        "memory_format": "channels_last",
    }
    assert resolve("fast", torch.device("cpu"), on_device=True).decoder == "torchvision"
    assert resolve("exact", torch.device("cpu")).describe()["dtype"] == "float32"
    assert resolve("exact", torch.device("cpu")).describe()["memory_format"] == "contiguous"


def test_fast_uses_bfloat16_only_where_the_cpu_has_it(monkeypatch):
    capabilities: dict = {"avx512_f": True, "avx512_bf16": False, "amx_bf16": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert native_bf16() is False
    fallback = resolve("fast", torch.device("cpu"))
    assert (fallback.dtype, fallback.memory_format) == ("float32", "channels_last")
    for flag in ("avx512_bf16", "amx_bf16"):
        monkeypatch.setitem(capabilities, flag, True)
        assert resolve("fast", torch.device("cpu")).dtype == "bfloat16"
        monkeypatch.setitem(capabilities, flag, False)
    # CUDA keeps float32 (with TF32) whatever the host CPU has.
    monkeypatch.setitem(capabilities, "avx512_bf16", True)
    assert resolve("fast", torch.device("cuda")).dtype == "float32"


def test_this_machines_cpu_is_detected_as_its_flags_say():
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
        flags = set(cpuinfo.read().split())
    assert native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


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


@pytest.mark.parametrize("mode", ["chain", "forward"])
def test_fast_stays_within_the_measured_tolerance_of_exact(random_model, camera_photos, mode):
    fast, exact = (
        process_images(
            random_model, camera_photos, JobOptions(precision=p, mode=mode), max_pixels=LIMIT
        )
        for p in ("fast", "exact")
    )
    largest, lowest = TOLERANCE[mode]
    for f, e in zip(fast, exact, strict=True):
        assert f.manifest["precision"]["decoder"] == "pillow-draft"
        assert f.manifest["precision"]["memory_format"] == "channels_last"
        assert "decoded_size" in f.manifest["input"]
        assert f.manifest["input"]["width"] == e.manifest["input"]["width"]
        difference = compare_maps(e.maps, f.maps)
        assert difference["max_abs_difference_over_range"] <= largest
        assert difference["min_correlation"] >= lowest
        assert difference["max_abs_difference_over_range"] > 0, "fast gave exact's maps"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fast_computes_the_articles_chain_in_its_dtype_and_layout(
    random_model, camera_photos, monkeypatch, dtype
):
    """fast's maps are the article's loop over the 17 convs, written out here on a copy of the
    model converted by hand to ``dtype`` and channels-last, over the same draft decode: the
    pipeline computes what its manifest says (and not float32 under a bfloat16 label)."""
    monkeypatch.setattr(precision_module, "native_bf16", lambda: dtype == torch.bfloat16)
    got = process_images(
        random_model, camera_photos, JobOptions(precision="fast"), max_pixels=LIMIT
    )
    pictures = [
        resize_input(decode(data, max_pixels=LIMIT, draft_side=DRAFT_SIDE).image)
        for data in camera_photos
    ]
    x = to_batch(pictures, "none").to(dtype).contiguous(memory_format=torch.channels_last)
    model = copy.deepcopy(random_model.model).to(dtype, memory_format=torch.channels_last)
    convs = [model.conv1] + [
        getattr(block, name)
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
        for block in layer
        for name in ("conv1", "conv2")
    ]
    expected: list[np.ndarray] = []
    with torch.inference_mode():
        for conv in convs:
            x = conv(x)
            # The article's reduction, written out: sum over channels / C, in float32.
            expected.append((torch.sum(x.float(), 1) / x.shape[1]).numpy())
    for row, result in enumerate(got):
        assert result.manifest["precision"]["dtype"] == str(dtype).removeprefix("torch.")
        maps = list(result.maps.values())
        assert len(maps) == len(expected) == 17
        for name, mine, theirs in zip(result.maps, maps, expected, strict=True):
            np.testing.assert_allclose(mine, theirs[row], rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_caption_states_the_precision(random_model, camera_photos, captions):
    for precision in ("auto", "fast"):
        process_image(
            random_model, camera_photos[1], JobOptions(precision=precision), max_pixels=LIMIT
        )
    assert captions[0].endswith("precision=exact")
    dtype = "bfloat16" if native_bf16() else "float32"
    assert captions[1].endswith(f"precision=fast ({dtype}, channels-last)")


def test_compare_maps_on_constant_and_equal_maps():
    flat, ramp = np.zeros((4, 4), np.float32), np.arange(16, dtype=np.float32).reshape(4, 4)
    assert compare_maps({"a": ramp}, {"a": ramp}) == {
        "max_abs_difference_over_range": 0.0,
        "min_correlation": 1.0,
    }
    assert compare_maps({"a": flat}, {"a": flat})["min_correlation"] == 1.0
    assert compare_maps({"a": flat}, {"a": ramp})["min_correlation"] == 0.0
    assert compare_maps({"a": ramp}, {"a": ramp + 1.5})["max_abs_difference_over_range"] == 0.1


@pytest.mark.parametrize("reduction", ["mean", "max", "std", "l2"])
def test_bfloat16_channels_last_activations_reduce_as_their_float32_copy(reduction):
    generator = torch.Generator().manual_seed(3)
    activation = torch.randn(3, 64, 17, 13, generator=generator).to(torch.bfloat16)
    activation = activation.contiguous(memory_format=torch.channels_last)
    got = reduce_channels(activation, reduction)
    expected = reduce_channels(activation.float().contiguous(), reduction)
    assert got.dtype == torch.float32 and got.shape == (3, 17, 13)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)
