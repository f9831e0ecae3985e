"""The webhook outbox and its deliverer (``worker/webhooks.py``) on the session's real Redis
and S3 with a real HTTP receiver, driven step by step with a clock of the test's own: which
transitions enqueue a record, the lease that hands a dead deliverer's entry to another, the
address check again at delivery, and an expired record's entry."""

from __future__ import annotations

import json
import time

import pytest

from shared.jobs import Job, JobStatus, RedisJobStore, job_key, new_job_id
from shared.webhooks import OUTBOX_KEY
from tests.integration.receiver import Receiver
from worker.webhooks import Deliverer


class Clock:
    """Unix time that moves only when the test moves it (outbox entries are scored by
    Redis's own TIME when they are added)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def hook_settings(make_settings):
    return make_settings(webhook_secret="s3cret", webhook_allow_private=True, webhook_timeout_s=5)


def ended_job(jobs: RedisJobStore, callback_url: str | None) -> str:
    job = Job(
        id=new_job_id(),
        status=JobStatus.QUEUED,
        options={},
        input_key="inputs/x/0.png",
        callback_url=callback_url,
    )
    jobs.create(job)
    jobs.cancel(job.id)
    return job.id


def test_only_an_ended_job_with_a_callback_enters_the_outbox_once(redis_client, hook_settings):
    jobs = RedisJobStore(redis_client, ttl_s=60)
    without = ended_job(jobs, None)
    with_hook = Job(id=new_job_id(), status=JobStatus.QUEUED, options={}, input_key="k")
    with_hook.callback_url = "http://127.0.0.1:9/x"
    jobs.create(with_hook)
    jobs.start(with_hook.id, worker="w", device="cpu", max_attempts=3)
    assert redis_client.zcard(OUTBOX_KEY) == 0  # running is not final
    jobs.succeed(with_hook.id, result={}, timings={})
    jobs.fail(with_hook.id, code="x", message="a late, refused move")
    assert [m.decode() for m in redis_client.zrange(OUTBOX_KEY, 0, -1)] == [job_key(with_hook.id)]
    assert jobs.get(with_hook.id).callback_state == "pending"
    assert jobs.get(without).callback_state is None


def test_a_dead_deliverers_entry_goes_to_another_after_its_lease(
    redis_client, hook_settings, object_store, receiver
):
    job_id = ended_job(RedisJobStore(redis_client, ttl_s=60), receiver.url("/ok/lease"))
    clock = Clock()
    first, second = (
        Deliverer(redis_client, object_store, hook_settings, clock=clock) for _ in range(2)
    )
    assert first.claim() == job_key(job_id)  # ... and its worker dies here
    assert second.deliver_due() is False  # leased
    clock.now += first.lease_s + 1
    assert second.deliver_due() is True
    (call,) = receiver.calls_to("/ok/lease")
    assert json.loads(call.body)["status"] == "canceled"
    job = RedisJobStore(redis_client, ttl_s=60).get(job_id)
    assert job.callback_state == "delivered" and job.callbacks[0]["status"] == 200
    assert redis_client.zcard(OUTBOX_KEY) == 0


def test_the_address_is_checked_again_when_sending(
    redis_client, make_settings, object_store, receiver
):
    """Accepted while private targets were allowed (or a name that resolved elsewhere then):
    at delivery the loopback address is refused and nothing is sent."""
    strict = make_settings(webhook_secret="s3cret", webhook_allow_private=False)
    job_id = ended_job(RedisJobStore(redis_client, ttl_s=60), receiver.url("/ok/rebound"))
    deliverer = Deliverer(redis_client, object_store, strict, clock=Clock())
    assert deliverer.deliver_due() is True
    job = RedisJobStore(redis_client, ttl_s=60).get(job_id)
    (attempt,) = job.callbacks
    assert attempt["status"] is None and "loopback" in attempt["error"]
    assert receiver.calls_to("/ok/rebound") == []
    assert job.callback_state == "pending"  # retried later, within WEBHOOK_RETRY_FOR_S


def test_an_expired_records_entry_is_dropped(redis_client, hook_settings, object_store):
    job_id = ended_job(RedisJobStore(redis_client, ttl_s=60), "http://127.0.0.1:9/x")
    deliverer = Deliverer(redis_client, object_store, hook_settings, clock=Clock())
    redis_client.delete(job_key(job_id))
    assert deliverer.deliver_due() is True
    assert redis_client.zcard(OUTBOX_KEY) == 0
