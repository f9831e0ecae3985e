"""Redis memory of a batch's bookkeeping at dataset scale: a private redis-server,
one batch of ``--items`` members recorded a block at a time as expansion does, every item
then started and finished by chunks, and a second batch as large canceled while queued.

Reports ``used_memory`` (``INFO memory``) per item over the empty server with every item
queued (name, input pack and byte range) and with every item succeeded (plus figure,
thumbnail and manifest keys; all but the first ``DISTINCT`` items reused from one of them,
as in the issue's million-image archive), the Redis key count, how long the cancel took, and
any Redis command that ran longer than ``SLOW_US`` (SLOWLOG: nothing may block Redis).
Not a test: about a minute or two at a million items. Run it with
``python -m bench --only bookkeeping`` or ``python -m bench.bookkeeping [--items N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import redis

from shared import keys
from shared.batches import BLOCK_ITEMS, Batch, BatchStatus, BatchStore, ItemStatus, NewItem, item_id
from stack.services import RedisServer

ITEMS = 1_000_000
DISTINCT = 300
CHUNK = 64  # items per start/finish pair (BATCH_CHUNK is 16; fewer round trips here)
SYNSETS = [1440764 + 7919 * n for n in range(1000)]  # ImageNet-like directory names
SLOW_US = 10_000


def run(repeat: int) -> dict:
    del repeat  # one pass: it is a memory figure
    return measure(ITEMS)


def measure(items: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(tmp, appendonly=False)
        server.start()
        try:
            client = redis.Redis(host="127.0.0.1", port=server.port)
            return _measure(client, items)
        finally:
            server.stop()


def _measure(client: redis.Redis, items: int) -> dict:
    client.config_set("slowlog-log-slower-than", SLOW_US)
    client.slowlog_reset()
    store = BatchStore(client, ttl_s=86_400)
    empty = _used(client)
    _record(store, "bench", items)
    queued = _used(client) - empty
    started = time.perf_counter()
    _run_all(store, "bench", items)
    run_s = time.perf_counter() - started
    succeeded = _used(client) - empty
    key_count = client.dbsize()
    _record(store, "canceled", items)
    started = time.perf_counter()
    store.cancel("canceled")
    cancel_s = time.perf_counter() - started
    canceled = store.get("canceled").counts()
    slow = [(e["duration"], e["command"].decode()[:60]) for e in client.slowlog_get(128)]
    numbers = {
        "items": items,
        "bytes_per_item_queued": round(queued / items, 1),
        "bytes_per_item_succeeded": round(succeeded / items, 1),
        "redis_keys": key_count,
        "blocks": store.blocks("bench"),
        "start_and_finish_s": round(run_s, 1),
        "cancel_s": round(cancel_s, 2),
        "canceled_counts": canceled,
        "slowest_commands_us": sorted(slow, reverse=True)[:5],
    }
    _print(numbers)
    return numbers


def _used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _record(store: BatchStore, batch_id: str, items: int) -> None:
    """A batch with ``items`` queued members, recorded a block per call."""
    store.create(Batch(id=batch_id, status=BatchStatus.QUEUED, options={}, source={}))
    store.begin_expansion(batch_id)
    for first in range(0, items, BLOCK_ITEMS):
        block = first // BLOCK_ITEMS
        pack = keys.batch_input_pack_key(batch_id, block)
        new = []
        for n in range(first, min(items, first + BLOCK_ITEMS)):
            synset = SYNSETS[n % len(SYNSETS)]
            name = f"n{synset:08d}/n{synset:08d}_{n}.JPEG"
            offset = (n - first) * 110_000
            new.append(NewItem(item_id(batch_id, n), name, pack, input_range=(offset, 110_000)))
        store.add_items(batch_id, new)
    store.end_expansion(batch_id)


def _run_all(store: BatchStore, batch_id: str, items: int) -> None:
    """Every item started and finished succeeded by chunks of ``CHUNK``, as workers do."""
    for first in range(0, items, CHUNK):
        ids = [item_id(batch_id, n) for n in range(first, min(items, first + CHUNK))]
        started = store.start_items(batch_id, ids, token=f"chunk-{first}")
        infos = store.get_items(batch_id, started)
        store.finish_items(
            batch_id,
            [(i, ItemStatus.SUCCEEDED, _outputs(batch_id, i, infos[i].info)) for i in started],
        )


def _outputs(batch_id: str, item: str, info: dict) -> dict:
    attempt = "g1234567"  # a lease generation as a busy deployment reaches
    done = {
        **info,
        "figure_key": keys.figure_key(item, "jpg", attempt=attempt),
        "thumbnail_key": keys.thumbnail_key(item, attempt=attempt),
        "manifest_key": keys.manifest_key(item, attempt=attempt),
        "attempt": attempt,
    }
    index = int(item.rpartition("-")[2])
    if index >= DISTINCT:
        done.update(reused=True, reused_from=item_id(batch_id, index % DISTINCT))
    return done


def _print(numbers: dict) -> None:
    print(f"bookkeeping of {numbers['items']:,} items ({numbers['blocks']:,} blocks):")
    print(f"  redis memory per item, queued:    {numbers['bytes_per_item_queued']} bytes")
    print(f"  redis memory per item, succeeded: {numbers['bytes_per_item_succeeded']} bytes")
    print(f"  redis keys (batch + blocks):      {numbers['redis_keys']:,}")
    print(f"  start + finish every item:        {numbers['start_and_finish_s']} s")
    canceled = numbers["canceled_counts"]
    print(f"  cancel of as many queued items:   {numbers['cancel_s']} s -> {canceled}")
    print(f"  commands over {SLOW_US} us:          {numbers['slowest_commands_us'] or 'none'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bookkeeping", description=__doc__)
    parser.add_argument("--items", type=int, default=ITEMS)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.items)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
