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
# Seeds of the duplicate archive's photos start here, far from the distinct archive's; each
# round shifts both by ROUND_SEEDS, so no round reuses another's results.
DUPLICATES_SEED = 100_000
ROUND_SEEDS = 1_000_000
ROUNDS = 2


def run(repeat: int) -> dict:
    del repeat  # ROUNDS of each archive: a few minutes on a small machine
    return measure(IMAGES)


def measure(count: int, rounds: int = ROUNDS) -> dict:
    """Each archive ``rounds`` times, interleaved, the fastest of each kept: the machine
    may be shared, and a busy moment must not land on one kind only."""
    runs: dict[str, list[dict]] = {"all_distinct": [], "half_duplicates": [], "all_reused": []}
    with tempfile.TemporaryDirectory(prefix="bench-reuse-") as tmp:
        stack = _Stack(Path(tmp), reuse_results=True)
        try:
            for round_ in range(rounds):
                for name, run_ in _round(stack, count, round_ * ROUND_SEEDS).items():
                    runs[name].append(run_)
        finally:
            stack.stop()
    best = {name: min(found, key=lambda r: r["seconds"]) for name, found in runs.items()}
    numbers = {
        "section": "reuse",
        "images": count,
        "distinct_in_half_duplicates": count // 2,
        "image_size": list(SIZE),
        "batch_chunk": CHUNK,
        "rounds": rounds,
        **best,
        "seconds_of_each_round": {n: [r["seconds"] for r in found] for n, found in runs.items()},
        "time_ratio": round(
            best["half_duplicates"]["seconds"] / best["all_distinct"]["seconds"], 3
        ),
        "all_reused_time_ratio": round(
            best["all_reused"]["seconds"] / best["all_distinct"]["seconds"], 3
        ),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    _print(numbers)
    return numbers


def _round(stack: _Stack, count: int, seed: int) -> dict[str, dict]:
    distinct = [photo(seed + n) for n in range(count)]
    originals = [photo(seed + DUPLICATES_SEED + n) for n in range(count // 2)]
    halved = originals + originals[: count - len(originals)]
    random.Random(seed).shuffle(halved)  # nosec B311: a fixed order, not a secret
    runs = {
        "all_distinct": stack.throughput(_zip(distinct), count, workers=1),
        "half_duplicates": stack.throughput(_zip(halved), count, workers=1),
        # The same archive again: every member's result is in the index by now, so this is
        # the part of the time that no model pass is spent on.
        "all_reused": stack.throughput(_zip(halved), count, workers=1),
    }
    for found in runs.values():
        found["reused_items"] = _reused_items(stack.api_url, found.pop("batch_id"))
    return runs


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
    print(
        f"\nreuse: {numbers['images']} photo-like JPEGs, chunk {CHUNK}, 1 worker, "
        f"best of {numbers['rounds']} rounds each"
    )
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
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.images, args.rounds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
