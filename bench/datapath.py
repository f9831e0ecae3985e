"""Data path: where a worker's host CPU goes per image, next to the model's own cost.

Four runs in one process, on the same seeded random ResNet-18 and the same images:

- **model only**: the conv chain (each layer reduced as it comes, as the pipeline does) on
  preloaded ``[16, 3, 224, 224]`` tensors, in the pipeline's CPU slices.
- **data path**: :func:`worker.compute.pipeline.process_images` on chunks of 16 encoded images,
  bytes in, encoded figures and manifests out.
- **fast path**: the same with ``precision=fast`` (JPEG draft decode, worker/compute/precision.py).
- **chunk path**: :func:`worker.batches.chunks.run_chunk` against a private redis-server and
  SeaweedFS, so a chunk also downloads its inputs, uploads figures and manifests and moves its
  items through the batch store.

The images are photo-like JPEGs of mixed sizes, a share of them camera-size (12 MP); a few
dozen distinct ones are generated and cycled through, so generation stays quick while every
image is still decoded, resized and rendered for real.

Every stage's cost is CPU time, not wall time, so that other work on the machine does not
inflate it: decode, render, encode and the storage and Redis calls are each measured with
the calling thread's CPU clock (``time.thread_time``); preprocess, model and reduce, which
torch spreads over its threads, with the process's. *other* is what no stage accounts for
(result assembly, manifests, thread pools). *host outside model* is the process's whole CPU
time for the run less the model's, per image. Run it with ``python -m bench --only
datapath`` or ``python -m bench.datapath [--count N] [--no-stack]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import precision
from bench.bulk import photo
from shared import keys
from shared.batches import Batch, BatchStatus, BatchStore, NewItem, item_id
from shared.imaging import decode
from shared.jobs import JobStore
from shared.leases import LeaseStore
from shared.options import JobOptions
from shared.settings import Settings
from shared.storage import ObjectStore
from worker.batches.chunks import Delivery, run_chunk
from worker.compute import pipeline, render
from worker.compute.features import conv_chain, preprocess, reduce_channels
from worker.compute.model import LoadedModel, load_model
from worker.compute.precision import DRAFT_SIDE
from worker.runtime import WorkerContext

COUNT = 2000
CHUNK = 16
# (width, height, how many distinct images of that size): 3 of 24 are 12 MP camera photos.
SIZES = ((320, 240, 6), (640, 480, 6), (1024, 768, 5), (1920, 1080, 4), (4000, 3000, 3))
MAX_PIXELS = 50_000_000
STAGES = ("decode", "preprocess", "model", "reduce", "render", "encode")
STACK_STAGES = ("download", "upload", "redis")


def run(repeat: int) -> dict:
    return measure(COUNT, repeat=repeat)


def measure(count: int, *, repeat: int = 1, stack: bool = True, examples: int = 0) -> dict:
    """``repeat`` is accepted for ``python -m bench``; every chunk is measured once, the
    paths taking turns chunk by chunk so that a change in the machine's load hits all.
    ``examples`` is the chunk path's batch option (0: off; a batch's default is on)."""
    count = max(1, -(-count // CHUNK)) * CHUNK  # whole chunks
    photos = distinct_photos()
    sequence = [photos[i % len(photos)] for i in range(count)]
    loaded = load_model("random", device="cpu", seed=0)
    numbers = {
        "section": "datapath",
        "images": count,
        "distinct_images": len(photos),
        "sizes": [[w, h, n] for w, h, n in SIZES],
        "input_bytes_mean": round(sum(len(p) for p in sequence) / count),
        "chunk": CHUNK,
        "chunk_path_examples": examples,
        "machine": _machine(),
        "decode_by_size": _decode_by_size(photos),
        "decode_by_size_draft": _decode_by_size(photos, draft_side=DRAFT_SIDE),
        "precision_compare": precision.compare(loaded, photos, max_pixels=MAX_PIXELS),
        "render_compare": render_compare(loaded),
    }
    with contextlib.ExitStack() as services:
        ctx = services.enter_context(_services(loaded)) if stack else None
        numbers.update(_interleaved(loaded, photos, sequence, ctx, examples))
    numbers["ratios"] = {
        f"{path}_vs_model_only": _ratio(numbers[path], numbers["model_only"])
        for path in ("data_path", "fast_path", "chunk_path")
        if path in numbers
    }
    numbers["machine"]["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    _print(numbers)
    return numbers


def distinct_photos() -> list[bytes]:
    """The distinct inputs, smallest first; seeded, so every run uses the same bytes."""
    out = []
    for width, height, n in SIZES:
        out += [photo(len(out), (width, height)) for _ in range(n)]
    return out


class StageMeter:
    """CPU milliseconds per stage, taken by wrapping the functions that do each stage.

    ``with meter.wrapping(module, "name", "stage"):`` replaces ``module.name`` by a wrapper
    that adds its CPU time to ``stage`` and puts the original back on exit. A wrapper called
    inside another stage's wrapper (the reduction inside the model pass) is taken out of
    the outer stage, so the stages add up.
    """

    def __init__(self) -> None:
        self.cpu_ms: dict[str, float] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def wrap(self, fn: Callable, stage: str, clock: Callable[[], float]) -> Callable:
        def timed(*args, **kwargs):
            nested = getattr(self._local, "nested", None)
            self._local.nested = 0.0
            started = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = clock() - started
                inner = self._local.nested
                self._local.nested = nested
                if nested is not None:
                    self._local.nested = nested + spent
                self._add(stage, (spent - inner) * 1000)

        return timed

    @contextlib.contextmanager
    def wrapping(
        self, owner: object, name: str, stage: str, clock: Callable[[], float] = time.thread_time
    ) -> Iterator[None]:
        original = getattr(owner, name, None)
        if original is None:
            yield
            return
        setattr(owner, name, self.wrap(original, stage, clock))
        try:
            yield
        finally:
            setattr(owner, name, original)

    def _add(self, stage: str, ms: float) -> None:
        with self._lock:
            self.cpu_ms[stage] = self.cpu_ms.get(stage, 0.0) + ms


def _pipeline_stages(meter: StageMeter) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    # The pipeline decodes with imaging.decode (decode_image before it kept the EXIF facts).
    stack.enter_context(meter.wrapping(pipeline, "decode", "decode"))
    stack.enter_context(meter.wrapping(pipeline, "decode_image", "decode"))
    # Older pipelines preprocess in one call, newer ones resize as they decode; wrapping
    # skips a name the pipeline does not have, so the same bench measures both.
    stack.enter_context(meter.wrapping(pipeline, "preprocess", "preprocess", time.process_time))
    stack.enter_context(meter.wrapping(pipeline, "resize_input", "preprocess"))
    stack.enter_context(meter.wrapping(pipeline, "to_batch", "preprocess", time.process_time))
    stack.enter_context(meter.wrapping(pipeline, "conv_chain", "model", time.process_time))
    stack.enter_context(meter.wrapping(pipeline, "reduce_channels", "reduce", time.process_time))
    stack.enter_context(meter.wrapping(render, "_draw_fast", "render"))
    stack.enter_context(meter.wrapping(render, "_encode_pil", "encode"))
    return stack


def render_compare(loaded: LoadedModel, rounds: int = 5) -> dict:
    """CPU ms per image to draw a chunk's grids: the fast renderer (numpy and Pillow, image
    by image) against the batched torch renderer, on the same maps (the chain's 17 layers of
    16 images), interleaved, best of ``rounds``; and the largest pixel difference."""
    from worker.compute.render_tensor import draw_grids

    tensors = torch.rand(CHUNK, 3, 224, 224)
    outputs = conv_chain(loaded.model, tensors, keep=lambda a: reduce_channels(a, "mean"))
    modules = dict(loaded.model.named_modules())
    layers = [(n, (modules[n].out_channels, *t.shape[1:]), t) for n, t in outputs]
    caption = "ResNet-18 feature maps · weights: random, seed 0 (untrained)"
    numpy_maps = [
        [render.LayerMap(n, shape, t[row].numpy()) for n, shape, t in layers]
        for row in range(CHUNK)
    ]
    pillow = tensor = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        drawn = [render._draw_fast(maps, "viridis", caption) for maps in numpy_maps]
        pillow = min(pillow, time.process_time() - started)
        started = time.process_time()
        canvases = draw_grids(layers, "viridis", caption).numpy()
        tensor = min(tensor, time.process_time() - started)
    difference = max(
        int(np.abs(np.asarray(image, dtype=np.int16) - canvas).max())
        for image, canvas in zip(drawn, canvases, strict=True)
    )
    return {
        "pillow_cpu_ms_per_image": round(pillow * 1000 / CHUNK, 2),
        "torch_batched_cpu_ms_per_image": round(tensor * 1000 / CHUNK, 2),
        "max_pixel_difference": difference,
    }


def _decode_by_size(photos: list[bytes], *, draft_side: int | None = None) -> dict:
    """CPU ms to decode one image and resize it to 224×224, per input size (best of 3);
    with ``draft_side``, as ``precision=fast`` decodes JPEGs."""
    out = {}
    for data in photos:
        with Image.open(io.BytesIO(data)) as probe:
            label = f"{probe.width}x{probe.height}"
        if label in out:
            continue
        best = float("inf")
        for _ in range(3):
            started = time.thread_time()
            image = decode(data, max_pixels=MAX_PIXELS, draft_side=draft_side).image
            image.resize((224, 224), Image.Resampling.BILINEAR)
            best = min(best, time.thread_time() - started)
        out[label] = round(best * 1000, 2)
    return out


def _take_turns(
    paths: dict[str, Callable[[int], None]], rounds: int, ctx: WorkerContext | None
) -> dict[str, dict]:
    """Run every path on chunk 0, then every path on chunk 1, …, metering each path's wall
    time, process CPU time and CPU time by stage."""
    meter = StageMeter()
    totals: dict[str, dict] = {p: {"wall": 0.0, "cpu": 0.0, "stages": {}} for p in paths}
    with contextlib.ExitStack() as wrapped:
        wrapped.enter_context(_pipeline_stages(meter))
        if ctx:
            wrapped.enter_context(meter.wrapping(ctx.store, "get_bytes", "download"))
            wrapped.enter_context(meter.wrapping(ctx.store, "get_range", "download"))
            wrapped.enter_context(meter.wrapping(ctx.store, "put_bytes", "upload"))
            for name in ("start_items", "get", "get_items", "finish_items"):
                wrapped.enter_context(meter.wrapping(BatchStore, name, "redis"))
        for index in range(rounds):
            for path, fn in paths.items():
                meter.cpu_ms = totals[path]["stages"]
                wall, cpu = time.perf_counter(), time.process_time()
                fn(index)
                totals[path]["wall"] += time.perf_counter() - wall
                totals[path]["cpu"] += time.process_time() - cpu
    return totals


def _interleaved(
    loaded: LoadedModel,
    photos: list[bytes],
    sequence: list[bytes],
    ctx: WorkerContext | None,
    examples: int = 0,
) -> dict:
    """Chunk by chunk: the model alone on a preloaded chunk, then the data path on the chunk's
    bytes, then (with ``ctx``) the chunk path on the same items."""
    options, fast = JobOptions(), JobOptions(precision="fast")
    tensors = preprocess([Image.open(io.BytesIO(p)).convert("RGB") for p in photos], "none")
    preloaded = [
        tensors[[(start + i) % len(photos) for i in range(CHUNK)]]
        for start in range(0, len(sequence), CHUNK)
    ]
    chunks = [sequence[s : s + CHUNK] for s in range(0, len(sequence), CHUNK)]
    count = len(chunks) * CHUNK
    batch_id, item_chunks = _seed_batch(ctx, photos, count, examples) if ctx else ("", [])
    finalized: list[str] = []

    def keep(activation: torch.Tensor) -> torch.Tensor:
        return reduce_channels(activation, "mean")

    def model_only(index: int) -> None:
        batch = preloaded[index]
        for start in range(0, CHUNK, pipeline.CPU_MODEL_BATCH):
            conv_chain(loaded.model, batch[start : start + pipeline.CPU_MODEL_BATCH], keep=keep)

    def data_path(index: int) -> None:
        results = pipeline.process_images(loaded, chunks[index], options, max_pixels=MAX_PIXELS)
        if not all(isinstance(r, pipeline.ImageResult) for r in results):
            raise RuntimeError(f"bench image failed: {results}")

    def fast_path(index: int) -> None:
        pipeline.process_images(loaded, chunks[index], fast, max_pixels=MAX_PIXELS)

    def chunk_path(index: int) -> None:
        ids = item_chunks[index]
        run_chunk(ctx, batch_id, ids, Delivery(token=uuid.uuid4().hex, finalize=finalized.append))

    paths: dict[str, Callable[[int], None]] = {
        "model_only": model_only,
        "data_path": data_path,
        "fast_path": fast_path,
    }
    if ctx:
        paths["chunk_path"] = chunk_path
    model_only(0)
    data_path(0)  # warm-ups, not counted
    totals = _take_turns(paths, len(chunks), ctx)
    if ctx:
        done = ctx.batches.get(batch_id)
        if done.succeeded != count or finalized != [batch_id]:
            raise RuntimeError(f"bench batch did not process every image: {done.counts()}")
    return {
        path: _summary(total["stages"], count, total["wall"], total["cpu"], _STAGES_OF[path])
        for path, total in totals.items()
    }


# The stages each path reports (model-only has none but its total).
_STAGES_OF = {
    "model_only": (),
    "data_path": STAGES,
    "fast_path": STAGES,
    "chunk_path": (*STAGES, *STACK_STAGES),
}


@contextlib.contextmanager
def _services(loaded: LoadedModel) -> Iterator[WorkerContext]:
    """A private redis-server and SeaweedFS, and a worker context that uses them."""
    from stack.services import RedisServer, SeaweedS3

    with tempfile.TemporaryDirectory(prefix="bench-datapath-") as tmp:
        redis_server = RedisServer(Path(tmp) / "redis", appendonly=False)
        s3 = SeaweedS3(Path(tmp) / "s3")
        redis_server.start()
        s3.start()
        try:
            settings = Settings(
                redis_url=redis_server.url,
                s3_endpoint=s3.endpoint,
                s3_access_key=s3.access_key,
                s3_secret_key=s3.secret_key,
                s3_bucket="bench",
                batch_chunk=CHUNK,
                max_image_pixels=MAX_PIXELS,
                # The same photos go round again and again: compute them every time.
                reuse_results=False,
            )
            yield _context(settings, loaded)
        finally:
            s3.stop()
            redis_server.stop()


def _context(settings: Settings, loaded: LoadedModel) -> WorkerContext:
    redis = __import__("redis").Redis.from_url(settings.redis_url)
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    return WorkerContext(
        settings=settings,
        hostname="bench@datapath",
        redis=redis,
        jobs=JobStore(redis, ttl_s=settings.job_ttl_s),
        batches=BatchStore(redis, ttl_s=settings.job_ttl_s),
        leases=LeaseStore(redis, ttl_s=settings.visibility_timeout_s),
        store=store,
        loaded=loaded,
        device="cpu",
    )


def _seed_batch(
    ctx: WorkerContext, photos: list[bytes], count: int, examples: int = 0
) -> tuple[str, list]:
    """A running batch of ``count`` queued items. Items share one pack of the distinct inputs
    (so seeding uploads one object), but each chunk still downloads every item's range."""
    store = ctx.batches
    batch_id = uuid.uuid4().hex
    store.create(
        Batch(
            id=batch_id,
            status=BatchStatus.RUNNING,
            options=JobOptions(examples=examples).to_dict(),
            source={"kind": "bench"},
        )
    )
    # One input pack of the distinct photos, as expansion stores a block's members; each
    # item names its photo's range in it (one ranged GET per item, as in a worker).
    pack_key = keys.batch_input_pack_key(batch_id, 0)
    ctx.store.put_bytes(pack_key, b"".join(photos))
    offsets = np.cumsum([0] + [len(p) for p in photos]).tolist()
    items = [
        NewItem(
            item_id(batch_id, i),
            f"{i:05d}.jpg",
            input_key=pack_key,
            input_range=(offsets[i % len(photos)], len(photos[i % len(photos)])),
        )
        for i in range(count)
    ]
    _, queued = store.add_items(batch_id, items)
    store.end_expansion(batch_id)
    return batch_id, [queued[s : s + CHUNK] for s in range(0, len(queued), CHUNK)]


def _summary(
    stage_ms: dict[str, float], count: int, wall: float, cpu: float, stages: tuple[str, ...]
) -> dict:
    cpu_ms = cpu * 1000 / count
    summary = {
        "images_per_s": round(count / wall, 2),
        "wall_ms_per_image": round(wall * 1000 / count, 2),
        "cpu_ms_per_image": round(cpu_ms, 2),
    }
    if stages:
        per_image = {stage: round(stage_ms.get(stage, 0.0) / count, 2) for stage in stages}
        per_image["other"] = round(cpu_ms - sum(per_image.values()), 2)
        # Model-only runs the reduction as the pipeline does (each layer as it comes), so
        # "outside the model" leaves out both, to compare with model-only's own cost.
        outside = cpu_ms - per_image["model"] - per_image["reduce"]
        summary["host_cpu_ms_outside_model"] = round(outside, 2)
        summary["stage_cpu_ms_per_image"] = per_image
    return summary


def _ratio(path: dict, model_only: dict) -> dict:
    return {
        "images_per_s": round(path["images_per_s"] / model_only["images_per_s"], 3),
        "cpu_per_image": round(path["cpu_ms_per_image"] / model_only["cpu_ms_per_image"], 3),
    }


def _machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_before": round(os.getloadavg()[0], 2),
        "numpy": np.__version__,
        "torch": torch.__version__,
    }


def _print(numbers: dict) -> None:
    model = numbers["model_only"]
    paths = [("data_path", "data path"), ("fast_path", "fast path")]
    if "chunk_path" in numbers:
        paths.append(("chunk_path", "chunk path"))
    print(
        f"\ndatapath: {numbers['images']} images ({numbers['distinct_images']} distinct, "
        f"mixed sizes up to 12 MP), chunks of {numbers['chunk']}, CPU ms per image"
    )
    header = f"  {'stage':<26}{'model only':>12}" + "".join(f"{label:>12}" for _, label in paths)
    print(header)
    for stage in (*STAGES, *STACK_STAGES, "other"):
        row = [numbers[key]["stage_cpu_ms_per_image"].get(stage) for key, _ in paths]
        if all(v is None for v in row):
            continue
        ref = model["cpu_ms_per_image"] if stage == "model" else None
        print(
            f"  {stage:<26}{'' if ref is None else f'{ref:.2f}':>12}"
            + "".join(f"{'' if v is None else f'{v:.2f}':>12}" for v in row)
        )
    for field, label in (
        ("cpu_ms_per_image", "CPU, total"),
        ("host_cpu_ms_outside_model", "host outside model+reduce"),
        ("wall_ms_per_image", "wall"),
        ("images_per_s", "images/s"),
    ):
        ref = model.get(field)
        print(
            f"  {label:<26}{'' if ref is None else f'{ref:.2f}':>12}"
            + "".join(f"{numbers[key][field]:>12.2f}" for key, _ in paths)
        )
    for key, label in paths:
        ratio = numbers["ratios"][f"{key}_vs_model_only"]
        print(
            f"  {label}: {ratio['images_per_s']}x model-only images/s, "
            f"{ratio['cpu_per_image']}x its CPU per image"
        )
    _print_comparisons(numbers)


def _print_comparisons(numbers: dict) -> None:
    """The render, decode and precision comparisons, and the machine's load."""
    compare = numbers["render_compare"]
    print(
        f"  render, CPU ms per image: Pillow {compare['pillow_cpu_ms_per_image']}, torch "
        f"batched {compare['torch_batched_cpu_ms_per_image']} (max pixel difference "
        f"{compare['max_pixel_difference']})"
    )
    for key, label in (("decode_by_size", "exact"), ("decode_by_size_draft", "fast")):
        sizes = ", ".join(f"{k} {v:.1f}" for k, v in numbers[key].items())
        print(f"  decode + resize to 224, CPU ms, {label}: {sizes}")
    compare = numbers["precision_compare"]
    print(
        f"  fast against exact, {compare['images']} images, "
        f"CPU ms per image {compare['cpu_ms_per_image']}:"
    )
    for name in ("fast_host", "fast_device"):
        print(
            f"    {name}: max |difference| / map range "
            f"{compare[name]['max_abs_difference_over_range']}, "
            f"min correlation {compare[name]['min_correlation']}"
        )
    machine = numbers["machine"]
    print(
        f"  load average (1 min) before/after: {machine['load_average_1m_before']}"
        f"/{machine['load_average_1m_after']} on {machine['cpus']} CPUs"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.datapath", description=__doc__)
    parser.add_argument("--count", type=int, default=COUNT, help="images per run")
    parser.add_argument("--repeat", type=int, default=1, help="model-only runs (best kept)")
    parser.add_argument("--no-stack", action="store_true", help="skip the chunk path")
    parser.add_argument(
        "--examples", type=int, default=0, help="the chunk path's examples option (0: off)"
    )
    parser.add_argument("--out", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    numbers = measure(
        args.count, repeat=args.repeat, stack=not args.no_stack, examples=args.examples
    )
    if args.out:
        args.out.write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
