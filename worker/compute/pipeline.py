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

from shared.architectures import select_layers
from shared.errors import FeatureMapsError
from shared.imaging import decode
from shared.options import JobOptions
from worker.compute import device_stages
from worker.compute.features import (
    channel_scores,
    conv_chain,
    forward_activations,
    gating_layers,
    mode_layers,
    reduce_channels,
    resize_input,
    to_batch,
    to_model_input,
)
from worker.compute.model import DISPLAY_NAMES, LoadedModel
from worker.compute.precision import Precision, model_and_input, resolve, tf32
from worker.compute.render import (
    LayerMap,
    draw_grid,
    encode_grid,
    render_input_preview,
    render_layer_png,
    render_thumbnail,
)

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
    # the batch item whose model pass this result shares (the same bytes earlier in its
    # chunk, worker/reuse.py); None when this image went through the model itself
    reused_from: str | None = None
    # with options.examples: float32 [2, channels of all layers], each channel's mean and
    # max over (h, w) (dataset examples); else None
    scores: np.ndarray | None = None


@dataclass
class _Decoded:
    position: int
    # the manifest's ``input`` entry (DecodedImage.describe): format, size, mode, orientation
    input: dict
    # resized to the model's 224×224 input at once, so no full-size decode is kept: a Pillow
    # image, or uint8 [3, 224, 224] on the device (worker/compute/device_stages.py)
    resized: Image.Image | torch.Tensor
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
    on_device: bool | None = None,
) -> list[ImageResult | FeatureMapsError]:
    """Process several images with one model pass; the answer has one entry per input, in
    order: its result, or the error that its bytes caused (the others still go through).
    ``input_previews`` adds each upright input as a small JPEG (single jobs' pages show it;
    batch items do not, and a chunk of camera photos would pay ~tens of ms each for it).
    ``on_device`` forces where ``precision=fast`` runs its stages (worker/compute/precision.py).
    Options the model cannot do (``mode=chain`` outside the ResNet family, ``layers`` naming
    none of its layers) raise :class:`InvalidOption` for all of them."""
    layers = tiled_layers(loaded, options)
    results: list[ImageResult | FeatureMapsError | None] = [None] * len(images)
    precision = resolve(options.precision, loaded.device, on_device=on_device)
    stage = _decode_on_device if precision.on_device else _decode_on_host
    decoded = stage(loaded, images, results, precision, max_pixels, input_previews)
    if decoded:
        batch_results = _run_batch(loaded, decoded, options, precision, layers)
        for item, result in zip(decoded, batch_results, strict=True):
            results[item.position] = result
    return results  # type: ignore[return-value]  # every slot is filled by now


def tiled_layers(loaded: LoadedModel, options: JobOptions) -> list[str]:
    """The layers of ``options.mode`` that ``options.layers`` chooses, in model order: the
    figure's tiles, the maps and the dataset examples' scores."""
    names = mode_layers(loaded.model, loaded.architecture, options.mode)
    return select_layers(names, options.layers, left_out=gating_layers(loaded.model))


def _decode_on_host(
    loaded: LoadedModel,
    images: Sequence[bytes],
    results: list,
    precision: Precision,
    max_pixels: int,
    input_previews: bool,
) -> list[_Decoded]:
    """Pillow, image by image; each input's error goes into ``results``."""
    decoded = []
    for position, data in enumerate(images):
        started = time.perf_counter()
        try:
            source = decode(data, max_pixels=max_pixels, draft_side=precision.draft_side)
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
    return decoded


def _decode_on_device(
    loaded: LoadedModel,
    images: Sequence[bytes],
    results: list,
    precision: Precision,
    max_pixels: int,
    input_previews: bool,
) -> list[_Decoded]:
    """One batched decode and resize on the model's device (worker/compute/device_stages.py); the
    time is split evenly between the images."""
    started = time.perf_counter()
    outcomes = device_stages.decode_resize(
        list(images), loaded.device, max_pixels=max_pixels, previews=input_previews
    )
    _synchronize(loaded.device)
    each_ms = _ms_since(started) / len(images)
    decoded = []
    for position, outcome in enumerate(outcomes):
        if isinstance(outcome, FeatureMapsError):
            results[position] = outcome
            continue
        decoded.append(
            _Decoded(position, outcome.input, outcome.resized, outcome.preview, each_ms, 0.0)
        )
    return decoded


def describe_weights(weights: dict) -> str:
    """One line naming the weights, for the figure's caption."""
    name = weights.get("name")
    if name == "imagenet":
        return f"imagenet {weights['id']} (sha256 {weights['sha256'][:12]})"
    if name == "random":
        return f"random, seed {weights['seed']} (untrained)"
    if name == "state_dict":
        return f"state_dict {weights['path']} (sha256 {weights['sha256'][:12]})"
    if name == "upload":
        label = weights.get("label") or weights["id"]
        return f"uploaded {label} (sha256 {weights['sha256'][:12]})"
    return str(weights)


def _run_batch(
    loaded: LoadedModel,
    decoded: list[_Decoded],
    options: JobOptions,
    precision: Precision,
    layers: list[str],
) -> list[ImageResult]:
    count = len(decoded)
    started = time.perf_counter()
    batch = _model_input(decoded, options)
    preprocess_ms = _ms_since(started)
    with tf32(precision.tf32):
        forward = _forward(loaded, batch, options, precision, layers)
    arrays = _batch_arrays(loaded, forward)
    caption = _caption(loaded, options, precision, len(layers))
    figures = _device_figures(forward, arrays, options, caption) if precision.on_device else None
    # Batch-wide stages are split evenly between the images.
    model_ms = forward.model_ms / count
    reduce_ms = (forward.reduce_ms + arrays.ms) / count
    return [
        _finish(
            loaded,
            item,
            options,
            arrays.image(row),
            precision,
            figures[row] if figures else None,
            caption,
            {
                "decode_ms": item.decode_ms + item.preprocess_ms + preprocess_ms / count,
                "model_ms": model_ms,
                "reduce_ms": reduce_ms,
            },
        )
        for row, item in enumerate(decoded)
    ]


def _model_input(decoded: list[_Decoded], options: JobOptions) -> torch.Tensor:
    pictures = [item.resized for item in decoded]
    if isinstance(pictures[0], torch.Tensor):
        return to_model_input(torch.stack(pictures), options.normalize)
    return to_batch(pictures, options.normalize)


def _device_figures(
    forward: _Forward, arrays: _BatchArrays, options: JobOptions, caption: str
) -> list[_Figure] | None:
    """JPEG figures drawn and encoded on the device, one per image, when the figure is a
    JPEG of the fast renderer; None for the host renderer to draw the others."""
    if options.format != "jpg" or options.renderer != "fast":
        return None
    started = time.perf_counter()
    layers = [(name, arrays.shapes[name], maps) for name, maps in forward.outputs]
    encoded = device_stages.draw_and_encode(layers, options.colormap, caption)
    each_ms = _ms_since(started) / len(encoded)
    # Drawing and encoding are one pass on the device: the time is reported as render.
    return [_Figure(data, each_ms, 0.0) for data in encoded]


@dataclass
class _Forward:
    """The model pass over a batch: each layer's reduced maps (a tensor per layer, one row
    per image) and the logits (forward mode), with the time spent in the model and, inside
    the pass, reducing."""

    outputs: list[tuple[str, torch.Tensor]]
    logits: torch.Tensor | None
    model_ms: float
    reduce_ms: float
    # with options.examples: [N, 2, channels of all layers] (channel_scores), else None
    scores: torch.Tensor | None = None


def _forward(
    loaded: LoadedModel,
    batch: torch.Tensor,
    options: JobOptions,
    precision: Precision,
    layers: list[str],
) -> _Forward:
    # Each layer is reduced as soon as it is computed, so the full activations never all
    # stay alive at once; the time spent reducing is taken out of the model's (on CUDA, which
    # runs kernels asynchronously, that split is approximate; the sum is exact).
    reduce_s = 0.0
    # Dataset examples score every channel in the same hook, from the same activation; the
    # scores are found again by the reduced map they go with (hooks run in call order, which
    # need not be the order the layers are listed in).
    scored: dict[int, torch.Tensor] = {}

    def reduce(activation: torch.Tensor) -> torch.Tensor:
        nonlocal reduce_s
        reduce_started = time.perf_counter()
        reduced = reduce_channels(activation, options.reduction)
        if options.examples:
            scored[id(reduced)] = channel_scores(activation)
        reduce_s += time.perf_counter() - reduce_started
        return reduced

    started = time.perf_counter()
    # On the CPU a chunk goes through the model in slices: a few images' activations keep the
    # conv working set in cache (docs/benchmarks.md "Bulk"). A GPU takes the whole chunk.
    count = len(batch)
    step = count if loaded.device.type == "cuda" else CPU_MODEL_BATCH
    parts = []
    names = set(layers)
    for start in range(0, count, step):
        model, part = model_and_input(loaded, batch[start : start + step], precision)
        if options.mode == "chain":
            parts.append((conv_chain(model, part, keep=reduce, names=names), None))
        else:
            outputs, logits = forward_activations(model, part, keep=reduce, names=names)
            parts.append((outputs, logits.float()))
    _synchronize(loaded.device)
    model_ms = _ms_since(started) - reduce_s * 1000
    outputs = [
        (name, torch.cat([layers[index][1] for layers, _ in parts]))
        for index, (name, _) in enumerate(parts[0][0])
    ]
    logits = torch.cat([lg for _, lg in parts]) if parts[0][1] is not None else None
    scores = _scores(scored, [layers for layers, _ in parts]) if scored else None
    return _Forward(outputs, logits, model_ms, reduce_s * 1000, scores)


def _scores(scored: dict[int, torch.Tensor], parts: list[list]) -> torch.Tensor:
    """The channel scores as one [N, 2, channels] tensor: each part's layers side by side
    in the order they are listed, parts one after another."""
    per_part = [torch.cat([scored[id(t)] for _, t in layers], dim=2) for layers in parts]
    return torch.cat(per_part).cpu()


@dataclass
class _ImageArrays:
    """One image's share of the batch: its maps, the activations' shapes, its predictions."""

    maps: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]
    predictions: list[dict] | None
    scores: np.ndarray | None = None


@dataclass
class _BatchArrays:
    """The model pass as numpy arrays [N, H, W] per layer, with the shape [C, H, W] of each
    layer's activation and the top-k predictions, and the time taken to get them."""

    arrays: list[tuple[str, np.ndarray]]
    shapes: dict[str, tuple[int, ...]]
    predictions: list[list[dict]] | None
    ms: float
    scores: np.ndarray | None = None

    def image(self, row: int) -> _ImageArrays:
        return _ImageArrays(
            maps={name: batch_maps[row].copy() for name, batch_maps in self.arrays},
            shapes=self.shapes,
            predictions=self.predictions[row] if self.predictions else None,
            scores=self.scores[row].copy() if self.scores is not None else None,
        )


def _batch_arrays(loaded: LoadedModel, forward: _Forward) -> _BatchArrays:
    started = time.perf_counter()
    modules = dict(loaded.model.named_modules())
    shapes = {name: (modules[name].out_channels, *t.shape[1:]) for name, t in forward.outputs}
    arrays = [(name, t.cpu().numpy()) for name, t in forward.outputs]
    logits = forward.logits
    predictions = _top_k(logits, loaded.categories) if logits is not None else None
    scores = forward.scores.numpy() if forward.scores is not None else None
    return _BatchArrays(arrays, shapes, predictions, _ms_since(started), scores)


def _finish(
    loaded: LoadedModel,
    item: _Decoded,
    options: JobOptions,
    image: _ImageArrays,
    precision: Precision,
    figure: _Figure | None,
    caption: str,
    timings: dict[str, float],
) -> ImageResult:
    """One image's result; its figure is drawn here with the batch's ``caption`` unless the
    device drew it already."""
    layer_maps = [LayerMap(name, image.shapes[name], array) for name, array in image.maps.items()]
    if figure is None:
        figure = _figure(layer_maps, options, caption)
    extras = _extras(image.maps, layer_maps, options)
    timings = {
        **timings,
        "render_ms": figure.render_ms,
        "encode_ms": figure.encode_ms + extras.ms + item.preview_ms,
    }
    timings = {key: round(value, 2) for key, value in timings.items()}
    layers = _layer_stats(image)
    manifest = _manifest(loaded, item, options, layers, timings)
    manifest["precision"] = precision.describe()
    if image.predictions is not None:
        manifest["predictions"] = image.predictions
    return ImageResult(
        figure=figure.data,
        figure_ext=options.format,
        manifest=manifest,
        layers=layers,
        maps=image.maps,
        arrays=extras.arrays,
        layer_pngs=extras.layer_pngs,
        timings=timings,
        thumbnail=extras.thumbnail,
        input_preview=item.preview,
        scores=image.scores,
    )


def _caption(loaded: LoadedModel, options: JobOptions, precision: Precision, shown: int) -> str:
    every = len(mode_layers(loaded.model, loaded.architecture, options.mode))
    return (
        f"{DISPLAY_NAMES[loaded.architecture]} feature maps · weights: "
        f"{describe_weights(loaded.weights)} · "
        f"mode={options.mode} · reduction={options.reduction} · normalize={options.normalize}"
        f" · precision={precision.mode}{_compute(precision)}"
        # Say when the tiles are a choice of the layers (the option's, or the default's).
        + (f" · layers: {shown} of {every}" if shown < every else "")
    )


def _compute(precision: Precision) -> str:
    """How the model computed, where it is not the article's float32 NCHW."""
    if precision.dtype == "float32" and not precision.channels_last:
        return ""
    return f" ({precision.dtype}, {precision.memory_format.replace('_', '-')})"


@dataclass
class _Figure:
    data: bytes
    render_ms: float
    encode_ms: float


def _figure(layer_maps: list[LayerMap], options: JobOptions, caption: str) -> _Figure:
    """The figure, with the time spent drawing it and encoding it."""
    started = time.perf_counter()
    drawn = draw_grid(
        layer_maps,
        fmt=options.format,
        colormap=options.colormap,
        renderer=options.renderer,
        caption=caption,
    )
    render_ms = _ms_since(started)
    started = time.perf_counter()
    data = encode_grid(drawn, options.format)
    return _Figure(data, render_ms, _ms_since(started))


@dataclass
class _Extras:
    thumbnail: bytes
    arrays: bytes | None
    layer_pngs: list[tuple[int, str, bytes]]
    ms: float


def _extras(
    maps: dict[str, np.ndarray], layer_maps: list[LayerMap], options: JobOptions
) -> _Extras:
    """The outputs beside the figure (thumbnail; maps.npz and per-layer PNGs when asked),
    with the time spent encoding them."""
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
    return _Extras(thumbnail, arrays, layer_pngs, _ms_since(started))


def _layer_stats(image: _ImageArrays) -> list[dict]:
    return [
        {
            "name": name,
            "shape": list(image.shapes[name]),
            "min": float(array.min()),
            "max": float(array.max()),
            "mean": float(array.mean()),
        }
        for name, array in image.maps.items()
    ]


def _manifest(
    loaded: LoadedModel,
    item: _Decoded,
    options: JobOptions,
    layers: list[dict],
    timings: dict[str, float],
) -> dict:
    return {
        "model": loaded.architecture,
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
