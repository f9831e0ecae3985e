"""Every architecture the ``model`` option offers, on this CPU, in one run: what a model switch
costs, how fast the model runs, and how long one job takes.

For each of :data:`shared.options.ARCHITECTURES`, with seeded random weights saved to a
``torch.save`` state_dict first (as an upload, or a cached ImageNet checkpoint, is read):

- **switch**: building the architecture and loading that file into it
  (:func:`worker.compute.model.load_uploaded`: ``torch.load(weights_only=True)`` and a strict
  load), i.e. what a worker pays when a job asks for a model that is not resident;
- **model only**: ``mode=forward`` (every Conv2d hooked and reduced as it comes, as the
  pipeline does) on a preloaded ``[8, 3, 224, 224]`` batch, ``exact`` and ``fast``
  (bfloat16 channels-last on this CPU), images/s, best of ``repeat`` after a warm-up;
- **job**: :func:`worker.compute.pipeline.process_image` on one 1024×768 photo with
  default options but ``mode=forward`` (decode to encoded figure, the worker's part of a
  job; queueing and storage are measured in "Service latency"), median of ``repeat``.

``python -m bench --only models`` or ``python -m bench.models [--only NAME]...``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.bulk import photo
from shared.options import ARCHITECTURES, JobOptions
from worker.compute.features import forward_activations, reduce_channels
from worker.compute.model import load_model, load_uploaded
from worker.compute.pipeline import process_image
from worker.compute.precision import model_and_input, resolve

BATCH = 8
MAX_PIXELS = 50_000_000


def run(repeat: int) -> dict:
    return measure(ARCHITECTURES, repeat=repeat)


def measure(architectures: tuple[str, ...] | list[str], *, repeat: int = 3) -> dict:
    batch = torch.rand(BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    image = photo(7, (1024, 768))
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        for name in architectures:
            rows[name] = _architecture(name, Path(tmp), batch, image, repeat)
            print(f"  {name}: {rows[name]}", flush=True)
    numbers = {
        "section": "models",
        "batch": BATCH,
        "torch_threads": torch.get_num_threads(),
        "architectures": rows,
    }
    _print(numbers)
    return numbers


def _architecture(name: str, tmp: Path, batch: torch.Tensor, image: bytes, repeat: int) -> dict:
    path = tmp / f"{name}.pt"
    torch.save(load_model("random", device="cpu", architecture=name).model.state_dict(), path)
    started = time.perf_counter()
    identity = {"name": "upload", "id": f"bench-{name}", "sha256": "0" * 64}
    loaded = load_uploaded(name, path, identity, device="cpu")
    switch_s = time.perf_counter() - started
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in loaded.model.modules())
    row = {
        "conv_layers": convs,
        "parameters_m": round(sum(p.numel() for p in loaded.model.parameters()) / 1e6, 1),
        "weights_mb": round(path.stat().st_size / 1e6, 1),
        "switch_s": round(switch_s, 3),
    }
    for option in ("exact", "fast"):
        row[f"model_only_{option}_images_per_s"] = round(
            _model_only(loaded, batch, option, repeat), 2
        )
    options = JobOptions(mode="forward")
    process_image(loaded, image, options, max_pixels=MAX_PIXELS)  # warm-up
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        process_image(loaded, image, options, max_pixels=MAX_PIXELS)
        times.append(time.perf_counter() - started)
    row["job_ms"] = round(statistics.median(times) * 1000, 1)
    return row


def _model_only(loaded, batch: torch.Tensor, option: str, repeat: int) -> float:
    precision = resolve(option, loaded.device)

    def keep(activation: torch.Tensor) -> torch.Tensor:
        return reduce_channels(activation, "mean")

    def once() -> float:
        started = time.perf_counter()
        model, part = model_and_input(loaded, batch, precision)
        forward_activations(model, part, keep=keep)
        return time.perf_counter() - started

    once()  # warm-up (and the fast copy of the model)
    return len(batch) / min(once() for _ in range(repeat))


def _print(numbers: dict) -> None:
    print(f"\nmodels: forward mode, batch {numbers['batch']}, {numbers['torch_threads']} threads")
    header = f"  {'architecture':<20}{'convs':>6}{'MB':>7}{'switch s':>10}"
    print(header + f"{'exact img/s':>13}{'fast img/s':>12}{'job ms':>9}")
    for name, row in numbers["architectures"].items():
        print(
            f"  {name:<20}{row['conv_layers']:>6}{row['weights_mb']:>7}{row['switch_s']:>10}"
            f"{row['model_only_exact_images_per_s']:>13}{row['model_only_fast_images_per_s']:>12}"
            f"{row['job_ms']:>9}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__)
    parser.add_argument("--only", action="append", choices=ARCHITECTURES)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.only or ARCHITECTURES, repeat=args.repeat), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
