"""worker.compute.features: the article's method, reproduced faithfully; hooks that clean up after
themselves; reductions that agree with numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.models import resnet18

from shared.options import JobOptions
from worker.compute.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    chain_layers,
    conv_chain,
    forward_activations,
    preprocess,
    reduce_channels,
    resize_input,
    to_batch,
)
from worker.compute.pipeline import process_image, process_images

CHAIN_NAMES = [
    "conv1",
    "layer1.0.conv1",
    "layer1.0.conv2",
    "layer1.1.conv1",
    "layer1.1.conv2",
    "layer2.0.conv1",
    "layer2.0.conv2",
    "layer2.1.conv1",
    "layer2.1.conv2",
    "layer3.0.conv1",
    "layer3.0.conv2",
    "layer3.1.conv1",
    "layer3.1.conv2",
    "layer4.0.conv1",
    "layer4.0.conv2",
    "layer4.1.conv1",
    "layer4.1.conv2",
]
DOWNSAMPLE_NAMES = ["layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"]


def article_feature_maps(model: nn.Module, image: Image.Image) -> list[np.ndarray]:
    """The article's code, transcribed: its walk, its transform, no inference_mode."""
    model_children = list(model.children())
    conv_layers = []
    for child in model_children:
        if type(child) is nn.Conv2d:
            conv_layers.append(child)
        elif type(child) is nn.Sequential:
            for block in child:
                for c in block.children():
                    if type(c) is nn.Conv2d:
                        conv_layers.append(c)
    transform = transforms.Compose(
        [
            transforms.Resize((224, 224)),
            transforms.ToTensor(),
            transforms.Normalize(mean=0.0, std=1.0),
        ]
    )
    tensor = transform(image).unsqueeze(0)
    outputs = []
    for layer in conv_layers:
        tensor = layer(tensor)
        outputs.append(tensor)
    processed = []
    for feature_map in outputs:
        feature_map = feature_map.squeeze(0)
        gray_scale = torch.sum(feature_map, 0)
        gray_scale = gray_scale / feature_map.shape[0]
        processed.append(gray_scale.data.cpu().numpy())
    return processed


def test_chain_is_the_articles_17_layers_in_order(random_model):
    assert [name for name, _ in chain_layers(random_model.model)] == CHAIN_NAMES
    modules = dict(random_model.model.named_modules())
    assert all(conv is modules[name] for name, conv in chain_layers(random_model.model))


def test_faithful_to_the_article(random_model, grace_hopper, grace_hopper_path):
    with Image.open(grace_hopper_path) as image:
        expected = article_feature_maps(random_model.model, image)
    result = process_image(random_model, grace_hopper, JobOptions(), max_pixels=10**8)
    assert list(result.maps) == CHAIN_NAMES
    assert len(expected) == 17
    for (name, ours), theirs in zip(result.maps.items(), expected, strict=True):
        assert ours.dtype == np.float32
        assert ours.shape == theirs.shape, name
        scale = float(np.abs(theirs).max())
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


def test_a_batch_gives_what_single_images_give(random_model, photos, grace_hopper):
    inputs = [grace_hopper, photos[("shapes", "png")], photos[("noise", "webp")]]
    batched = process_images(random_model, inputs, JobOptions(), max_pixels=10**8)
    for data, together in zip(inputs, batched, strict=True):
        alone = process_image(random_model, data, JobOptions(), max_pixels=10**8)
        for name in CHAIN_NAMES:
            scale = float(np.abs(alone.maps[name]).max())
            np.testing.assert_allclose(
                together.maps[name], alone.maps[name], rtol=1e-5, atol=1e-5 * scale
            )


def test_conv_chain_shapes(random_model):
    outputs = conv_chain(random_model.model, torch.rand(2, 3, 224, 224))
    shapes = {name: tuple(t.shape) for name, t in outputs}
    assert shapes["conv1"] == (2, 64, 112, 112)
    assert shapes["layer1.1.conv2"] == (2, 64, 112, 112)  # no max-pool in the chain
    assert shapes["layer4.1.conv2"] == (2, 512, 14, 14)


def _hooks_left(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if m._forward_hooks]


def test_forward_captures_every_conv_like_the_real_network(random_model):
    model = random_model.model
    batch = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    captured, logits = forward_activations(model, batch)
    assert [name for name, _ in captured] == [
        name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
    ]
    assert len(captured) == 20
    assert set(DOWNSAMPLE_NAMES) <= {name for name, _ in captured}
    assert _hooks_left(model) == []

    # The same network, computed by hand without hooks.
    with torch.inference_mode():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(batch))))
        expected = {"conv1": model.conv1(batch)}
        x = stem
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for index, block in enumerate(getattr(model, stage)):
                prefix = f"{stage}.{index}"
                expected[f"{prefix}.conv1"] = block.conv1(x)
                hidden = block.relu(block.bn1(expected[f"{prefix}.conv1"]))
                expected[f"{prefix}.conv2"] = block.conv2(hidden)
                identity = x
                if block.downsample is not None:
                    expected[f"{prefix}.downsample.0"] = block.downsample[0](x)
                    identity = block.downsample[1](expected[f"{prefix}.downsample.0"])
                x = block.relu(block.bn2(expected[f"{prefix}.conv2"]) + identity)
        expected_logits = model.fc(torch.flatten(model.avgpool(x), 1))
    for name, activation in captured:
        assert activation.shape == expected[name].shape, name
        torch.testing.assert_close(activation, expected[name], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


def test_keep_maps_each_output_as_it_is_made(random_model):
    batch = torch.rand(2, 3, 224, 224)
    full = dict(conv_chain(random_model.model, batch))
    kept = dict(conv_chain(random_model.model, batch, keep=lambda t: t.amax(1)))
    assert list(kept) == CHAIN_NAMES
    for name in CHAIN_NAMES:
        assert torch.equal(kept[name], full[name].amax(1)), name
    captured, _ = forward_activations(random_model.model, batch, keep=lambda t: t.shape[1])
    assert dict(captured)["layer4.0.downsample.0"] == 512
    assert _hooks_left(random_model.model) == []


def test_forward_cleans_up_when_the_forward_raises():
    model = resnet18(weights=None)
    model.train()
    wrong_channels = torch.rand(1, 4, 64, 64)
    with pytest.raises(RuntimeError):
        forward_activations(model, wrong_channels)
    assert _hooks_left(model) == []
    assert model.training  # mode restored


def test_forward_restores_eval_mode_too(random_model):
    forward_activations(random_model.model, torch.rand(1, 3, 64, 64))
    assert not random_model.model.training


@pytest.fixture
def known_tensor() -> torch.Tensor:
    rng = np.random.default_rng(5)
    return torch.from_numpy(rng.normal(size=(2, 7, 5, 3)).astype(np.float32))


@pytest.mark.parametrize(
    ("reduction", "numpy_reduce"),
    [
        ("mean", lambda a: a.sum(axis=1) / a.shape[1]),
        ("max", lambda a: a.max(axis=1)),
        ("std", lambda a: a.std(axis=1)),
        ("l2", lambda a: np.sqrt((a**2).sum(axis=1))),
    ],
)
def test_reductions_match_numpy(known_tensor, reduction, numpy_reduce):
    reduced = reduce_channels(known_tensor, reduction)
    assert reduced.dtype == torch.float32
    assert tuple(reduced.shape) == (2, 5, 3)
    expected = numpy_reduce(known_tensor.numpy().astype(np.float64))
    np.testing.assert_allclose(reduced.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_reductions_on_a_hand_made_tensor():
    # Two channels at one pixel: 3 and -4.
    t = torch.tensor([3.0, -4.0]).reshape(1, 2, 1, 1)
    assert reduce_channels(t, "mean").item() == -0.5
    assert reduce_channels(t, "max").item() == 3.0
    assert reduce_channels(t, "std").item() == 3.5
    assert reduce_channels(t, "l2").item() == 5.0


def test_mean_is_the_articles_sum_over_c(known_tensor):
    article = torch.sum(known_tensor[0], 0) / known_tensor.shape[1]
    assert torch.equal(reduce_channels(known_tensor, "mean")[0], article)


def test_preprocess(grace_hopper_path):
    with Image.open(grace_hopper_path) as source:
        image = source.convert("RGB")
    plain = preprocess([image, image], "none")
    assert plain.shape == (2, 3, 224, 224) and plain.dtype == torch.float32
    assert float(plain.min()) >= 0.0 and float(plain.max()) <= 1.0
    normalized = preprocess([image], "imagenet")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(normalized[0], (plain[0] - mean) / std)


@pytest.mark.parametrize("normalize", ["none", "imagenet"])
def test_preprocess_is_the_articles_transform_bit_for_bit(normalize):
    mean, std = (0.0, 1.0) if normalize == "none" else (IMAGENET_MEAN, IMAGENET_STD)
    transform = transforms.Compose(
        [
            transforms.Resize((224, 224)),
            transforms.ToTensor(),
            transforms.Normalize(mean=mean, std=std),
        ]
    )
    rng = np.random.default_rng(3)
    images = [
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for width, height in ((224, 224), (1003, 701), (97, 333), (2000, 1500))
    ]
    batch = preprocess(images, normalize)
    assert batch.is_contiguous() and batch.dtype == torch.float32
    assert torch.equal(batch, torch.stack([transform(image) for image in images]))


def test_to_batch_takes_only_resized_images():
    with pytest.raises(ValueError, match="224×224"):
        to_batch([Image.new("RGB", (225, 224))], "none")
    assert resize_input(Image.new("RGB", (640, 480))).size == (224, 224)


def test_preprocess_refuses_an_unknown_normalization():
    with pytest.raises(ValueError, match="unknown normalize"):
        preprocess([Image.new("RGB", (8, 8))], "zscore")


def test_preprocess_resizes_any_size():
    image = Image.new("RGB", (300, 90), (10, 20, 30))
    assert preprocess([image], "none").shape == (1, 3, 224, 224)
