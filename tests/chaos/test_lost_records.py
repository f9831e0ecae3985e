"""Redis restarted from an append-only file missing its last writes, as after a host crash with
``appendfsync everysec``: the records and messages of submissions already answered 202 are
gone. The file is cut for real here, at the size it had before the submissions, while
redis-server is killed; on restart Redis replays what is left. Every accepted job and batch
comes back (keeper/restore.py): by its owner's poll, or by the API's keeper for one nobody
polls, and a worker started afterwards finishes each."""

from __future__ import annotations

import time
from pathlib import Path

from keeper.counters import REPAIR, counts
from shared.batches import batch_key
from shared.jobs import job_key
from stack.services import wait_until
from tests.chaos.faults import marked_png
from tests.helpers import zip_of

FAST_KEEPER = {"reconcile_every_s": 1, "reconcile_grace_s": 2, "restore_every_s": 1}


def _incr_aof(redis_dir: Path) -> Path:
    """The file Redis appends to now: the newest incremental file of its AOF directory."""
    files = sorted(
        (redis_dir / "appendonlydir").glob("*.incr.aof"),
        key=lambda p: int(p.name.split(".")[-3]),
    )
    assert files, f"no incremental AOF file in {redis_dir}"
    return files[-1]


def test_redis_restarted_from_an_aof_missing_its_last_writes_loses_no_accepted_work(make_stack):
    stack = make_stack(**FAST_KEEPER)
    aof = _incr_aof(stack.redis_server.dir)
    cut = aof.stat().st_size  # everything appended from here on is the lost suffix

    polled = stack.submit(marked_png(color=(200, 30, 30)))
    unpolled = stack.submit(marked_png(color=(30, 200, 30)))
    files = {f"img_{i}.png": marked_png(color=(20 * i, 40, 140)) for i in range(3)}
    batch_id = stack.submit_archive("photos.zip", zip_of(files), examples="0")
    for key in (job_key(polled), job_key(unpolled), batch_key(batch_id)):
        assert stack.redis.exists(key)

    stack.redis_server.kill()
    assert aof.stat().st_size > cut
    with aof.open("r+b") as fh:
        fh.truncate(cut)
    stack.redis_server.start()
    for key in (job_key(polled), job_key(unpolled), batch_key(batch_id)):
        assert not stack.redis.exists(key), f"{key} survived the cut"

    # The owners' polls find their records again (restored by the poll or, if it came
    # first, by the keeper's sweep); the job nobody polls comes back too.
    assert stack.job(polled)["status"] == "queued"
    assert stack.batch(batch_id)["status"] == "queued"
    wait_until(
        lambda: stack.redis.exists(job_key(unpolled)),
        timeout_s=30,
        what="the API's keeper restoring the job nobody polls",
    )
    repairs = counts(stack.redis, REPAIR)
    assert (repairs["job_restored"], repairs["batch_restored"]) == (2, 1), repairs

    started = time.monotonic()
    stack.start_worker("w1")
    for job_id in (polled, unpolled):
        doc = stack.wait_finished(job_id, timeout_s=180)
        assert doc["status"] == "succeeded", doc
    batch = stack.wait_batch_finished(batch_id)
    assert batch["status"] == "succeeded" and batch["counts"]["succeeded"] == 3, batch
    print(
        f"\nAOF cut: three accepted records restored and run in {time.monotonic() - started:.1f} s"
    )
    wait_until(stack.queue_is_drained, timeout_s=30, what="empty queues")
    assert not list(stack.store().list_keys("accepted/")), "specs left after their records ended"
