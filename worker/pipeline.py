"""The whole computation for a list of images: decode, one batched model pass, reduce, render.

Celery tasks and the ``featuremaps local`` command call :func:`process_images` (a chunk of a
batch) or :func:`process_image` (one job); neither touches storage or the queue.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from PIL import Image

from shared.errors import FeatureMapsError
from shared.imaging import decode
from shared.options import JobOptions
from worker.features import (
    conv_chain,
    forward_activations,
    reduce_channels,
    resize_input,
    to_batch,
)
from worker.model import LoadedModel
from worker.render import (
    LayerMap,
    render_grid,
    render_input_preview,
    render_layer_png,
    render_thumbnail,
)

MODEL_NAME = "resnet18"
TOP_K = 5
CPU_MODEL_BATCH = 8


@dataclass
class ImageResult:
    figure: bytes
    figure_ext: str
    # Everything needed to interpret the outputs: layers, options, weights, versions, timings.
    manifest: dict
    # [{name, shape: [C, H, W], min, max, mean}], the statistics being those of the map.
    layers: list[dict]
    # layer name -> float32 H×W map, exactly the reduction's output
    maps: dict[str, np.ndarray]
    # maps.npz when options.arrays, else None
    arrays: bytes | None
    # (index, layer name, PNG) when options.per_layer, else empty
    layer_pngs: list[tuple[int, str, bytes]]
    # decode_ms, model_ms, reduce_ms, render_ms, encode_ms; batch-wide stages split evenly
    timings: dict[str, float]
    # a small JPEG of the grid for galleries (render_thumbnail)
    thumbnail: bytes = b""
    # the input as analysed, small, for pages (render_input_preview)
    input_preview: bytes = b""


@dataclass
class _Decoded:
    position: int
    # the manifest's ``input`` entry (DecodedImage.describe): format, size, mode, orientation
    input: dict
    # resized to the model's 224×224 input at once, so no full-size decode is kept
    resized: Image.Image
    # the upright input as a small JPEG for pages (single jobs only), else b""
    preview: bytes
    decode_ms: float
    preprocess_ms: float
    preview_ms: float = 0.0


def process_image(
    loaded: LoadedModel, data: bytes, options: JobOptions, *, max_pixels: int
) -> ImageResult:
    """Process one image; bad input raises its :class:`FeatureMapsError`."""
    (result,) = process_images(loaded, [data], options, max_pixels=max_pixels, input_previews=True)
    if isinstance(result, FeatureMapsError):
        raise result
    return result


def process_images(
    loaded: LoadedModel,
    images: Sequence[bytes],
    options: JobOptions,
    *,
    max_pixels: int,
    input_previews: bool = False,
) -> list[ImageResult | FeatureMapsError]:
    """Process several images with one model pass; the answer has one entry per input, in
    order: its result, or the error that its bytes caused (the others still go through).
    ``input_previews`` adds each upright input as a small JPEG (single jobs' pages show it;
    batch items do not, and a chunk of camera photos would pay ~tens of ms each for it)."""
    results: list[ImageResult | FeatureMapsError | None] = [None] * len(images)
    decoded: list[_Decoded] = []
    for position, data in enumerate(images):
        started = time.perf_counter()
        try:
            source = decode(data, max_pixels=max_pixels)
        except FeatureMapsError as exc:
            results[position] = exc
            continue
        decode_ms = _ms_since(started)
        started = time.perf_counter()
        resized = resize_input(source.image)
        preprocess_ms = _ms_since(started)
        started = time.perf_counter()
        preview = render_input_preview(source.image) if input_previews else b""
        decoded.append(
            _Decoded(
                position,
                source.describe(),
                resized,
                preview,
                decode_ms,
                preprocess_ms,
                preview_ms=_ms_since(started),
            )
        )
    if decoded:
        for item, result in zip(decoded, _run_batch(loaded, decoded, options), strict=True):
            results[item.position] = result
    return results  # type: ignore[return-value]  # every slot is filled by now


def describe_weights(weights: dict) -> str:
    """One line naming the weights, for the figure's caption."""
    name = weights.get("name")
    if name == "imagenet":
        return f"imagenet {weights['id']} (sha256 {weights['sha256'][:12]})"
    if name == "random":
        return f"random, seed {weights['seed']} (untrained)"
    if name == "state_dict":
        return f"state_dict {weights['path']} (sha256 {weights['sha256'][:12]})"
    return str(weights)


def _run_batch(
    loaded: LoadedModel, decoded: list[_Decoded], options: JobOptions
) -> list[ImageResult]:
    count = len(decoded)
    started = time.perf_counter()
    batch = to_batch([item.resized for item in decoded], options.normalize)
    preprocess_ms = _ms_since(started)

    # Each layer is reduced as soon as it is computed, so the full activations never all
    # stay alive at once; the time spent reducing is taken out of the model's (on CUDA, which
    # runs kernels asynchronously, that split is approximate; the sum is exact).
    reduce_s = 0.0

    def reduce(activation: torch.Tensor) -> torch.Tensor:
        nonlocal reduce_s
        reduce_started = time.perf_counter()
        reduced = reduce_channels(activation, options.reduction)
        reduce_s += time.perf_counter() - reduce_started
        return reduced

    started = time.perf_counter()
    # On the CPU a chunk goes through the model in slices: activations of 8 images keep the
    # conv working set small enough to run ~10% faster per image than 16 at once (measured,
    # docs/benchmarks.md). A GPU takes the whole chunk.
    step = count if loaded.device.type == "cuda" else CPU_MODEL_BATCH
    parts = []
    for start in range(0, count, step):
        part = batch[start : start + step]
        if options.mode == "chain":
            parts.append((conv_chain(loaded.model, part, keep=reduce), None))
        else:
            parts.append(forward_activations(loaded.model, part, keep=reduce))
    _synchronize(loaded.device)
    model_ms = _ms_since(started) - reduce_s * 1000
    outputs = [
        (name, torch.cat([layers[index][1] for layers, _ in parts]))
        for index, (name, _) in enumerate(parts[0][0])
    ]
    logits = torch.cat([lg for _, lg in parts]) if parts[0][1] is not None else None

    started = time.perf_counter()
    modules = dict(loaded.model.named_modules())
    shapes = {name: (modules[name].out_channels, *t.shape[1:]) for name, t in outputs}
    reduced = [(name, t.cpu().numpy()) for name, t in outputs]
    predictions = _top_k(logits, loaded.categories) if logits is not None else None
    reduce_ms = _ms_since(started) + reduce_s * 1000

    results = []
    for row, item in enumerate(decoded):
        timings = {
            "decode_ms": item.decode_ms + item.preprocess_ms + preprocess_ms / count,
            "model_ms": model_ms / count,
            "reduce_ms": reduce_ms / count,
        }
        maps = {name: batch_maps[row].copy() for name, batch_maps in reduced}
        results.append(
            _finish(
                loaded,
                item,
                options,
                maps=maps,
                shapes=shapes,
                predictions=predictions[row] if predictions else None,
                timings=timings,
            )
        )
    return results


def _finish(
    loaded: LoadedModel,
    item: _Decoded,
    options: JobOptions,
    *,
    maps: dict[str, np.ndarray],
    shapes: dict[str, tuple[int, ...]],
    predictions: list[dict] | None,
    timings: dict[str, float],
) -> ImageResult:
    layer_maps = [LayerMap(name, shapes[name], array) for name, array in maps.items()]
    caption = (
        f"ResNet-18 feature maps · weights: {describe_weights(loaded.weights)} · "
        f"mode={options.mode} · reduction={options.reduction} · normalize={options.normalize}"
    )
    figure = render_grid(
        layer_maps,
        fmt=options.format,
        colormap=options.colormap,
        renderer=options.renderer,
        caption=caption,
        timings=timings,
    )

    started = time.perf_counter()
    thumbnail = render_thumbnail(layer_maps, options.colormap)
    arrays = _npz(maps) if options.arrays else None
    layer_pngs = (
        [
            (index, name, render_layer_png(array, options.colormap))
            for index, (name, array) in enumerate(maps.items())
        ]
        if options.per_layer
        else []
    )
    timings["encode_ms"] += _ms_since(started) + item.preview_ms
    timings = {key: round(value, 2) for key, value in timings.items()}

    layers = [
        {
            "name": name,
            "shape": list(shapes[name]),
            "min": float(array.min()),
            "max": float(array.max()),
            "mean": float(array.mean()),
        }
        for name, array in maps.items()
    ]
    manifest = {
        "model": MODEL_NAME,
        "weights": loaded.weights,
        "options": options.to_dict(),
        "input": item.input,
        "figure": f"feature_maps.{options.format}",
        "layers": layers,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(loaded.device),
        "timings": timings,
    }
    if predictions is not None:
        manifest["predictions"] = predictions
    return ImageResult(
        figure=figure,
        figure_ext=options.format,
        manifest=manifest,
        layers=layers,
        maps=maps,
        arrays=arrays,
        layer_pngs=layer_pngs,
        timings=timings,
        thumbnail=thumbnail,
        input_preview=item.preview,
    )


def _top_k(logits: torch.Tensor, categories: list[str] | None) -> list[list[dict]] | None:
    # Class names only mean something for the ImageNet weights.
    if categories is None:
        return None
    probabilities = torch.softmax(logits.float(), dim=1).cpu()
    values, indices = probabilities.topk(TOP_K, dim=1)
    return [
        [
            {"label": categories[int(index)], "probability": float(value)}
            for value, index in zip(row_values, row_indices, strict=True)
        ]
        for row_values, row_indices in zip(values, indices, strict=True)
    ]


def _npz(maps: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **maps)
    return buffer.getvalue()


def _synchronize(device: torch.device) -> None:
    # CUDA runs asynchronously; without this the model time would land in the next stage.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
