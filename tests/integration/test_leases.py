"""Leases, fencing and the hand-over of a lost node's message, against a real redis-server and
kombu's own Redis transport (shared/leases.py, keeper/recovery.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from celery.exceptions import Reject
from kombu import Connection, Consumer, Exchange, Queue
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from keeper.counters import HANDOVER, counts
from keeper.recovery import recover
from shared.batches import Batch, BatchStatus, BatchStore, ItemStatus, NewItem, item_id
from shared.heartbeat import heartbeat_key
from shared.jobs import Job, JobStatus, JobStore, new_job_id
from shared.leases import LEASE_INDEX, UNFENCED, LeaseLost, LeaseStore, lease_key
from shared.queue import PRIORITY_SEP, UNACKED_KEY, find_unacked
from shared.settings import Settings
from worker import leasing
from worker.runtime import WorkerContext

A, B = "a@host:11", "b@host:22"  # pool processes of nodes a@host and b@host


@pytest.fixture
def leases(redis_client):
    return LeaseStore(redis_client, ttl_s=60)


def _beat(redis_client, *holders: str) -> None:
    for holder in holders:
        redis_client.set(heartbeat_key(holder), "{}", ex=60)


def _take(leases, task_id: str, holder: str):
    node = holder.rsplit(":", 1)[0]
    return leases.acquire(task_id, holder=holder, node=node, task="featuremaps.render_job")


def _handovers(redis_client) -> int:
    return counts(redis_client, HANDOVER)["render_job"]


def test_a_live_holder_on_another_node_keeps_its_lease_until_its_heartbeat_expires(
    leases, redis_client
):
    _beat(redis_client, A, B)
    first = _take(leases, "t1", A).fence
    assert first is not None and redis_client.zscore(LEASE_INDEX, "t1") is not None
    busy = _take(leases, "t1", B)
    assert busy.fence is None and busy.busy_with == A

    redis_client.delete(heartbeat_key(A))  # A is lost
    second = _take(leases, "t1", B).fence
    assert second is not None and second.gen != first.gen
    # The old generation can neither give back nor record anything any more.
    assert not leases.release(first)
    assert leases.get("t1").holder == B
    assert leases.release(second)
    assert leases.get("t1") is None and redis_client.zscore(LEASE_INDEX, "t1") is None


def test_a_holder_of_my_own_node_is_taken_over_while_its_heartbeat_lasts(leases, redis_client):
    # A node gives a message to a second pool process only once the first one died.
    _beat(redis_client, A)
    first = _take(leases, "t1", A).fence
    again = _take(leases, "t1", "a@host:12").fence
    assert again is not None and again.gen != first.gen


def test_stale_fences_change_no_job_and_no_item(leases, redis_client):
    jobs = JobStore(redis_client, ttl_s=60)
    job = jobs.create(Job(id=new_job_id(), status=JobStatus.QUEUED, options={}, input_key="k"))
    _beat(redis_client, A)
    old = _take(leases, "t1", A).fence
    assert jobs.start(job.id, worker="a", device="cpu", max_attempts=3, fence=old).started
    redis_client.delete(heartbeat_key(A))
    new = _take(leases, "t1", B).fence
    with pytest.raises(LeaseLost):
        jobs.succeed(job.id, result={}, timings={}, fence=old)
    with pytest.raises(LeaseLost):
        jobs.fail(job.id, code="timeout", message="m", fence=old)
    assert jobs.get(job.id).status is JobStatus.RUNNING
    with pytest.raises(LeaseLost):  # what the old holder checks before writing outputs
        leases.check(old, "job")
    leases.check(new, "job")
    leases.check(UNFENCED, "job")
    restarted = jobs.start(job.id, worker="b", device="cpu", max_attempts=3, fence=new)
    assert restarted.started and restarted.attempts == 2
    assert jobs.succeed(job.id, result={}, timings={}, fence=new)

    batches = BatchStore(redis_client, ttl_s=60)
    batch = batches.create(Batch(id="b1", status=BatchStatus.RUNNING, options={}, source={}))
    ids = [item_id(batch.id, i) for i in range(2)]
    batches.add_items(batch.id, [NewItem(id=i, name=i, input_key="k") for i in ids])
    with pytest.raises(LeaseLost):
        batches.start_items(batch.id, ids, token="t1", fence=old)
    assert batches.start_items(batch.id, ids, token="t1", fence=new) == ids
    # The same delivery (same token) resumes its items; each start is an attempt.
    assert batches.start_items(batch.id, ids, token="t1", fence=new) == ids
    assert [item.attempts for item in batches.items(batch.id)] == [2, 2]
    outcomes = [(i, ItemStatus.SUCCEEDED, {"name": i}) for i in ids]
    with pytest.raises(LeaseLost):
        batches.finish_items(batch.id, outcomes, fence=old)
    assert batches.get(batch.id).running == 2
    batches.finish_items(batch.id, outcomes, fence=new)
    assert batches.get(batch.id).succeeded == 2


def _deliver(url: str, queue: str) -> tuple[Connection, list]:
    """Take one message from ``queue`` the way a Celery worker does, without acknowledging
    it: kombu files it in the unacked hash. Returns the open connection and the messages."""
    conn = Connection(url, transport_options={"visibility_timeout": 600})
    channel = conn.channel()
    channel.basic_qos(0, 1, False)
    received: list = []
    Consumer(
        channel,
        queues=[Queue(queue, Exchange(queue), routing_key=queue)],
        callbacks=[lambda body, message: received.append(message)],
        accept=["json"],
    ).consume()
    conn.drain_events(timeout=5)
    return conn, received


def _publish(url: str, queue: str, task_id: str, priority: int = 0) -> None:
    with Connection(url) as conn:
        producer = conn.Producer()
        producer.publish(
            [["x"], {}, {}],
            exchange=Exchange(queue),
            routing_key=queue,
            declare=[Queue(queue, Exchange(queue), routing_key=queue)],
            headers={"id": task_id, "task": "featuremaps.render_job"},
            priority=priority,
            serializer="json",
        )


@pytest.mark.parametrize("priority", [0, 6])
def test_a_dead_holders_message_goes_back_to_the_front_of_its_queue_once(
    leases, redis_client, redis_server, priority
):
    url = redis_server.url
    _publish(url, "jobs", "t1", priority)
    lost_node, (delivered,) = _deliver(url, "jobs")
    _beat(redis_client, A)
    _take(leases, "t1", A)
    _publish(url, "jobs", "t2", priority)  # waiting behind it
    assert find_unacked(redis_client, "t1").tag == delivered.delivery_tag

    assert recover(redis_client, leases) == {}, "the holder still beats"
    redis_client.delete(heartbeat_key(A))
    before = _handovers(redis_client)
    assert recover(redis_client, leases) == {"t1": "moved"}
    assert _handovers(redis_client) == before + 1
    assert redis_client.hlen(UNACKED_KEY) == 0
    key = f"jobs{PRIORITY_SEP}6" if priority else "jobs"
    assert redis_client.llen(key) == 2
    lease = leases.get("t1")
    assert lease.holder == "" and lease.handovers == 1
    assert redis_client.hget(lease_key("t1"), "gen") is None
    assert recover(redis_client, leases) == {}, "nothing is handed over twice"

    # The lost node's late acknowledgement removes nothing; a live worker takes the same
    # task first (the front of the queue), with a new delivery tag.
    delivered.ack()
    lost_node.release()
    conn, (again,) = _deliver(url, "jobs")
    assert again.headers["id"] == "t1" and again.delivery_tag != delivered.delivery_tag
    assert again.headers["redelivered"] is True
    assert json.loads(again.body) == [["x"], {}, {}]
    assert redis_client.hlen(UNACKED_KEY) == 1
    again.ack()
    conn.release()


def test_a_lease_whose_message_was_already_requeued_is_only_released(leases, redis_client):
    _beat(redis_client, A)
    _take(leases, "t1", A)
    redis_client.delete(heartbeat_key(A))
    assert recover(redis_client, leases) == {"t1": "released"}
    assert leases.get("t1").holder == ""
    assert _take(leases, "t1", B).fence is not None


def _context(redis_client, hostname: str, leases) -> WorkerContext:
    return WorkerContext(
        settings=Settings(),
        hostname=hostname,
        redis=redis_client,
        jobs=JobStore(redis_client, ttl_s=60),
        batches=BatchStore(redis_client, ttl_s=60),
        leases=leases,
        store=None,  # type: ignore[arg-type]
        loaded=None,
        device="cpu",
    )


def test_a_delivery_of_a_task_still_run_elsewhere_is_requeued_not_run(
    leases, redis_client, monkeypatch
):
    monkeypatch.setattr(leasing, "DEFER_S", 0)
    task = SimpleNamespace(request=SimpleNamespace(id="t1"), name="featuremaps.render_job")
    _beat(redis_client, A)
    _take(leases, "t1", A)
    ran = []
    with (
        pytest.raises(Reject) as raised,
        leasing.lease_held(task, _context(redis_client, "b@host", leases)),
    ):
        ran.append(True)
    assert raised.value.requeue is True and ran == []
    assert leases.get("t1").holder == A

    ctx = _context(redis_client, "a@host", leases)  # its own node: taken over
    with leasing.lease_held(task, ctx) as fence:
        assert leases.get("t1").holder == ctx.holder and fence.gen
    assert leases.get("t1") is None, "given back when the task ends"


def test_a_lease_that_could_not_be_given_back_is_given_back_once_redis_answers(
    leases, redis_client
):
    fence = _take(leases, "t1", A).fence
    down = Redis(port=1, retry=Retry(NoBackoff(), 0))  # nothing listens there
    ctx = _context(redis_client, "a@host", LeaseStore(down, ttl_s=60))
    ctx.release_lease(fence)  # Redis "down": nothing raised, kept for later
    assert ctx.unreleased == [fence] and leases.get("t1") is not None
    ctx.leases = leases
    ctx.release_pending()
    assert ctx.unreleased == [] and leases.get("t1") is None


def test_a_holder_from_before_a_restart_in_place_is_not_taken_for_the_new_process(
    leases, redis_client, monkeypatch
):
    """A container restarted in place runs its worker under the same hostname and often the
    same pid: the new process's heartbeat must not keep the dead one's lease held."""
    from shared import heartbeat

    monkeypatch.setattr(heartbeat, "_nonce", (0, ""))
    before = heartbeat.holder_id("a@host", 11, heartbeat.process_nonce())
    first = _take(leases, "t1", before).fence
    monkeypatch.setattr(heartbeat, "_nonce", (0, ""))  # the restarted process
    after = heartbeat.holder_id("a@host", 11, heartbeat.process_nonce())
    assert after != before and after.startswith("a@host:11.")
    heartbeat.write_heartbeat(redis_client, {"hostname": "a@host", "pid": 11, "nonce": after[-8:]})
    assert redis_client.exists(heartbeat_key(after)) and not redis_client.exists(
        heartbeat_key(before)
    )
    # Node b gets the redelivered message: the old holder has no heartbeat, so b takes over
    # at once instead of waiting out the lease's TTL.
    taken = _take(leases, "t1", "b@host:22").fence
    assert taken is not None and taken.gen != first.gen
