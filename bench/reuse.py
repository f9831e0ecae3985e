"""Result reuse: an archive whose members are half byte-duplicates against an archive of as
many distinct members, end to end through the real service (gunicorn API, one Celery worker,
redis-server, SeaweedFS) with ``REUSE_RESULTS`` on, reported as a ratio of wall times.

A third run sends the half-duplicate archive again: every member is then reused, which shows
the time spent outside the model (upload, expansion, copies, finalization).

The duplicates are shuffled among the originals, so some share a chunk with their twin (one
model pass in the chunk) and most find it in the result index (server-side copies). The
distinct and the half-duplicate archives have photos of their own: the second reuses nothing
of the first. Run it with
``python -m bench --only reuse`` or ``python -m bench.reuse [--images N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import requests

from bench.bulk import CHUNK, SIZE, _Stack, _zip, photo

IMAGES = 200
# Seeds of the duplicate archive's photos start here, far from the distinct archive's.
DUPLICATES_SEED = 100_000


def run(repeat: int) -> dict:
    del repeat  # one run of each archive: minutes on a small machine
    return measure(IMAGES)


def measure(count: int) -> dict:
    distinct = [photo(seed) for seed in range(count)]
    originals = [photo(DUPLICATES_SEED + seed) for seed in range(count // 2)]
    halved = originals + originals[: count - len(originals)]
    random.Random(0).shuffle(halved)  # nosec B311: a fixed order, not a secret
    with tempfile.TemporaryDirectory(prefix="bench-reuse-") as tmp:
        stack = _Stack(Path(tmp), reuse_results=True)
        try:
            all_distinct = stack.throughput(_zip(distinct), count, workers=1)
            half_duplicates = stack.throughput(_zip(halved), count, workers=1)
            # The same archive again: every member's result is in the index by now, so
            # this is the part of the time that no model pass is spent on.
            all_reused = stack.throughput(_zip(halved), count, workers=1)
            reused = _reused_items(stack.api_url, half_duplicates.pop("batch_id"))
            all_reused["reused_items"] = _reused_items(stack.api_url, all_reused.pop("batch_id"))
            all_distinct.pop("batch_id")
        finally:
            stack.stop()
    numbers = {
        "section": "reuse",
        "images": count,
        "distinct_in_half_duplicates": len(originals),
        "image_size": list(SIZE),
        "batch_chunk": CHUNK,
        "all_distinct": all_distinct,
        "half_duplicates": {**half_duplicates, "reused_items": reused},
        "all_reused": all_reused,
        "time_ratio": round(half_duplicates["seconds"] / all_distinct["seconds"], 3),
        "all_reused_time_ratio": round(all_reused["seconds"] / all_distinct["seconds"], 3),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    _print(numbers)
    return numbers


def _reused_items(api: str, batch_id: str) -> int:
    reused, cursor = 0, "0"
    while cursor is not None:
        page = requests.get(
            f"{api}/batches/{batch_id}/items", params={"cursor": cursor, "limit": 500}, timeout=30
        ).json()
        reused += sum(1 for item in page["items"] if item["reused"])
        cursor = page["next_cursor"]
    return reused


def _print(numbers: dict) -> None:
    distinct, halved = numbers["all_distinct"], numbers["half_duplicates"]
    print(f"\nreuse: {numbers['images']} photo-like JPEGs, chunk {CHUNK}, 1 worker")
    print(f"  {'archive':<40}{'seconds':>10}{'images/s':>10}")
    print(f"  {'all distinct':<40}{distinct['seconds']:>10}{distinct['images_per_s']:>10}")
    label = f"half duplicates ({halved['reused_items']} reused)"
    print(f"  {label:<40}{halved['seconds']:>10}{halved['images_per_s']:>10}")
    again = numbers["all_reused"]
    label = f"half duplicates again ({again['reused_items']} reused)"
    print(f"  {label:<40}{again['seconds']:>10}{again['images_per_s']:>10}")
    print(
        f"  time ratio half-duplicates / distinct = {numbers['time_ratio']}, "
        f"all reused / distinct = {numbers['all_reused_time_ratio']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reuse", description=__doc__)
    parser.add_argument("--images", type=int, default=IMAGES)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.images), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
