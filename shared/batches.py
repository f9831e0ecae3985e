"""Batch records in Redis: one batch, its items, and counters that always add up.

A batch is six Redis keys under ``featuremaps:batch:<id>``: the batch hash (fields and the
counters ``total``, ``queued``, ``running``, ``succeeded``, ``failed``, ``canceled``), the
item ids in member order (a list, for paging and the manifest), each item's status, the
token of the chunk delivery running it, its details (JSON: name, keys, error) and how many
times a chunk started it (``attempts``).

Every change is one short Lua script, so counters move with the statuses they count, two
workers can't both start an item, and exactly one caller learns that the batch is complete
and must be finalized (the ``finalizing`` flag is set inside the same script that sees the
last item finish, or the expansion end, or a cancel leave nothing running).

    batch: queued → expanding → running → succeeded | failed | canceled
           expanding → failed        (an archive limit; dispatched items keep going)
           queued | expanding | running → canceled
    item:  queued → running → succeeded | failed;  queued → canceled
           failed from the start     (a refused member, or not an image)

A chunk's starts and ends carry its lease's fence (shared/leases.py): once the chunk was
handed over to another worker they raise :class:`LeaseLost` and change nothing.

A batch submitted with ``item_callbacks=true`` has each item's call put in the webhook outbox
by the same script that ends the item (finish, cancel, or failed at expansion; see
shared/webhooks.py), so no crash can end an item without queueing its call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from shared.errors import Conflict
from shared.leases import FENCE_LUA, UNFENCED, Fence, LeaseLost
from shared.records import (
    Record,
    RecordNotFound,
    RecordStore,
    now_iso,
    record_key,
    text,
)
from shared.webhooks import ENQUEUE_SCRIPT, ITEM_ENQUEUE_LUA, OUTBOX_KEY

# Expansion groups a batch's members in blocks of this many consecutive indexes (block n is
# indexes [n * BLOCK_ITEMS, (n + 1) * BLOCK_ITEMS)); a block's inputs are one object.
BLOCK_ITEMS = 128
COUNTERS = ("queued", "running", "succeeded", "failed", "canceled")


class BatchStatus(StrEnum):
    QUEUED = "queued"
    EXPANDING = "expanding"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class ItemStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class BatchNotFound(RecordNotFound):
    kind = "batch"


def batch_key(batch_id: str) -> str:
    return record_key("batch", batch_id)


def item_id(batch_id: str, index: int) -> str:
    """Server-generated, deterministic in the member's position: a redelivered expansion
    finds the items it already created. Item keys in storage are prefixed by it."""
    return f"{batch_id}-{index:06d}"


def item_info_key(batch_id: str) -> str:
    """The hash of the batch's item details (JSON by item id)."""
    return _keys(batch_id)[2]


def _keys(batch_id: str) -> list[str]:
    base = batch_key(batch_id)
    return [
        base,
        f"{base}:order",
        f"{base}:info",
        f"{base}:status",
        f"{base}:token",
        f"{base}:attempts",
    ]


@dataclass
class Batch(Record):
    STATUS: ClassVar = BatchStatus
    JSON_FIELDS: ClassVar = (
        "options",
        "source",
        "result",
        "error",
        "callbacks",
        "item_callback_spacing_s",
    )
    INT_FIELDS: ClassVar = ("total", *COUNTERS, "expanded", "finalizing", "failed_at_expansion")

    id: str
    status: BatchStatus
    options: dict[str, Any]
    source: dict[str, Any]
    owner: str = ""
    created_at: str = field(default_factory=now_iso)
    started_at: str | None = None
    first_item_at: str | None = None
    finished_at: str | None = None
    error: dict[str, str] | None = None
    result: dict[str, Any] | None = None
    total: int = 0
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0
    expanded: int = 0
    finalizing: int = 0
    # Members refused during expansion count as failed but were never processed.
    failed_at_expansion: int = 0
    callback_url: str | None = None
    callback_state: str | None = None
    callbacks: list[dict[str, Any]] | None = None
    # Set when the batch asked for per-item callbacks: seconds between two item calls.
    item_callback_spacing_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in (BatchStatus.SUCCEEDED, BatchStatus.FAILED, BatchStatus.CANCELED)

    def counts(self) -> dict[str, int]:
        return {"total": self.total, **{name: getattr(self, name) for name in COUNTERS}}

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        """The public batch document; storage keys and owner stay private."""
        done = self.succeeded + self.failed + self.canceled
        complete = self.finished and self.queued == 0 and self.running == 0
        progress = 1.0 if complete else (done / self.total if self.total else 0.0)
        doc: dict[str, Any] = {
            **self.document_head(),
            "source": {"kind": self.source.get("kind"), "name": self.source.get("name")},
            "counts": self.counts(),
            "progress": round(progress, 4),
            "rate": None,
            "eta_s": None,
            "error": self.error,
            "result": None,
            **self.callback_document(),
            "item_callbacks": bool(self.item_callback_spacing_s),
        }
        if self.first_item_at and (self.queued or self.running):
            elapsed = (now or time.time()) - datetime.fromisoformat(self.first_item_at).timestamp()
            processed = self.succeeded + self.failed - self.failed_at_expansion
            rate = processed / elapsed if elapsed > 0 else 0.0
            doc["rate"] = round(rate, 3)
            if rate > 0:
                doc["eta_s"] = round((self.queued + self.running) / rate, 1)
        return doc


@dataclass(frozen=True)
class Item:
    id: str
    status: ItemStatus
    info: dict[str, Any]
    attempts: int = 0

    @property
    def name(self) -> str:
        return self.info.get("name", "")


@dataclass(frozen=True)
class NewItem:
    """An item as expansion creates it: queued with its input key, or failed with a reason."""

    id: str
    name: str
    input_key: str | None = None
    error: dict[str, str] | None = None
    # [offset, length] of the input inside ``input_key`` (a block's pack).
    input_range: tuple[int, int] | None = None

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"name": self.name}
        if self.input_key:
            info["input_key"] = self.input_key
        if self.input_range is not None:
            info["input_range"] = list(self.input_range)
        if self.error:
            info["error"] = self.error
        return info


# Shared by every script: KEYS = batch, order, info, status, token, attempts, the lease of
# the fenced ones (else unused), the webhook outbox; ARGV[1] = ttl. touch() renews the
# batch's own six keys only: the lease and the outbox have lives of their own.
_PRELUDE = (
    FENCE_LUA
    + ITEM_ENQUEUE_LUA
    + """
local function touch()
  for i = 1, 6 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[1])) end
end
local function complete_if_done()
  local b = redis.call('HMGET', KEYS[1], 'expanded', 'queued', 'running')
  if b[1] == '1' and tonumber(b[2]) == 0 and tonumber(b[3]) == 0 then
    if redis.call('HGET', KEYS[1], 'finalizing') ~= '1' then
      redis.call('HSET', KEYS[1], 'finalizing', '1')
      return 'finalize'
    end
  end
  return 'ok'
end
local function move(id, from, to)
  redis.call('HSET', KEYS[4], id, to)
  redis.call('HINCRBY', KEYS[1], from, -1)
  redis.call('HINCRBY', KEYS[1], to, 1)
  if to ~= 'running' then enqueue_item_callback(KEYS[1], KEYS[8], id) end
end
"""
)

# ARGV: ttl, then (id, status, info) triples. Returns {batch status, ids still queued...}:
# a redelivered expansion re-dispatches only what has not started.
_ADD_ITEMS = (
    _PRELUDE
    + """
local bstatus = redis.call('HGET', KEYS[1], 'status')
if not bstatus then return {'missing'} end
local out = {bstatus}
for i = 2, #ARGV, 3 do
  local id, status = ARGV[i], ARGV[i + 1]
  local cur = redis.call('HGET', KEYS[4], id)
  if cur then
    if cur == 'queued' then table.insert(out, id) end
  else
    if status == 'queued' and bstatus == 'canceled' then status = 'canceled' end
    redis.call('RPUSH', KEYS[2], id)
    redis.call('HSET', KEYS[3], id, ARGV[i + 2])
    redis.call('HSET', KEYS[4], id, status)
    redis.call('HINCRBY', KEYS[1], 'total', 1)
    redis.call('HINCRBY', KEYS[1], status, 1)
    if status == 'failed' then redis.call('HINCRBY', KEYS[1], 'failed_at_expansion', 1) end
    if status == 'queued' then table.insert(out, id)
    else enqueue_item_callback(KEYS[1], KEYS[8], id) end
  end
end
touch()
return out
"""
)

# KEYS[7] lease. ARGV: ttl, now, token, lease generation, ids... Returns {'ok', ids this
# delivery may run...}: queued ones, and running ones this same delivery started before (its
# worker died; Celery redelivered it, or recovery handed it over); each start is an attempt.
# {'stale'} when the delivery no longer holds its lease.
_START_ITEMS = (
    _PRELUDE
    + """
if stale(KEYS[7], ARGV[4]) then return {'stale'} end
local out = {'ok'}
for i = 5, #ARGV do
  local id = ARGV[i]
  local cur = redis.call('HGET', KEYS[4], id)
  if cur == 'queued' then
    move(id, 'queued', 'running')
    redis.call('HSET', KEYS[5], id, ARGV[3])
    table.insert(out, id)
  elseif cur == 'running' and redis.call('HGET', KEYS[5], id) == ARGV[3] then
    table.insert(out, id)
  end
end
for i = 2, #out do redis.call('HINCRBY', KEYS[6], out[i], 1) end
if #out > 1 then redis.call('HSETNX', KEYS[1], 'first_item_at', ARGV[2]) end
touch()
return out
"""
)

# KEYS[7] lease. ARGV: ttl, lease generation, then (id, status, info) triples for running
# items. Returns 'finalize' to the one caller that finished the batch's last item, 'stale'
# when the caller no longer holds its lease, else 'ok'.
_FINISH_ITEMS = (
    _PRELUDE
    + """
if stale(KEYS[7], ARGV[2]) then return 'stale' end
for i = 3, #ARGV, 3 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[4], id) == 'running' then
    redis.call('HSET', KEYS[3], id, ARGV[i + 2])
    move(id, 'running', ARGV[i + 1])
  end
end
touch()
return complete_if_done()
"""
)

# ARGV: ttl, now. Returns 'ok' or the status that makes expansion pointless.
_BEGIN_EXPANSION = (
    _PRELUDE
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 'missing' end
if cur == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'expanding', 'started_at', ARGV[2])
elseif cur ~= 'expanding' then
  return cur
end
touch()
return 'ok'
"""
)

# ARGV: ttl, now, error JSON or ''. Returns 'finalize' or 'ok'.
_END_EXPANSION = (
    _PRELUDE
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 'missing' end
redis.call('HSET', KEYS[1], 'expanded', '1')
if cur == 'queued' or cur == 'expanding' or cur == 'running' then
  if ARGV[3] ~= '' then
    redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[3])
  else
    redis.call('HSET', KEYS[1], 'status', 'running')
  end
end
touch()
return complete_if_done()
"""
)

# ARGV: ttl, now. Returns {'ok' | current status, 'finalize' | 'ok'}.
_CANCEL = (
    _PRELUDE
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {'missing', 'ok'} end
if cur ~= 'queued' and cur ~= 'expanding' and cur ~= 'running' then return {cur, 'ok'} end
redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[2])
local statuses = redis.call('HGETALL', KEYS[4])
for i = 1, #statuses, 2 do
  if statuses[i + 1] == 'queued' then move(statuses[i], 'queued', 'canceled') end
end
touch()
return {'ok', complete_if_done()}
"""
)

# ARGV: ttl, now, result JSON. A running batch succeeds; failed and canceled stay as they are.
_COMPLETE = (
    _PRELUDE
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 'missing' end
if cur == 'running' or cur == 'expanding' then
  redis.call('HSET', KEYS[1], 'status', 'succeeded')
end
redis.call('HSET', KEYS[1], 'result', ARGV[3])
if not redis.call('HGET', KEYS[1], 'finished_at') then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[2])
end
touch()
return redis.call('HGET', KEYS[1], 'status')
"""
)

# ARGV: ttl, now, error JSON. The batch could not be closed (its manifest could not be
# written): a batch still open ends failed with that error, so it never waits forever.
_FAIL = (
    _PRELUDE
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 'missing' end
if cur == 'queued' or cur == 'expanding' or cur == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[3], 'finished_at', ARGV[2])
end
touch()
return redis.call('HGET', KEYS[1], 'status')
"""
)


class BatchStore(RecordStore[Batch]):
    """Batches and their items: five keys per batch, every change one script that keeps
    the counters, the item statuses and the ``finalizing`` flag in step."""

    RECORD = Batch
    NOT_FOUND = BatchNotFound
    SCRIPTS: ClassVar = {
        "_add_items": _ADD_ITEMS,
        "_start_items": _START_ITEMS,
        "_finish_items": _FINISH_ITEMS,
        "_begin_expansion": _BEGIN_EXPANSION,
        "_end_expansion": _END_EXPANSION,
        "_cancel": _CANCEL,
        "_complete": _COMPLETE,
        "_fail": _FAIL,
        "_enqueue_callback": ENQUEUE_SCRIPT,
    }

    def record_keys(self, record_id: str) -> list[str]:
        return _keys(record_id)

    def begin_expansion(self, batch_id: str) -> str:
        return text(self._run(self._begin_expansion, batch_id, now_iso()))

    def add_items(self, batch_id: str, items: list[NewItem]) -> tuple[str, list[str]]:
        """Record new items (idempotent per id); returns the batch status and the ids of the
        given items that are queued and need dispatching."""
        args: list[str] = []
        for item in items:
            status = ItemStatus.FAILED if item.error else ItemStatus.QUEUED
            args += [item.id, status.value, json.dumps(item.info())]
        status, *queued = self._run(self._add_items, batch_id, *args)
        return text(status), [text(i) for i in queued]

    def end_expansion(self, batch_id: str, error: dict[str, str] | None = None) -> bool:
        """Mark expansion over (failed with ``error``); True when the caller must finalize."""
        outcome = self._run(
            self._end_expansion, batch_id, now_iso(), json.dumps(error) if error else ""
        )
        return text(outcome) == "finalize"

    def start_items(
        self, batch_id: str, ids: list[str], *, token: str, fence: Fence = UNFENCED
    ) -> list[str]:
        """The ids this delivery may run (see ``_START_ITEMS``); raises :class:`LeaseLost`
        when ``fence`` no longer holds its lease."""
        outcome, *started = self._run(
            self._start_items, batch_id, now_iso(), token, fence.gen, *ids, lease=fence.key
        )
        if text(outcome) == "stale":
            raise LeaseLost(f"chunk of batch {batch_id}")
        return [text(i) for i in started]

    def finish_items(
        self,
        batch_id: str,
        outcomes: list[tuple[str, ItemStatus, dict]],
        *,
        fence: Fence = UNFENCED,
    ) -> bool:
        """Record finished items; True for the one caller that finished the last item.
        Raises :class:`LeaseLost` when ``fence`` no longer holds its lease."""
        args: list[str] = [fence.gen]
        for item, status, info in outcomes:
            args += [item, status.value, json.dumps(info)]
        outcome = text(self._run(self._finish_items, batch_id, *args, lease=fence.key))
        if outcome == "stale":
            raise LeaseLost(f"chunk of batch {batch_id}")
        return outcome == "finalize"

    def cancel(self, batch_id: str, *, owner: str | None = None) -> tuple[Batch, bool]:
        """Cancel; queued items end canceled. Returns the batch and whether the caller must
        have it finalized (nothing was left running)."""
        self.get(batch_id, owner=owner)  # 404 before 409: others' batches must look unknown
        outcome, finalize = self._run(self._cancel, batch_id, now_iso())
        if text(outcome) != "ok":
            raise Conflict(f"batch {batch_id} is already {text(outcome)}; nothing to cancel")
        return self.get(batch_id), text(finalize) == "finalize"

    def complete(self, batch_id: str, result: dict[str, Any]) -> str:
        status = text(self._run(self._complete, batch_id, now_iso(), json.dumps(result)))
        self._ended(batch_id)
        return status

    def fail(self, batch_id: str, *, code: str, message: str) -> str:
        """End a batch that is still open as failed; returns its final status."""
        error = json.dumps({"code": code, "message": message})
        status = text(self._run(self._fail, batch_id, now_iso(), error))
        self._ended(batch_id)
        return status

    def _ended(self, batch_id: str) -> None:
        """Queue the batch's callback, if it has one, once. Not inside the closing script:
        those touch every key they name. The finalize task that closes a batch is
        acknowledged only after this, so a worker dying in between closes it again."""
        self._enqueue_callback(keys=[batch_key(batch_id), OUTBOX_KEY])

    def items(self, batch_id: str, *, start: int = 0, count: int = 100) -> list[Item]:
        """Items in member order, ``count`` from position ``start``."""
        order = _keys(batch_id)[1]
        ids = [text(i) for i in self.redis.lrange(order, start, start + count - 1)]
        return list(self.get_items(batch_id, ids).values()) if ids else []

    def get_items(self, batch_id: str, ids: list[str]) -> dict[str, Item]:
        """The items of ``ids`` that exist, in that order."""
        _, _, info, status, _, attempts = _keys(batch_id)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(status, ids)
            pipe.hmget(info, ids)
            pipe.hmget(attempts, ids)
            statuses, infos, counts = pipe.execute()
        return {
            i: Item(id=i, status=ItemStatus(text(s)), info=json.loads(d), attempts=int(n or 0))
            for i, s, d, n in zip(ids, statuses, infos, counts, strict=True)
            if s is not None
        }

    def iter_items(self, batch_id: str, *, page: int = 1000) -> Iterator[Item]:
        start = 0
        while page_items := self.items(batch_id, start=start, count=page):
            yield from page_items
            start += len(page_items)

    def item_count(self, batch_id: str) -> int:
        return int(self.redis.llen(_keys(batch_id)[1]))

    def _run(self, script, batch_id: str, *args: Any, lease: str | None = None) -> Any:
        keys = [*_keys(batch_id), lease or UNFENCED.key, OUTBOX_KEY]
        outcome = script(keys=keys, args=[self.ttl_s, *args])
        if outcome in (b"missing", "missing") or (
            isinstance(outcome, list) and outcome and text(outcome[0]) == "missing"
        ):
            raise BatchNotFound(batch_id)
        return outcome
