"""Storage retries waiting out their backoff in Redis, not in a worker's hands.

A task whose storage is unavailable is tried again after a backoff (worker/guard.py). Celery's
own ``retry(countdown=...)`` would publish the retry with an ETA, and whichever worker took it
would hold it unacknowledged until it was due, leased by nobody: a worker killed in the
meantime left it for kombu's restore, after the visibility timeout (600 s), and a worker
scaled down took it along. Here the retry is written to Redis instead, the delivery ends, and
the keeper (keeper/runner.py, every :data:`SEND_DUE_EVERY_S`, in the API's processes and the
workers') sends it again once it is due: same task id, same arguments, ``retries`` one more,
the time it was first sent kept.

- ``featuremaps:delayed`` — sorted set: task id → when it is due (Unix time).
- ``featuremaps:delayed:messages`` — hash: task id → JSON :class:`Delayed`.

Both are written in one transaction and taken in one script, so two keepers never send the
same retry; a keeper that dies between taking and sending loses it, and the reconciler
(keeper/reconciler.py), which counts a waiting retry as a message that will move its record,
finds the record without one and sends its task again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from redis import Redis

from shared.records import PREFIX, text

DELAYED_KEY = f"{PREFIX}:delayed"
DELAYED_MESSAGES_KEY = f"{PREFIX}:delayed:messages"
SEND_DUE_EVERY_S = 1.0
# Retries taken per script call; a keeper takes more in the same tick until none are due.
TAKE_AT_MOST = 100


@dataclass(frozen=True)
class Delayed:
    """A task to send again: what Celery's retry would have published."""

    task: str
    task_id: str
    args: list
    queue: str
    priority: int | None
    retries: int
    sent_at: float | None = None


# KEYS: the sorted set, the hash. ARGV: now, at most. Returns the JSON of each due retry,
# removed from both.
_TAKE_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  local raw = redis.call('HGET', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  if raw then table.insert(out, raw) end
end
return out
"""


def hold_back(redis: Redis, delayed: Delayed, due: float) -> None:
    """Keep ``delayed`` until ``due``; a retry of the same task id replaces the previous."""
    with redis.pipeline(transaction=True) as pipe:
        pipe.hset(DELAYED_MESSAGES_KEY, delayed.task_id, json.dumps(asdict(delayed)))
        pipe.zadd(DELAYED_KEY, {delayed.task_id: due})
        pipe.execute()


def take_due(redis: Redis, now: float, *, at_most: int = TAKE_AT_MOST) -> list[Delayed]:
    """Remove and return the retries due at ``now`` (at most ``at_most``), earliest first."""
    script = redis.register_script(_TAKE_DUE)  # EVALSHA, as every script of ours
    raws = script(keys=[DELAYED_KEY, DELAYED_MESSAGES_KEY], args=[now, at_most])
    return [Delayed(**json.loads(text(raw))) for raw in raws]


def waiting(redis: Redis) -> Iterator[Delayed]:
    """Every retry waiting out its backoff (read without locking)."""
    for _task_id, raw in redis.hscan_iter(DELAYED_MESSAGES_KEY):
        try:
            yield Delayed(**json.loads(text(raw)))
        except (ValueError, TypeError):
            continue


def count(redis: Redis) -> int:
    return int(redis.zcard(DELAYED_KEY))
