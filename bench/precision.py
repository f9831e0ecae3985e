"""Precision: how far ``precision=fast`` is from ``exact``, per map, and what each costs.

The same inputs go through :func:`worker.compute.pipeline.process_images` three ways on the same
model: ``exact``; ``fast`` on the host (Pillow draft decode, the CPU's choice); and ``fast``
with its stages on the device (worker/compute/device_stages.py: torchvision decode, torch resize,
torch renderer, torchvision JPEG encoder — what a CUDA worker runs, here on the CPU). For
each fast variant, every one of the 17 maps is compared with exact's
(:func:`worker.compute.precision.compare_maps`); the worst over all maps and images is reported with
the process CPU ms per image of each variant, so docs/benchmarks.md can state the tolerance
that tests/unit/test_precision.py and test_device_stages.py hold the fast paths to.
"""

from __future__ import annotations

import time

from shared.options import JobOptions
from worker.compute import pipeline
from worker.compute.model import LoadedModel
from worker.compute.precision import compare_maps

VARIANTS = {"exact": ("exact", False), "fast_host": ("fast", False), "fast_device": ("fast", True)}


def compare(loaded: LoadedModel, photos: list[bytes], *, max_pixels: int) -> dict:
    results, cpu_ms = {}, {}
    for name, (precision, on_device) in VARIANTS.items():
        started = time.process_time()
        results[name] = pipeline.process_images(
            loaded,
            photos,
            JobOptions(precision=precision),
            max_pixels=max_pixels,
            on_device=on_device,
        )
        cpu_ms[name] = round((time.process_time() - started) * 1000 / len(photos), 2)
    out: dict = {"images": len(photos), "cpu_ms_per_image": cpu_ms}
    for name in ("fast_host", "fast_device"):
        out[name] = worst_difference(results["exact"], results[name])
    return out


def worst_difference(reference: list, results: list) -> dict:
    """:func:`worker.compute.precision.compare_maps` of each result against its reference (both
    lists of :class:`worker.compute.pipeline.ImageResult`, in the same order), worst over all."""
    differences = [
        compare_maps(r.maps, got.maps) for r, got in zip(reference, results, strict=True)
    ]
    return {
        "max_abs_difference_over_range": round(
            max(d["max_abs_difference_over_range"] for d in differences), 5
        ),
        "min_correlation": round(min(d["min_correlation"] for d in differences), 6),
    }
