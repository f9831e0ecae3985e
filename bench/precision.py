"""Precision: how far ``precision=fast`` (JPEG draft decode) is from ``exact``, per map.

For each input, both precisions run through :func:`worker.pipeline.process_images` on the
same model; every one of the 17 maps of the fast result is compared with the exact one:
the largest absolute difference over the map's range (max |fast − exact| / (max − min) of
exact), and the correlation of the two. The worst over all maps and images is reported,
with the decoded sizes, so docs/benchmarks.md can state the tolerance that the unit tests
(tests/unit/test_precision.py) hold the fast path to.
"""

from __future__ import annotations

import numpy as np

from shared.options import JobOptions
from worker import pipeline
from worker.model import LoadedModel


def compare(loaded: LoadedModel, photos: list[bytes], *, max_pixels: int) -> dict:
    """The worst relative difference and the lowest correlation of fast against exact."""
    exact, fast = (
        pipeline.process_images(loaded, photos, JobOptions(precision=p), max_pixels=max_pixels)
        for p in ("exact", "fast")
    )
    worst, lowest, drafted = 0.0, 1.0, 0
    for e, f in zip(exact, fast, strict=True):
        drafted += "decoded_size" in f.manifest["input"]
        for name, reference in e.maps.items():
            spread = float(reference.max() - reference.min()) or 1.0
            worst = max(worst, float(np.abs(f.maps[name] - reference).max()) / spread)
            correlation = np.corrcoef(f.maps[name].ravel(), reference.ravel())[0, 1]
            lowest = min(lowest, float(correlation))
    return {
        "images": len(photos),
        "drafted_images": drafted,
        "max_abs_difference_over_range": round(worst, 5),
        "min_correlation": round(lowest, 6),
    }
