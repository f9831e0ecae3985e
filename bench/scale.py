"""Dataset scale: one archive of a million small JPEGs through the real service (gunicorn API,
two Celery workers, redis-server, SeaweedFS) at default settings.

Two runs in one stack:

- **expansion at scale** (``--members``, default 1,000,000): the archive is streamed up, the
  expansion is timed from the moment the batch starts expanding to the moment it has recorded
  its last member (members/s), and Redis is sampled all along (``used_memory`` and the memory of
  the batch's own keys, per item). The batch is then canceled (its queued items end
  ``canceled`` block by block) and finalized: its manifest has one line per member. At the
  cancel a batch of 10 photos of another token is submitted: the time until its first item
  has run says what a canceled million costs the next batch (chunk turns, docs/design.md
  "Fair share").
- **fairness**: token ``alice`` submits three batches and ``bob`` one (``--fair`` members
  each); while all four run, each token's share of the chunk claims is counted.
- **the full path** (``--full``, default 20,000 members): an archive of as many members, most
  of them byte-duplicates of ``--distinct`` photos, run to the end: figures for every member,
  result reuse keeping model work to the distinct photos.

For both: total time, peak worker RSS (the largest VmHWM of any worker process), and whether
any task hit a time limit (the workers' logs). Run it with ``python -m bench --only scale`` or
``python -m bench.scale [--members N] [--full N] [--distinct N]``. It takes a while: the
1M-member zip is about 1.5 GB on disk.
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
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench.bulk import CHUNK, _Stack
from client.api import Client
from client.errors import Conflict
from shared.batches import batch_key
from stack.services import ManagedProcess, group_members

MEMBERS = 1_000_000
FULL = 20_000
FAIR = 400
TOKENS = {"alice": "alice-bench-token", "bob": "bob-bench-token"}
DISTINCT = 300
SIZE = (64, 48)
FULL_SEEDS = 1_000_000
TIME_LIMIT_MARKERS = ("TimeLimitExceeded", "Hard time limit", "SoftTimeLimitExceeded")


def run(repeat: int) -> dict:
    del repeat  # one run of each: minutes, not seconds
    return measure(MEMBERS, FULL, DISTINCT)


def measure(members: int, full: int, distinct: int, workers: int = 2, fair: int = FAIR) -> dict:
    photos = [_small_photo(seed) for seed in range(distinct)]
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        started = time.perf_counter()
        big = _archive(Path(tmp) / "big.zip", members, photos)
        build_s = time.perf_counter() - started
        tokens = ",".join(f"{name}:{token}" for name, token in TOKENS.items())
        stack = _Stack(Path(tmp) / "stack", reuse_results=True, api_tokens=tokens)
        processes = stack.start_workers(workers)
        try:
            next_zip = _archive(Path(tmp) / "next.zip", 10, photos[:10])
            expansion = _expansion_run(stack, big, members, next_zip)
            big.unlink()
            fairness = _fairness_run(stack, Path(tmp), fair, distinct)
            # Photos of their own: the full run reuses nothing of the first batch's.
            fresh = [_small_photo(FULL_SEEDS + seed) for seed in range(distinct)]
            small = _archive(Path(tmp) / "full.zip", full, fresh)
            full_path = _full_run(stack, small, full)
            rss = _peak_rss_mib(processes)
            limits = _time_limit_lines(stack.run_dir)
        finally:
            for process in processes:
                process.stop()
            stack.stop()
    numbers = {
        "section": "scale",
        "workers": workers,
        "image_size": list(SIZE),
        "distinct_photos": distinct,
        "archive_build_s": round(build_s, 1),
        "expansion": expansion,
        "full_path": full_path,
        "fairness": fairness,
        "peak_worker_rss_mib": rss,
        "time_limit_log_lines": limits,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    _print(numbers)
    return numbers


def _small_photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    width, height = SIZE
    base = np.linspace(0, 1, width)[None, :, None] * rng.uniform(40, 220, 3)
    pixels = base + rng.normal(0, 12, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _archive(path: Path, members: int, photos: list[bytes]) -> Path:
    """A zip of ``members`` JPEGs named like ImageNet's training set, cycling over ``photos``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for index in range(members):
            synset = index // 1300
            name = f"n{synset:08d}/n{synset:08d}_{index}.JPEG"
            archive.writestr(name, photos[index % len(photos)])
    return path


class _RedisSampler:
    """Samples Redis's used_memory (and the batch's own keys) until stopped; keeps peaks."""

    def __init__(self, stack: _Stack) -> None:
        self.redis = stack.client
        self.baseline = int(self.redis.info("memory")["used_memory"])
        self.peak = self.baseline
        self.batch_id: str | None = None
        self.batch_keys_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self.peak = max(self.peak, int(self.redis.info("memory")["used_memory"]))

    def batch_keys_bytes(self) -> tuple[int, int]:
        """(bytes, keys) of every Redis key of the batch, by MEMORY USAGE."""
        total = count = 0
        pattern = f"{batch_key(self.batch_id or '')}*"
        for key in self.redis.scan_iter(match=pattern, count=1000):
            total += int(self.redis.memory_usage(key, samples=0) or 0)
            count += 1
        self.batch_keys_peak = max(self.batch_keys_peak, total)
        return total, count

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _client(stack: _Stack, owner: str = "alice") -> Client:
    return Client(stack.api_url, TOKENS[owner], timeout=60)


def _expansion_run(stack: _Stack, archive: Path, members: int, next_zip: Path) -> dict:
    client = _client(stack)
    sampler = _RedisSampler(stack)
    started = time.perf_counter()
    batch = client.batch(archive)
    upload_s = time.perf_counter() - started
    sampler.batch_id = batch.id
    expanding_at = expanded_at = None
    fields = batch_key(batch.id)
    while expanded_at is None:
        status, expanded = stack.client.hmget(fields, "status", "expanded")
        now = time.perf_counter()
        if expanding_at is None and status not in (None, b"queued"):
            expanding_at = now
        if expanded == b"1":
            expanded_at = now
        if now - started > 7200:
            raise RuntimeError(f"expansion of {batch.id} did not end in 2 h")
        time.sleep(0.2)
    batch_bytes, batch_keys = sampler.batch_keys_bytes()
    doc = batch.refresh().doc
    total = doc["counts"]["total"]
    cancel_started = time.perf_counter()
    batch.cancel()
    following = _client(stack, "bob").batch(next_zip, examples=0)
    while following.refresh().doc["counts"]["succeeded"] < 1:
        if time.perf_counter() - cancel_started > 3600:
            raise RuntimeError(f"the batch after the cancel, {following.id}, ran nothing in 1 h")
        time.sleep(0.1)
    next_first_item_s = time.perf_counter() - cancel_started
    batch.wait(timeout=3600, interval=1.0)
    done = time.perf_counter()
    following.wait(timeout=3600, interval=1.0)
    sampler.stop()
    manifest_lines = _manifest_lines(client, batch.doc)
    expansion_s = expanded_at - (expanding_at or started)
    return {
        "batch_id": batch.id,
        "members": members,
        "total_items": total,
        "upload_s": round(upload_s, 1),
        "expansion_s": round(expansion_s, 1),
        "members_per_s": round(total / expansion_s, 1) if expansion_s else None,
        "items_processed_before_cancel": doc["counts"]["succeeded"] + doc["counts"]["running"],
        "cancel_to_finalized_s": round(done - cancel_started, 1),
        "cancel_to_next_batch_first_item_s": round(next_first_item_s, 1),
        "total_s": round(done - started, 1),
        "status": batch.status,
        "manifest_lines": manifest_lines,
        "redis_used_memory_peak_bytes_per_item": round((sampler.peak - sampler.baseline) / total),
        "redis_batch_keys_bytes_per_item": round(batch_bytes / total, 1),
        "redis_batch_keys": batch_keys,
    }


def _fairness_run(stack: _Stack, tmp: Path, members: int, distinct: int) -> dict:
    """Three batches of alice's and one of bob's, submitted together: each token's chunk
    claims (``chunks_claimed`` on each batch record) from the moment all four have one until
    the first of them has claimed its last chunk."""
    archives = [
        _archive(
            tmp / f"fair{n}.zip",
            members,
            [_small_photo(2 * FULL_SEEDS + n * distinct + i) for i in range(distinct)],
        )
        for n in range(4)
    ]
    owners = ["alice", "alice", "alice", "bob"]
    batches = [
        _client(stack, owner).batch(path, examples=0)
        for owner, path in zip(owners, archives, strict=True)
    ]
    chunks = -(-members // CHUNK)
    started = time.perf_counter()
    samples = []
    while time.perf_counter() - started < 7200:
        counts = [int(stack.client.hget(batch_key(b.id), "chunks_claimed") or 0) for b in batches]
        samples.append(counts)
        if max(counts) >= chunks:
            break
        time.sleep(0.1)
    first = next(c for c in samples if min(c) >= 1)
    last = samples[-1]
    grown = [b - a for a, b in zip(first, last, strict=True)]
    for batch in batches:
        with contextlib.suppress(Conflict):  # it had ended already
            batch.cancel()
    return {
        "members_per_batch": members,
        "chunk": CHUNK,
        "claims_alice_3_batches": sum(grown[:3]),
        "claims_bob_1_batch": grown[3],
        "alice_per_batch": grown[:3],
        "bob_share": round(grown[3] / max(1, sum(grown)), 3),
        "window_s": round(time.perf_counter() - started, 1),
    }


def _full_run(stack: _Stack, archive: Path, members: int) -> dict:
    client = _client(stack)
    started = time.perf_counter()
    batch = client.batch(archive)
    batch.wait(timeout=7200, interval=1.0)
    elapsed = time.perf_counter() - started
    counts = batch.doc["counts"]
    reused = sum(1 for item in batch.items() if item.doc.get("reused"))
    return {
        "batch_id": batch.id,
        "members": members,
        "status": batch.status,
        "counts": counts,
        "reused": reused,
        "seconds": round(elapsed, 1),
        "images_per_s": round(counts["succeeded"] / elapsed, 1),
        "manifest_lines": _manifest_lines(client, batch.doc),
    }


def _manifest_lines(client: Client, doc: dict) -> int:
    """Lines over every manifest shard of the batch's result."""
    result = doc.get("result") or {}
    shards = result.get("shards") or [{"manifest_url": result.get("manifest_url")}]
    return sum(client.fetch(shard["manifest_url"]).count(b"\n") for shard in shards)


def _peak_rss_mib(processes: list[ManagedProcess]) -> float:
    """The largest VmHWM (peak resident set) of any process of the workers' groups."""
    peak = 0
    for process in processes:
        for pid in group_members(process.pid or 0):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
    return round(peak / 1024, 1)


def _time_limit_lines(run_dir: Path) -> list[str]:
    found = []
    for log in run_dir.glob("bench*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if any(marker in line for marker in TIME_LIMIT_MARKERS):
                found.append(f"{log.name}: {line[:200]}")
    return found


def _print(numbers: dict) -> None:
    exp, full = numbers["expansion"], numbers["full_path"]
    print(f"\nscale: {numbers['workers']} workers, {numbers['distinct_photos']} distinct photos")
    print(
        f"  expansion: {exp['total_items']} members in {exp['expansion_s']} s = "
        f"{exp['members_per_s']} members/s (upload {exp['upload_s']} s); "
        f"canceled → finalized in {exp['cancel_to_finalized_s']} s, the next batch's first "
        f"item {exp['cancel_to_next_batch_first_item_s']} s after the cancel; "
        f"manifest lines {exp['manifest_lines']}"
    )
    print(
        f"  redis: {exp['redis_batch_keys_bytes_per_item']} B/item in the batch's "
        f"{exp['redis_batch_keys']} keys; used_memory peak "
        f"{exp['redis_used_memory_peak_bytes_per_item']} B/item (queue messages included)"
    )
    print(
        f"  full path: {full['members']} members, {full['counts']}, reused {full['reused']}, "
        f"{full['seconds']} s = {full['images_per_s']} images/s"
    )
    fair = numbers["fairness"]
    print(
        f"  fairness: while all four ran, alice's 3 batches claimed "
        f"{fair['claims_alice_3_batches']} chunks {fair['alice_per_batch']}, bob's one "
        f"{fair['claims_bob_1_batch']} (bob's share {fair['bob_share']})"
    )
    print(
        f"  peak worker RSS {numbers['peak_worker_rss_mib']} MiB; time-limit log lines: "
        f"{len(numbers['time_limit_log_lines'])}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--members", type=int, default=MEMBERS)
    parser.add_argument("--full", type=int, default=FULL)
    parser.add_argument("--distinct", type=int, default=DISTINCT)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fair", type=int, default=FAIR)
    args = parser.parse_args(argv)
    numbers = measure(args.members, args.full, args.distinct, args.workers, args.fair)
    print(json.dumps(numbers, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
