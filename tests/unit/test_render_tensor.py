"""worker.compute.render_tensor: the batched torch grid is the fast renderer's grid, pixel
for pixel."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from worker.compute.render import LayerMap, render_grid
from worker.compute.render_tensor import colormap_index, draw_grids, to_image

CAPTION = "ResNet-18 feature maps · weights: random, seed 0 (untrained)"
# The article's chain on a 224×224 input, plus a 7×7 map as the real forward pass gives.
CHAIN_SHAPES = [(64, 112, 112)] * 5 + [(128, 56, 56)] * 4 + [(256, 28, 28)] * 4 + [(512, 7, 7)]


def batch_layers(shapes, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        (
            f"layer{index}.conv",
            shape,
            torch.from_numpy(rng.normal(size=(count, *shape[1:]))).float(),
        )
        for index, shape in enumerate(shapes)
    ]


def pil_pixels(layers, row: int, colormap: str = "viridis") -> np.ndarray:
    maps = [LayerMap(name, shape, maps[row].numpy()) for name, shape, maps in layers]
    png = render_grid(maps, fmt="png", colormap=colormap, caption=CAPTION)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.mark.parametrize("colormap", ["viridis", "magma"])
def test_batched_grid_is_the_fast_renderers_pixel_for_pixel(colormap):
    layers = batch_layers(CHAIN_SHAPES, count=3)
    # A constant map, a NaN and an infinity: the edge cases of the min-max scaling.
    layers[1][2][0] = 2.5
    layers[2][2][1, 3, 4] = float("nan")
    layers[3][2][2, 0, 0] = float("inf")
    canvases = draw_grids(layers, colormap, CAPTION)
    assert canvases.dtype == torch.uint8
    for row in range(3):
        assert np.array_equal(canvases[row].numpy(), pil_pixels(layers, row, colormap))


def test_maps_that_do_not_divide_the_tile_are_sampled_as_pillow_does():
    layers = batch_layers([(3, 13, 9), (3, 100, 33), (3, 225, 300)], count=1, seed=1)
    canvas = draw_grids(layers, "viridis", CAPTION)[0]
    assert np.array_equal(canvas.numpy(), pil_pixels(layers, 0))


def test_colormap_index_is_min_max_onto_0_255():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 4.0]], [[7.0, 7.0], [7.0, 7.0]]])
    assert colormap_index(maps).tolist() == [[[0, 64], [128, 255]], [[0, 0], [0, 0]]]


def test_to_image_gives_the_canvas_as_rgb():
    canvas = draw_grids(batch_layers(CHAIN_SHAPES[:2], count=1), "viridis", CAPTION)[0]
    image = to_image(canvas)
    assert image.mode == "RGB" and image.size == (canvas.shape[1], canvas.shape[0])
