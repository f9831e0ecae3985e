"""The batch scheduler's scripts on a real redis-server (shared/schedule.py): fair turns by
owner and by batch, the window, resuming a claimed chunk, cancel, and repair of lost turns.
The end-to-end behaviour with real workers is in test_fair_share.py."""

from __future__ import annotations

import base64
import json
from collections import Counter

import pytest

from shared.batches import Batch, BatchStatus, BatchStore
from shared.leases import Fence, LeaseLost
from shared.queue import CHUNK_PRIORITY, UNACKED_KEY, queue_key
from shared.schedule import (
    CLAIMS_KEY,
    TURNS_KEY,
    Claim,
    Scheduler,
    parse_weights,
    todo_key,
)
from shared.settings import Settings


def _batch(store: BatchStore, batch_id: str, owner: str, status=BatchStatus.RUNNING) -> str:
    store.create(Batch(id=batch_id, status=status, options={}, source={}, owner=owner))
    return batch_id


def _chunks(count: int, size: int = 2, first: int = 0) -> list[list[int]]:
    return [list(range(first + n * size, first + (n + 1) * size)) for n in range(count)]


def _run(scheduler: Scheduler, turns: list[str], limit: int = 10_000) -> list[str]:
    """Run turns as one worker would, one at a time in queue order: each claims, "runs" and
    ends, its successors going to the back of the queue. Returns the batch of every chunk in
    the order claimed."""
    order, queue = [], list(turns)
    while queue and len(order) < limit:
        turn = queue.pop(0)
        claim = scheduler.claim(turn)
        if isinstance(claim, Claim):
            order.append(claim.batch_id)
        queue += scheduler.end(turn)
    return order


def test_each_owner_gets_an_equal_share_whatever_its_number_of_batches(redis_client):
    store = BatchStore(redis_client, ttl_s=60)
    scheduler = Scheduler(redis_client, Settings(batch_window=4))
    alice = [_batch(store, f"a{n}", "alice") for n in range(3)]
    bob = _batch(store, "b0", "bob")
    turns = []
    for batch_id in alice:
        turns += scheduler.add(batch_id, _chunks(10))
    turns += scheduler.add(bob, _chunks(10))
    assert len(turns) == 4  # the window, not one per chunk
    order = _run(scheduler, turns)
    assert len(order) == 40 and Counter(order) == {"a0": 10, "a1": 10, "a2": 10, "b0": 10}
    # While both owners have chunks waiting (bob's last is the 20th claim at the latest),
    # every prefix of the order is split evenly between them, and alice's batches take turns.
    for n in range(1, 21):
        prefix = order[:n]
        shares = Counter("bob" if b == "b0" else "alice" for b in prefix)
        assert abs(shares["alice"] - shares["bob"]) <= 1, prefix
        per_batch = [prefix.count(b) for b in alice]
        assert max(per_batch) - min(per_batch) <= 1, prefix
    assert scheduler.backlog() == {"chunks": 0, "items": 0, "turns": 0, "claimed": 0}


def test_an_owner_weight_changes_its_share(redis_client):
    store = BatchStore(redis_client, ttl_s=60)
    scheduler = Scheduler(redis_client, Settings(batch_window=2, owner_weights="alice=2"))
    turns = scheduler.add(_batch(store, "a", "alice"), _chunks(40))
    turns += scheduler.add(_batch(store, "b", "bob"), _chunks(40))
    order = _run(scheduler, turns, limit=30)
    assert abs(order.count("a") - 2 * order.count("b")) <= 2, order


def test_a_new_owner_joins_at_the_current_pass_and_gets_no_credit_for_idle_time(redis_client):
    store = BatchStore(redis_client, ttl_s=60)
    scheduler = Scheduler(redis_client, Settings(batch_window=1))
    turns = scheduler.add(_batch(store, "a", "alice"), _chunks(30))
    order = _run(scheduler, turns, limit=20)  # alice alone for 20 chunks
    assert order == ["a"] * 20
    # the turn in circulation is still registered: hand bob chunks and go on
    late = scheduler.add(_batch(store, "b", "bob"), _chunks(10))
    assert late == []  # the window (1) is full: the same turn goes on
    (turn,) = [t.decode() for t in redis_client.zrange(TURNS_KEY, 0, -1)]
    order = _run(scheduler, [turn], limit=10)
    assert abs(order.count("a") - order.count("b")) <= 1, order


def test_the_window_bounds_turns_and_never_exceeds_the_chunks_waiting(redis_client):
    store = BatchStore(redis_client, ttl_s=60)
    scheduler = Scheduler(redis_client, Settings(batch_window=8))
    assert len(scheduler.add(_batch(store, "small", "alice"), _chunks(3))) == 3
    assert len(scheduler.add(_batch(store, "big", "bob"), _chunks(1000))) == 5
    assert scheduler.add("big", _chunks(10, first=5000)) == []
    assert scheduler.backlog() == {"chunks": 1013, "items": 2026, "turns": 8, "claimed": 0}


def test_a_turn_resumes_its_chunk_and_an_ended_turn_claims_nothing(redis_client):
    store = BatchStore(redis_client, ttl_s=60)
    scheduler = Scheduler(redis_client, Settings(batch_window=1))
    (turn,) = scheduler.add(_batch(store, "r", "alice"), [[5, 6, 7], [8]])
    first = scheduler.claim(turn)
    assert first == Claim("r", ["r-000005", "r-000006", "r-000007"])
    assert scheduler.claim(turn) == first  # a redelivery, or a handed-over message
    assert scheduler.claimed(turn) == first
    (successor,) = scheduler.end(turn)
    assert scheduler.claim(turn) == "none"  # a late copy of an ended turn does nothing
    assert scheduler.claim(successor) == Claim("r", ["r-000008"])
    assert scheduler.end(successor) == []
    assert scheduler.backlog() == {"chunks": 0, "items": 0, "turns": 0, "claimed": 0}


def test_a_stale_holder_can_neither_claim_nor_end(redis_client):
    store = BatchStore(redis_client, ttl_s=60)
    scheduler = Scheduler(redis_client, Settings(batch_window=1))
    (turn,) = scheduler.add(_batch(store, "s", "alice"), [[1]])
    redis_client.hset(f"featuremaps:lease:{turn}", mapping={"gen": "7", "holder": "h"})
    with pytest.raises(LeaseLost):
        scheduler.claim(turn, Fence(turn, "6"))
    assert isinstance(scheduler.claim(turn, Fence(turn, "7")), Claim)
    with pytest.raises(LeaseLost):
        scheduler.end(turn, Fence(turn, "6"))
    assert redis_client.hexists(CLAIMS_KEY, turn)


def test_a_canceled_batch_gets_no_more_turns_and_leaves_no_backlog(redis_client):
    store = BatchStore(redis_client, ttl_s=60)
    scheduler = Scheduler(redis_client, Settings(batch_window=4))
    turns = scheduler.add(_batch(store, "huge", "alice"), _chunks(20_000, size=1))
    turns += scheduler.add(_batch(store, "next", "bob"), _chunks(3))
    assert len(turns) == 4
    store.cancel("huge")
    assert not redis_client.exists(todo_key("huge"))
    assert scheduler.backlog()["chunks"] == 3 and scheduler.backlog()["items"] == 6
    assert _run(scheduler, turns) == ["next"] * 3
    assert scheduler.add("huge", _chunks(5)) == []  # a late expansion block adds nothing
    assert scheduler.backlog() == {"chunks": 0, "items": 0, "turns": 0, "claimed": 0}


def test_a_batch_canceled_by_other_means_is_dropped_by_the_next_claim(redis_client):
    store = BatchStore(redis_client, ttl_s=60)
    scheduler = Scheduler(redis_client, Settings(batch_window=2))
    turns = scheduler.add(_batch(store, "gone", "alice"), _chunks(50))
    redis_client.hset("featuremaps:batch:gone", "status", "failed")
    assert [scheduler.claim(t) for t in turns] == ["idle", "idle"]
    assert scheduler.backlog() == {"chunks": 0, "items": 0, "turns": 0, "claimed": 0}


def _message(task_id: str) -> str:
    """A turn's message as kombu stores it: Celery's headers, the body (no arguments)
    base64-encoded."""
    body = base64.b64encode(json.dumps([[], {}, {}]).encode()).decode()
    return json.dumps(
        {
            "body": body,
            "headers": {"id": task_id, "task": "featuremaps.run_batch_turn"},
            "properties": {"priority": CHUNK_PRIORITY, "body_encoding": "base64"},
        }
    )


def test_repair_resends_turns_with_no_message_and_tops_up_a_window_that_lost_them(
    redis_client,
):
    store = BatchStore(redis_client, ttl_s=60)
    scheduler = Scheduler(redis_client, Settings(batch_window=4))
    queued, unacked, leased, lost = scheduler.add(_batch(store, "w", "alice"), _chunks(10))
    redis_client.lpush(queue_key("batch", CHUNK_PRIORITY), _message(queued))
    redis_client.hset(
        UNACKED_KEY, "tag-1", json.dumps([json.loads(_message(unacked)), "", "batch"])
    )
    redis_client.hset(f"featuremaps:lease:{leased}", "holder", "node:1.abc")
    sent: list[str] = []
    assert scheduler.repair(sent.append, older_than_s=60) == {"turn_resent": 0, "turn_added": 0}
    assert scheduler.repair(sent.append, older_than_s=0) == {"turn_resent": 1, "turn_added": 0}
    assert sent == [lost]
    # resent now: not again on the next sweep
    assert scheduler.repair(sent.append, older_than_s=1) == {"turn_resent": 0, "turn_added": 0}
    # the registrations themselves lost (an AOF missing its last second): chunks wait with no
    # turn; repair opens the window again
    redis_client.delete(TURNS_KEY)
    sent.clear()
    assert scheduler.repair(sent.append, older_than_s=0) == {"turn_resent": 0, "turn_added": 4}
    assert len(sent) == 4 and scheduler.backlog()["turns"] == 4


def test_owner_weights_are_checked_at_start():
    assert parse_weights("alice=2, bob=0.5") == {"alice": 2.0, "bob": 0.5}
    for bad in ("alice", "alice=0", "=2", "alice=x"):
        with pytest.raises(ValueError, match="FEATUREMAPS_OWNER_WEIGHTS"):
            parse_weights(bad)
        with pytest.raises(ValueError, match="FEATUREMAPS_OWNER_WEIGHTS"):
            Settings(owner_weights=bad)
