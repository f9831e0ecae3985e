"""Only the fenced winner's objects count (shared/keys.py, docs/reliability.md): two deliveries
of the same work write into their own attempts' folders, the fenced transition records the
winner's keys, and the loser's objects are never named and are deleted. Real redis-server and
SeaweedFS; the model pass is replaced by fixed bytes (what is tested is where they go)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from shared import keys
from shared.batches import Batch, BatchStatus, BatchStore, ItemStatus, NewItem, item_id
from shared.heartbeat import heartbeat_key
from shared.jobs import Job, JobStatus, JobStore, new_job_id
from shared.leases import LeaseLost, LeaseStore
from shared.storage import ObjectStore
from worker.batches import chunks
from worker.batches.chunks import Delivery, run_chunk
from worker.compute.pipeline import ImageResult
from worker.execute import attempt_of, run_job
from worker.runtime import WorkerContext

A, B = "a@host:11", "b@host:22"  # pool processes of nodes a@host and b@host


def _take(leases: LeaseStore, redis_client, task_id: str, holder: str):
    redis_client.set(heartbeat_key(holder), "{}", ex=60)
    node = holder.rsplit(":", 1)[0]
    return leases.acquire(task_id, holder=holder, node=node, task="featuremaps.run_chunk").fence


def _handed_over(leases: LeaseStore, redis_client, task_id: str, old: str, new: str):
    """``old``'s heartbeat lapses (a pause, a Redis blip) and ``new`` takes the task over."""
    redis_client.delete(heartbeat_key(old))
    return _take(leases, redis_client, task_id, new)


def _outputs(record_id: str, attempt: str) -> dict:
    return {
        "figure_key": keys.figure_key(record_id, "jpg", attempt=attempt),
        "thumbnail_key": keys.thumbnail_key(record_id, attempt=attempt),
        "manifest_key": keys.manifest_key(record_id, attempt=attempt),
    }


def test_the_fenced_transition_records_the_winners_keys_only(redis_client):
    leases = LeaseStore(redis_client, ttl_s=60)
    jobs = JobStore(redis_client, ttl_s=60)
    job = jobs.create(Job(id=new_job_id(), status=JobStatus.QUEUED, options={}, input_key="k"))
    loser = _take(leases, redis_client, "t1", A)
    assert jobs.start(job.id, worker="a", device="cpu", max_attempts=3, fence=loser).started
    winner = _handed_over(leases, redis_client, "t1", A, B)
    assert jobs.start(job.id, worker="b", device="cpu", max_attempts=3, fence=winner).started
    assert attempt_of(winner) != attempt_of(loser)
    won = _outputs(job.id, attempt_of(winner))
    assert jobs.succeed(job.id, result=won, timings={}, fence=winner)
    with pytest.raises(LeaseLost):
        jobs.succeed(job.id, result=_outputs(job.id, attempt_of(loser)), timings={}, fence=loser)
    assert jobs.get(job.id).result == won

    batches = BatchStore(redis_client, ttl_s=60)
    batch = batches.create(Batch(id="b1", status=BatchStatus.RUNNING, options={}, source={}))
    ids = [item_id(batch.id, i) for i in range(2)]
    batches.add_items(batch.id, [NewItem(id=i, name=i, input_key="k") for i in ids])
    loser = _take(leases, redis_client, "t2", A)
    assert batches.start_items(batch.id, ids, token="t2", fence=loser) == ids
    winner = _handed_over(leases, redis_client, "t2", A, B)
    assert batches.start_items(batch.id, ids, token="t2", fence=winner) == ids

    def outcomes(attempt: str) -> list:
        return [
            (i, ItemStatus.SUCCEEDED, {"name": i, **_outputs(i, attempt), "attempt": attempt})
            for i in ids
        ]

    batches.finish_items(batch.id, outcomes(attempt_of(winner)), fence=winner)
    with pytest.raises(LeaseLost):
        batches.finish_items(batch.id, outcomes(attempt_of(loser)), fence=loser)
    recorded = batches.get_items(batch.id, ids)
    assert {i: item.info for i, item in recorded.items()} == {
        i: info for i, _, info in outcomes(attempt_of(winner))
    }


class _PausingStore(ObjectStore):
    """A store whose first manifest write runs ``pause()`` first: the writer stalls there
    (a SIGSTOP, a GC pause, a slow network) while the rest of the world goes on."""

    pause = staticmethod(lambda: None)
    _once = threading.Lock()

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream"):
        if key.endswith("/manifest.json") and self._once.acquire(blocking=False):
            self.pause()
        return super().put_bytes(key, data, content_type)


def _fake_process(ctx, loaded, inputs, options):
    return [
        ImageResult(
            figure=b"figure " + data,
            figure_ext="jpg",
            manifest={"layers": []},
            layers=[],
            maps={},
            arrays=None,
            layer_pngs=[],
            timings={},
            thumbnail=b"thumbnail " + data,
        )
        for data in inputs
    ]


def _context(settings, redis_client, store: ObjectStore, hostname: str) -> WorkerContext:
    loaded = SimpleNamespace(device=SimpleNamespace(type="cpu"))
    return WorkerContext(
        settings=settings,
        hostname=hostname,
        redis=redis_client,
        jobs=JobStore(redis_client, ttl_s=60),
        batches=BatchStore(redis_client, ttl_s=60),
        leases=LeaseStore(redis_client, ttl_s=60),
        store=store,
        loaded=loaded,  # type: ignore[arg-type]
        device="cpu",
        models=SimpleNamespace(get=lambda model: loaded),  # type: ignore[arg-type]
    )


def test_two_chunk_deliveries_racing_on_the_same_objects_only_the_winners_count(
    make_settings, object_store, redis_client, monkeypatch
):
    """Delivery A stalls at its first manifest write (figures written) and is handed over;
    delivery B runs the chunk and records it; then A writes the rest. Before attempts both
    wrote the same keys, A last. Now the items name B's folder, every object there is B's,
    and A deleted its own folder once its fenced ``finish_items`` was refused."""
    settings = make_settings(reuse_results=False)
    monkeypatch.setattr(chunks, "_process", _fake_process)
    batches = BatchStore(redis_client, ttl_s=60)
    batch = batches.create(Batch(id="b2", status=BatchStatus.RUNNING, options={}, source={}))
    pack = keys.batch_input_pack_key(batch.id, 0)
    object_store.put_bytes(pack, b"onetwo")
    ids = [item_id(batch.id, i) for i in range(2)]
    batches.add_items(
        batch.id,
        [
            NewItem(id=ids[0], name="one", input_key=pack, input_range=(0, 3)),
            NewItem(id=ids[1], name="two", input_key=pack, input_range=(3, 3)),
        ],
    )
    batches.end_expansion(batch.id)
    finalized: list[str] = []
    store_a = _PausingStore.from_settings(settings)
    ctx_a = _context(settings, redis_client, store_a, "a@host")
    ctx_b = _context(settings, redis_client, object_store, "b@host")
    leases = ctx_a.leases
    fence_a = _take(leases, redis_client, "chunk-1", A)
    winner: dict = {}

    def stall_while_b_runs_the_chunk() -> None:
        fence_b = _handed_over(leases, redis_client, "chunk-1", A, B)
        winner["attempt"] = attempt_of(fence_b)
        delivery = Delivery(token="chunk-1", finalize=finalized.append, fence=fence_b)
        assert run_chunk(ctx_b, batch.id, ids, delivery) == 2

    store_a.pause = stall_while_b_runs_the_chunk
    delivery_a = Delivery(token="chunk-1", finalize=finalized.append, fence=fence_a)
    with pytest.raises(LeaseLost):
        run_chunk(ctx_a, batch.id, ids, delivery_a)
    store_a.close()

    assert finalized == [batch.id], "finalized once, by the winner"
    items = batches.get_items(batch.id, ids)
    for item, data in zip(ids, (b"one", b"two"), strict=True):
        info = items[item].info
        assert items[item].status is ItemStatus.SUCCEEDED
        assert info["attempt"] == winner["attempt"] != attempt_of(fence_a)
        assert {k: info[k] for k in ("figure_key", "thumbnail_key", "manifest_key")} == _outputs(
            item, winner["attempt"]
        )
        # Everything under the item's id is the winner's, and only that: the loser's
        # objects (written before and after the winner recorded) are gone.
        assert sorted(object_store.list_keys(keys.results_prefix(item))) == sorted(
            _outputs(item, winner["attempt"]).values()
        )
        assert object_store.get_bytes(info["figure_key"]) == b"figure " + data


def test_a_delivery_of_a_canceled_job_deletes_what_a_lost_holder_wrote_after_the_cancel(
    settings, object_store, redis_client
):
    """The cancel found the job running; its holder was lost mid-upload and its message is
    delivered again: that delivery runs nothing and deletes every attempt's objects."""
    jobs = JobStore(redis_client, ttl_s=60)
    job = jobs.create(Job(id=new_job_id(), status=JobStatus.QUEUED, options={}, input_key="k"))
    lost = _take(LeaseStore(redis_client, ttl_s=60), redis_client, "t3", A)
    assert jobs.start(job.id, worker="a", device="cpu", max_attempts=3, fence=lost).started
    jobs.cancel(job.id)
    for key in _outputs(job.id, attempt_of(lost)).values():
        object_store.put_bytes(key, b"written after the cancel")
    ctx = _context(settings, redis_client, object_store, "b@host")
    fence = _handed_over(ctx.leases, redis_client, "t3", A, B)
    assert run_job(ctx, job.id, fence) == "canceled"
    assert list(object_store.list_keys(keys.results_prefix(job.id))) == []
