"""The GPU data-path benchmark: one in-process run on a CUDA machine, no services.

``python -m bench.gpu [--count 5000] [--chunk 128] [--out FILE]`` generates JPEGs mixed like
a real archive — a third are 12 MP camera photos (4000×3000, 3-6 MB, EXIF, sensor noise),
the rest 0.3-2 MP — and reports, on the machine's first CUDA device (the CPU when there is
none, which is how the unit test keeps it working):

- model-only images/s: the conv chain with its reduction on a preloaded device batch;
- data-path images/s: :func:`worker.compute.pipeline.process_images` on chunks of encoded bytes with
  the default ``precision=auto`` (on CUDA: ``fast``, its stages on the device), bytes in,
  encoded figures and manifests out, and its ratio to model-only;
- host CPU ms per image of the data path (process CPU time, all threads);
- how far its maps are from the CPU float32 ``exact`` reference
  (:func:`worker.compute.precision.compare_maps`, on a sample);
- single-image latency: one camera photo through ``process_image``, median of 10.

It needs only torch, torchvision, numpy, Pillow and the repository (no Redis, S3, Celery or
Flask), so it runs where those are absent. docs/benchmarks.md records the command and the
figures of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from bench.precision import worst_difference
from shared.options import JobOptions
from tests.photos import camera_jpeg
from worker.compute import pipeline
from worker.compute.features import INPUT_SIDE, conv_chain, reduce_channels
from worker.compute.model import load_model

MAX_PIXELS = 50_000_000
# Distinct inputs, cycled: (width, height, EXIF orientation) — 1 in 3 a camera photo.
SIZES = ((4000, 3000, 6), (640, 480, None), (1600, 1200, None))
DISTINCT = 48
REFERENCE_SAMPLE = 12


def measure(
    count: int, chunk: int, *, sizes=SIZES, distinct: int = DISTINCT, processes: int = 16
) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    photos = _photos(sizes, distinct, processes)
    sequence = [photos[i % len(photos)] for i in range(count)]
    loaded = load_model("random", device=device, seed=0)
    numbers = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "images": count,
        "chunk": chunk,
        "input_mb_mean": round(sum(map(len, sequence)) / count / 1e6, 2),
        "model_only": _model_only(loaded, count, chunk),
        "data_path": _data_path(loaded, sequence, chunk),
        "reference": _reference(loaded, photos[:REFERENCE_SAMPLE]),
        "single_image_latency_ms": _latency(loaded, photos[0]),
    }
    numbers["data_path_vs_model_only"] = round(
        numbers["data_path"]["images_per_s"] / numbers["model_only"]["images_per_s"], 3
    )
    return numbers


def _photos(sizes, distinct: int, processes: int) -> list[bytes]:
    specs = [(*sizes[i % len(sizes)], i) for i in range(distinct)]
    processes = max(1, min(processes, os.cpu_count() or 1))
    if processes == 1:
        return [_photo(spec) for spec in specs]
    with ProcessPoolExecutor(processes) as pool:
        return list(pool.map(_photo, specs))


def _photo(spec: tuple) -> bytes:
    width, height, orientation, seed = spec
    return camera_jpeg(width, height, orientation=orientation, seed=seed)


def _model_only(loaded, count: int, chunk: int) -> dict:
    batch = torch.rand(chunk, 3, INPUT_SIDE, INPUT_SIDE, device=loaded.device)

    def run() -> None:
        conv_chain(loaded.model, batch, keep=lambda a: reduce_channels(a, "mean"))

    run()  # warm-up
    rounds = max(1, count // chunk)
    started = time.perf_counter()
    for _ in range(rounds):
        run()
    _sync(loaded.device)
    return {"images_per_s": round(rounds * chunk / (time.perf_counter() - started), 1)}


def _data_path(loaded, sequence: list[bytes], chunk: int) -> dict:
    options = JobOptions()
    pipeline.process_images(loaded, sequence[:chunk], options, max_pixels=MAX_PIXELS)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    precision = None
    for start in range(0, len(sequence), chunk):
        results = pipeline.process_images(
            loaded, sequence[start : start + chunk], options, max_pixels=MAX_PIXELS
        )
        failed = [r for r in results if not isinstance(r, pipeline.ImageResult)]
        if failed:
            raise RuntimeError(f"bench images failed: {failed[:3]}")
        precision = results[0].manifest["precision"]
    _sync(loaded.device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "images_per_s": round(len(sequence) / wall, 1),
        "host_cpu_ms_per_image": round(cpu * 1000 / len(sequence), 2),
        "precision": precision,
    }


def _reference(loaded, photos: list[bytes]) -> dict:
    """The data path's maps against the CPU float32 exact computation, worst over a sample."""
    fast = pipeline.process_images(loaded, photos, JobOptions(), max_pixels=MAX_PIXELS)
    cpu = load_model("random", device="cpu", seed=0)
    exact = pipeline.process_images(
        cpu, photos, JobOptions(precision="exact"), max_pixels=MAX_PIXELS
    )
    return {"images": len(photos), **worst_difference(exact, fast)}


def _latency(loaded, photo: bytes) -> float:
    times = []
    for _ in range(10):
        started = time.perf_counter()
        pipeline.process_image(loaded, photo, JobOptions(), max_pixels=MAX_PIXELS)
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    numbers = measure(args.count, args.chunk)
    text = json.dumps(numbers, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
