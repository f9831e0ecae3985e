"""Core pipeline benchmark: the article's own code path against the project's default path,
on the same images, the same seeded weights and the same machine, in one run.

- article: the article's per-image code as written: ``Image.open``, its transform, the conv
  chain with autograd on (no ``inference_mode``), ``torch.sum / C``, a 30×50-inch pyplot
  figure saved as JPEG with ``bbox_inches="tight"``.
- ours: :func:`worker.compute.pipeline.process_image` with default options, bytes in, encoded JPEG
  figure out.

Numbers are medians, and bests, over every timed run (images × repetitions), after one
warm-up run of each path. Stages: decode (including preprocessing), model, reduce, render (drawing),
encode (image encoding; for the article, ``savefig``, which also rasterizes the figure).
"""

from __future__ import annotations

import io
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw

from shared.options import JobOptions
from worker.compute.model import load_model
from worker.compute.pipeline import process_image

STAGES = ("decode", "model", "reduce", "render", "encode")
MAX_PIXELS = 50_000_000


def run(repeat: int) -> dict:
    images = _images()
    loaded = load_model("random", device="cpu", seed=0)
    model = loaded.model
    options = JobOptions()

    _article(model, images[0][1])
    process_image(loaded, images[0][1], options, max_pixels=MAX_PIXELS)

    article_runs: list[dict[str, float]] = []
    our_runs: list[dict[str, float]] = []
    for _ in range(repeat):
        for _name, data in images:
            article_runs.append(_article(model, data))
            started = time.perf_counter()
            result = process_image(loaded, data, options, max_pixels=MAX_PIXELS)
            total = (time.perf_counter() - started) * 1000
            our_runs.append(
                {stage: result.timings[f"{stage}_ms"] for stage in STAGES} | {"total": total}
            )

    article = _summary(article_runs, statistics.median)
    ours = _summary(our_runs, statistics.median)
    article_best = _summary(article_runs, min)
    ours_best = _summary(our_runs, min)
    ratio = article["total"] / ours["total"]
    best_ratio = article_best["total"] / ours_best["total"]
    largest = max(STAGES, key=lambda stage: ours[stage])
    _print_table(article, ours, ratio, title=f"median of {len(our_runs)} runs")
    _print_table(article_best, ours_best, best_ratio, title=f"best of {len(our_runs)} runs")
    return {
        "section": "core",
        "unit": "ms per image",
        "images": [{"name": name, "bytes": len(data)} for name, data in images],
        "repeat": repeat,
        "runs_per_path": len(our_runs),
        "median": {"article": article, "ours": ours, "speedup": round(ratio, 1)},
        # The least disturbed run: closest to the code's own cost on a busy machine.
        "best": {"article": article_best, "ours": ours_best, "speedup": round(best_ratio, 1)},
        "ours_largest_stage": largest,
        "machine": {
            "cpus": os.cpu_count(),
            # Other work on the machine slows both paths; the ratio is only meaningful when low.
            "load_average_1m": round(os.getloadavg()[0], 2),
            "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "matplotlib": matplotlib.__version__,
        },
    }


def _article(model: torch.nn.Module, data: bytes) -> dict[str, float]:
    """The article's code, stage by stage (its file I/O replaced by in-memory bytes)."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clock = _Clock()
    model_children = list(model.children())
    conv_layers = []
    for child in model_children:
        if type(child) is torch.nn.Conv2d:
            conv_layers.append(child)
        elif type(child) is torch.nn.Sequential:
            for block in child:
                for c in block.children():
                    if type(c) is torch.nn.Conv2d:
                        conv_layers.append(c)
    transform = torchvision.transforms.Compose(
        [
            torchvision.transforms.Resize((224, 224)),
            torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize(mean=0.0, std=1.0),
        ]
    )
    image = Image.open(io.BytesIO(data))
    image = transform(image)
    image = image.unsqueeze(0)
    clock.lap("decode")

    outputs = []
    names = []
    for layer in conv_layers:
        image = layer(image)
        outputs.append(image)
        names.append(str(layer))
    clock.lap("model")

    processed = []
    for feature_map in outputs:
        feature_map = feature_map.squeeze(0)
        gray_scale = torch.sum(feature_map, 0)
        gray_scale = gray_scale / feature_map.shape[0]
        processed.append(gray_scale.data.cpu().numpy())
    clock.lap("reduce")

    fig = plt.figure(figsize=(30, 50))
    for i in range(len(processed)):
        a = fig.add_subplot(5, 4, i + 1)
        plt.imshow(processed[i])
        a.axis("off")
        a.set_title(names[i].split("(")[0], fontsize=30)
    clock.lap("render")
    buffer = io.BytesIO()
    plt.savefig(buffer, bbox_inches="tight", format="jpg")
    # The article's script exits here; a benchmark loop has to close what pyplot keeps alive.
    plt.close(fig)
    clock.lap("encode")
    return clock.laps


def _images() -> list[tuple[str, bytes]]:
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return [
        ("grace_hopper.jpg", photo.read_bytes()),
        ("gradient_640x480.jpg", _encode(_gradient(640, 480), "JPEG")),
        ("shapes_800x600.png", _encode(_shapes(800, 600), "PNG")),
    ]


def _gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8))


def _shapes(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (30, 60, 90))
    draw = ImageDraw.Draw(image)
    draw.ellipse((50, 50, 350, 350), fill=(240, 200, 40))
    draw.rectangle((400, 150, 750, 500), fill=(200, 30, 60))
    draw.line((0, height, width, 0), fill=(255, 255, 255), width=20)
    return image


def _encode(image: Image.Image, pil_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, pil_format)
    return buffer.getvalue()


def _summary(runs: list[dict[str, float]], pick: Callable[[list[float]], float]) -> dict:
    return {key: round(pick([run[key] for run in runs]), 1) for key in (*STAGES, "total")}


def _print_table(article: dict, ours: dict, ratio: float, *, title: str) -> None:
    threads = torch.get_num_threads()
    print(f"Core pipeline: ms per image, {title}, {threads} torch threads")
    print(f"{'stage':<12}{'article':>10}{'ours':>10}")
    for stage in (*STAGES, "total"):
        label = "end-to-end" if stage == "total" else stage
        print(f"{label:<12}{article[stage]:>10.1f}{ours[stage]:>10.1f}")
    print(f"speed-up, end to end: {ratio:.1f}×\n")


class _Clock:
    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self._now = now
        self._start = self._last = now()
        self.laps: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = self._now()
        self.laps[stage] = (now - self._last) * 1000
        self.laps["total"] = (now - self._start) * 1000
        self._last = now
