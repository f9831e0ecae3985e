"""Every supported architecture through the pipeline, against references written out here:
``mode=forward``'s maps are what plain forward hooks that copy each Conv2d output give, and
ResNet-50's ``mode=chain`` is the article's loop over its 49 main-path convs
(docs/design.md "Models"). Seeded random weights, two small photos, float32 on the CPU.

The big networks are slow on a small CPU: each is built once per module and its reference
computed once (``_cache``)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from shared.architectures import MAX_DEFAULT_TILES, layer_names
from shared.errors import InvalidOption
from shared.options import ARCHITECTURES, CHAIN_ARCHITECTURES, CHAIN_NOT_DEFINED, JobOptions
from tests.unit.conftest import encode, gradient_photo, shapes_photo
from worker.compute.features import conv_layers, mode_layers, preprocess
from worker.compute.model import DISPLAY_NAMES, LoadedModel, load_model
from worker.compute.pipeline import process_images, tiled_layers

_cache: dict[str, object] = {}


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [encode(gradient_photo(), "PNG"), encode(shapes_photo(), "PNG")]


def loaded(architecture: str) -> LoadedModel:
    key = f"model:{architecture}"
    if key not in _cache:
        _cache[key] = load_model("random", device="cpu", seed=0, architecture=architecture)
    return _cache[key]  # type: ignore[return-value]


def reference_forward(model: nn.Module, batch: torch.Tensor, *, copy: bool = True) -> dict:
    """Each Conv2d's output copied by a plain hook, then reduced as the article does
    (sum over channels / C). ``copy=False`` keeps the bare reference, the mistake the
    pipeline must not make."""
    kept: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: kept.__setitem__(name, out.clone() if copy else out)
        )
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
    ]
    try:
        with torch.inference_mode():
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (t.sum(1) / t.shape[1]).numpy() for name, t in kept.items()}


def forward_reference(architecture: str, images: list[bytes]) -> dict:
    key = f"reference:{architecture}"
    if key not in _cache:
        from PIL import Image

        from shared.imaging import decode

        pictures = [decode(data, max_pixels=10**8).image for data in images]
        assert all(isinstance(p, Image.Image) for p in pictures)
        _cache[key] = reference_forward(loaded(architecture).model, preprocess(pictures, "none"))
    return _cache[key]  # type: ignore[return-value]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_forward_maps_equal_copied_hook_outputs(architecture, images):
    model = loaded(architecture)
    options = JobOptions(mode="forward", model=architecture, layers="*")
    results = process_images(model, images, options, max_pixels=10**8)
    expected = forward_reference(architecture, images)
    assert len(expected) == len(conv_layers(model.model))
    for row, result in enumerate(results):
        assert list(result.maps) == list(expected), "every Conv2d, by name, in module order"
        for name, reference in expected.items():
            np.testing.assert_allclose(
                result.maps[name], reference[row], rtol=1e-5, atol=1e-6, err_msg=name
            )
        assert result.manifest["model"] == architecture
        assert result.manifest["weights"] == {"name": "random", "seed": 0}


def test_vgg16_would_catch_a_kept_reference(images):
    """VGG's ReLU(inplace=True) rewrites a conv's output after its hook returned: a bare
    reference differs from a copy, so the comparison above would see the mistake."""
    from shared.imaging import decode

    pictures = [decode(data, max_pixels=10**8).image for data in images]
    batch = preprocess(pictures, "none")
    bare = reference_forward(loaded("vgg16").model, batch, copy=False)
    copied = forward_reference("vgg16", images)
    assert any(not np.allclose(bare[name], copied[name]) for name in copied)


def test_resnet50_chain_is_the_articles_loop_over_its_main_path(images):
    from shared.imaging import decode

    model = loaded("resnet50").model
    convs: list[tuple[str, nn.Conv2d]] = [("conv1", model.conv1)]
    for layer_name in ("layer1", "layer2", "layer3", "layer4"):
        for index, block in enumerate(getattr(model, layer_name)):
            for conv_name in ("conv1", "conv2", "conv3"):
                convs.append((f"{layer_name}.{index}.{conv_name}", getattr(block, conv_name)))
    assert len(convs) == 49
    pictures = [decode(data, max_pixels=10**8).image for data in images]
    x = preprocess(pictures, "none")
    expected = {}
    with torch.inference_mode():
        for name, conv in convs:
            x = conv(x)
            expected[name] = (x.sum(1) / x.shape[1]).numpy()

    options = JobOptions(mode="chain", model="resnet50", layers="*")
    results = process_images(loaded("resnet50"), images, options, max_pixels=10**8)
    for row, result in enumerate(results):
        assert list(result.maps) == list(expected)
        for name, reference in expected.items():
            np.testing.assert_allclose(
                result.maps[name], reference[row], rtol=1e-5, atol=1e-6, err_msg=name
            )


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_apis_layer_names_are_the_workers(architecture):
    """The API checks ``layers`` against names read from shared/architectures.json; the
    worker walks the built network. They agree, in order."""
    model = loaded(architecture).model
    for mode in ("forward", "chain") if architecture in CHAIN_ARCHITECTURES else ("forward",):
        assert layer_names(architecture, mode) == mode_layers(model, architecture, mode)


@pytest.mark.parametrize("architecture", ["vgg16", "densenet121", "convnext_tiny"])
def test_chain_is_refused_outside_the_resnet_family(architecture):
    with pytest.raises(InvalidOption, match="mode=chain is defined for ResNet-style networks"):
        JobOptions(model=architecture)
    # An uploaded model's architecture is known only later: the worker refuses it too.
    options = JobOptions(model="0" * 24)
    with pytest.raises(InvalidOption) as refused:
        tiled_layers(loaded(architecture), options)
    assert refused.value.message == CHAIN_NOT_DEFINED


def test_default_tiles_stay_readable():
    """At most MAX_DEFAULT_TILES, evenly spaced, the first and the last included."""
    densenet = loaded("densenet121")
    every = [name for name, _ in conv_layers(densenet.model)]
    assert len(every) == 120
    shown = tiled_layers(densenet, JobOptions(mode="forward", model="densenet121"))
    assert len(shown) == MAX_DEFAULT_TILES
    assert shown[0] == every[0] and shown[-1] == every[-1]
    positions = [every.index(name) for name in shown]
    gaps = np.diff(positions)
    assert positions == sorted(positions) and gaps.max() - gaps.min() <= 1
    # Squeeze-and-excitation convs (1×1 maps) are left out of the default, not of "*".
    efficientnet = loaded("efficientnet_b0")
    options = JobOptions(mode="forward", model="efficientnet_b0")
    assert not any(name.endswith((".fc1", ".fc2")) for name in tiled_layers(efficientnet, options))
    every = tiled_layers(
        efficientnet, JobOptions(mode="forward", model="efficientnet_b0", layers="*")
    )
    assert len(every) == len(conv_layers(efficientnet.model))
    # ResNet-18 keeps every layer, as before: 17 in the chain, 20 in a forward pass.
    resnet = loaded("resnet18")
    assert len(tiled_layers(resnet, JobOptions())) == 17
    assert len(tiled_layers(resnet, JobOptions(mode="forward"))) == 20


def test_layers_option_chooses_tiles(images):
    resnet = loaded("resnet18")
    chosen = tiled_layers(resnet, JobOptions(layers="layer4.*, conv1"))
    assert chosen == [
        "conv1",
        "layer4.0.conv1",
        "layer4.0.conv2",
        "layer4.1.conv1",
        "layer4.1.conv2",
    ]
    with pytest.raises(InvalidOption, match="layer9"):
        tiled_layers(resnet, JobOptions(layers="layer9.*"))
    (result,) = process_images(
        resnet, images[:1], JobOptions(layers="layer4.1.conv2"), max_pixels=10**8
    )
    assert [layer["name"] for layer in result.manifest["layers"]] == ["layer4.1.conv2"]


def test_caption_names_the_architecture_and_weights(images, captions):
    process_images(
        loaded("mobilenet_v3_large"),
        images[:1],
        JobOptions(mode="forward", model="mobilenet_v3_large"),
        max_pixels=10**8,
    )
    assert captions[-1].startswith(f"{DISPLAY_NAMES['mobilenet_v3_large']} feature maps")
    assert "random, seed 0" in captions[-1]
    assert re.search(r" · layers: 32 of \d+$", captions[-1]), "the tiles are a choice"


def test_precision_fast_runs_on_another_architecture(images):
    """precision=fast computes on a channels-last (bfloat16 where native) copy of whichever
    model the job names (LoadedModel.variant); its maps are finite and named alike."""
    model = loaded("mobilenet_v3_large")
    options = JobOptions(mode="forward", model="mobilenet_v3_large", precision="fast")
    (fast,) = process_images(model, images[:1], options, max_pixels=10**8)
    exact_options = JobOptions(mode="forward", model="mobilenet_v3_large")
    (exact,) = process_images(model, images[:1], exact_options, max_pixels=10**8)
    assert fast.manifest["precision"]["mode"] == "fast"
    assert fast.manifest["precision"]["memory_format"] == "channels_last"
    assert list(fast.maps) == list(exact.maps)
    assert all(np.isfinite(m).all() for m in fast.maps.values())
