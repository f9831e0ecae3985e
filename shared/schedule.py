"""Fair turns for batch chunks: which chunk of which batch a worker runs next.

A batch's expansion no longer sends a message per chunk. It hands its chunks (lists of
member indexes) to this scheduler, which keeps them in Redis, and the batch queue holds only
*turns*: messages that carry no batch at all (``featuremaps.run_batch_turn``). A worker that
takes a turn asks the scheduler for a chunk when the turn starts (:meth:`Scheduler.claim`), so
the choice is made at the last moment and is always fair:

- **owners** (the token a batch was submitted with) take turns by stride scheduling: the
  owner with the smallest *pass* goes next and its pass grows by ``1 / weight`` per chunk, so
  each owner gets an equal share (or its weight's share, ``FEATUREMAPS_OWNER_WEIGHTS``)
  whatever its number of batches. An owner that comes back joins at the current pass: idle
  time earns no credit.
- an owner's batches take turns round-robin, a chunk each.
- single jobs keep their priority: they are in the ``jobs`` queue, which workers read first.

At most ``FEATUREMAPS_BATCH_WINDOW`` turns are queued or running at once (the *window*,
over all batches), and never more unclaimed turns than chunks waiting: a turn that ends
registers its successor in the same script while chunks wait, so the queue stays short
whatever the backlog. A canceled batch costs nothing: its waiting chunks are dropped at once
(:meth:`Scheduler.forget`, and by any claim that meets it), and no message names it.

Every turn is registered (``turns``, task id -> time) before its message is sent, and a
claimed turn keeps its chunk (``claims``) until it ends, so a redelivered or handed-over turn
resumes the same chunk, and a turn whose message was lost (a worker killed between
registering a successor and sending it, a Redis restarted from an AOF missing its last
second) is found by :meth:`Scheduler.repair` and sent again under the same id. Repair also
tops the window up when chunks wait with too few turns to take them. docs/design.md "Fair
share" has the contract.

Keys (all under ``featuremaps:sched``): ``:todo:<batch>`` (list of chunks), ``:ring:<owner>``
(the owner's batches with chunks waiting), ``:owners`` (sorted set, owner -> pass), ``:turns``
(sorted set, turn id -> registered at), ``:claims`` (hash, turn id -> ``<batch>|<chunk>``),
and the hash itself (``chunks``, ``items``: what waits, for the autoscaler; ``vtime``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from redis import Redis

from shared.leases import FENCE_LUA, UNFENCED, Fence, LeaseLost, lease_key
from shared.queue import broker_options, pending_messages
from shared.records import PREFIX, text
from shared.settings import Settings

SCHED_KEY = f"{PREFIX}:sched"
OWNERS_KEY = f"{SCHED_KEY}:owners"
TURNS_KEY = f"{SCHED_KEY}:turns"
CLAIMS_KEY = f"{SCHED_KEY}:claims"


def todo_key(batch_id: str) -> str:
    return f"{SCHED_KEY}:todo:{batch_id}"


def ring_key(owner: str) -> str:
    return f"{SCHED_KEY}:ring:{owner}"


# KEYS: the scheduler hash, owners, turns, claims. ARGV[1] = now, ARGV[2] = window.
# Other keys (a batch's hash and todo list, an owner's ring) are named from ids, as a
# round-robin over all batches cannot list them in advance: this scheduler needs a single
# Redis (as the rest of the service does), not a cluster.
_PRELUDE = """
local function bkey(b) return 'featuremaps:batch:' .. b end
local function tkey(b) return 'featuremaps:sched:todo:' .. b end
local function rkey(o) return 'featuremaps:sched:ring:' .. o end
local function count(s)
  local n = 1
  for _ in string.gmatch(s, ',') do n = n + 1 end
  return n
end
-- Forget what batch b still had waiting: its chunks leave the totals.
local function drop(b)
  local chunks = tonumber(redis.call('HGET', bkey(b), 'sched_chunks') or '0')
  local items = tonumber(redis.call('HGET', bkey(b), 'sched_items') or '0')
  if chunks > 0 then
    redis.call('HINCRBY', KEYS[1], 'chunks', -chunks)
    redis.call('HINCRBY', KEYS[1], 'items', -items)
  end
  redis.call('DEL', tkey(b))
  if redis.call('EXISTS', bkey(b)) == 1 then
    redis.call('HDEL', bkey(b), 'sched_chunks', 'sched_items', 'scheduled')
  end
end
-- Register new turns (from the table of fresh ids given) while chunks wait for one and the
-- window has room; returns the ids registered.
local function top_up(ids)
  local out = {}
  local window = tonumber(ARGV[2])
  local waiting = tonumber(redis.call('HGET', KEYS[1], 'chunks') or '0')
  local turns = redis.call('ZCARD', KEYS[3])
  local free = turns - redis.call('HLEN', KEYS[4])
  local i = 1
  while i <= #ids and turns < window and free < waiting do
    redis.call('ZADD', KEYS[3], tonumber(ARGV[1]), ids[i])
    table.insert(out, ids[i])
    turns = turns + 1
    free = free + 1
    i = i + 1
  end
  return out
end
"""

# ARGV: now, window, batch id, then the number of new turn ids, the ids, then the chunks
# (comma-joined member indexes). Returns the turn ids registered (to be sent).
_ADD = (
    _PRELUDE
    + """
local b = ARGV[3]
local status = redis.call('HGET', bkey(b), 'status')
if not status or status == 'canceled' or status == 'succeeded' or status == 'failed' then
  return {}
end
local n = tonumber(ARGV[4])
local chunks, items = 0, 0
for i = 5 + n, #ARGV do
  redis.call('RPUSH', tkey(b), ARGV[i])
  chunks = chunks + 1
  items = items + count(ARGV[i])
end
if chunks == 0 then return {} end
redis.call('HINCRBY', bkey(b), 'sched_chunks', chunks)
redis.call('HINCRBY', bkey(b), 'sched_items', items)
redis.call('HINCRBY', KEYS[1], 'chunks', chunks)
redis.call('HINCRBY', KEYS[1], 'items', items)
if redis.call('HSETNX', bkey(b), 'scheduled', '1') == 1 then
  local owner = redis.call('HGET', bkey(b), 'owner') or ''
  redis.call('RPUSH', rkey(owner), b)
  if not redis.call('ZSCORE', KEYS[2], owner) then
    local vtime = redis.call('HGET', KEYS[1], 'vtime') or '0'
    redis.call('ZADD', KEYS[2], vtime, owner)
  end
end
local ids = {}
for i = 5, 4 + n do table.insert(ids, ARGV[i]) end
return top_up(ids)
"""
)

# ARGV: now, window, turn id, weights JSON ({owner: weight}), default weight, lease
# generation ('' unfenced); KEYS[5] the turn's lease. Returns {batch, chunk} (the turn's
# chunk: kept from an earlier delivery of the same turn, or the next one in fair order),
# {'none'} for a turn that is not registered (it ended already), {'idle'} when nothing waits
# (the turn ends), {'stale'} when the caller no longer holds its lease.
_CLAIM = (
    _PRELUDE
    + FENCE_LUA
    + """
if stale(KEYS[5], ARGV[6]) then return {'stale'} end
local tid = ARGV[3]
local held = redis.call('HGET', KEYS[4], tid)
if held then
  local sep = string.find(held, '|', 1, true)
  return {string.sub(held, 1, sep - 1), string.sub(held, sep + 1)}
end
if not redis.call('ZSCORE', KEYS[3], tid) then return {'none'} end
local weights = cjson.decode(ARGV[4])
while true do
  local top = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if #top == 0 then
    redis.call('ZREM', KEYS[3], tid)
    return {'idle'}
  end
  local owner, pass = top[1], tonumber(top[2])
  local ring = rkey(owner)
  local b = redis.call('LINDEX', ring, 0)
  if not b then
    redis.call('ZREM', KEYS[2], owner)
  else
    local status = redis.call('HGET', bkey(b), 'status')
    local chunk = nil
    if status and status ~= 'canceled' and status ~= 'failed' and status ~= 'succeeded' then
      chunk = redis.call('LPOP', tkey(b))
    end
    if not chunk then
      -- canceled, ended, gone, or nothing waits now (expansion adds it back with its next
      -- chunks)
      redis.call('LPOP', ring)
      drop(b)
      if redis.call('LLEN', ring) == 0 then redis.call('ZREM', KEYS[2], owner) end
    else
      local items = count(chunk)
      redis.call('HINCRBY', bkey(b), 'sched_chunks', -1)
      redis.call('HINCRBY', bkey(b), 'sched_items', -items)
      redis.call('HINCRBY', KEYS[1], 'chunks', -1)
      redis.call('HINCRBY', KEYS[1], 'items', -items)
      if redis.call('LLEN', tkey(b)) == 0 then
        redis.call('LPOP', ring)
        redis.call('HDEL', bkey(b), 'scheduled', 'sched_chunks', 'sched_items')
      else
        redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
      end
      local weight = tonumber(weights[owner] or ARGV[5])
      if redis.call('LLEN', ring) == 0 then
        redis.call('ZREM', KEYS[2], owner)
      else
        redis.call('ZADD', KEYS[2], pass + 1 / weight, owner)
      end
      redis.call('HSET', KEYS[1], 'vtime', tostring(pass))
      redis.call('HSET', KEYS[4], tid, b .. '|' .. chunk)
      redis.call('HINCRBY', bkey(b), 'chunks_claimed', 1)
      return {b, chunk}
    end
  end
end
"""
)

# ARGV: now, window, turn id, lease generation ('' unfenced), then new turn ids; KEYS[5] the
# turn's lease. Ends the turn (its claim and its registration) and registers successors
# while chunks wait. Returns {'stale'} or {'ok', ids registered...}.
_END = (
    _PRELUDE
    + FENCE_LUA
    + """
if stale(KEYS[5], ARGV[4]) then return {'stale'} end
redis.call('HDEL', KEYS[4], ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[3])
local ids = {}
for i = 5, #ARGV do table.insert(ids, ARGV[i]) end
local out = top_up(ids)
table.insert(out, 1, 'ok')
return out
"""
)

# ARGV: now, window, batch id. A canceled batch's waiting chunks are dropped at once.
_FORGET = (
    _PRELUDE
    + """
drop(ARGV[3])
return 'ok'
"""
)

# ARGV: now, window, then new turn ids. Registers turns while chunks wait for one (a window
# that lost its turns). Returns the ids registered.
_TOP_UP = (
    _PRELUDE
    + """
local ids = {}
for i = 3, #ARGV do table.insert(ids, ARGV[i]) end
return top_up(ids)
"""
)

# ARGV: now, turn id. Marks a turn re-sent now (so a sweep that follows does not send it
# again at once), if it is still registered; returns 1 if so.
_TOUCH = """
if redis.call('ZSCORE', KEYS[3], ARGV[2]) then
  redis.call('ZADD', KEYS[3], tonumber(ARGV[1]), ARGV[2])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Claim:
    """What a turn runs: a batch and the item ids of one of its chunks."""

    batch_id: str
    item_ids: list[str]


def parse_weights(spec: str) -> dict[str, float]:
    """``"alice=2,bob=0.5"`` -> ``{"alice": 2.0, "bob": 0.5}``; a clear error otherwise."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        owner, sep, value = part.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = 0.0
        if not sep or not owner or not weight > 0:
            raise ValueError(
                f"FEATUREMAPS_OWNER_WEIGHTS: {part!r} is not <owner>=<weight> with a weight > 0"
            )
        weights[owner] = weight
    return weights


# How old a registered turn with no message must be before it counts as lost.
LOST_AFTER_S = 30.0


def _script_keys(lease: str | None = None) -> list[str]:
    """KEYS of every script here: the scheduler hash, owners, turns, claims, the lease."""
    return [SCHED_KEY, OWNERS_KEY, TURNS_KEY, CLAIMS_KEY, lease or UNFENCED.key]


def forget(redis: Redis, batch_id: str) -> None:
    """Drop the chunks a canceled batch still had waiting (idempotent): called by the
    cancel itself (shared/batches.py), so no turn is spent on them."""
    redis.register_script(_FORGET)(keys=_script_keys(), args=[time.time(), 0, batch_id])


def _chunk_text(indexes: Iterable[int]) -> str:
    return ",".join(str(i) for i in indexes)


def _item_ids(batch_id: str, chunk: str) -> list[str]:
    from shared.item_codec import item_id

    return [item_id(batch_id, int(i)) for i in chunk.split(",") if i]


class Scheduler:
    """The batch chunks waiting for a turn, and the turns in circulation (module docstring)."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.window = settings.batch_window
        self.weights = json.dumps(parse_weights(settings.owner_weights))
        self.default_weight = 1.0
        self.broker_options = broker_options(settings)
        self._add = redis.register_script(_ADD)
        self._claim = redis.register_script(_CLAIM)
        self._end = redis.register_script(_END)
        self._top_up = redis.register_script(_TOP_UP)
        self._touch = redis.register_script(_TOUCH)

    def _new_ids(self, n: int) -> list[str]:
        return [str(uuid.uuid4()) for _ in range(n)]

    def add(self, batch_id: str, chunks: list[list[int]]) -> list[str]:
        """Queue a batch's chunks (member indexes each) behind its earlier ones; returns the
        turn ids to send (registered already). Nothing is queued for a batch that ended or
        was canceled."""
        if not chunks:
            return []
        ids = self._new_ids(min(self.window, len(chunks)))
        args = [time.time(), self.window, batch_id, len(ids), *ids]
        args += [_chunk_text(c) for c in chunks]
        return [text(i) for i in self._add(keys=_script_keys(), args=args)]

    def claim(self, turn_id: str, fence: Fence = UNFENCED) -> Claim | str:
        """The chunk turn ``turn_id`` runs, or why it runs none (``'none'``: not
        registered, ended before; ``'idle'``: nothing waits). Raises :class:`LeaseLost`
        when ``fence`` no longer holds the turn's lease."""
        args = [time.time(), self.window, turn_id, self.weights, self.default_weight, fence.gen]
        out = [text(x) for x in self._claim(keys=_script_keys(fence.key), args=args)]
        if out[0] == "stale":
            raise LeaseLost(f"batch turn {turn_id}")
        if len(out) == 1:
            return out[0]
        return Claim(out[0], _item_ids(out[0], out[1]))

    def claimed(self, turn_id: str) -> Claim | None:
        """The chunk turn ``turn_id`` has claimed, if any (read only)."""
        held = self.redis.hget(CLAIMS_KEY, turn_id)
        if held is None:
            return None
        batch_id, _, chunk = text(held).partition("|")
        return Claim(batch_id, _item_ids(batch_id, chunk))

    def end(self, turn_id: str, fence: Fence = UNFENCED) -> list[str]:
        """End a turn: its chunk is done (every item recorded) or it had none. Returns the
        successors' turn ids to send (registered already)."""
        args = [time.time(), self.window, turn_id, fence.gen, *self._new_ids(2)]
        outcome, *ids = [text(x) for x in self._end(keys=_script_keys(fence.key), args=args)]
        if outcome == "stale":
            raise LeaseLost(f"batch turn {turn_id}")
        return ids

    def forget(self, batch_id: str) -> None:
        """Drop the chunks a canceled batch still had waiting (idempotent)."""
        forget(self.redis, batch_id)

    def backlog(self) -> dict[str, int]:
        """What waits for a worker: chunks and their items not yet claimed, turns registered
        (queued or running) and turns claimed (running)."""
        chunks, items = self.redis.hmget(SCHED_KEY, "chunks", "items")
        return {
            "chunks": int(chunks or 0),
            "items": int(items or 0),
            "turns": int(self.redis.zcard(TURNS_KEY)),
            "claimed": int(self.redis.hlen(CLAIMS_KEY)),
        }

    def repair(
        self,
        send_turn: Callable[[str], None],
        *,
        older_than_s: float = LOST_AFTER_S,
        present: set[str] | None = None,
    ) -> dict[str, int]:
        """Find turns that nothing will run and re-open a window that lost its turns; returns
        how many of each were repaired (``turn_resent``, ``turn_added``).

        A registered turn older than ``older_than_s`` whose message is in no queue, not
        unacknowledged and whose lease has no holder was lost (between registering and
        sending, or with the last second of an AOF): it is sent again under the same id,
        so it resumes its chunk if it had claimed one. Then, if chunks wait with fewer
        unclaimed turns than them and the window has room, turns are added. ``present``: the
        task ids of the messages waiting or unacknowledged, when the caller has read them
        already (the reconciler's sweep); read here otherwise."""
        now = time.time()
        repaired = {"turn_resent": 0, "turn_added": 0}
        old = [
            text(t)
            for t, at in self.redis.zrange(TURNS_KEY, 0, -1, withscores=True)
            if now - at > older_than_s
        ]
        if old:
            if present is None:
                present = {m.task_id for m in pending_messages(self.redis, self.broker_options)}
            for turn in old:
                if turn in present or self._leased(turn):
                    continue
                if self._touch(keys=_script_keys(), args=[time.time(), turn]):
                    send_turn(turn)
                    repaired["turn_resent"] += 1
        added = [
            text(t)
            for t in self._top_up(
                keys=_script_keys(), args=[now, self.window, *self._new_ids(self.window)]
            )
        ]
        for turn in added:
            send_turn(turn)
        repaired["turn_added"] = len(added)
        return repaired

    def _leased(self, turn: str) -> bool:
        holder = self.redis.hget(lease_key(turn), "holder")
        return bool(holder)
