"""Where an expansion's progress is kept: one Redis hash per batch,
``featuremaps:batch:<id>:expansion``, with the batch's TTL.

    kind, shards            the plan: the source kind and how many shards it was cut into
    cursor:<n>              shard n's checkpoint (JSON): where its next block starts
    gen:<n>                 the generation of the task that owns shard n now
    owner:<n>               the lease generation (shared/leases.py) of the delivery of that
                            task that claimed it last
    done:<n>                set once shard n has ended (read to its end, stopped, or failed)
    shards_done             how many have (the one that makes it ``shards`` ends expansion)
    continuations           how many times a task handed a shard on to a continuation
    error                   the first error that ended a shard (the batch's expansion error)

A checkpoint is committed only after its block's pack is uploaded and its items are added,
so a redelivered task redoes at most one block (``add_items`` is idempotent per id).
Every task of a shard carries a generation: a continuation is sent with the next one (and
the hash moves to it once it is sent), and whichever task holds an older generation than the
hash stops at its next commit or does not start, so a stale redelivery never moves a shard
backwards or runs beside its continuation for long. Two deliveries of the *same* task (a
holder presumed dead and the delivery its message was handed over to) carry the same
generation: the claim records the delivery's lease generation too, and a commit or an end by
any other delivery is refused the same way, so the presumed-dead one stops at its next block
instead of expanding, and handing on, beside the one that took its work over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from redis import Redis

from shared.batches import batch_key
from shared.records import text

_PLAN = """
if redis.call('HEXISTS', KEYS[1], 'shards') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'kind', ARGV[2], 'shards', #ARGV - 2, 'shards_done', 0,
  'continuations', 0)
for i = 3, #ARGV do
  redis.call('HSET', KEYS[1], 'cursor:' .. (i - 3), ARGV[i], 'gen:' .. (i - 3), 0)
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""

# ARGV: ttl, shard, gen, owner (the delivery's lease generation, '' unfenced). Returns
# {'ok', cursor} | {'done'} | {'superseded'} | {'missing'}.
_CLAIM = """
local shard = ARGV[2]
local cursor = redis.call('HGET', KEYS[1], 'cursor:' .. shard)
if not cursor then return {'missing'} end
if redis.call('HEXISTS', KEYS[1], 'done:' .. shard) == 1 then return {'done'} end
local cur = tonumber(redis.call('HGET', KEYS[1], 'gen:' .. shard) or '0')
if tonumber(ARGV[3]) < cur then return {'superseded'} end
redis.call('HSET', KEYS[1], 'gen:' .. shard, ARGV[3], 'owner:' .. shard, ARGV[4])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return {'ok', cursor}
"""

# ARGV: ttl, shard, gen, cursor, owner. Returns 'ok', 'stop' (another shard failed the
# expansion) or 'superseded'.
_COMMIT = """
local shard = ARGV[2]
if redis.call('HGET', KEYS[1], 'gen:' .. shard) ~= ARGV[3]
  or (redis.call('HGET', KEYS[1], 'owner:' .. shard) or '') ~= ARGV[5]
  or redis.call('HEXISTS', KEYS[1], 'done:' .. shard) == 1 then
  return 'superseded'
end
redis.call('HSET', KEYS[1], 'cursor:' .. shard, ARGV[4])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
if redis.call('HEXISTS', KEYS[1], 'error') == 1 then return 'stop' end
return 'ok'
"""

# ARGV: ttl, shard, gen ('' for whichever), error JSON or '', owner (with a gen). Returns
# {'superseded'} or {'ok', shards_done, shards, error}.
_FINISH = """
local shard = ARGV[2]
if ARGV[3] ~= '' and (redis.call('HGET', KEYS[1], 'gen:' .. shard) ~= ARGV[3]
    or (redis.call('HGET', KEYS[1], 'owner:' .. shard) or '') ~= ARGV[5]) then
  return {'superseded'}
end
if ARGV[4] ~= '' then redis.call('HSETNX', KEYS[1], 'error', ARGV[4]) end
if redis.call('HSETNX', KEYS[1], 'done:' .. shard, 1) == 1 then
  redis.call('HINCRBY', KEYS[1], 'shards_done', 1)
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
local state = redis.call('HMGET', KEYS[1], 'shards_done', 'shards', 'error')
return {'ok', state[1], state[2], state[3] or ''}
"""


# ARGV: ttl, shard, the continuation's generation. The shard now belongs to the continuation:
# a later copy of the message that handed on finds itself superseded.
_HANDED_ON = """
local field = 'gen:' .. ARGV[2]
if tonumber(redis.call('HGET', KEYS[1], field) or '0') < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], field, ARGV[3])
end
redis.call('HINCRBY', KEYS[1], 'continuations', 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""


def expansion_key(batch_id: str) -> str:
    return f"{batch_key(batch_id)}:expansion"


@dataclass(frozen=True)
class Claim:
    """What a shard's task may do: ``run`` from ``cursor``, or nothing (``done``: the shard
    has ended; ``superseded``: a newer task owns it; ``missing``: no plan)."""

    outcome: str
    cursor: dict[str, Any] | None = None


@dataclass(frozen=True)
class Finish:
    """A shard's end as recorded: ``last`` when every shard has now ended."""

    recorded: bool
    last: bool = False
    error: dict[str, str] | None = None


class ExpansionState:
    """The checkpoints of one batch's expansion (see the module docstring)."""

    def __init__(self, redis: Redis, batch_id: str, ttl_s: int, *, owner: str = "") -> None:
        """``owner``: the lease generation of the delivery that claims, commits and ends
        shards through this object ('' unfenced)."""
        self.redis = redis
        self.key = expansion_key(batch_id)
        self.ttl_s = ttl_s
        self.owner = owner
        self._plan = redis.register_script(_PLAN)
        self._claim = redis.register_script(_CLAIM)
        self._commit = redis.register_script(_COMMIT)
        self._finish = redis.register_script(_FINISH)
        self._handed_on = redis.register_script(_HANDED_ON)

    def plan(self, kind: str, cursors: list[dict[str, Any]]) -> bool:
        """Record the plan, once; False when one was recorded before (a redelivery)."""
        args = [self.ttl_s, kind, *(json.dumps(cursor) for cursor in cursors)]
        return bool(self._plan(keys=[self.key], args=args))

    def planned(self) -> bool:
        return bool(self.redis.hexists(self.key, "shards"))

    def unfinished(self) -> list[tuple[int, int]]:
        """``(shard, next generation)`` of every shard that has not ended."""
        state = {text(k): text(v) for k, v in self.redis.hgetall(self.key).items()}
        shards = int(state.get("shards", 0))
        return [
            (shard, int(state.get(f"gen:{shard}", 0)) + 1)
            for shard in range(shards)
            if f"done:{shard}" not in state
        ]

    def claim(self, shard: int, gen: int) -> Claim:
        outcome, *rest = self._claim(keys=[self.key], args=[self.ttl_s, shard, gen, self.owner])
        cursor = json.loads(text(rest[0])) if rest else None
        return Claim(text(outcome), cursor)

    def commit(self, shard: int, gen: int, cursor: dict[str, Any]) -> str:
        args = [self.ttl_s, shard, gen, json.dumps(cursor), self.owner]
        return text(self._commit(keys=[self.key], args=args))

    def finish(self, shard: int, gen: int | None, error: dict[str, str] | None = None) -> Finish:
        """Mark the shard ended (with the error that ended it, if any), unless a newer task
        owns it; ``gen=None`` ends it whoever owns it (a task given up on)."""
        error_json = json.dumps(error) if error else ""
        args = [self.ttl_s, shard, "" if gen is None else gen, error_json, self.owner]
        outcome, *rest = self._finish(keys=[self.key], args=args)
        if text(outcome) != "ok":
            return Finish(recorded=False)
        done, shards, first_error = rest
        stored = text(first_error)
        return Finish(
            recorded=True,
            last=int(done) == int(shards),
            error=json.loads(stored) if stored else None,
        )

    def handed_on(self, shard: int, gen: int) -> None:
        """Record that the shard's continuation of generation ``gen`` was sent."""
        self._handed_on(keys=[self.key], args=[self.ttl_s, shard, gen])

    def continuations(self) -> int:
        return int(self.redis.hget(self.key, "continuations") or 0)
