"""worker.compute.pipeline: bytes in, figure + manifest + maps out; bad images fail alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from shared.errors import FeatureMapsError, UnsupportedType
from shared.options import JobOptions
from worker.compute import pipeline
from worker.compute.model import load_model
from worker.compute.pipeline import ImageResult, process_image, process_images

LIMIT = 10**8
STAGES = {"decode_ms", "model_ms", "reduce_ms", "render_ms", "encode_ms"}


@pytest.fixture(scope="module")
def chain_result(random_model, grace_hopper) -> ImageResult:
    options = JobOptions(arrays=True, per_layer=True)
    return process_image(random_model, grace_hopper, options, max_pixels=LIMIT)


def test_manifest_describes_everything(chain_result):
    manifest = chain_result.manifest
    assert manifest["model"] == "resnet18"
    assert manifest["weights"] == {"name": "random", "seed": 0}
    assert manifest["options"] == JobOptions(arrays=True, per_layer=True).to_dict()
    assert manifest["torch"] == torch.__version__
    assert manifest["torchvision"] == torchvision.__version__
    assert manifest["device"] == "cpu"
    assert manifest["precision"] == {
        "mode": "exact",
        "decoder": "pillow",
        "tf32": False,
        "on_device": False,
        "dtype": "float32",
        "memory_format": "contiguous",
    }
    assert manifest["input"] == {
        "format": "jpg",
        "width": 512,
        "height": 600,
        "mode": "RGB",
        "exif_orientation": 1,
        "frames": 1,
    }
    assert manifest["layers"] == chain_result.layers
    assert set(manifest["timings"]) == STAGES
    assert chain_result.timings == manifest["timings"]
    assert "predictions" not in manifest  # random weights: class names would be a lie


def test_manifest_records_what_the_file_held(random_model, special_images):
    # Stored 40×20 with EXIF orientation 6: the maps are of the 20×40 picture as shown.
    result = process_image(
        random_model, special_images["exif_rotated_jpeg"], JobOptions(), max_pixels=LIMIT
    )
    assert result.manifest["input"] == {
        "format": "jpg",
        "width": 20,
        "height": 40,
        "mode": "RGB",
        "exif_orientation": 6,
        "frames": 1,
    }
    animated = process_image(
        random_model, special_images["animated_gif"], JobOptions(), max_pixels=LIMIT
    )
    assert animated.manifest["input"]["frames"] == 2
    assert animated.manifest["input"]["mode"] == "P"


def test_layer_summaries_match_the_maps(chain_result):
    assert len(chain_result.layers) == 17
    first = chain_result.layers[0]
    assert first["name"] == "conv1" and first["shape"] == [64, 112, 112]
    assert chain_result.layers[-1]["shape"] == [512, 14, 14]
    for summary in chain_result.layers:
        array = chain_result.maps[summary["name"]]
        assert array.dtype == np.float32 and array.shape == tuple(summary["shape"][1:])
        assert summary["min"] == float(array.min())
        assert summary["max"] == float(array.max())
        assert summary["mean"] == pytest.approx(float(array.mean()))


def test_figure_is_the_asked_format(chain_result):
    assert chain_result.figure_ext == "jpg"
    assert Image.open(io.BytesIO(chain_result.figure)).format == "JPEG"


def test_npz_round_trips_bit_for_bit(chain_result):
    with np.load(io.BytesIO(chain_result.arrays)) as stored:
        assert list(stored.keys()) == list(chain_result.maps)
        for name, array in chain_result.maps.items():
            assert stored[name].dtype == np.float32
            assert stored[name].tobytes() == array.tobytes(), name


def test_per_layer_pngs(chain_result):
    assert [(index, name) for index, name, _ in chain_result.layer_pngs] == list(
        enumerate(chain_result.maps)
    )
    for _, _, png in chain_result.layer_pngs:
        assert Image.open(io.BytesIO(png)).format == "PNG"


def test_extras_only_when_asked(random_model, photos):
    result = process_image(random_model, photos[("shapes", "png")], JobOptions(), max_pixels=LIMIT)
    assert result.arrays is None and result.layer_pngs == []


def test_the_caption_names_the_weights(random_model, photos, captions):
    process_image(random_model, photos[("shapes", "png")], JobOptions(), max_pixels=LIMIT)
    assert "weights: random, seed 0" in captions[0]


@pytest.mark.parametrize("fmt", ["svg", "pdf"])
def test_vector_figures(random_model, photos, fmt):
    options = JobOptions(format=fmt, mode="forward")
    result = process_image(random_model, photos[("gradient", "bmp")], options, max_pixels=LIMIT)
    assert result.figure.startswith({"svg": b"<?xml", "pdf": b"%PDF-"}[fmt])
    assert result.figure_ext == fmt
    assert len(result.layers) == 20


def test_bad_images_fail_alone(random_model, photos, bad_inputs):
    good = photos[("noise", "tiff")]
    inputs = [good, *(data for data, _ in bad_inputs.values()), good]
    results = process_images(random_model, inputs, JobOptions(), max_pixels=50_000_000)
    assert isinstance(results[0], ImageResult) and isinstance(results[-1], ImageResult)
    codes = [result.code for result in results[1:-1]]
    assert codes == [code for _, code in bad_inputs.values()]
    assert all(isinstance(result, FeatureMapsError) for result in results[1:-1])


def test_only_bad_images(random_model, bad_inputs):
    results = process_images(random_model, [bad_inputs["pdf"][0]], JobOptions(), max_pixels=LIMIT)
    assert isinstance(results[0], UnsupportedType)
    assert process_images(random_model, [], JobOptions(), max_pixels=LIMIT) == []


def test_process_image_raises_for_bad_input(random_model, bad_inputs):
    for name, (data, code) in bad_inputs.items():
        with pytest.raises(FeatureMapsError) as caught:
            process_image(random_model, data, JobOptions(), max_pixels=50_000_000)
        assert caught.value.code == code, name


def test_batch_timings_are_split_per_image(random_model, photos):
    inputs = [photos[("shapes", ext)] for ext in ("jpg", "png", "gif")]
    results = process_images(random_model, inputs, JobOptions(), max_pixels=LIMIT)
    assert {result.timings["model_ms"] for result in results} == {results[0].timings["model_ms"]}
    assert all(set(result.timings) == STAGES for result in results)


@pytest.mark.parametrize("reduction", ["max", "std", "l2"])
def test_other_reductions(random_model, photos, reduction):
    options = JobOptions(reduction=reduction, normalize="imagenet", colormap="magma")
    result = process_image(random_model, photos[("noise", "png")], options, max_pixels=LIMIT)
    assert len(result.maps) == 17
    if reduction in ("std", "l2"):
        assert all(float(array.min()) >= 0 for array in result.maps.values())


def test_forward_with_imagenet_weights_predicts(random_model, photos, tmp_path, monkeypatch):
    # The seeded random weights stand in for the ImageNet checkpoint in torchvision's cache.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoint = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    checkpoint.parent.mkdir(parents=True)
    torch.save(random_model.model.state_dict(), checkpoint)
    loaded = load_model("imagenet", device="cpu")
    options = JobOptions(mode="forward", normalize="imagenet")
    result = process_image(loaded, photos[("shapes", "jpg")], options, max_pixels=LIMIT)
    predictions = result.manifest["predictions"]
    assert len(predictions) == 5
    assert all(p["label"] in loaded.categories for p in predictions)
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    assert 0 < sum(probabilities) <= 1.0 + 1e-6
    assert result.manifest["weights"]["id"] == "IMAGENET1K_V1"


@pytest.mark.parametrize("mode", ["chain", "forward"])
def test_a_chunk_larger_than_the_model_slice_matches_one_by_one(random_model, photos, mode):
    # More images than CPU_MODEL_BATCH: the model runs in slices whose outputs are joined.
    inputs = list(photos.values())[: pipeline.CPU_MODEL_BATCH + 3]
    options = JobOptions(mode=mode)
    together = process_images(random_model, inputs, options, max_pixels=LIMIT)
    assert len(together) == len(inputs)
    for data, result in zip(inputs, together, strict=True):
        alone = process_image(random_model, data, options, max_pixels=LIMIT)
        assert list(result.maps) == list(alone.maps)
        for name, array in result.maps.items():
            np.testing.assert_allclose(array, alone.maps[name], rtol=1e-4, atol=1e-5)
