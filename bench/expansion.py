"""Expansion throughput: members/s from the start of an archive's expansion to its end
(every member an item, every block's pack uploaded), through the real stack (gunicorn API,
Celery workers, redis-server, SeaweedFS) with two worker processes.

The archive is a zip of small JPEGs (about 5 KB each; a few hundred distinct ones, repeated
under distinct names). The chunks that expansion dispatches compete for the same workers;
once expansion has ended the batch is canceled, since model work is not measured here.
Run it with ``python -m bench.expansion [--members N] [--workers N]``.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
import zipfile
from datetime import datetime
from pathlib import Path

import requests

from bench.bulk import _Stack, photo
from shared.batches import batch_key
from stack.services import wait_until
from worker.batches.checkpoints import expansion_key

MEMBERS = 100_000
DISTINCT = 300
SIZE = (96, 72)


def small_jpegs_zip(members: int) -> bytes:
    photos = [photo(seed, SIZE) for seed in range(DISTINCT)]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for index in range(members):
            archive.writestr(f"photos/{index:06d}.jpg", photos[index % DISTINCT])
    return buffer.getvalue()


def measure(members: int, workers: int) -> dict:
    archive = small_jpegs_zip(members)
    with tempfile.TemporaryDirectory(prefix="bench-expansion-") as tmp:
        stack = _Stack(Path(tmp), reuse_results=True)
        processes = []
        try:
            processes = stack.start_workers(workers)
            response = requests.post(
                f"{stack.api_url}/batches",
                files={"archive": ("photos.zip", archive)},
                timeout=300,
            )
            response.raise_for_status()
            batch_id = response.json()["id"]
            wait_until(
                lambda: stack.client.hget(batch_key(batch_id), "expanded") == b"1",
                timeout_s=1800,
                what="expansion to end",
            )
            ended = time.time()
            raw = stack.client.hgetall(batch_key(batch_id))
            batch = {k.decode(): v.decode() for k, v in raw.items()}
            # From the planning task's start (the upload is not expansion) to its end.
            elapsed = ended - datetime.fromisoformat(batch["started_at"]).timestamp()
            state = {
                k.decode(): v.decode()
                for k, v in stack.client.hgetall(expansion_key(batch_id)).items()
                if not k.startswith((b"cursor:", b"gen:", b"done:"))
            }
            requests.delete(f"{stack.api_url}/batches/{batch_id}", timeout=30)
        finally:
            for process in processes:
                process.stop()
            stack.stop()
    if int(batch["total"]) != members:
        raise RuntimeError(f"expansion made {batch['total']} items of {members}")
    return {
        "section": "expansion",
        "members": members,
        "archive_bytes": len(archive),
        "workers": workers,
        "seconds": round(elapsed, 2),
        "members_per_s": round(members / elapsed, 1),
        "expansion": state,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--members", type=int, default=MEMBERS)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(measure(args.members, args.workers), indent=2))


if __name__ == "__main__":
    main()
