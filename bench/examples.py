"""What dataset examples cost: the same archive through the real service (gunicorn API, Celery
workers, redis-server, SeaweedFS) with ``examples=0`` and with the default (9), runs
interleaved in one process, reported as wall time, the time from the last item's outcome to
the batch's end (finalization, and the examples' merge and second pass), and the workers'
peak resident memory.

Two archives: bench.bulk's distinct photo-like JPEGs (every item computed: the small-batch
case, where the winners are most of the batch), and a larger one of repeated small photos
with result reuse on (bench.scale's kind: most items are copies, so the per-item bookkeeping
the examples add shows). ``python -m bench --only examples`` or
``python -m bench.examples [--images N] [--members N] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench import bulk, scale
from client.api import Client
from shared.options import BATCH_EXAMPLES

IMAGES = 200
MEMBERS = 5_000
DISTINCT = 300
WORKERS = 1


def run(repeat: int) -> dict:
    return measure(IMAGES, MEMBERS, repeat=min(repeat, 2))


def measure(images: int, members: int, *, repeat: int = 1) -> dict:
    distinct = [bulk.photo(seed) for seed in range(images)]
    small = bulk._zip(distinct)
    repeated = [scale._small_photo(seed) for seed in range(DISTINCT)]
    with tempfile.TemporaryDirectory(prefix="bench-examples-") as tmp:
        big = scale._archive(Path(tmp) / "big.zip", members, repeated).read_bytes()
        numbers = {
            "section": "examples",
            "workers": WORKERS,
            "distinct": _compare(Path(tmp) / "distinct", small, images, repeat, reuse=False),
            "repeated": _compare(Path(tmp) / "repeated", big, members, repeat, reuse=True),
            "load_average_1m": round(os.getloadavg()[0], 2),
        }
    _print(numbers)
    return numbers


def _compare(run_dir: Path, archive: bytes, count: int, repeat: int, *, reuse: bool) -> dict:
    """Interleaved runs with examples off and on; the best of each."""
    stack = bulk._Stack(run_dir, reuse_results=reuse)
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    try:
        for _ in range(repeat):
            for name, examples in (("off", 0), ("on", BATCH_EXAMPLES)):
                runs[name].append(_one_run(stack, archive, count, examples))
    finally:
        stack.stop()
    best = {name: min(results, key=lambda r: r["seconds"]) for name, results in runs.items()}
    return {
        "items": count,
        "runs": runs,
        "best": best,
        "on_vs_off": round(best["on"]["seconds"] / best["off"]["seconds"], 3),
    }


def _one_run(stack: bulk._Stack, archive: bytes, count: int, examples: int) -> dict:
    processes = stack.start_workers(WORKERS)
    try:
        started = time.perf_counter()
        response = requests.post(
            f"{stack.api_url}/batches",
            files={"archive": ("photos.zip", archive)},
            data={"examples": str(examples)},
            timeout=300,
        )
        response.raise_for_status()
        batch_id = response.json()["id"]
        items_done = _wait_items(stack, batch_id, count)
        doc = Client(stack.api_url).get_batch(batch_id).wait(timeout=3600).doc
        ended = time.perf_counter()
        rss = scale._peak_rss_mib(processes)
    finally:
        for process in processes:
            process.stop()
    if doc["status"] != "succeeded" or doc["counts"]["succeeded"] != count:
        raise RuntimeError(f"bench batch did not process every image: {doc}")
    if examples and not doc["result"].get("examples_url"):
        raise RuntimeError(f"bench batch has no examples: {doc}")
    return {
        "examples": examples,
        "seconds": round(ended - started, 2),
        "items_s": round(items_done - started, 2),
        "finalize_s": round(ended - items_done, 2),
        "peak_worker_rss_mib": rss,
    }


def _wait_items(stack: bulk._Stack, batch_id: str, count: int) -> float:
    """When every item had its outcome (polled every 0.2 s)."""
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        doc = requests.get(f"{stack.api_url}/batches/{batch_id}", timeout=10).json()
        counts = doc.get("counts", {})
        if counts.get("succeeded", 0) + counts.get("failed", 0) >= count:
            return time.perf_counter()
        time.sleep(0.2)
    raise RuntimeError(f"bench batch {batch_id} did not finish its items in an hour")


def _print(numbers: dict) -> None:
    print(f"\nexamples: off vs on (K={BATCH_EXAMPLES}), {numbers['workers']} worker")
    print(
        f"  {'archive':<34}{'items':>8}{'off s':>9}{'on s':>9}{'on/off':>8}"
        f"{'final off':>11}{'final on':>10}{'RSS on MiB':>12}"
    )
    for key, label in (("distinct", "distinct photos"), ("repeated", "repeated, reuse on")):
        row = numbers[key]
        off, on = row["best"]["off"], row["best"]["on"]
        print(
            f"  {label:<34}{row['items']:>8}{off['seconds']:>9}{on['seconds']:>9}"
            f"{row['on_vs_off']:>8}{off['finalize_s']:>11}{on['finalize_s']:>10}"
            f"{on['peak_worker_rss_mib']:>12}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.examples", description=__doc__)
    parser.add_argument("--images", type=int, default=IMAGES)
    parser.add_argument("--members", type=int, default=MEMBERS)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.images, args.members, repeat=args.repeat), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
