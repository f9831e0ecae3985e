"""``precision=fast`` on the CPU against ``exact``, in one run: what bfloat16 and channels-last
buy, what they cost in accuracy, and what reaches the end of the pipeline.

- **model only**: the 17-conv chain on a preloaded chunk ``[16, 3, 224, 224]`` in the
  pipeline's CPU slices, each layer reduced as it comes; ``exact`` on the resident float32
  NCHW model, ``fast`` on the copy ``precision=fast`` computes with (bfloat16 channels-last
  where the CPU has native bfloat16, float32 channels-last elsewhere).
- **data path**: :func:`worker.compute.pipeline.process_images` on the same chunks' bytes
  (bench/datapath.py's 24 photo-like images of mixed sizes, one in eight 12 MP), CPU ms per
  image by stage, and the host CPU outside the model and its reduction.
- **tolerance**: every map of ``fast`` against ``exact``'s over the same photos, chain and
  forward modes (:func:`worker.compute.precision.compare_maps`).
- **bulk end to end** (``--no-stack`` skips it): one archive through the real service (one
  worker), ``exact`` then ``fast``, with the batch default (dataset examples on) and with
  ``examples=0``.

The paths take turns chunk by chunk so a change in the machine's load hits all of them.
``python -m bench --only fast`` or ``python -m bench.cpu_fast [--count N] [--no-stack]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from bench import bulk, datapath
from shared.options import JobOptions
from worker.compute import pipeline
from worker.compute.features import conv_chain, preprocess, reduce_channels
from worker.compute.model import LoadedModel, load_model
from worker.compute.precision import compare_maps, model_and_input, native_bf16, resolve

COUNT = 160
CHUNK = datapath.CHUNK
BULK_IMAGES = 200
MAX_PIXELS = datapath.MAX_PIXELS


def run(repeat: int) -> dict:
    return measure(COUNT, stack=True)


def measure(count: int, *, stack: bool = True, bulk_images: int = BULK_IMAGES) -> dict:
    count = max(1, -(-count // CHUNK)) * CHUNK
    photos = datapath.distinct_photos()
    loaded = load_model("random", device="cpu", seed=0)
    fast = resolve("fast", loaded.device)
    numbers: dict = {
        "section": "fast",
        "images": count,
        "distinct_images": len(photos),
        "chunk": CHUNK,
        "fast_precision": fast.describe(),
        "native_bf16": native_bf16(),
        "machine": datapath._machine(),
        "tolerance": {mode: _tolerance(loaded, photos, mode) for mode in ("chain", "forward")},
    }
    numbers.update(_interleaved(loaded, photos, count))
    numbers["ratios"] = _ratios(numbers)
    if stack:
        numbers["bulk"] = _bulk(bulk_images)
        numbers["ratios"].update(_bulk_ratios(numbers["bulk"]))
    numbers["machine"]["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    _print(numbers)
    return numbers


def _tolerance(loaded: LoadedModel, photos: list[bytes], mode: str) -> dict:
    results = {
        precision: pipeline.process_images(
            loaded, photos, JobOptions(precision=precision, mode=mode), max_pixels=MAX_PIXELS
        )
        for precision in ("exact", "fast")
    }
    differences = [
        compare_maps(e.maps, f.maps) for e, f in zip(results["exact"], results["fast"], strict=True)
    ]
    return {
        "max_abs_difference_over_range": round(
            max(d["max_abs_difference_over_range"] for d in differences), 5
        ),
        "min_correlation": round(min(d["min_correlation"] for d in differences), 6),
    }


def _interleaved(loaded: LoadedModel, photos: list[bytes], count: int) -> dict:
    sequence = [photos[i % len(photos)] for i in range(count)]
    chunks = [sequence[s : s + CHUNK] for s in range(0, count, CHUNK)]
    tensors = preprocess([Image.open(io.BytesIO(p)).convert("RGB") for p in photos], "none")
    preloaded = [
        tensors[[(start + i) % len(photos) for i in range(CHUNK)]]
        for start in range(0, count, CHUNK)
    ]
    exact, fast = resolve("exact", loaded.device), resolve("fast", loaded.device)

    def keep(activation: torch.Tensor) -> torch.Tensor:
        return reduce_channels(activation, "mean")

    def model_only(precision):
        def run_chunk(index: int) -> None:
            batch = preloaded[index]
            for start in range(0, CHUNK, pipeline.CPU_MODEL_BATCH):
                part = batch[start : start + pipeline.CPU_MODEL_BATCH]
                model, part = model_and_input(loaded, part, precision)
                conv_chain(model, part, keep=keep)

        return run_chunk

    def data_path(option: str):
        options = JobOptions(precision=option)

        def run_chunk(index: int) -> None:
            results = pipeline.process_images(loaded, chunks[index], options, max_pixels=MAX_PIXELS)
            if not all(isinstance(r, pipeline.ImageResult) for r in results):
                raise RuntimeError(f"bench image failed: {results}")

        return run_chunk

    paths: dict[str, Callable[[int], None]] = {
        "model_only_exact": model_only(exact),
        "model_only_fast": model_only(fast),
        "data_path_exact": data_path("exact"),
        "data_path_fast": data_path("fast"),
    }
    for fn in paths.values():
        fn(0)  # warm-ups (the fast copy of the model is made here), not counted
    totals = datapath._take_turns(paths, len(chunks), None)
    return {
        path: datapath._summary(
            total["stages"],
            count,
            total["wall"],
            total["cpu"],
            datapath.STAGES if path.startswith("data_path") else (),
        )
        for path, total in totals.items()
    }


def _ratios(numbers: dict) -> dict:
    def speed(a: str, b: str) -> float:
        return round(numbers[a]["images_per_s"] / numbers[b]["images_per_s"], 3)

    return {
        "model_only_fast_vs_exact": speed("model_only_fast", "model_only_exact"),
        "data_path_fast_vs_exact": speed("data_path_fast", "data_path_exact"),
        "data_path_exact_vs_model_only": speed("data_path_exact", "model_only_exact"),
        "data_path_fast_vs_model_only_fast": speed("data_path_fast", "model_only_fast"),
    }


def _bulk(count: int) -> dict:
    photos = [bulk.photo(seed) for seed in range(count)]
    archive = bulk._zip(photos)
    runs: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-fast-") as tmp:
        stack = bulk._Stack(Path(tmp))
        try:
            for examples in ("9", "0"):
                for precision in ("exact", "fast"):
                    form = {"precision": precision, "examples": examples}
                    key = f"{precision}_examples_{examples}"
                    runs[key] = stack.throughput(archive, count, workers=1, form=form)
        finally:
            stack.stop()
    return {"images": count, "image_size": list(bulk.SIZE), "workers": 1, "runs": runs}


def _bulk_ratios(numbers: dict) -> dict:
    runs = numbers["runs"]
    return {
        f"bulk_fast_vs_exact_examples_{k}": round(
            runs[f"fast_examples_{k}"]["images_per_s"]
            / runs[f"exact_examples_{k}"]["images_per_s"],
            3,
        )
        for k in ("9", "0")
    }


def _print(numbers: dict) -> None:
    print(
        f"\nfast: precision=fast here is {numbers['fast_precision']['dtype']} "
        f"{numbers['fast_precision']['memory_format']} (native bf16: {numbers['native_bf16']}); "
        f"{numbers['images']} images, chunks of {numbers['chunk']}"
    )
    print(f"  {'path':<24}{'images/s':>10}{'CPU ms/img':>12}{'host outside model':>20}")
    for path in ("model_only_exact", "model_only_fast", "data_path_exact", "data_path_fast"):
        row = numbers[path]
        outside = row.get("host_cpu_ms_outside_model")
        print(
            f"  {path:<24}{row['images_per_s']:>10.2f}{row['cpu_ms_per_image']:>12.2f}"
            f"{'' if outside is None else f'{outside:.2f}':>20}"
        )
    for path in ("data_path_exact", "data_path_fast"):
        stages = numbers[path]["stage_cpu_ms_per_image"]
        print(f"  {path} by stage: " + ", ".join(f"{k} {v}" for k, v in stages.items()))
    for mode, worst in numbers["tolerance"].items():
        print(
            f"  {mode}: fast within {worst['max_abs_difference_over_range']:.2%} of each map's "
            f"range, correlation >= {worst['min_correlation']}"
        )
    if "bulk" in numbers:
        for key, run in numbers["bulk"]["runs"].items():
            print(f"  bulk {key:<22}{run['images_per_s']:>8.2f} images/s ({run['seconds']} s)")
    for key, value in numbers["ratios"].items():
        print(f"  {key}: {value}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_fast", description=__doc__)
    parser.add_argument("--count", type=int, default=COUNT)
    parser.add_argument("--bulk-images", type=int, default=BULK_IMAGES)
    parser.add_argument("--no-stack", action="store_true", help="skip the bulk runs")
    args = parser.parse_args(argv)
    numbers = measure(args.count, stack=not args.no_stack, bulk_images=args.bulk_images)
    print(json.dumps(numbers, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
