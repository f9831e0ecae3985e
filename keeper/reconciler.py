"""The reconciler: one periodic sweep that checks that every record still to move has something
that will move it, and repairs what has not. Liveness otherwise rests on one-shot signals (a
message sent once, a finalize sent by whoever recorded the last outcome, an outbox entry
added in the script that ended a record); a signal lost to a crash between two steps, a
refused publish or a Redis restored from an AOF missing its last second is noticed here.

What moves a record: a message of ours waiting in a queue or delivered and not acknowledged
(a running task keeps its message unacknowledged until it ends, and a live lease's message is
one of those; a storage retry's message waits in its queue or in a worker's hands), an outbox
entry, a turn of the scheduler. What is repaired, each logged and counted in
``featuremaps_reconciler_repairs_total{kind}`` (keeper/counters.py):

- ``job_requeued``: a ``queued`` or ``running`` job no message names: ``render_job`` sent
  again. The job store counts a redelivery of a ``running`` job as lost, as for a lost node.
- ``finalize``: a batch with ``finalizing=1`` and no ``result`` that no message names,
  whatever its status (a canceled batch, or one whose expansion failed, is final before its
  manifest is written), unless its close gave up (``close_failed``): ``finalize_batch`` sent
  again (idempotent; the same ``:refinalize`` key as a redelivered
  chunk's re-send, worker/batches/chunks.py, so the two never send it together).
- ``expand``: a batch ``queued`` or ``expanding`` that no message names (its expansion's
  message, or all its shards' messages, lost): ``expand_batch`` sent again; a redelivered
  expansion resumes from its plan and checkpoints (worker/batches/expand.py).
- ``webhook``: a record whose ``callback_state`` is ``pending`` and which is not in the outbox:
  put back, due now.
- ``turn_resent``, ``turn_added``: :meth:`shared.schedule.Scheduler.repair`.

A record is repaired only after it was found without anything moving it in two sweeps at least
``RECONCILE_GRACE_S`` apart (the first sighting is kept in Redis, as the next sweep may run in
another process): a message read while it moves between its queue and kombu's ``unacked`` hash,
a job whose record is written but whose message is still being sent, are not repaired. The
records checked are those of the open index (``featuremaps:open``, shared/records.py): each
job and batch from its creation until a sweep finds it ended with nothing left to send (no
pending webhook, a batch closed), so a sweep reads the records still in play, not the
keyspace; a Redis written before the index has its records added by one ``SCAN`` once.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Protocol

from redis import Redis

from keeper.counters import REPAIR, count
from shared.heartbeat import heartbeat_key
from shared.leases import LEASE_INDEX, LeaseStore
from shared.queue import (
    BATCH_QUEUE,
    CHUNK_PRIORITY,
    EXPAND_BATCH,
    FINALIZE_BATCH,
    JOBS_QUEUE,
    RENDER_JOB,
    RUN_BATCH_TURN,
    SENT_AT_HEADER,
    broker_options,
    pending_messages,
)
from shared.records import FINISHED, OPEN_KEY, PREFIX, text
from shared.schedule import Scheduler
from shared.settings import Settings
from shared.webhooks import OUTBOX_KEY, PENDING

log = logging.getLogger(__name__)

LOCK_KEY = f"{PREFIX}:reconciler:lock"
# Field "<kind>:<record id>" -> when the record was first found with nothing to move it.
SUSPECTS_KEY = f"{PREFIX}:reconciler:suspects"
# A re-sent finalize is not sent again before this (the key worker/batches/chunks.py uses).
REFINALIZE_EVERY_S = 60
SCAN_COUNT = 1000
# Set once the records of a Redis written before the open index are in it.
OPEN_COMPLETE_KEY = f"{OPEN_KEY}:complete"


class Send(Protocol):
    """Publish a task by name. ``retries`` and ``sent_at`` are a storage retry's
    (shared/delayed.py): the count the task reads as ``request.retries``, and when the
    first message of the work was sent."""

    def __call__(
        self,
        task: str,
        *,
        args: list,
        queue: str,
        priority: int | None = None,
        task_id: str | None = None,
        retries: int = 0,
        sent_at: float | None = None,
    ) -> None: ...


def celery_sender(app) -> Send:
    """A :class:`Send` over a Celery app's ``send_task`` (the API's producer, a worker's app)."""

    def send(task, *, args, queue, priority=None, task_id=None, retries=0, sent_at=None) -> None:
        headers = {SENT_AT_HEADER: sent_at} if sent_at is not None else None
        app.send_task(
            task,
            args=args,
            queue=queue,
            priority=priority,
            task_id=task_id,
            retries=retries,
            headers=headers,
        )

    return send


def _record_of(key: str) -> tuple[str, str] | None:
    """``(kind, id)`` of a job's or batch's record key; None for a side key
    (``…:<id>:b:3``) or any other key."""
    kind, _, record_id = key.partition(":")[2].partition(":")
    if kind in ("job", "batch") and record_id and ":" not in record_id:
        return kind, record_id
    return None


class Reconciler:
    """One Redis's records, checked by :meth:`sweep`; ``send`` publishes a task by name."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        send: Send,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.send = send
        self.clock = clock
        self.grace_s = settings.reconcile_grace_s
        self.options = broker_options(settings)

    def sweep(self) -> dict[str, int]:
        """Check every record and repair what has waited past the grace period; returns the
        repairs made, by kind."""
        pending = list(pending_messages(self.redis, self.options))
        named = {sent.subject for sent in pending}
        stalled = dict(self._stalled(named, self._nodes_running_jobs()))
        repairs: Counter[str] = Counter()
        for suspect in self._due(set(stalled)):
            kind, _, record_id = suspect.partition(":")
            if self._repair(kind, record_id, stalled[suspect]):
                repairs[kind] += 1
                # Its grace period starts again should the repair be lost too.
                self.redis.hdel(SUSPECTS_KEY, suspect)
        repairs.update(self._turns({sent.task_id for sent in pending}))
        for kind, n in repairs.items():
            count(self.redis, REPAIR, kind, n)
        return dict(repairs)

    # -- finding -------------------------------------------------------------------------

    def _records(self) -> Iterator[tuple[str, str, str]]:
        """(kind, key, id) of every job and batch record in the open index (shared/records.py);
        the records of a Redis written before the index existed are added once, by one
        ``SCAN``, the first time."""
        if not self.redis.exists(OPEN_COMPLETE_KEY):
            self._index_older_records()
        for key in self.redis.sscan_iter(OPEN_KEY, count=SCAN_COUNT):
            parsed = _record_of(text(key))
            if parsed is not None:
                yield parsed[0], text(key), parsed[1]

    def _index_older_records(self) -> None:
        found: list[str] = []
        for kind in ("job", "batch"):
            for key in self.redis.scan_iter(match=f"{PREFIX}:{kind}:*", count=SCAN_COUNT):
                if _record_of(text(key)) is not None:
                    found.append(text(key))
        for start in range(0, len(found), SCAN_COUNT):
            self.redis.sadd(OPEN_KEY, *found[start : start + SCAN_COUNT])
        self.redis.set(OPEN_COMPLETE_KEY, "1")
        log.info("reconciler: %d records of before the open index added to it", len(found))

    def _nodes_running_jobs(self) -> set[str]:
        """Nodes with a live process holding a ``render_job`` lease."""
        leases = LeaseStore(self.redis, ttl_s=self.settings.visibility_timeout_s)
        held = [lease for lease in map(leases.get, self._lease_ids()) if lease and lease.holder]
        with self.redis.pipeline(transaction=False) as pipe:
            for lease in held:
                pipe.exists(heartbeat_key(lease.holder))
            alive = pipe.execute() if held else []
        return {
            lease.node
            for lease, beating in zip(held, alive, strict=True)
            if beating and lease.task == RENDER_JOB
        }

    def _lease_ids(self) -> list[str]:
        return [text(t) for t in self.redis.zrange(LEASE_INDEX, 0, -1)]

    def _stalled(self, named: set[str], running_nodes: set[str]) -> Iterator[tuple[str, str]]:
        """``("<kind>:<id>", record key)`` of every record nothing will move now. A
        ``running`` job whose node has a live process running a job is left alone: a node
        runs one task per process, and a message lost from Redis while its task runs (an
        older AOF) is no reason to run the job twice at once. Records found gone, or ended
        with nothing left to send, leave the open index."""
        records = list(self._records())
        with self.redis.pipeline(transaction=False) as pipe:
            for _, key, _ in records:
                pipe.hmget(key, "status", "finalizing", "callback_state", "worker", "close_failed")
                pipe.hexists(key, "result")
                pipe.zscore(OUTBOX_KEY, key)
            replies = pipe.execute()
        closed: list[str] = []
        for i, (kind, key, record_id) in enumerate(records):
            (status, finalizing, callback, node, close_failed), has_result, in_outbox = replies[
                3 * i : 3 * i + 3
            ]
            status = text(status) if status else ""
            pending_call = bool(callback) and text(callback) == PENDING
            # A batch ends (canceled, or failed at expansion) before its manifest is written:
            # it is closed once it has a result, or once closing gave up.
            unclosed = (
                kind == "batch"
                and finalizing is not None
                and text(finalizing) == "1"
                and not has_result
                and not close_failed
            )
            if not status or (status in FINISHED and not pending_call and not unclosed):
                closed.append(key)
                continue
            if status in FINISHED and pending_call and in_outbox is None:
                yield f"webhook:{record_id}", key
            if record_id in named:
                continue
            if unclosed:
                yield f"finalize:{record_id}", key
            elif status in FINISHED:
                continue
            elif kind == "job":
                if not (status == "running" and node and text(node) in running_nodes):
                    yield f"job_requeued:{record_id}", key
            elif status in ("queued", "expanding"):
                yield f"expand:{record_id}", key
        for start in range(0, len(closed), SCAN_COUNT):
            self.redis.srem(OPEN_KEY, *closed[start : start + SCAN_COUNT])

    def _due(self, stalled: set[str]) -> list[str]:
        """Remember when each stalled record was first seen so, forget those that moved;
        returns the ones stalled past the grace period."""
        now = self.clock()
        seen = {text(k): float(v) for k, v in self.redis.hgetall(SUSPECTS_KEY).items()}
        moved = [s for s in seen if s not in stalled]
        new = {s: now for s in stalled if s not in seen}
        due = sorted(s for s in stalled if s in seen and now - seen[s] >= self.grace_s)
        with self.redis.pipeline(transaction=False) as pipe:
            if moved:
                pipe.hdel(SUSPECTS_KEY, *moved)
            if new:
                pipe.hset(SUSPECTS_KEY, mapping=new)
            pipe.execute()
        return due

    # -- repairing -----------------------------------------------------------------------

    def _repair(self, kind: str, record_id: str, key: str) -> bool:
        if kind == "job_requeued":
            log.warning("job %s: no message left to run it; render_job sent again", record_id)
            self.send(RENDER_JOB, args=[record_id], queue=JOBS_QUEUE)
            return True
        if kind == "expand":
            log.warning("batch %s: %s, no message left; expansion sent again", record_id, key)
            self.send(EXPAND_BATCH, args=[record_id], queue=BATCH_QUEUE)
            return True
        if kind == "finalize":
            if not self.redis.set(f"{key}:refinalize", "1", nx=True, ex=REFINALIZE_EVERY_S):
                return False  # a redelivered chunk has just sent it
            log.warning("batch %s: finalizing but not closed; finalize sent again", record_id)
            self.send(FINALIZE_BATCH, args=[record_id], queue=BATCH_QUEUE)
            return True
        # webhook: put back only if it is still pending and still out of the outbox.
        if text(self.redis.hget(key, "callback_state") or b"") != PENDING:
            return False
        if not self.redis.zadd(OUTBOX_KEY, {key: self.clock()}, nx=True):
            return False
        log.warning("%s: its webhook was pending but not in the outbox; put back", key)
        return True

    def _turns(self, present: set[str]) -> dict[str, int]:
        """Batch turns nothing will run, re-sent; a window that lost its turns, topped up.
        ``present``: the task ids of the messages this sweep found waiting or unacked."""

        def send_turn(turn_id: str) -> None:
            self.send(
                RUN_BATCH_TURN,
                args=[],
                queue=BATCH_QUEUE,
                priority=CHUNK_PRIORITY,
                task_id=turn_id,
            )

        repaired = Scheduler(self.redis, self.settings).repair(send_turn, present=present)
        for kind, n in repaired.items():
            if n:
                log.warning("batch turns: %s %d", kind, n)
        return {kind: n for kind, n in repaired.items() if n}


def maybe_reconcile(reconciler: Reconciler, holder: str) -> dict[str, int] | None:
    """Sweep unless another process did in this period; None when it was not our turn."""
    every_ms = int(reconciler.settings.reconcile_every_s * 1000)
    if not reconciler.redis.set(LOCK_KEY, holder, nx=True, px=every_ms):
        return None
    return reconciler.sweep()
