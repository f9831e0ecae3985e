"""Leases: which worker process is running each task, so that work held by a lost node is
handed to a live worker in seconds (keeper/recovery.py), and a holder that was presumed dead
cannot record a result over the one that took its work over.

A lease is the hash ``featuremaps:lease:<task_id>`` (the Celery task id, which a message keeps
when it is handed over), listed in the sorted set ``featuremaps:leases``:

    holder     ``<hostname>:<pid>.<nonce>`` of the pool process running it: the suffix of its
               heartbeat key (shared/heartbeat.py); '' once handed over or released
    node       the Celery node (hostname) of the holder
    gen        this delivery's generation, unique for ever (``INCR featuremaps:leases:gen``);
               absent once handed over
    task       the task's name;  since  when it was taken;  handovers  how many times moved

Every change is one Lua compare-and-set:

- :meth:`LeaseStore.acquire` when a task starts: the lease is taken unless its holder is a
  *live* process of *another* node. A node's main process gives a message to a second pool
  process only once the first one died (Celery requeues it on ``WorkerLostError``), so a
  holder on the caller's own node is always gone even while its heartbeat has not expired yet.
  A live holder elsewhere is still running the task: the caller defers (worker/leasing.py).
- :meth:`LeaseStore.release` when the task ends, only by the generation that holds it.
- :meth:`LeaseStore.hand_over` by the recovery loop, only while the holder's heartbeat is gone:
  the holder's unacknowledged message moves from kombu's ``unacked`` hash to the front of its
  queue with a new delivery tag, in the same script that clears the lease's generation.
- :data:`FENCE_LUA`: the final status changes of jobs and batch items (shared/jobs.py,
  shared/batches.py) check that the caller's generation still holds the lease, so a stale
  holder's outcome is dropped. The generation also names the folder a delivery writes its
  outputs to (shared/keys.py), so only the objects of the holder that recorded are named.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

from redis import Redis

from shared.heartbeat import heartbeat_key
from shared.queue import UNACKED_INDEX_KEY, UNACKED_KEY, Unacked
from shared.records import PREFIX, text

LEASE_INDEX = f"{PREFIX}:leases"
GENERATION_KEY = f"{PREFIX}:leases:gen"

# Lua, for the scripts of the stores: true when a delivery of generation ``gen`` no longer
# holds the lease at ``key`` (handed over, taken by another delivery, or gone). An empty
# generation is an unfenced caller (the API cancelling a job).
FENCE_LUA = """
local function stale(key, gen)
  return gen ~= '' and redis.call('HGET', key, 'gen') ~= gen
end
"""


def lease_key(task_id: str) -> str:
    return f"{PREFIX}:lease:{task_id}"


class LeaseLost(Exception):
    """A delivery's work was handed over (or taken by a newer delivery): what it would have
    recorded is dropped. Not an API error: the holder that took over records the outcome."""

    def __init__(self, subject: str) -> None:
        super().__init__(f"{subject}: this delivery no longer holds its lease")


@dataclass(frozen=True)
class Fence:
    """What a running delivery passes to the stores' final transitions: its lease and
    generation. ``UNFENCED`` (no generation) always passes."""

    task_id: str
    gen: str

    @property
    def key(self) -> str:
        return lease_key(self.task_id)


UNFENCED = Fence(task_id="-", gen="")


@dataclass(frozen=True)
class Lease:
    task_id: str
    holder: str
    node: str
    task: str
    handovers: int = 0


@dataclass(frozen=True)
class Acquired:
    """The outcome of :meth:`LeaseStore.acquire`: a fence to run under, or the live holder
    that still runs the task."""

    fence: Fence | None
    busy_with: str = ""


# KEYS: lease, index, generation counter, heartbeat of the holder read before.
# ARGV: holder read before ('' if none), task id, me, my node, task name, now, ttl, whether
# the holder read before may be taken over while it beats ('1': it is of my node).
_ACQUIRE = """
local cur = redis.call('HGET', KEYS[1], 'holder') or ''
if cur ~= ARGV[1] then return {'changed', ''} end
if cur ~= '' and ARGV[8] ~= '1' and redis.call('EXISTS', KEYS[4]) == 1 then
  return {'busy', cur}
end
local gen = tostring(redis.call('INCR', KEYS[3]))
redis.call('HSET', KEYS[1], 'holder', ARGV[3], 'node', ARGV[4], 'task', ARGV[5],
  'since', ARGV[6], 'gen', gen)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[2])
return {'ok', gen}
"""

# KEYS: lease, index. ARGV: generation, task id. Returns 1 when released.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""

# KEYS: lease, heartbeat of the holder, unacked hash, unacked index, queue list.
# ARGV: holder, delivery tag ('' when its message is not unacknowledged), the message as it
# is in the unacked hash, the message to queue, ttl.
# Returns 'moved', 'released' (no message to move), 'alive' or 'changed'.
_HAND_OVER = """
if redis.call('HGET', KEYS[1], 'holder') ~= ARGV[1] then return 'changed' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'alive' end
local outcome = 'released'
if ARGV[2] ~= '' then
  if redis.call('HGET', KEYS[3], ARGV[2]) ~= ARGV[3] then return 'changed' end
  redis.call('HDEL', KEYS[3], ARGV[2])
  redis.call('ZREM', KEYS[4], ARGV[2])
  -- Consumers BRPOP from the right: the front of the queue.
  redis.call('RPUSH', KEYS[5], ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'handovers', 1)
  outcome = 'moved'
end
redis.call('HSET', KEYS[1], 'holder', '', 'node', '')
redis.call('HDEL', KEYS[1], 'gen')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
return outcome
"""


class LeaseStore:
    """Leases in one Redis. ``ttl_s`` (the visibility timeout) outlasts any running task:
    a lease left by a process that died outside a task cannot block a delivery for ever."""

    SCRIPTS: ClassVar = {"_acquire": _ACQUIRE, "_release": _RELEASE, "_hand_over": _HAND_OVER}
    _ATTEMPTS = 5  # compare-and-set rounds against a lease that keeps changing

    def __init__(self, redis: Redis, *, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        for name, source in self.SCRIPTS.items():
            setattr(self, name, redis.register_script(source))

    def acquire(self, task_id: str, *, holder: str, node: str, task: str) -> Acquired:
        """Take the lease of ``task_id`` for ``holder`` (see the module docstring)."""
        key = lease_key(task_id)
        for _ in range(self._ATTEMPTS):
            cur_holder, cur_node = (
                text(v) if v else "" for v in self.redis.hmget(key, "holder", "node")
            )
            outcome, value = self._acquire(
                keys=[key, LEASE_INDEX, GENERATION_KEY, heartbeat_key(cur_holder or "-")],
                args=[
                    cur_holder,
                    task_id,
                    holder,
                    node,
                    task,
                    time.time(),
                    self.ttl_s,
                    "1" if cur_node == node else "0",
                ],
            )
            outcome, value = text(outcome), text(value)
            if outcome == "ok":
                return Acquired(Fence(task_id=task_id, gen=value))
            if outcome == "busy":
                return Acquired(None, busy_with=value)
        raise RuntimeError(f"lease of task {task_id} kept changing while it was taken")

    def check(self, fence: Fence, subject: str) -> None:
        """Raise :class:`LeaseLost` unless ``fence`` still holds its lease: a stale holder
        stops before writing outputs the new holder is writing too."""
        if fence.gen and text(self.redis.hget(fence.key, "gen") or b"") != fence.gen:
            raise LeaseLost(subject)

    def release(self, fence: Fence) -> bool:
        return bool(self._release(keys=[fence.key, LEASE_INDEX], args=[fence.gen, fence.task_id]))

    def get(self, task_id: str) -> Lease | None:
        raw = {text(k): text(v) for k, v in self.redis.hgetall(lease_key(task_id)).items()}
        if not raw:
            return None
        return Lease(
            task_id=task_id,
            holder=raw.get("holder", ""),
            node=raw.get("node", ""),
            task=raw.get("task", ""),
            handovers=int(raw.get("handovers", 0)),
        )

    def orphaned(self) -> list[Lease]:
        """Leases whose holder's heartbeat is gone; index entries of expired leases dropped."""
        task_ids = [text(t) for t in self.redis.zrange(LEASE_INDEX, 0, -1)]
        leases = {t: self.get(t) for t in task_ids}
        gone = [t for t, lease in leases.items() if lease is None]
        if gone:
            self.redis.zrem(LEASE_INDEX, *gone)
        held = [lease for lease in leases.values() if lease is not None and lease.holder]
        if not held:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for lease in held:
                pipe.exists(heartbeat_key(lease.holder))
            alive = pipe.execute()
        return [lease for lease, beating in zip(held, alive, strict=True) if not beating]

    def hand_over(self, lease: Lease, message: Unacked | None) -> str:
        """Move ``message`` (the dead holder's, from kombu's unacked hash) to the front of its
        queue and clear the lease, or only clear it when there is no message to move."""
        args: list[Any] = [lease.holder, "", "", "", self.ttl_s]
        queue = lease_key(lease.task_id)  # unused by the script when nothing moves
        if message is not None:
            args = [lease.holder, message.tag, message.raw, message.requeued(), self.ttl_s]
            queue = message.queue_key
        keys = [
            lease_key(lease.task_id),
            heartbeat_key(lease.holder),
            UNACKED_KEY,
            UNACKED_INDEX_KEY,
            queue,
        ]
        return text(self._hand_over(keys=keys, args=args))
