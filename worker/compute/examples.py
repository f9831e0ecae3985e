"""Dataset examples on the model's side: the channel maps of a batch's winning images, and
the tiles that show where a channel fires in one of them (docs/design.md "Dataset examples").
The scores themselves are taken in the figure's own model pass (``channel_scores``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shared.errors import FeatureMapsError
from shared.imaging import decode
from shared.options import JobOptions
from worker.compute.features import conv_chain, forward_activations, resize_input, to_batch
from worker.compute.model import LoadedModel
from worker.compute.precision import Precision, model_and_input, resolve, tf32

TILE = 64
# Maps are average-pooled to at most this side as the hook sees them: a 64-pixel tile shows
# no more, and a slice of images keeps a few MB of maps instead of every full activation.
MAP_SIDE = 28
# Where the map is 0 the input shows through almost untouched; where it is 1, mostly colour.
MIN_OPACITY, MAX_OPACITY = 0.15, 0.75


@dataclass
class ExampleImage:
    """One image as the second pass sees it: the input as the model saw it (squashed to a
    square, TILE × TILE, uint8 RGB) and every layer's channel maps (float32 [C, h, w])."""

    picture: np.ndarray
    layers: dict[str, np.ndarray]


def example_images(
    loaded: LoadedModel, images: Sequence[bytes], options: JobOptions, *, max_pixels: int
) -> list[ExampleImage | FeatureMapsError]:
    """Decode ``images`` as the batch did (its precision's decode) and run them through the
    layers of its ``mode`` in one pass; one entry per input, in order."""
    precision = resolve(options.precision, loaded.device, on_device=False)
    results: list[ExampleImage | FeatureMapsError | None] = [None] * len(images)
    pictures: list[tuple[int, Image.Image]] = []
    for position, data in enumerate(images):
        try:
            source = decode(data, max_pixels=max_pixels, draft_side=precision.draft_side)
        except FeatureMapsError as exc:
            results[position] = exc
            continue
        pictures.append((position, resize_input(source.image)))
    if pictures:
        batch = to_batch([picture for _, picture in pictures], options.normalize)
        with tf32(precision.tf32):
            layers = pooled_layers(loaded, batch, options, precision)
        for row, (position, picture) in enumerate(pictures):
            small = picture.resize((TILE, TILE), Image.Resampling.BILINEAR)
            maps = {name: maps[row].numpy() for name, maps in layers}
            results[position] = ExampleImage(np.asarray(small), maps)
    return results  # type: ignore[return-value]  # every slot is filled by now


def pooled_layers(
    loaded: LoadedModel, batch: torch.Tensor, options: JobOptions, precision: Precision
) -> list[tuple[str, torch.Tensor]]:
    """The batch's layers (its ``mode``'s, as its ``layers`` chose them) as float32
    [N, C, h, w] on the CPU, pooled in the hook, computed as the batch's ``precision``
    computed its scores."""
    from worker.compute.pipeline import tiled_layers

    names = set(tiled_layers(loaded, options))

    def keep(activation: torch.Tensor) -> torch.Tensor:
        height, width = activation.shape[-2:]
        side = (min(height, MAP_SIDE), min(width, MAP_SIDE))
        return F.adaptive_avg_pool2d(activation.float(), side).cpu()

    model, batch = model_and_input(loaded, batch, precision)
    if options.mode == "chain":
        return conv_chain(model, batch, keep=keep, names=names)
    outputs, _logits = forward_activations(model, batch, keep=keep, names=names)
    return outputs


def draw_tile(picture: np.ndarray, channel_map: np.ndarray, colormap: np.ndarray) -> np.ndarray:
    """The picture with ``channel_map`` upsampled over it (bilinear), scaled to the map's
    own range and blended in ``colormap`` (a [256, 3] uint8 table): uint8 [TILE, TILE, 3]."""
    lo, hi = float(channel_map.min()), float(channel_map.max())
    scaled = (channel_map - lo) / (hi - lo) if hi > lo else np.zeros_like(channel_map)
    up = Image.fromarray(scaled.astype(np.float32)).resize((TILE, TILE), Image.Resampling.BILINEAR)
    value = np.clip(np.asarray(up), 0.0, 1.0)
    colour = colormap[np.rint(value * 255).astype(np.uint8)].astype(np.float32)
    alpha = (MIN_OPACITY + (MAX_OPACITY - MIN_OPACITY) * value)[..., None]
    blended = picture.astype(np.float32) * (1 - alpha) + colour * alpha
    return np.rint(blended).astype(np.uint8)
