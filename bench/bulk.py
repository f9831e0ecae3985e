"""Bulk throughput: images/s end to end for one archive of photo-like images, through the real
service (gunicorn API, Celery workers, redis-server, SeaweedFS), with one worker and with two,
beside the article's sequential per-image path and model-only throughput (the conv chain on
preloaded tensors, batched like a chunk), all measured in the same run on the same machine.

End to end is submit → batch succeeded: the streamed upload, expansion, every chunk's
download, decode, model pass, reduction, render, encode and upload, and finalization
(manifest and results.zip). Run it with ``python -m bench --only bulk`` or
``python -m bench.bulk [--images N]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image, ImageDraw
from redis import Redis

from bench import core
from client.api import Client
from shared.heartbeat import live_workers
from shared.settings import Settings
from shared.storage import ObjectStore
from stack.commands import api_command, cpu_worker_env, wait_for_api, worker_command
from stack.local import service_env
from stack.services import ManagedProcess, RedisServer, SeaweedS3, free_port, wait_until
from worker.compute.features import conv_chain, preprocess, reduce_channels
from worker.compute.model import load_model
from worker.compute.pipeline import CPU_MODEL_BATCH

IMAGES = 300
SIZE = (320, 240)
CHUNK = 16
ARTICLE_SAMPLES = 4


def run(repeat: int) -> dict:
    return measure(IMAGES, repeat=repeat)


def measure(count: int, *, repeat: int = 1) -> dict:
    photos = [photo(seed) for seed in range(count)]
    archive = _zip(photos)
    model_only = _model_only(photos[:CHUNK], repeat=max(2, repeat))
    article = _article(photos[:ARTICLE_SAMPLES])
    with tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp:
        stack = _Stack(Path(tmp))
        try:
            one = stack.throughput(archive, count, workers=1)
            two = stack.throughput(archive, count, workers=2)
        finally:
            stack.stop()
    best = max(one["images_per_s"], two["images_per_s"])
    numbers = {
        "section": "bulk",
        "images": count,
        "image_size": list(SIZE),
        "archive_bytes": len(archive),
        "batch_chunk": CHUNK,
        "end_to_end": {"1_worker": one, "2_workers": two},
        "article_images_per_s": round(article, 3),
        "model_only_images_per_s": round(model_only, 2),
        "ratios": {
            "1_worker_vs_article": round(one["images_per_s"] / article, 1),
            "2_workers_vs_article": round(two["images_per_s"] / article, 1),
            "best_vs_model_only": round(best / model_only, 2),
            "1_worker_vs_model_only": round(one["images_per_s"] / model_only, 2),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
    }
    _print(numbers)
    return numbers


def photo(seed: int, size: tuple[int, int] = SIZE) -> bytes:
    """A photo-like JPEG: two gradients, a few filled shapes, sensor-like noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = x * rng.uniform(40, 220, 3) + y * rng.uniform(40, 220, 3)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        x1, y1 = x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=color)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=88)
    return buffer.getvalue()


def _zip(photos: list[bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for index, data in enumerate(photos):
            archive.writestr(f"photos/{index:04d}.jpg", data)
    return buffer.getvalue()


def _model_only(photos: list[bytes], *, repeat: int) -> float:
    """Images/s of the chain alone on a preloaded [CHUNK, 3, 224, 224] tensor: the faster
    of the whole chunk at once and the pipeline's CPU slices, each layer reduced as it comes
    (as the pipeline does), so the reference is the best the model itself can do here."""
    loaded = load_model("random", device="cpu", seed=0)
    batch = preprocess([Image.open(io.BytesIO(p)).convert("RGB") for p in photos], "none")

    def keep(activation: torch.Tensor) -> torch.Tensor:
        return reduce_channels(activation, "mean")

    best = float("inf")
    for step in (len(photos), CPU_MODEL_BATCH):
        conv_chain(loaded.model, batch[:step], keep=keep)  # warm-up
        for _ in range(repeat):
            started = time.perf_counter()
            for start in range(0, len(photos), step):
                conv_chain(loaded.model, batch[start : start + step], keep=keep)
            best = min(best, time.perf_counter() - started)
    return len(photos) / best


def _article(photos: list[bytes]) -> float:
    """Images/s of the article's sequential per-image path (bench/core.py's copy of it)."""
    model = load_model("random", device="cpu", seed=0).model
    core._article(model, photos[0])  # warm-up
    started = time.perf_counter()
    for data in photos:
        core._article(model, data)
    return len(photos) / (time.perf_counter() - started)


class _Stack:
    """redis-server, SeaweedFS and a gunicorn API for the whole run; workers per measurement."""

    def __init__(self, run_dir: Path, *, reuse_results: bool = False, **also: object) -> None:
        self.run_dir = run_dir
        self.redis = RedisServer(run_dir / "redis")
        self.s3 = SeaweedS3(run_dir / "s3")
        self.redis.start()
        self.s3.start()
        self.settings = Settings(
            redis_url=self.redis.url,
            s3_endpoint=self.s3.endpoint,
            s3_access_key=self.s3.access_key,
            s3_secret_key=self.s3.secret_key,
            s3_bucket="bench",
            weights="random",
        )
        # Both runs process the same archive: each must compute, not reuse the first's results.
        self.env = {
            **os.environ,
            **service_env(self.settings, batch_chunk=CHUNK, reuse_results=reuse_results, **also),
        }
        self.client = Redis.from_url(self.redis.url)
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        self.api = self._spawn("api", api_command(f"127.0.0.1:{port}", workers=1), self.env)
        wait_for_api(self.api_url, self.api, timeout_s=30)
        ObjectStore.from_settings(self.settings).ensure_bucket()

    def _spawn(self, name: str, argv: list[str], env: dict) -> ManagedProcess:
        process = ManagedProcess(name, argv, env=env, log_path=self.run_dir / f"{name}.log")
        process.start()
        return process

    def start_workers(self, workers: int) -> list[ManagedProcess]:
        """``workers`` Celery worker processes on both queues, each seen alive."""
        started_workers = []
        for index in range(workers):
            hostname = f"bench{workers}-{index}@{socket.gethostname()}"
            argv = worker_command(hostname, queues="jobs,batch", loglevel="WARNING")
            env = {**self.env, **cpu_worker_env(workers)}
            process = self._spawn(hostname.split("@")[0], argv, env)
            started_workers.append(process)
            wait_until(
                lambda h=hostname: h in {w["hostname"] for w in live_workers(self.client)},
                timeout_s=120,
                process=process,
                what=f"worker {hostname}",
            )
        return started_workers

    def throughput(
        self, archive: bytes, count: int, *, workers: int, form: dict | None = None
    ) -> dict:
        """Submit → succeeded for ``archive`` with ``workers`` fresh workers; ``form`` is the
        batch's options (the service's defaults without it)."""
        started_workers = self.start_workers(workers)
        try:
            started = time.perf_counter()
            response = requests.post(
                f"{self.api_url}/batches",
                files={"archive": ("photos.zip", archive)},
                data=form or {},
                timeout=120,
            )
            response.raise_for_status()
            batch_id = response.json()["id"]
            # The client waits for the batch's result too (its manifest comes last).
            doc = Client(self.api_url).get_batch(batch_id).wait(timeout=900).doc
            elapsed = time.perf_counter() - started
        finally:
            for process in started_workers:
                process.stop()
        if doc["counts"]["succeeded"] != count:
            raise RuntimeError(f"bench batch did not process every image: {doc}")
        return {
            "batch_id": batch_id,
            "workers": workers,
            "seconds": round(elapsed, 2),
            "images_per_s": round(count / elapsed, 2),
        }

    def stop(self) -> None:
        self.api.stop()
        self.s3.stop()
        self.redis.stop()


def _print(numbers: dict) -> None:
    e2e = numbers["end_to_end"]
    ratios = numbers["ratios"]
    print(f"\nbulk: {numbers['images']} photo-like {SIZE[0]}x{SIZE[1]} JPEGs, chunk {CHUNK}")
    print(f"  {'path':<34}{'images/s':>10}")
    print(f"  {'article, sequential per image':<34}{numbers['article_images_per_s']:>10.2f}")
    print(f"  {'model only (chain, preloaded)':<34}{numbers['model_only_images_per_s']:>10.2f}")
    for key, label in (
        ("1_worker", "end to end, 1 worker"),
        ("2_workers", "end to end, 2 workers"),
    ):
        print(f"  {label:<34}{e2e[key]['images_per_s']:>10.2f}   ({e2e[key]['seconds']} s)")
    print(
        f"  1 worker = {ratios['1_worker_vs_article']}x article, "
        f"2 workers = {ratios['2_workers_vs_article']}x article, "
        f"best = {ratios['best_vs_model_only']}x model-only"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bulk", description=__doc__)
    parser.add_argument("--images", type=int, default=IMAGES)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.images, repeat=args.repeat), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
