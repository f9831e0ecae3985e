"""Expansion's building blocks against the real servers: ranged reads and paged listing on
S3, and the checkpoint hash's generations and once-only shard ends on Redis."""

from __future__ import annotations

import pytest

from shared.errors import NotFound
from worker.batches.checkpoints import ExpansionState


def test_ranged_reads_and_listing_pages(object_store):
    data = bytes(range(256)) * 4000
    object_store.put_bytes("src/archive.bin", data)
    assert object_store.get_range("src/archive.bin", 1000, 10) == data[1000:1010]
    assert object_store.get_range("src/archive.bin", len(data) - 3, 100) == data[-3:]
    with object_store.open_ranged("src/archive.bin", read_ahead=4096) as reader:
        assert reader.size == len(data)
        reader.seek(500_000)
        assert reader.read(100) == data[500_000:500_100]
        assert reader.read(100) == data[500_100:500_200]
        assert reader.gets == 1
    with pytest.raises(NotFound):
        object_store.open_ranged("src/missing.bin")
    for i in range(7):
        object_store.put_bytes(f"src/set/{i}.jpg", b"x")
    first = object_store.list_page("src/set/", limit=3)
    assert first == ["src/set/0.jpg", "src/set/1.jpg", "src/set/2.jpg"]
    rest = object_store.list_page("src/set/", start_after=first[-1], limit=10)
    assert rest == [f"src/set/{i}.jpg" for i in range(3, 7)]


def test_generations_and_shard_ends(redis_client):
    state = ExpansionState(redis_client, "b1", ttl_s=60)
    assert state.plan("zip", [{"index": 0}, {"index": 128}])
    assert not state.plan("zip", [{"index": 0}])  # a redelivered plan keeps the first
    assert state.claim(0, 0).cursor == {"index": 0}
    assert state.commit(0, 0, {"index": 64}) == "ok"
    # A continuation (generation 1) takes the shard over; the older task stops.
    assert state.claim(0, 1).cursor == {"index": 64}
    assert state.commit(0, 0, {"index": 32}) == "superseded"
    assert state.claim(0, 0).outcome == "superseded"
    assert state.commit(0, 1, {"index": 128}) == "ok"
    # Generation 1 hands on to 2: a later copy of generation 1's message does not start.
    state.handed_on(0, 2)
    assert state.claim(0, 1).outcome == "superseded"
    assert state.claim(0, 2).cursor == {"index": 128}
    assert state.unfinished() == [(0, 3), (1, 1)]
    first = state.finish(0, 2)
    assert first.recorded and not first.last
    assert state.claim(0, 2).outcome == "done"
    # A shard that fails records the first error; the other shards are told to stop.
    assert state.claim(1, 0).outcome == "ok"
    assert state.finish(0, None, {"code": "archive_bomb", "message": "m"}).recorded
    assert state.commit(1, 0, {"index": 200}) == "stop"
    last = state.finish(1, 0)
    assert last.last and last.error == {"code": "archive_bomb", "message": "m"}
    # Ending again (a redelivery) is recorded once: the counter stays at two.
    again = state.finish(1, 0)
    assert again.last and redis_client.hget(state.key, "shards_done") == b"2"
    assert redis_client.ttl(state.key) > 0


def test_a_delivery_presumed_dead_stops_once_its_task_was_handed_over(redis_client):
    """The same task delivered twice (its message handed over while the first holder still
    ran): one generation, two leases. The claim of the later delivery owns the shard; the
    earlier one's commits and end are refused, so it stops at its next block."""
    first = ExpansionState(redis_client, "b2", ttl_s=60, owner="11")
    assert first.plan("tar", [{"index": 0}])
    assert first.claim(0, 0).cursor == {"index": 0}
    assert first.commit(0, 0, {"index": 128}) == "ok"
    handed_over = ExpansionState(redis_client, "b2", ttl_s=60, owner="12")
    assert handed_over.claim(0, 0).cursor == {"index": 128}
    assert first.commit(0, 0, {"index": 256}) == "superseded"
    assert not first.finish(0, 0).recorded
    assert handed_over.commit(0, 0, {"index": 256}) == "ok"
    assert handed_over.finish(0, 0).last
    # A shard given up on (no generation) ends whoever owns it.
    other = ExpansionState(redis_client, "b3", ttl_s=60, owner="20")
    assert other.plan("tar", [{"index": 0}])
    assert other.claim(0, 0).outcome == "ok"
    assert ExpansionState(redis_client, "b3", ttl_s=60).finish(0, None).recorded
