"""BatchStore transitions that the end-to-end batch tests do not reach on their own."""

import math
import threading

import redis

from shared import keys
from shared.batches import (
    BLOCK_ITEMS,
    COUNTERS,
    Batch,
    BatchStatus,
    BatchStore,
    ItemStatus,
    NewItem,
    batch_key,
    block_key,
    item_id,
)
from shared.records import OPEN_KEY, text
from shared.webhooks import OUTBOX_KEY


def _batch(store: BatchStore, status: BatchStatus) -> Batch:
    return store.create(Batch(id=f"b-{status.value}", status=status, options={}, source={}))


def test_a_batch_whose_manifest_cannot_be_written_ends_failed(redis_client):
    store = BatchStore(redis_client, ttl_s=60)
    _batch(store, BatchStatus.RUNNING)
    assert store.fail("b-running", code="storage_unavailable", message="S3 down") == "failed"
    failed = store.get("b-running")
    assert failed.error == {"code": "storage_unavailable", "message": "S3 down"}
    assert failed.finished_at


def test_the_step_that_ends_a_batch_queues_its_callback(redis_client, monkeypatch):
    """A worker that dies right after the closing script, before anything else, leaves the
    batch with its callback queued: a redelivered close finds the result set and returns
    early, so a callback queued after the script would be lost."""
    store = BatchStore(redis_client, ttl_s=60)
    monkeypatch.setattr(store, "_ended", lambda batch_id: None)  # the worker dies here
    for status, end in (
        ("running", lambda i: store.complete(i, {"shards": []})),
        ("expanding", lambda i: store.fail(i, code="storage_unavailable", message="S3 down")),
    ):
        batch_id = f"cb-{status}"
        store.create(
            Batch(
                id=batch_id,
                status=BatchStatus(status),
                options={},
                source={},
                callback_url="http://example.org/hook",
            )
        )
        redis_client.zrem(OUTBOX_KEY, batch_key(batch_id))
        end(batch_id)
        assert redis_client.zscore(OUTBOX_KEY, batch_key(batch_id)) is not None, status
        assert text(redis_client.hget(batch_key(batch_id), "callback_state")) == "pending"
    # Once: ending it again queues nothing more.
    redis_client.zrem(OUTBOX_KEY, batch_key("cb-running"))
    store.complete("cb-running", {"shards": []})
    assert redis_client.zscore(OUTBOX_KEY, batch_key("cb-running")) is None


def test_fail_leaves_a_finished_batch_alone(redis_client):
    store = BatchStore(redis_client, ttl_s=60)
    _batch(store, BatchStatus.CANCELED)
    assert store.fail("b-canceled", code="x", message="y") == "canceled"
    assert store.get("b-canceled").error is None


# Compact bookkeeping (issue 15): items kept per block of BLOCK_ITEMS, on a real Redis.


def _expanded(store: BatchStore, batch_id: str, total: int, **batch: object) -> list[str]:
    """A running batch of ``total`` queued items recorded a block per call, as expansion
    does (pack key and byte range in each info); returns the ids."""
    store.create(Batch(id=batch_id, status=BatchStatus.QUEUED, options={}, source={}, **batch))
    store.begin_expansion(batch_id)
    ids = [item_id(batch_id, n) for n in range(total)]
    for first in range(0, total, BLOCK_ITEMS):
        block = first // BLOCK_ITEMS
        store.add_items(
            batch_id,
            [
                NewItem(
                    ids[n],
                    f"n01440764/n01440764_{n:05d}.JPEG",
                    input_key=keys.batch_input_pack_key(batch_id, block),
                    input_range=(n * 1000, 1000),
                )
                for n in range(first, min(total, first + BLOCK_ITEMS))
            ],
        )
    assert not store.end_expansion(batch_id)
    return ids


def _succeeded(batch_id: str, item: str) -> dict:
    return {
        "figure_key": keys.figure_key(item, "png", attempt="g5"),
        "thumbnail_key": keys.thumbnail_key(item, attempt="g5"),
        "manifest_key": keys.manifest_key(item, attempt="g5"),
        "attempt": "g5",
    }


def _adds_up(batch: Batch) -> None:
    counts = batch.counts()
    assert counts["total"] == sum(counts[name] for name in COUNTERS), counts


def test_redis_keys_grow_per_block_not_per_item(redis_client):
    store = BatchStore(redis_client, ttl_s=60)
    ids = _expanded(store, "big", 1000)
    chunk = ids[100:140]  # spans blocks 0 and 1
    store.start_items("big", chunk, token="t1")
    store.finish_items("big", [(i, ItemStatus.SUCCEEDED, _succeeded("big", i)) for i in chunk])
    blocks = math.ceil(1000 / BLOCK_ITEMS)
    assert store.blocks("big") == blocks
    # The record, its blocks, and the reconciler's index of open records (one set for all).
    assert redis_client.dbsize() == 1 + blocks + 1
    found = sorted(k.decode() for k in redis_client.scan_iter() if k != OPEN_KEY.encode())
    assert sorted(store.record_keys("big")) == found
    store.delete("big")
    assert redis_client.dbsize() == 1 and redis_client.exists(OPEN_KEY)


def test_item_info_round_trips_exactly(redis_client):
    store = BatchStore(redis_client, ttl_s=60)
    store.create(Batch(id="rt", status=BatchStatus.QUEUED, options={}, source={}))
    pack = keys.batch_input_pack_key("rt", 1)
    error = {"code": "refused_member", "message": 'a | pipe and "quotes" and ünïcode'}
    store.add_items(
        "rt",
        [
            NewItem(
                item_id("rt", 128), "a/b|c.jpg", input_key=pack, input_range=(0, 5_000_000_000)
            ),
            NewItem(item_id("rt", 129), "../evil.png", error=error),
            NewItem(item_id("rt", 130), "elsewhere.jpg", input_key="inputs/x/0.jpg"),
        ],
    )
    a, b, c = (item_id("rt", n) for n in (128, 129, 130))
    assert store.get_items("rt", [b])[b].info == {"name": "../evil.png", "error": error}
    assert store.start_items("rt", [a, c], token="tok") == [a, c]
    infos = {
        a: {
            "name": "a/b|c.jpg",
            "input_key": pack,
            "input_range": [0, 5_000_000_000],
            **_succeeded("rt", a),
            "reused": True,
            "reused_from": item_id("rt", 7),
        },
        c: {
            "name": "elsewhere.jpg",
            "input_key": "inputs/x/0.jpg",
            "figure_key": "results/other/feature_maps.svg",
            "thumbnail_key": keys.thumbnail_key(a, attempt="g5"),  # another item's: kept whole
            "manifest_key": keys.manifest_key(c, attempt=""),  # written before attempts
            "reused": True,
            "reused_from": "0123abcd",  # a job
            "n": "a field named like a short one",
            "~odd": [1, 2],
        },
    }
    store.finish_items(
        "rt", [(a, ItemStatus.SUCCEEDED, infos[a]), (c, ItemStatus.SUCCEEDED, infos[c])]
    )
    got = store.get_items("rt", [c, a, b, item_id("rt", 131), "not-an-item"])
    assert list(got) == [c, a, b]
    assert {i: got[i].info for i in (a, c)} == infos
    assert list(got[c].info) == list(infos[c])  # field order kept too
    assert [i.id for i in store.items("rt", start=0, count=1000)] == [a, b, c]
    assert [i.info for i in store.iter_items("rt")] == [infos[a], got[b].info, infos[c]]
    assert got[a].attempts == 1 and got[b].attempts == 0


def test_redelivery_keeps_counters_exact(redis_client):
    store = BatchStore(redis_client, ttl_s=60)
    ids = _expanded(store, "rd", 300)
    _, queued = store.add_items("rd", [NewItem(ids[20], "again.jpg")])  # a redelivered add
    assert queued == [ids[20]]
    assert store.start_items("rd", ids[:10], token="first") == ids[:10]
    assert store.start_items("rd", ids[:10], token="other") == []  # someone else's
    assert store.start_items("rd", ids[:12], token="first") == ids[:12]  # resumes, and more
    outcomes = [(i, ItemStatus.SUCCEEDED, _succeeded("rd", i)) for i in ids[:12]]
    store.finish_items("rd", outcomes)
    store.finish_items("rd", [(ids[0], ItemStatus.FAILED, {"name": "x"})])  # not running
    batch = store.get("rd")
    assert (batch.total, batch.succeeded, batch.queued, batch.running) == (300, 12, 288, 0)
    items = store.get_items("rd", ids[:12])
    assert items[ids[0]].status is ItemStatus.SUCCEEDED
    assert [items[i].attempts for i in ids[:12]] == [2] * 10 + [1] * 2
    assert store.get_items("rd", [ids[20]])[ids[20]].name == "n01440764/n01440764_00020.JPEG"


def test_items_pages_by_member_position(redis_client):
    store = BatchStore(redis_client, ttl_s=60)
    ids = _expanded(store, "pg", 1000)
    assert [i.id for i in store.items("pg", start=120, count=300)] == ids[120:420]
    assert [i.id for i in store.items("pg", start=990, count=100)] == ids[990:]
    assert store.items("pg", start=1000, count=10) == []
    assert [i.id for i in store.iter_items("pg", page=200)] == ids
    assert store.item_count("pg") == 1000


def test_cancel_of_a_large_batch_while_chunks_start(redis_client, redis_server):
    """20,000 queued items, four threads starting and finishing chunks while the batch is
    canceled: every item ends succeeded or canceled, once, and the counters add up."""
    store = BatchStore(redis_client, ttl_s=600)
    ids = _expanded(
        store, "cx", 20_000, callback_url="http://example.org/", item_callback_spacing_s=0.0
    )
    chunks = [ids[n : n + 16] for n in range(0, len(ids), 16)]
    finalized = []
    ran: list[str] = []
    lock = threading.Lock()
    go = threading.Event()

    def worker(part: list[list[str]]) -> None:
        client = redis.Redis.from_url(redis_server.url)
        mine = BatchStore(client, ttl_s=600)
        for chunk in part:
            if len(chunk) == 0:
                continue
            started = mine.start_items("cx", chunk, token=f"t-{chunk[0]}")
            if len(started) < len(chunk) and mine.settle_canceled("cx", chunk):
                finalized.append("chunk")
            if started:
                with lock:
                    ran.extend(started)
                go.set()
                done = [(i, ItemStatus.SUCCEEDED, _succeeded("cx", i)) for i in started]
                if mine.finish_items("cx", done):
                    finalized.append("finish")
        client.close()

    threads = [threading.Thread(target=worker, args=(chunks[n::4],)) for n in range(4)]
    for thread in threads:
        thread.start()
    go.wait(10)
    _, finalize = store.cancel("cx")
    if finalize:
        finalized.append("cancel")
    for thread in threads:
        thread.join()
    batch = store.get("cx")
    _adds_up(batch)
    assert batch.queued == 0 and batch.running == 0
    assert batch.succeeded == len(ran) and 0 < len(ran) < 20_000
    assert batch.canceled == 20_000 - len(ran)
    statuses = {i.id: i.status for i in store.iter_items("cx")}
    assert len(statuses) == 20_000
    assert {i for i, s in statuses.items() if s is ItemStatus.SUCCEEDED} == set(ran)
    assert set(statuses.values()) == {ItemStatus.SUCCEEDED, ItemStatus.CANCELED}
    assert len(finalized) == 1, finalized
    # One outbox entry per ended item (and none for an item that ran and was not ended twice).
    entries = redis_client.zrange(OUTBOX_KEY, 0, -1)
    assert len(entries) == 20_000
    assert {text(e).rsplit(":", 1)[1] for e in entries} == set(ids)


def test_a_chunk_after_the_cancel_runs_nothing_and_settles_its_blocks(redis_client):
    store = BatchStore(redis_client, ttl_s=60)
    ids = _expanded(store, "late", 300)
    store.redis.hset(batch_key("late"), "status", "canceled")  # as if the API died after it
    assert store.start_items("late", ids[:16], token="t") == []
    assert store.settle_canceled("late", ids[290:300]) is False  # blocks 0, 1 still queued
    batch = store.get("late")
    assert (batch.queued, batch.canceled) == (256, 44)
    assert store.settle_canceled("late", ids[:16]) is False
    assert store.settle_canceled("late", ids[200:216]) is True
    _adds_up(store.get("late"))


def test_a_running_batch_never_expires_and_an_ended_one_does(redis_client):
    """A batch waiting a day behind others must not vanish: its hash and blocks have no TTL
    while it runs (a block that got one — from an older version — is made persistent again
    by the rotating window); once it ends every key expires JOB_TTL later."""
    store = BatchStore(redis_client, ttl_s=600)
    ids = _expanded(store, "ttl", 1000)  # 8 blocks
    assert redis_client.ttl(batch_key("ttl")) == -1
    assert {redis_client.ttl(block_key("ttl", block)) for block in range(8)} == {-1}
    for block in range(8):
        redis_client.expire(block_key("ttl", block), 5)
    chunk = ids[:4]
    store.start_items("ttl", chunk, token="t")
    store.finish_items("ttl", [(i, ItemStatus.FAILED, {"name": i}) for i in chunk])
    ttls = [redis_client.ttl(block_key("ttl", block)) for block in range(8)]
    # Block 0 (its items) and the window 0-3 are persistent again; the others not yet.
    assert [t == -1 for t in ttls] == [True] * 4 + [False] * 4
    store.start_items("ttl", ids[4:8], token="t")
    store.finish_items("ttl", [(i, ItemStatus.FAILED, {"name": i}) for i in ids[4:8]])
    assert all(redis_client.ttl(block_key("ttl", block)) == -1 for block in range(8))
    assert redis_client.ttl(batch_key("ttl")) == -1
    store.complete("ttl", {})
    assert all(0 < redis_client.ttl(block_key("ttl", block)) <= 600 for block in range(8))
    assert 0 < redis_client.ttl(batch_key("ttl")) <= 600
