"""The webhook outbox and its deliverer (``keeper/webhook_delivery.py``) on the session's real Redis
and S3 with a real HTTP receiver, driven step by step with a clock of the test's own: which
transitions enqueue a record, the lease that hands a dead deliverer's entry to another, the
address check again at delivery, and an expired record's entry."""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid

import pytest

from keeper.webhook_delivery import ITEM_ATTEMPTS_KEPT, Deliverer
from shared.batches import Batch, BatchStatus, BatchStore, ItemStatus, NewItem, batch_key, item_id
from shared.jobs import Job, JobStatus, JobStore, job_key, new_job_id
from shared.records import parse_iso
from shared.webhooks import OUTBOX_KEY, item_entry
from tests.integration.receiver import Receiver


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


def ended_job(jobs: JobStore, callback_url: str | None) -> str:
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
    jobs = JobStore(redis_client, ttl_s=60)
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
    job_id = ended_job(JobStore(redis_client, ttl_s=60), receiver.url("/ok/lease"))
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
    job = JobStore(redis_client, ttl_s=60).get(job_id)
    assert job.callback_state == "delivered" and job.callbacks[0]["status"] == 200
    assert redis_client.zcard(OUTBOX_KEY) == 0


def test_the_address_is_checked_again_when_sending(
    redis_client, make_settings, object_store, receiver
):
    """Accepted while private targets were allowed (or a name that resolved elsewhere then):
    at delivery the loopback address is refused and nothing is sent."""
    strict = make_settings(webhook_secret="s3cret", webhook_allow_private=False)
    job_id = ended_job(JobStore(redis_client, ttl_s=60), receiver.url("/ok/rebound"))
    deliverer = Deliverer(redis_client, object_store, strict, clock=Clock())
    assert deliverer.deliver_due() is True
    job = JobStore(redis_client, ttl_s=60).get(job_id)
    (attempt,) = job.callbacks
    assert attempt["status"] is None and "loopback" in attempt["error"]
    assert receiver.calls_to("/ok/rebound") == []
    assert job.callback_state == "pending"  # retried later, within WEBHOOK_RETRY_FOR_S


def test_an_expired_records_entry_is_dropped(redis_client, hook_settings, object_store):
    job_id = ended_job(JobStore(redis_client, ttl_s=60), "http://127.0.0.1:9/x")
    deliverer = Deliverer(redis_client, object_store, hook_settings, clock=Clock())
    redis_client.delete(job_key(job_id))
    assert deliverer.deliver_due() is True
    assert redis_client.zcard(OUTBOX_KEY) == 0


# Per-item callbacks of a batch (item_callbacks=true): entries named after the batch and item.


def item_batch(store: BatchStore, callback_url: str, *, spacing_s: float | None) -> str:
    batch = Batch(
        id=uuid.uuid4().hex[:24],
        status=BatchStatus.RUNNING,
        options={},
        source={},
        callback_url=callback_url,
        item_callback_spacing_s=spacing_s,
    )
    store.create(batch)
    return batch.id


def ended_items(store: BatchStore, batch_id: str, count: int) -> list[str]:
    """``count`` items of the batch, run and ended: the first succeeded, the others failed."""
    ids = [item_id(batch_id, i) for i in range(count)]
    store.add_items(batch_id, [NewItem(i, f"{i}.png", input_key="k") for i in ids])
    store.start_items(batch_id, ids, token="t")
    outcomes = [
        (i, ItemStatus.SUCCEEDED if n == 0 else ItemStatus.FAILED, {"name": f"{i}.png"})
        for n, i in enumerate(ids)
    ]
    store.finish_items(batch_id, outcomes)
    return ids


def outbox(redis_client) -> list[tuple[str, float]]:
    return [(m.decode(), s) for m, s in redis_client.zrange(OUTBOX_KEY, 0, -1, withscores=True)]


def test_an_item_enters_the_outbox_in_the_step_that_ends_it_spaced_by_the_rate(redis_client):
    store = BatchStore(redis_client, ttl_s=60)
    batch_id = item_batch(store, "http://127.0.0.1:9/x", spacing_s=0.5)
    store.add_items(batch_id, [NewItem(item_id(batch_id, 9), "junk", error={"code": "x"})])
    ids = ended_items(store, batch_id, 3)
    entries = outbox(redis_client)
    assert [e for e, _ in entries] == [
        item_entry(batch_key(batch_id), i) for i in [item_id(batch_id, 9), *ids]
    ]
    gaps = [round(b - a, 6) for (_, a), (_, b) in itertools.pairwise(entries)]
    assert gaps == [0.5, 0.5, 0.5]
    assert redis_client.ttl(OUTBOX_KEY) == -1  # the batch scripts never expire the outbox
    queued = item_batch(store, "http://127.0.0.1:9/x", spacing_s=0.5)
    store.add_items(queued, [NewItem(item_id(queued, 0), "q.png", input_key="k")])
    store.cancel(queued)
    canceled = item_entry(batch_key(queued), item_id(queued, 0))
    assert canceled in [e for e, _ in outbox(redis_client)]
    plain = item_batch(store, "http://127.0.0.1:9/x", spacing_s=None)
    ended_items(store, plain, 2)
    assert len(outbox(redis_client)) == 5  # a batch without item_callbacks adds none


def test_item_calls_due_together_are_spread_not_burst(
    redis_client, hook_settings, object_store, receiver
):
    store = BatchStore(redis_client, ttl_s=60)
    batch_id = item_batch(store, receiver.url("/ok/items"), spacing_s=1.0)
    ended_items(store, batch_id, 3)
    clock = Clock()
    clock.now += 100  # every entry is long due: the deliverers were busy elsewhere
    deliverer = Deliverer(redis_client, object_store, hook_settings, clock=clock)
    assert [deliverer.deliver_due() for _ in range(3)] == [True, True, True]
    assert len(receiver.calls_to("/ok/items")) == 1  # the first went; the others took turns
    slots = [score for _, score in outbox(redis_client)]
    assert slots == [clock.now + 1, clock.now + 2]
    for n, slot in enumerate(slots, start=2):
        clock.now = slot
        assert deliverer.deliver_due() is True
        assert deliverer.deliver_due() is False  # the next one is not due yet
        assert len(receiver.calls_to("/ok/items")) == n
    calls = receiver.calls_to("/ok/items")
    assert {c.headers["X-Featuremaps-Event"] for c in calls} == {"item"}
    sent = [json.loads(c.body) for c in calls]
    assert {(d["batch_id"], d["status"]) for d in sent} == {
        (batch_id, "succeeded"),
        (batch_id, "failed"),
    }


def test_an_items_attempts_are_recorded_in_its_info_and_kept_bounded(
    redis_client, hook_settings, object_store, receiver
):
    store = BatchStore(redis_client, ttl_s=60)
    batch_id = item_batch(store, receiver.url("/redirect/item"), spacing_s=0.1)
    (only,) = ended_items(store, batch_id, 1)
    entry = item_entry(batch_key(batch_id), only)
    clock = Clock()
    deliverer = Deliverer(redis_client, object_store, hook_settings, clock=clock)
    for _ in range(ITEM_ATTEMPTS_KEPT + 2):
        clock.now = redis_client.zscore(OUTBOX_KEY, entry)
        assert deliverer.deliver_due() is True
    info = store.get_items(batch_id, [only])[only].info
    assert info["callback_attempts"] == ITEM_ATTEMPTS_KEPT + 2
    assert info["callback_state"] == "pending"
    assert [a["status"] for a in info["callbacks"]] == [302] * ITEM_ATTEMPTS_KEPT
    first, *latest = info["callbacks"]
    assert parse_iso(first["at"]) < parse_iso(latest[0]["at"])
    calls = receiver.calls_to("/redirect/item")
    assert [c.headers["X-Featuremaps-Attempt"] for c in calls] == [
        str(n) for n in range(1, ITEM_ATTEMPTS_KEPT + 3)
    ]


def test_a_slow_receiver_takes_at_most_two_deliverers_and_the_others_go_on(
    redis_client, make_settings, object_store, receiver
):
    """Three calls to a receiver that does not answer and one to a healthy host, three
    deliverers: two calls to the slow host run, the third deliverer puts its slow call back
    and delivers the healthy one meanwhile (before, all three deliverers waited on the slow
    host and every other tenant's webhooks with them)."""
    settings = make_settings(
        webhook_secret="s3cret", webhook_allow_private=True, webhook_timeout_s=30
    )
    jobs = JobStore(redis_client, ttl_s=60)
    redis_client.delete(OUTBOX_KEY)
    slow = [ended_job(jobs, receiver.url(f"/slow/{n}")) for n in range(3)]
    time.sleep(0.01)
    healthy = ended_job(jobs, receiver.url("/ok/healthy").replace("127.0.0.1", "localhost"))
    stop = threading.Event()

    def deliver() -> None:
        deliverer = Deliverer(redis_client, object_store, settings)
        while not stop.is_set():
            if not deliverer.deliver_due():
                time.sleep(0.05)

    threads = [threading.Thread(target=deliver, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        receiver.wait_for("/ok/healthy", 1, timeout_s=60)
        assert receiver.in_flight == 2
        assert sum(len(receiver.calls_to(f"/slow/{n}")) for n in range(3)) == 2
        assert jobs.get(healthy).callback_state == "delivered"
    finally:
        receiver.release()
        for n in range(3):
            receiver.wait_for(f"/slow/{n}", 1, timeout_s=60)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert {jobs.get(job_id).callback_state for job_id in slow} == {"delivered"}
