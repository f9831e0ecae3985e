"""The fast renderer's grid drawn with torch, for a whole batch at once, on any device.

Pixel for pixel what :func:`worker.compute.render.render_grid` draws with ``renderer="fast"`` (the
unit tests compare them), but as tensor operations that run where the maps already are, so
on a GPU only the finished uint8 canvases come back to the host:

- every map is min-max scaled onto 0..255 per image, exactly as
  :func:`worker.compute.render._colormap_index` does it (the scale factor computed in float64 and
  rounded to float32, then truncated to uint8);
- scaled to the tile by nearest neighbour with an index gather (Pillow's sampling points);
- coloured through the colormap's 256-entry LUT by a gather;
- written into a template of the whole grid (background, titles, caption) rendered once
  per layer list and caption, and cached.

Encoding stays with Pillow, image by image.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from worker.compute.render import TILE, draw_template, grid_layout, lut


def draw_grids(
    layers: Sequence[tuple[str, tuple[int, int, int], Tensor]], colormap: str, caption: str
) -> Tensor:
    """``(name, [C, H, W], maps [N, H, W])`` per layer -> uint8 canvases [N, height, width, 3]
    on the maps' device."""
    device = layers[0][2].device
    count = layers[0][2].shape[0]
    template = _template(tuple((name, shape) for name, shape, _ in layers), caption, device)
    canvases = template.expand(count, -1, -1, -1).clone()
    colours = _lut(colormap, device)
    layout = grid_layout(len(layers))
    for index, (_, _, maps) in enumerate(layers):
        x, y = layout.tile_origin(index)
        rows = _nearest(maps.shape[1], TILE, device)
        cols = _nearest(maps.shape[2], TILE, device)
        tiles = colormap_index(maps).index_select(1, rows).index_select(2, cols)
        rgb = colours.index_select(0, tiles.flatten().long()).view(count, TILE, TILE, 3)
        canvases[:, y : y + TILE, x : x + TILE] = rgb
    return canvases


def colormap_index(maps: Tensor) -> Tensor:
    """float maps [N, H, W] -> uint8 [N, H, W], each map min-max scaled onto 0..255."""
    values = torch.nan_to_num(maps.float(), nan=0.0, posinf=0.0, neginf=0.0)
    flat = values.flatten(1)
    low, high = flat.amin(1), flat.amax(1)
    spread = high.double() - low.double()
    flat_map = spread <= 0
    scale = (256.0 / torch.where(flat_map, 1.0, spread)).float()
    index = (values - low[:, None, None]) * scale[:, None, None]
    index = torch.where(flat_map[:, None, None], 0.0, index.clamp(0, 255))
    return index.to(torch.uint8)


def _nearest(source: int, target: int, device: torch.device) -> Tensor:
    # Pillow's nearest sampling point for output pixel i: floor((i + 0.5) * source / target).
    points = (torch.arange(target, dtype=torch.float64) + 0.5) * (source / target)
    return points.floor().long().clamp(max=source - 1).to(device)


@lru_cache(maxsize=32)
def _template(
    layers: tuple[tuple[str, tuple[int, int, int]], ...], caption: str, device: torch.device
) -> Tensor:
    image = draw_template(layers, caption)
    return torch.from_numpy(np.asarray(image).copy()).to(device)


@lru_cache(maxsize=32)
def _lut(colormap: str, device: torch.device) -> Tensor:
    return torch.from_numpy(lut(colormap).copy()).to(device)


def to_image(canvas: Tensor) -> Image.Image:
    """One canvas [height, width, 3] as a Pillow image (copied to the host if need be)."""
    return Image.fromarray(canvas.cpu().numpy())
