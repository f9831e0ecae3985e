"""The keeper's reconciler (keeper/reconciler.py) deciding on a real redis-server: what it
leaves alone (a record a message, an unacknowledged delivery or an outbox entry will move),
what it repairs once the grace period has passed, and that every repair is counted. Messages
are real kombu messages sent by the API's own producer; time is a test clock."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from keeper.backlog import backlog
from keeper.counters import REPAIR, counts
from keeper.reconciler import LOCK_KEY, SUSPECTS_KEY, Reconciler, maybe_reconcile
from shared.batches import Batch, BatchStatus, BatchStore, batch_key
from shared.heartbeat import heartbeat_key
from shared.jobs import Job, JobStatus, JobStore, job_key, new_job_id
from shared.leases import LeaseStore
from shared.queue import (
    BATCH_QUEUE,
    CHUNK_PRIORITY,
    EXPAND_BATCH,
    EXPAND_BATCH_SHARD,
    FINALIZE_BATCH,
    JOBS_QUEUE,
    RENDER_JOB,
    RUN_BATCH_TURN,
    UNACKED_KEY,
    make_producer,
)
from shared.records import OPEN_KEY
from shared.schedule import TURNS_KEY, Scheduler
from shared.webhooks import OUTBOX_KEY

GRACE_S = 60.0


class Sends(list):
    """A fake publish: records (task, args, queue, priority, task_id)."""

    def __call__(self, task, *, args, queue, priority=None, task_id=None) -> None:
        self.append((task, args, queue, priority, task_id))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rig(redis_client, make_settings):
    settings = make_settings(reconcile_grace_s=GRACE_S, batch_window=4)
    sends, clock = Sends(), Clock()
    reconciler = Reconciler(redis_client, settings, sends, clock=clock)
    producer = make_producer(settings)
    yield reconciler, sends, clock, producer
    producer.close()


def _job(redis_client, status: JobStatus = JobStatus.QUEUED, **fields) -> str:
    job_id = new_job_id()
    JobStore(redis_client, ttl_s=3600).create(
        Job(id=job_id, status=status, options={}, input_key=f"inputs/{job_id}", **fields)
    )
    return job_id


def _batch(redis_client, **fields) -> str:
    batch_id = new_job_id()
    BatchStore(redis_client, ttl_s=3600).create(
        Batch(id=batch_id, status=BatchStatus.RUNNING, options={}, source={}, owner="alice")
    )
    if fields:
        redis_client.hset(batch_key(batch_id), mapping=fields)
    return batch_id


def _twice(reconciler, clock, apart_s: float = GRACE_S) -> dict[str, int]:
    """Two sweeps ``apart_s`` apart; the second one's repairs."""
    assert reconciler.sweep() == {}, "nothing is repaired at first sight"
    clock.now += apart_s
    return reconciler.sweep()


def test_a_job_whose_message_is_gone_is_sent_again_after_the_grace_period(rig, redis_client):
    reconciler, sends, clock, _ = rig
    job_id = _job(redis_client)
    assert reconciler.sweep() == {} and sends == []
    clock.now += GRACE_S - 1
    assert reconciler.sweep() == {} and sends == [], "not before the grace period"
    clock.now += 1
    assert reconciler.sweep() == {"job_requeued": 1}
    assert sends == [(RENDER_JOB, [job_id], JOBS_QUEUE, None, None)]
    assert counts(redis_client, REPAIR)["job_requeued"] == 1
    assert redis_client.hlen(SUSPECTS_KEY) == 0, "repaired, forgotten"


def test_a_running_job_whose_message_is_gone_is_sent_again(rig, redis_client):
    reconciler, sends, clock, _ = rig
    job_id = _job(redis_client, JobStatus.RUNNING)
    assert _twice(reconciler, clock) == {"job_requeued": 1}
    assert sends == [(RENDER_JOB, [job_id], JOBS_QUEUE, None, None)]


def test_a_running_job_whose_node_runs_a_job_is_not_run_twice(rig, redis_client):
    # Its message lost from Redis (an older AOF) while a live process of its node holds a
    # render_job lease: that process is running it.
    reconciler, sends, clock, _ = rig
    job_id = _job(redis_client, JobStatus.RUNNING, worker="w1@host")
    leases = LeaseStore(redis_client, ttl_s=60)
    holder = "w1@host:7.abcd"
    redis_client.set(heartbeat_key(holder), "{}", ex=60)
    fence = leases.acquire("task-1", holder=holder, node="w1@host", task=RENDER_JOB).fence
    assert _twice(reconciler, clock) == {}
    # That process ends (lease given back) and nothing runs the job any more.
    leases.release(fence)
    assert _twice(reconciler, clock) == {"job_requeued": 1}
    assert sends == [(RENDER_JOB, [job_id], JOBS_QUEUE, None, None)]


def test_a_job_with_a_waiting_or_unacknowledged_message_is_left_alone(rig, redis_client):
    reconciler, sends, clock, producer = rig
    waiting = _job(redis_client)
    producer.send_task(RENDER_JOB, args=[waiting], queue=JOBS_QUEUE)
    running = _job(redis_client, JobStatus.RUNNING)
    producer.send_task(RENDER_JOB, args=[running], queue=JOBS_QUEUE)
    # As kombu keeps a delivered message: taken from its list into the unacked hash.
    raw = redis_client.lpop(JOBS_QUEUE)
    redis_client.hset(UNACKED_KEY, str(uuid.uuid4()), json.dumps([json.loads(raw), "", "jobs"]))
    assert redis_client.llen(JOBS_QUEUE) == 1
    for _ in range(3):
        assert reconciler.sweep() == {}
        clock.now += GRACE_S
    assert sends == []
    assert backlog(redis_client, reconciler.settings)["for_workers"] == 2


def test_a_job_that_finds_its_message_again_between_sweeps_is_not_repaired(rig, redis_client):
    reconciler, sends, clock, producer = rig
    job_id = _job(redis_client)
    assert reconciler.sweep() == {}
    producer.send_task(RENDER_JOB, args=[job_id], queue=JOBS_QUEUE)  # e.g. a slow publish
    clock.now += GRACE_S
    assert reconciler.sweep() == {}
    redis_client.delete(JOBS_QUEUE)  # lost afterwards: the grace period starts again
    clock.now += GRACE_S
    assert reconciler.sweep() == {}
    assert sends == []


def test_ended_jobs_are_left_alone(rig, redis_client):
    reconciler, sends, clock, _ = rig
    for status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED):
        _job(redis_client, status)
    assert _twice(reconciler, clock) == {}
    assert sends == []


def test_a_batch_finalizing_but_never_closed_is_finalized_again_once(rig, redis_client):
    reconciler, sends, clock, producer = rig
    lost = _batch(redis_client, finalizing=1)
    closed = _batch(redis_client, finalizing=1, result="{}")
    _batch(redis_client)  # running, not finalizing: its chunks move it
    finalizing = _batch(redis_client, finalizing=1)
    producer.send_task(FINALIZE_BATCH, args=[finalizing], queue=BATCH_QUEUE)
    assert _twice(reconciler, clock) == {"finalize": 1}
    assert sends == [(FINALIZE_BATCH, [lost], BATCH_QUEUE, None, None)]
    assert closed not in json.dumps(sends)
    # The re-sent message was lost too: sent again only once REFINALIZE_EVERY_S has passed
    # (the key a redelivered chunk's re-send shares), never twice at once.
    assert _twice(reconciler, clock, apart_s=GRACE_S) == {}
    redis_client.delete(f"{batch_key(lost)}:refinalize")  # expired
    assert reconciler.sweep() == {"finalize": 1}
    assert counts(redis_client, REPAIR)["finalize"] == 2


def test_a_canceled_or_failed_batch_whose_finalize_was_lost_is_finalized_again(rig, redis_client):
    """A canceled batch (or one whose expansion failed) is final before its manifest is
    written: its finalize can be lost like any other, and it is sent again. One whose close
    gave up (storage gone past its retries: ``close_failed``) is not sent again for ever."""
    reconciler, sends, clock, _ = rig
    canceled = _batch(redis_client, status="canceled", finalizing=1)
    failed = _batch(redis_client, status="failed", finalizing=1)
    gave_up = _batch(redis_client, finalizing=1)
    BatchStore(redis_client, ttl_s=3600).fail(gave_up, code="storage_unavailable", message="m")
    closed = _batch(redis_client, status="canceled", finalizing=1, result="{}")
    assert _twice(reconciler, clock) == {"finalize": 2}
    assert sorted(args[0] for _, args, *_ in sends) == sorted([canceled, failed])
    assert gave_up not in json.dumps(sends) and closed not in json.dumps(sends)


def test_a_sweep_reads_the_open_index_not_the_keyspace(rig, redis_client):
    """Records enter the open index when created and leave it once a sweep finds them ended
    with nothing left to send; a Redis written before the index has its records added once."""
    reconciler, sends, clock, producer = rig
    older = new_job_id()  # a record written before the index existed: not in it
    redis_client.hset(job_key(older), mapping={"id": older, "status": "queued"})
    done = _job(redis_client, JobStatus.SUCCEEDED)
    calling = _job(redis_client, JobStatus.FAILED, callback_url="https://example.com/h")
    redis_client.hset(job_key(calling), "callback_state", "pending")
    redis_client.zadd(OUTBOX_KEY, {job_key(calling): 0})
    waiting = _job(redis_client)
    producer.send_task(RENDER_JOB, args=[waiting], queue=JOBS_QUEUE)
    unclosed = _batch(redis_client, status="canceled", finalizing=1)
    producer.send_task(FINALIZE_BATCH, args=[unclosed], queue=BATCH_QUEUE)
    assert not redis_client.sismember(OPEN_KEY, job_key(older))
    assert redis_client.sismember(OPEN_KEY, job_key(done))

    assert reconciler.sweep() == {}
    members = {m.decode() for m in redis_client.smembers(OPEN_KEY)}
    assert members == {job_key(older), job_key(calling), job_key(waiting), batch_key(unclosed)}
    clock.now += GRACE_S
    assert reconciler.sweep() == {"job_requeued": 1}, "the older record is checked too"
    assert sends == [(RENDER_JOB, [older], JOBS_QUEUE, None, None)]
    # Its webhook delivered, the failed job leaves; a record gone (expired) leaves too.
    redis_client.hset(job_key(calling), "callback_state", "delivered")
    redis_client.delete(job_key(waiting))
    reconciler.sweep()
    members = {m.decode() for m in redis_client.smembers(OPEN_KEY)}
    assert members == {job_key(older), batch_key(unclosed)}
    # The keyspace is scanned once: a record written by hand afterwards is not seen.
    hidden = new_job_id()
    redis_client.hset(job_key(hidden), mapping={"id": hidden, "status": "queued"})
    reconciler.sweep()
    assert not redis_client.sismember(OPEN_KEY, job_key(hidden))


def test_a_batch_whose_expansion_message_is_gone_is_expanded_again(rig, redis_client):
    reconciler, sends, clock, producer = rig
    queued = _batch(redis_client, status="queued")
    expanding = _batch(redis_client, status="expanding")
    shards_waiting = _batch(redis_client, status="expanding")
    producer.send_task(EXPAND_BATCH_SHARD, args=[shards_waiting, 0, 1], queue=BATCH_QUEUE)
    assert _twice(reconciler, clock) == {"expand": 2}
    assert sorted(sends) == sorted(
        (EXPAND_BATCH, [b], BATCH_QUEUE, None, None) for b in (queued, expanding)
    )


def test_a_pending_webhook_missing_from_the_outbox_is_put_back(rig, redis_client):
    reconciler, _, clock, _ = rig
    lost = _job(redis_client, JobStatus.SUCCEEDED, callback_url="https://example.com/hook")
    redis_client.hset(job_key(lost), "callback_state", "pending")
    queued = _job(redis_client, JobStatus.FAILED, callback_url="https://example.com/hook")
    redis_client.hset(job_key(queued), "callback_state", "pending")
    redis_client.zadd(OUTBOX_KEY, {job_key(queued): clock.now + 30})
    delivered = _job(redis_client, JobStatus.SUCCEEDED, callback_url="https://example.com/hook")
    redis_client.hset(job_key(delivered), "callback_state", "delivered")
    assert _twice(reconciler, clock) == {"webhook": 1}
    assert redis_client.zscore(OUTBOX_KEY, job_key(lost)) == clock.now
    assert redis_client.zscore(OUTBOX_KEY, job_key(queued)) == clock.now - GRACE_S + 30
    assert redis_client.zscore(OUTBOX_KEY, job_key(delivered)) is None


def test_batch_turns_lost_are_sent_again_and_counted(rig, redis_client):
    reconciler, sends, _, _ = rig
    batch_id = _batch(redis_client)
    scheduler = Scheduler(redis_client, reconciler.settings)
    turns = scheduler.add(batch_id, [[0, 1], [2, 3], [4, 5]])  # registered, never sent
    assert len(turns) == 3
    assert reconciler.sweep() == {}, "young turns may still be on their way"
    # Registered long ago and in no queue: lost between registering and sending.
    redis_client.zadd(TURNS_KEY, dict.fromkeys(turns, time.time() - 3600))
    assert backlog(redis_client, reconciler.settings)["scheduled_chunks"] == 0
    assert reconciler.sweep() == {"turn_resent": 3}
    assert sorted(s[4] for s in sends) == sorted(turns), "under the same ids"
    assert all(s[:4] == (RUN_BATCH_TURN, [], BATCH_QUEUE, CHUNK_PRIORITY) for s in sends)
    assert counts(redis_client, REPAIR)["turn_resent"] == 3


def test_chunks_beyond_the_turns_count_in_the_backlog(rig, redis_client):
    reconciler, _, _, _ = rig
    batch_id = _batch(redis_client)
    scheduler = Scheduler(redis_client, reconciler.settings)
    scheduler.add(batch_id, [[i] for i in range(10)])  # window 4: 6 chunks without a turn
    waiting = backlog(redis_client, reconciler.settings)
    assert waiting["scheduled_chunks"] == 6 and waiting["scheduled_items"] == 10
    assert waiting["for_workers"] == 6  # the 4 turns were never sent: not in a queue


def test_one_process_sweeps_per_period(rig, redis_client):
    reconciler, _, _, _ = rig
    assert maybe_reconcile(reconciler, "api@a:1") == {}
    assert maybe_reconcile(reconciler, "api@b:2") is None
    assert redis_client.get(LOCK_KEY) == b"api@a:1"
