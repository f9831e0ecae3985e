"""Storage retries waiting out their backoff in Redis (shared/delayed.py) and sent again by
the keeper when due (keeper/retries.py), on a real redis-server through the API's own Celery
producer: the message that comes back is the one Celery's retry would have published (same
task id, arguments, queue and priority; ``retries`` one more; the first send time kept), and
while it waits the reconciler counts it as the message that will move its record."""

from __future__ import annotations

import json

import pytest

from keeper.backlog import backlog
from keeper.reconciler import Reconciler, celery_sender
from keeper.retries import send_due
from shared.delayed import Delayed, count, hold_back, take_due
from shared.jobs import Job, JobStatus, JobStore, new_job_id
from shared.queue import (
    BATCH_QUEUE,
    CHUNK_PRIORITY,
    JOBS_QUEUE,
    RENDER_JOB,
    RUN_BATCH_TURN,
    SENT_AT_HEADER,
    make_producer,
    queue_key,
)

NOW = 1_000_000.0


@pytest.fixture
def settings(make_settings):
    return make_settings(reconcile_grace_s=60.0)


def _turn_retry(**fields) -> Delayed:
    values = {
        "task": RUN_BATCH_TURN,
        "task_id": "turn-1",
        "args": [],
        "queue": BATCH_QUEUE,
        "priority": CHUNK_PRIORITY,
        "retries": 2,
        "sent_at": 123.5,
    }
    return Delayed(**{**values, **fields})


def test_a_retry_is_sent_once_due_as_celerys_retry_would_have_sent_it(redis_client, settings):
    send = celery_sender(make_producer(settings))
    hold_back(redis_client, _turn_retry(), due=NOW + 8)
    assert count(redis_client) == 1
    waiting = backlog(redis_client, settings)
    assert waiting["retries_waiting"] == 1 and waiting["for_workers"] == 0

    assert send_due(redis_client, send, now=NOW + 7.9) == 0, "not before it is due"
    assert redis_client.llen(queue_key(BATCH_QUEUE, CHUNK_PRIORITY)) == 0
    assert send_due(redis_client, send, now=NOW + 8) == 1
    assert count(redis_client) == 0
    raw = redis_client.lpop(queue_key(BATCH_QUEUE, CHUNK_PRIORITY))
    headers = json.loads(raw)["headers"]
    assert headers["task"] == RUN_BATCH_TURN and headers["id"] == "turn-1"
    assert headers["retries"] == 2
    assert headers[SENT_AT_HEADER] == 123.5, "the first send time is kept"
    assert send_due(redis_client, send, now=NOW + 100) == 0, "sent once"


def test_due_retries_are_taken_once_however_many_keepers_look(redis_client):
    for n in range(250):
        hold_back(redis_client, _turn_retry(task_id=f"turn-{n}"), due=NOW + n % 3)
    taken = [take_due(redis_client, NOW + 5, at_most=40) for _ in range(10)]
    ids = [retry.task_id for batch in taken for retry in batch]
    assert len(ids) == len(set(ids)) == 250
    # One keeper sends them all in one tick, a hundred per script.
    for n in range(250):
        hold_back(redis_client, _turn_retry(task_id=f"again-{n}"), due=NOW)
    sent: list[str] = []
    assert send_due(redis_client, lambda task, **kw: sent.append(kw["task_id"]), now=NOW) == 250
    assert len(set(sent)) == 250


def test_a_retry_the_broker_refuses_is_kept_for_the_next_tick(redis_client):
    hold_back(redis_client, _turn_retry(task_id="a"), due=NOW)
    hold_back(redis_client, _turn_retry(task_id="b"), due=NOW + 1)

    def refuse(task, **kwargs):
        raise ConnectionError("broker away")

    with pytest.raises(ConnectionError):
        send_due(redis_client, refuse, now=NOW + 2)
    assert count(redis_client) == 2, "neither lost"
    kept = sorted(retry.task_id for retry in take_due(redis_client, float("inf")))
    assert kept == ["a", "b"]


def test_a_job_waiting_for_its_retry_is_not_taken_for_lost(redis_client, settings):
    job_id = new_job_id()
    JobStore(redis_client, ttl_s=3600).create(
        Job(id=job_id, status=JobStatus.QUEUED, options={}, input_key=f"inputs/{job_id}/0.png")
    )
    retry = Delayed(RENDER_JOB, "task-9", [job_id], JOBS_QUEUE, None, 1)
    hold_back(redis_client, retry, due=NOW + 3600)
    sends: list = []
    clock = [NOW]
    reconciler = Reconciler(
        redis_client, settings, lambda *a, **k: sends.append(a), clock=lambda: clock[0]
    )
    for _ in range(3):
        assert reconciler.sweep() == {}
        clock[0] += 120
    assert sends == []
    # Its retry gone (a keeper died between taking and sending it): repaired.
    take_due(redis_client, float("inf"))
    reconciler.sweep()
    clock[0] += 120
    assert reconciler.sweep() == {"job_requeued": 1}
