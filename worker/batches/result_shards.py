"""Where a batch's result shards are planned and counted: one Redis hash per batch,
``featuremaps:batch:<id>:shards``, with the plan (``total`` members, ``size`` members per
shard) and one field ``shard:<n>`` per written shard holding what it wrote (JSON: index,
first, items, manifest_key, archive_key).

The plan is written once (a redelivered finalize task keeps the first one, so every shard
task of a batch agrees on the positions it covers); writing a shard's field again (a shard
task redelivered or run twice) changes nothing but its TTL. Whoever sees the last field
written closes the batch (worker/batches/finalize.py); closing is idempotent, so a second caller
that sees it too does no harm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from redis import Redis

from shared.batches import batch_key

# KEYS[1] shards hash; ARGV: ttl, total, size. Returns the plan in force: {total, size}.
_PLAN = """
if redis.call('HEXISTS', KEYS[1], 'total') == 0 then
  redis.call('HSET', KEYS[1], 'total', ARGV[2], 'size', ARGV[3])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return redis.call('HMGET', KEYS[1], 'total', 'size')
"""

# KEYS[1] shards hash; ARGV: ttl, shard index, summary JSON. Returns how many shards are
# written, or -1 when the batch has no plan (expired).
_RECORD = """
if redis.call('HEXISTS', KEYS[1], 'total') == 0 then return -1 end
redis.call('HSET', KEYS[1], 'shard:' .. ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return redis.call('HLEN', KEYS[1]) - 2
"""


class ShardsUnplanned(LookupError):
    """A shard task ran for a batch whose plan is gone (it expired with the batch)."""


@dataclass(frozen=True)
class ShardPlan:
    """``total`` members in shards of ``size`` by position; shards are numbered from 1, and
    an empty batch still has one (empty) shard."""

    total: int
    size: int

    @property
    def count(self) -> int:
        return max(1, -(-self.total // self.size))

    def span(self, shard: int) -> tuple[int, int]:
        """(first position, number of members) of ``shard``."""
        if not 1 <= shard <= self.count:
            raise ValueError(f"shard {shard} is not one of 1..{self.count}")
        first = (shard - 1) * self.size
        return first, max(0, min(self.size, self.total - first))


def shards_key(batch_id: str, kind: str = "shards") -> str:
    return f"{batch_key(batch_id)}:{kind}"


class ResultShards:
    """The plan and the written shards of batches' results; with ``kind="examples"``, of the
    dataset examples' slices (worker/batches/examples.py), counted the same way."""

    def __init__(self, redis: Redis, *, ttl_s: int, kind: str = "shards") -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.kind = kind
        self._plan = redis.register_script(_PLAN)
        self._record = redis.register_script(_RECORD)

    def plan(self, batch_id: str, *, total: int, size: int) -> ShardPlan:
        """The batch's plan: this one, or the one an earlier call wrote."""
        stored_total, stored_size = self._plan(
            keys=[shards_key(batch_id, self.kind)], args=[self.ttl_s, total, size]
        )
        return ShardPlan(total=int(stored_total), size=int(stored_size))

    def planned(self, batch_id: str) -> ShardPlan:
        total, size = self.redis.hmget(shards_key(batch_id, self.kind), ["total", "size"])
        if total is None:
            raise ShardsUnplanned(f"batch {batch_id} has no {self.kind} planned")
        return ShardPlan(total=int(total), size=int(size))

    def record(self, batch_id: str, shard: int, summary: dict[str, Any]) -> int:
        """Mark ``shard`` written with its ``summary``; returns how many shards are written."""
        written = int(
            self._record(
                keys=[shards_key(batch_id, self.kind)],
                args=[self.ttl_s, shard, json.dumps(summary)],
            )
        )
        if written < 0:
            raise ShardsUnplanned(f"batch {batch_id} has no {self.kind} planned")
        return written

    def written(self, batch_id: str) -> list[dict[str, Any]]:
        """The summaries of the written shards, by index."""
        fields = self.redis.hgetall(shards_key(batch_id, self.kind))
        summaries = [json.loads(v) for k, v in fields.items() if k.startswith(b"shard:")]
        return sorted(summaries, key=lambda s: s["index"])
