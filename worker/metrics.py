"""Prometheus metrics of a worker process: images processed and failed (by error code), the
time of each stage, batch chunk sizes, lost signals repaired on the chunk path, model loads and, on
CUDA, GPU memory and utilisation.

Where the counters live. A Celery worker is a main process (it takes messages from Redis) and,
at concurrency 1 (one process per GPU, worker/launcher.py), exactly one prefork pool process
that holds the model and the CUDA context and runs every task. The counters live in that pool
process and it serves them itself: :func:`start_server` runs from ``worker_process_init``,
after the fork, like the heartbeat (worker/runtime.py). Prometheus' multiprocess mode (every
process writes mmap files, the main process adds them up) would keep the totals when the pool
process is replaced, but it needs ``PROMETHEUS_MULTIPROC_DIR`` set before prometheus_client is
first imported in the main process and a directory wiped at every start; a replaced pool
process (hard time limit, crash) is rare, Prometheus' ``rate()``/``increase()`` read its reset
counters as a restart, and the allocator's GPU figures can only be read in the process that
owns the CUDA context anyway.

The stage timings are the ones the pipeline already records (``ImageResult.timings``); fetch
and upload are timed around the storage calls.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
# stage -> key of the pipeline's timings dict (worker/compute/pipeline.py)
PIPELINE_STAGES = {
    "decode": "decode_ms",
    "model": "model_ms",
    "reduce": "reduce_ms",
    "render": "render_ms",
    "encode": "encode_ms",
}
STAGES = ("fetch", *PIPELINE_STAGES, "upload")

IMAGES_PROCESSED = Counter(
    "featuremaps_worker_images_processed",
    "Images whose outputs were stored, by kind (job or batch item).",
    ["kind"],
    registry=REGISTRY,
)
IMAGES_FAILED = Counter(
    "featuremaps_worker_images_failed",
    "Images that ended failed, by kind and error code (docs/design.md).",
    ["kind", "code"],
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "featuremaps_worker_stage_duration_seconds",
    "Time per image of each stage; a batch chunk's model pass is shared out evenly.",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
MODEL_IMAGES = Counter(
    "featuremaps_worker_model_images",
    "Images this process ran through the model (those whose result was reused did not).",
    registry=REGISTRY,
)
IMAGES_REUSED = Counter(
    "featuremaps_worker_images_reused",
    "Images whose outputs were stored without a model pass, by kind: copied from an equal "
    "earlier result, or shared with the same bytes in their chunk (worker/reuse.py).",
    ["kind"],
    registry=REGISTRY,
)
CHUNK_IMAGES = Histogram(
    "featuremaps_worker_chunk_images",
    "Items per batch chunk (those whose input could not be fetched included).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=REGISTRY,
)
REPAIRS = Counter(
    "featuremaps_worker_repairs",
    "Lost signals this process repaired on its own path, by kind: finalize (a batch "
    "finalizing but never closed, its finalize sent again by a redelivered chunk). The "
    "keeper's repairs are featuremaps_reconciler_repairs_total, from the API.",
    ["kind"],
    registry=REGISTRY,
)

# Every series exists from the start, at zero, so that rate() sees the first observation.
for _stage in STAGES:
    STAGE_SECONDS.labels(_stage)
for _kind in ("job", "batch"):
    IMAGES_PROCESSED.labels(_kind)
    IMAGES_REUSED.labels(_kind)
REPAIRS.labels("finalize")


def image_succeeded(kind: str, timings: Mapping[str, float], *, reused: bool = False) -> None:
    """One image's outputs are stored; ``timings`` is its pipeline timings dict (ms), empty
    of pipeline stages when ``reused``."""
    IMAGES_PROCESSED.labels(kind).inc()
    if reused:
        IMAGES_REUSED.labels(kind).inc()
    for stage, key in PIPELINE_STAGES.items():
        if key in timings:
            STAGE_SECONDS.labels(stage).observe(timings[key] / 1000)


def images_failed(kind: str, code: str, count: int = 1) -> None:
    IMAGES_FAILED.labels(kind, code).inc(count)


def repaired(kind: str) -> None:
    REPAIRS.labels(kind).inc()


def chunk_done(results: Iterable[object]) -> None:
    """A batch chunk's outcomes are stored: each an ``ImageResult`` or the error it raised."""
    results = list(results)
    CHUNK_IMAGES.observe(len(results))
    for result in results:
        code = getattr(result, "code", None)
        if code is None:
            image_succeeded("batch", result.timings, reused=bool(result.reused_from))
        else:
            images_failed("batch", code)


def model_pass(results: Iterable[object]) -> None:
    """A model pass returned: count the images it computed (not the errors of bad input)."""
    MODEL_IMAGES.inc(sum(1 for result in results if getattr(result, "code", None) is None))


@contextmanager
def timed(stage: str) -> Iterator[None]:
    with STAGE_SECONDS.labels(stage).time():
        yield


class ModelLoads(Collector):
    """How many times this process loaded a model (ResNet-18 once, plus each load of another
    model, docs/design.md "Models"), how many it evicted, and which are resident besides
    ResNet-18: ``resident()`` is the process's ``worker.compute.resident.ResidentModels`` or
    None before the first other model was asked for."""

    def __init__(self, resident: Callable[[], object] = lambda: None) -> None:
        self.resident = resident

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        from worker.compute.model import load_count

        yield CounterMetricFamily(
            "featuremaps_worker_model_loads", "Models loaded by this process.", value=load_count()
        )
        models = self.resident()
        yield CounterMetricFamily(
            "featuremaps_worker_model_evictions",
            "Models this process unloaded to stay within FEATUREMAPS_RESIDENT_MODELS.",
            value=getattr(models, "evictions", 0),
        )
        yield GaugeMetricFamily(
            "featuremaps_worker_resident_models",
            "Models loaded now besides ResNet-18 (which always is).",
            value=len(models.resident()) if models is not None else 0,
        )
        yield GaugeMetricFamily(
            "featuremaps_worker_resident_models_peak",
            "The most models ever loaded at once besides ResNet-18, since the process started.",
            value=getattr(models, "peak", 0),
        )


class GpuStats(Collector):
    """On CUDA: the allocator's figures for this process, and (with nvidia-ml-py installed)
    the device's used memory and utilisation as nvidia-smi reports them."""

    # featuremaps_worker_gpu_memory_<name>_bytes: (help, needs NVML)
    MEMORY: ClassVar[dict[str, tuple[str, bool]]] = {
        "allocated": ("Memory held by this process's tensors", False),
        "reserved": ("Memory this process's caching allocator holds", False),
        "total": ("Memory of the device", False),
        "used": ("Memory in use on the device, all processes (as nvidia-smi)", True),
    }
    UTILIZATION = "featuremaps_worker_gpu_utilization_ratio"

    def __init__(self, device) -> None:
        self.device = device
        self.nvml = importlib.util.find_spec("pynvml") is not None
        if not self.nvml:
            log.info("nvidia-ml-py is not installed: no GPU utilisation or used-memory metrics")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import torch

        read = {
            "allocated": torch.cuda.memory_allocated,
            "reserved": torch.cuda.memory_reserved,
            "total": lambda device: torch.cuda.get_device_properties(device).total_memory,
            "used": torch.cuda.device_memory_used,
        }
        for name, (help_text, needs_nvml) in self.MEMORY.items():
            if self.nvml or not needs_nvml:
                yield GaugeMetricFamily(
                    f"featuremaps_worker_gpu_memory_{name}_bytes",
                    help_text,
                    value=read[name](self.device),
                )
        if self.nvml:
            yield GaugeMetricFamily(
                self.UTILIZATION,
                "Share of the last sample period the GPU was busy (0-1).",
                value=torch.cuda.utilization(self.device) / 100,
            )


def start_server(port: int, device, resident: Callable[[], object] = lambda: None) -> None:
    """Serve this process's metrics on ``port`` (called once, after the fork); ``resident``
    gives the process's resident models (:class:`ModelLoads`)."""
    REGISTRY.register(ModelLoads(resident))
    if device.type == "cuda":
        REGISTRY.register(GpuStats(device))
    start_http_server(port, registry=REGISTRY)
    log.info("worker metrics on :%d/metrics", port)
