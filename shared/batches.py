"""Batch records in Redis: one batch, its items, and counters that always add up.

A batch is one hash and one Redis list per block of ``BLOCK_ITEMS`` consecutive members (an
item's entry packed by shared/item_codec.py). Every change is one short Lua script over the
hash and the blocks of the ids it is given, so counters move with the statuses they count, two
workers can't both start an item, a chunk's changes carry its lease's fence
(shared/leases.py), an item's callback is queued by the script that ends it
(shared/webhooks.py), and exactly one caller learns that the batch must be finalized.
docs/design.md "Statuses" has the state machine and "Batch records" the layout, cancel and
TTL rules.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from shared import schedule
from shared.errors import Conflict
from shared.item_codec import ItemPlace, member_index, pack_info, unpack_info
from shared.item_codec import item_id as item_id  # where callers have always found it
from shared.leases import FENCE_LUA, UNFENCED, Fence, LeaseLost
from shared.records import (
    Record,
    RecordNotFound,
    RecordStore,
    now_iso,
    record_key,
    text,
)
from shared.webhooks import ENQUEUE_LUA, ENQUEUE_SCRIPT, ITEM_ENQUEUE_LUA, OUTBOX_KEY

COUNTERS = ("queued", "running", "succeeded", "failed", "canceled", "skipped")
# Consecutive member indexes that share one input pack and one Redis list of entries.
BLOCK_ITEMS = 128


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
    # A member that is not a file anyone sent (shared/member_names.py): final from the start.
    SKIPPED = "skipped"


# Each item status's one-letter code in a block entry (the Lua below has the same table).
STATUS_CODES = {
    ItemStatus.QUEUED: "q",
    ItemStatus.RUNNING: "r",
    ItemStatus.SUCCEEDED: "s",
    ItemStatus.FAILED: "f",
    ItemStatus.CANCELED: "c",
    ItemStatus.SKIPPED: "k",
}


class BatchNotFound(RecordNotFound):
    kind = "batch"


def batch_key(batch_id: str) -> str:
    return record_key("batch", batch_id)


def block_of(index: int) -> int:
    """The block that member ``index`` belongs to."""
    return index // BLOCK_ITEMS


def block_key(batch_id: str, block: int) -> str:
    """The list of block ``block``'s item entries (``BLOCK_ITEMS`` of them at most)."""
    return f"{batch_key(batch_id)}:b:{block}"


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
    skipped: int = 0
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
        done = self.succeeded + self.failed + self.canceled + self.skipped
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
    """An item as expansion creates it: queued with its input key, failed with a reason, or
    skipped with a reason."""

    id: str
    name: str
    input_key: str | None = None
    error: dict[str, str] | None = None
    skip_reason: dict[str, str] | None = None
    # (offset, length) of the member's bytes in the block's input pack.
    input_range: tuple[int, int] | None = None

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"name": self.name}
        if self.input_key:
            info["input_key"] = self.input_key
        if self.input_range is not None:
            info["input_range"] = list(self.input_range)
        if self.error:
            info["error"] = self.error
        if self.skip_reason:
            info["skip_reason"] = self.skip_reason
        return info

    @property
    def status(self) -> ItemStatus:
        if self.skip_reason:
            return ItemStatus.SKIPPED
        return ItemStatus.FAILED if self.error else ItemStatus.QUEUED


# Shared by every script: KEYS = batch, the lease of the fenced ones (else unused), the
# webhook outbox, then the blocks the script reads or writes (KEYS[4]…, computed in Python);
# an item is named by its id, the position of its block in KEYS and its offset in the block.
# ARGV[1] = ttl. An entry is ``<status code><attempts>|<delivery token>|<packed info>``
# (shared/item_codec.py), '' for a position not recorded yet. touch() renews the batch and
# the blocks given: the lease and the outbox have lives of their own.
_PRELUDE = (
    FENCE_LUA
    + ITEM_ENQUEUE_LUA
    + """
local STATUS = {q = 'queued', r = 'running', s = 'succeeded', f = 'failed', c = 'canceled',
                k = 'skipped'}
local CODE = {queued = 'q', running = 'r', succeeded = 's', failed = 'f', canceled = 'c',
              skipped = 'k'}
local function read(k, pos)
  local e = redis.call('LINDEX', KEYS[k], pos)
  if not e or e == '' then return nil end
  local attempts, token, info = string.match(e, '^(%d+)|([^|]*)|(.*)$', 2)
  return {status = STATUS[string.sub(e, 1, 1)], attempts = tonumber(attempts),
          token = token, info = info}
end
local function write(k, pos, it)
  redis.call('LSET', KEYS[k], pos,
             CODE[it.status] .. it.attempts .. '|' .. it.token .. '|' .. it.info)
end
local function place(k, pos, it)
  local n = redis.call('LLEN', KEYS[k])
  if n <= pos then
    local pad = {}
    for _ = n, pos do pad[#pad + 1] = '' end
    redis.call('RPUSH', KEYS[k], unpack(pad))
  end
  write(k, pos, it)
end
local function touch()
  -- An ended batch's keys expire ARGV[1] s from now; one still to run never expires (a
  -- batch queued for days behind others must not vanish), so its keys are made persistent.
  local st = redis.call('HGET', KEYS[1], 'status')
  local ended = st == 'succeeded' or st == 'failed' or st == 'canceled'
  for i = 1, #KEYS do
    if i ~= 2 and i ~= 3 then
      if ended then redis.call('EXPIRE', KEYS[i], tonumber(ARGV[1]))
      else redis.call('PERSIST', KEYS[i]) end
    end
  end
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
local function move(k, pos, it, id, to)
  redis.call('HINCRBY', KEYS[1], it.status, -1)
  redis.call('HINCRBY', KEYS[1], to, 1)
  it.status = to
  write(k, pos, it)
  if to ~= 'running' then enqueue_item_callback(KEYS[1], KEYS[3], id) end
end
"""
)

# ARGV: ttl, the number of blocks these items reach, then (id, block, offset, status, packed
# info) for each. Returns {batch status, ids still queued...}: a redelivered expansion
# re-dispatches only what has not started.
_ADD_ITEMS = (
    _PRELUDE
    + """
local bstatus = redis.call('HGET', KEYS[1], 'status')
if not bstatus then return {'missing'} end
if tonumber(ARGV[2]) > tonumber(redis.call('HGET', KEYS[1], 'blocks') or '0') then
  redis.call('HSET', KEYS[1], 'blocks', ARGV[2])
end
local out = {bstatus}
for i = 3, #ARGV, 5 do
  local id, k, pos, status = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), ARGV[i + 3]
  local cur = read(k, pos)
  if cur then
    if cur.status == 'queued' then table.insert(out, id) end
  else
    if status == 'queued' and bstatus == 'canceled' then status = 'canceled' end
    place(k, pos, {status = status, attempts = 0, token = '', info = ARGV[i + 4]})
    redis.call('HINCRBY', KEYS[1], 'total', 1)
    redis.call('HINCRBY', KEYS[1], status, 1)
    if status == 'failed' then redis.call('HINCRBY', KEYS[1], 'failed_at_expansion', 1) end
    if status == 'queued' then table.insert(out, id)
    else enqueue_item_callback(KEYS[1], KEYS[3], id) end
  end
end
touch()
return out
"""
)

# ARGV: ttl, now, token, lease generation, then (id, block, offset) for each. Returns {'ok',
# ids this delivery may run...}: queued ones (none once the batch is canceled), and running
# ones this same delivery started before (its worker died; Celery redelivered it, or
# recovery handed it over); each start is an attempt. {'stale'} when the delivery no longer
# holds its lease.
_START_ITEMS = (
    _PRELUDE
    + """
if stale(KEYS[2], ARGV[4]) then return {'stale'} end
local canceled = redis.call('HGET', KEYS[1], 'status') == 'canceled'
local out = {'ok'}
for i = 5, #ARGV, 3 do
  local id, k, pos = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local it = read(k, pos)
  if it and it.status == 'queued' and not canceled then
    it.token = ARGV[3]
    it.attempts = it.attempts + 1
    move(k, pos, it, id, 'running')
    table.insert(out, id)
  elseif it and it.status == 'running' and it.token == ARGV[3] then
    it.attempts = it.attempts + 1
    write(k, pos, it)
    table.insert(out, id)
  end
end
if #out > 1 then redis.call('HSETNX', KEYS[1], 'first_item_at', ARGV[2]) end
touch()
return out
"""
)

# ARGV: ttl, lease generation, the renewal cursor after this call ('' for none), then (id,
# block, offset, status, packed info) for running items. KEYS beyond the items' blocks are
# blocks given only to be renewed. Returns 'finalize' to the one caller that finished the
# batch's last item, 'stale' when the caller no longer holds its lease, else 'ok'.
_FINISH_ITEMS = (
    _PRELUDE
    + """
if stale(KEYS[2], ARGV[2]) then return 'stale' end
for i = 4, #ARGV, 5 do
  local id, k, pos = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local it = read(k, pos)
  if it and it.status == 'running' then
    it.token = ''
    it.info = ARGV[i + 4]
    move(k, pos, it, id, ARGV[i + 3])
  end
end
if ARGV[3] ~= '' and redis.call('EXISTS', KEYS[1]) == 1 then
  if tonumber(ARGV[3]) > tonumber(redis.call('HGET', KEYS[1], 'renewed') or '0') then
    redis.call('HSET', KEYS[1], 'renewed', ARGV[3])
  end
end
touch()
return complete_if_done()
"""
)

# ARGV: ttl, batch id, then the first member index of each block given. In a canceled batch,
# the queued items of those blocks end canceled: each block read once and written back
# whole, its counters moved once. Returns 'finalize' or 'ok'.
_CANCEL_BLOCKS = (
    _PRELUDE
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'canceled' then return 'ok' end
for k = 4, #KEYS do
  local entries = redis.call('LRANGE', KEYS[k], 0, -1)
  local first, ended = tonumber(ARGV[k - 1]), 0
  for pos = 1, #entries do
    local e = entries[pos]
    if string.sub(e, 1, 1) == 'q' then
      entries[pos] = 'c' .. string.sub(e, 2)
      ended = ended + 1
      local id = ARGV[2] .. '-' .. string.format('%06d', first + pos - 1)
      enqueue_item_callback(KEYS[1], KEYS[3], id)
    end
  end
  if ended > 0 then
    redis.call('DEL', KEYS[k])
    redis.call('RPUSH', KEYS[k], unpack(entries))
    redis.call('HINCRBY', KEYS[1], 'queued', -ended)
    redis.call('HINCRBY', KEYS[1], 'canceled', ended)
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

# ARGV: ttl, now. Only the batch hash: its queued items end canceled block by block after
# it (_CANCEL_BLOCKS), so no script walks a large batch. Returns {'ok' | current status,
# 'finalize' | 'ok', the number of blocks}.
_CANCEL = (
    _PRELUDE
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {'missing', 'ok', 0} end
if cur ~= 'queued' and cur ~= 'expanding' and cur ~= 'running' then return {cur, 'ok', 0} end
redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[2])
touch()
return {'ok', complete_if_done(), tonumber(redis.call('HGET', KEYS[1], 'blocks') or '0')}
"""
)

# ARGV: ttl, now, result JSON. A running batch succeeds; failed and canceled stay as they are.
# The batch's callback is queued in the same step (a redelivered close returns early once
# the result is set, so a callback queued after it could be lost with its worker).
_COMPLETE = (
    _PRELUDE
    + ENQUEUE_LUA
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
enqueue_callback(KEYS[1], KEYS[3])
touch()
return redis.call('HGET', KEYS[1], 'status')
"""
)

# ARGV: ttl, now, error JSON. The batch could not be closed (its manifest could not be
# written): a batch still open ends failed with that error, so it never waits forever.
_FAIL = (
    _PRELUDE
    + ENQUEUE_LUA
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 'missing' end
if cur == 'queued' or cur == 'expanding' or cur == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[3], 'finished_at', ARGV[2])
end
-- Closing gave up: nothing is to send its finalize again (keeper/reconciler.py).
redis.call('HSET', KEYS[1], 'close_failed', '1')
enqueue_callback(KEYS[1], KEYS[3])
touch()
return redis.call('HGET', KEYS[1], 'status')
"""
)

# Append an item's callback attempt to its info and settle its outbox entry (the deliverer,
# keeper/webhook_delivery.py). KEYS[4] the item's block. ARGV: ttl (unused: the item's TTL is the
# batch's), offset, outbox entry, attempt JSON, callback_state, earliest next attempt (''
# removes the entry; a retry takes the batch's next free slot), how many attempts to keep.
_RECORD_ITEM_CALL = (
    _PRELUDE
    + """
local pos = tonumber(ARGV[2])
local it = read(4, pos)
if not it or redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[3], ARGV[3])
  return 0
end
local info = cjson.decode(it.info)
local attempts = info.callbacks or {}
table.insert(attempts, cjson.decode(ARGV[4]))
while #attempts > tonumber(ARGV[7]) do table.remove(attempts, 2) end
info.callbacks = attempts
info.callback_attempts = (info.callback_attempts or 0) + 1
info.callback_state = ARGV[5]
it.info = cjson.encode(info)
write(4, pos, it)
if ARGV[6] == '' then redis.call('ZREM', KEYS[3], ARGV[3])
else redis.call('ZADD', KEYS[3], next_item_slot(KEYS[1], tonumber(ARGV[6])), ARGV[3]) end
return 1
"""
)

_STATUS_OF_CODE = {code: status for status, code in STATUS_CODES.items()}
# Blocks renewed by each finish_items on top of its own, round the batch (see ``_renewal``).
RENEW_STEP = 4
# Blocks per pipelined round trip where a whole batch is walked (renewal, cancel, reads).
PIPELINE_BLOCKS = 64


class _Slots:
    """The block keys a script is given (KEYS[4]…) and each item's (key position, offset)."""

    FIRST = 4

    def __init__(self, batch_id: str) -> None:
        self.batch_id = batch_id
        self.blocks: dict[int, int] = {}

    def slot(self, index: int) -> list[str]:
        block = block_of(index)
        position = self.blocks.setdefault(block, self.FIRST + len(self.blocks))
        return [str(position), str(index % BLOCK_ITEMS)]

    def keys(self) -> list[str]:
        return [block_key(self.batch_id, block) for block in self.blocks]


def _script_keys(batch_id: str, blocks: list[str], lease: str | None = None) -> list[str]:
    """KEYS of every script (see ``_PRELUDE``): the batch, the lease (or the unfenced
    placeholder), the webhook outbox, then ``blocks``."""
    return [batch_key(batch_id), lease or UNFENCED.key, OUTBOX_KEY, *blocks]


def _decode(batch_id: str, index: int, entry: bytes | None) -> Item | None:
    """The item an entry holds; None for a position not recorded."""
    if not entry:
        return None
    raw = entry.decode()
    attempts, _token, packed = raw[1:].split("|", 2)
    place = ItemPlace(batch_id, index, block_of(index))
    return Item(
        id=place.item_id,
        status=_STATUS_OF_CODE[raw[0]],
        info=unpack_info(place, packed),
        attempts=int(attempts),
    )


class BatchStore(RecordStore[Batch]):
    """Batches and their items: a hash per batch and a list per block of items, every change
    one script that keeps the counters, the item statuses and the ``finalizing`` flag in
    step."""

    OPEN_INDEXED = True
    RECORD = Batch
    NOT_FOUND = BatchNotFound
    SCRIPTS: ClassVar = {
        "_add_items": _ADD_ITEMS,
        "_start_items": _START_ITEMS,
        "_finish_items": _FINISH_ITEMS,
        "_cancel_blocks": _CANCEL_BLOCKS,
        "_begin_expansion": _BEGIN_EXPANSION,
        "_end_expansion": _END_EXPANSION,
        "_cancel": _CANCEL,
        "_complete": _COMPLETE,
        "_fail": _FAIL,
        "_record_item_call": _RECORD_ITEM_CALL,
        "_enqueue_callback": ENQUEUE_SCRIPT,
    }

    def record_keys(self, record_id: str) -> list[str]:
        return [batch_key(record_id), *self._block_keys(record_id, range(self.blocks(record_id)))]

    def blocks(self, batch_id: str) -> int:
        """How many blocks the batch's items reach (0 for an unknown batch)."""
        return int(self.redis.hget(batch_key(batch_id), "blocks") or 0)

    def begin_expansion(self, batch_id: str) -> str:
        return text(self._run(self._begin_expansion, batch_id, now_iso()))

    def add_items(self, batch_id: str, items: list[NewItem]) -> tuple[str, list[str]]:
        """Record new items (idempotent per id); returns the batch status and the ids of the
        given items that are queued and need dispatching."""
        slots = _Slots(batch_id)
        args: list[str] = []
        reach = 0
        for item in items:
            index = member_index(batch_id, item.id)
            if index is None:
                raise ValueError(f"{item.id!r} is not an item id of batch {batch_id}")
            packed = pack_info(ItemPlace(batch_id, index, block_of(index)), item.info())
            args += [item.id, *slots.slot(index), item.status.value, packed]
            reach = max(reach, block_of(index) + 1)
        status, *queued = self._run(self._add_items, batch_id, reach, *args, slots=slots)
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
        if "|" in token:
            raise ValueError(f"a delivery token cannot hold '|': {token!r}")
        slots = _Slots(batch_id)
        args = [
            a
            for i in ids
            if (n := member_index(batch_id, i)) is not None
            for a in (i, *slots.slot(n))
        ]
        outcome, *started = self._run(
            self._start_items,
            batch_id,
            now_iso(),
            token,
            fence.gen,
            *args,
            lease=fence.key,
            slots=slots,
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
        slots = _Slots(batch_id)
        args: list[str] = []
        for item, status, info in outcomes:
            index = member_index(batch_id, item)
            if index is None:
                continue
            packed = pack_info(ItemPlace(batch_id, index, block_of(index)), info)
            args += [item, *slots.slot(index), status.value, packed]
        renew_keys, cursor = self._renewal(batch_id)
        outcome = text(
            self._run(
                self._finish_items,
                batch_id,
                fence.gen,
                cursor,
                *args,
                lease=fence.key,
                slots=slots,
                extra_keys=renew_keys,
            )
        )
        if outcome == "stale":
            raise LeaseLost(f"chunk of batch {batch_id}")
        return outcome == "finalize"

    def cancel(self, batch_id: str, *, owner: str | None = None) -> tuple[Batch, bool]:
        """Cancel; queued items end canceled, a few blocks per script. Returns the batch and
        whether the caller must have it finalized (nothing was left running)."""
        self.get(batch_id, owner=owner)  # 404 before 409: others' batches must look unknown
        outcome, finalize, blocks = self._run(self._cancel, batch_id, now_iso())
        if text(outcome) != "ok":
            raise Conflict(f"batch {batch_id} is already {text(outcome)}; nothing to cancel")
        schedule.forget(self.redis, batch_id)  # its waiting chunks get no more turns
        drained = self._cancel_queued(batch_id, range(int(blocks)))
        return self.get(batch_id), text(finalize) == "finalize" or drained

    def settle_canceled(self, batch_id: str, ids: list[str]) -> bool:
        """In a canceled batch, end the queued items of the blocks of ``ids`` canceled (a
        chunk that starts after the cancel, should the canceling API process not have got
        there); True when the caller must finalize. Does nothing in any other batch."""
        indexes = (member_index(batch_id, i) for i in ids)
        blocks = sorted({block_of(n) for n in indexes if n is not None})
        return self._cancel_queued(batch_id, blocks)

    def _cancel_queued(self, batch_id: str, blocks: range | list[int]) -> bool:
        """Run _CANCEL_BLOCKS over ``blocks``, one block per script, pipelined."""
        finalize = False
        for step in range(0, len(blocks), PIPELINE_BLOCKS):
            with self.redis.pipeline(transaction=False) as pipe:
                for block in blocks[step : step + PIPELINE_BLOCKS]:
                    self._cancel_blocks(
                        keys=_script_keys(batch_id, [block_key(batch_id, block)]),
                        args=[self.ttl_s, batch_id, block * BLOCK_ITEMS],
                        client=pipe,
                    )
                finalize |= any(text(o) == "finalize" for o in pipe.execute())
        return finalize

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

    def record_item_call(
        self,
        batch_id: str,
        item: str,
        *,
        entry: str,
        attempt: str,
        state: str,
        next_at: str,
        keep: int,
    ) -> None:
        """Append an item callback's ``attempt`` (JSON) to the item's info and settle its
        outbox ``entry``: due again at ``next_at``, or removed when that is ''."""
        index = member_index(batch_id, item)
        if index is None:
            self.redis.zrem(OUTBOX_KEY, entry)
            return
        keys = _script_keys(batch_id, [block_key(batch_id, block_of(index))])
        args = [self.ttl_s, index % BLOCK_ITEMS, entry, attempt, state, next_at, keep]
        self._record_item_call(keys=keys, args=args)

    def _ended(self, batch_id: str) -> None:
        """Give every block the TTL from now (not inside the closing script: those touch
        every key they name, and a large batch has thousands of blocks), and queue the
        batch's callback once — the closing script queued it already; this covers a batch
        ended by other means. The finalize task that closes a batch is acknowledged only
        after this, so a worker dying in between renews the blocks again."""
        self._enqueue_callback(keys=[batch_key(batch_id), OUTBOX_KEY])
        self._renew(batch_id, range(self.blocks(batch_id)))

    def _renew(self, batch_id: str, blocks: range) -> None:
        for step in range(0, len(blocks), PIPELINE_BLOCKS * 16):
            with self.redis.pipeline(transaction=False) as pipe:
                for block in blocks[step : step + PIPELINE_BLOCKS * 16]:
                    pipe.expire(block_key(batch_id, block), self.ttl_s)
                pipe.execute()

    def _renewal(self, batch_id: str) -> tuple[list[str], int | str]:
        """The blocks a finish_items call renews besides its own, and the cursor to leave.

        Blocks get the TTL when a script writes them; a block whose items all ended long
        ago must not expire while the batch still runs. Each finish_items renews the next
        ``RENEW_STEP`` blocks round the batch from the cursor kept on the batch hash (which
        only moves forward), so every block is renewed at least once every
        ``blocks / RENEW_STEP`` finishes; when the batch ends, every block is (``_ended``)."""
        blocks, renewed = self.redis.hmget(batch_key(batch_id), "blocks", "renewed")
        if not blocks:
            return [], ""
        count, cursor = int(blocks), int(renewed or 0)
        window = {(cursor + step) % count for step in range(min(RENEW_STEP, count))}
        return self._block_keys(batch_id, sorted(window)), cursor + RENEW_STEP

    @staticmethod
    def _block_keys(batch_id: str, blocks: range | list[int]) -> list[str]:
        return [block_key(batch_id, block) for block in blocks]

    def items(self, batch_id: str, *, start: int = 0, count: int = 100) -> list[Item]:
        """The items at member positions ``start`` to ``start + count - 1``, in order (a
        position not recorded yet is skipped); reads only the blocks they are in."""
        if count <= 0:
            return []
        end = start + count  # exclusive
        blocks = range(block_of(start), block_of(end - 1) + 1)
        with self.redis.pipeline(transaction=False) as pipe:
            for block in blocks:
                first = block * BLOCK_ITEMS
                lo, hi = max(start, first) - first, min(end, first + BLOCK_ITEMS) - 1 - first
                pipe.lrange(block_key(batch_id, block), lo, hi)
            pages = pipe.execute()
        out: list[Item] = []
        for block, entries in zip(blocks, pages, strict=True):
            base = max(start, block * BLOCK_ITEMS)
            out += [i for n, e in enumerate(entries) if (i := _decode(batch_id, base + n, e))]
        return out

    def get_items(self, batch_id: str, ids: list[str]) -> dict[str, Item]:
        """The items of ``ids`` that exist, in that order."""
        wanted = [(i, n) for i in ids if (n := member_index(batch_id, i)) is not None]
        with self.redis.pipeline(transaction=False) as pipe:
            for _, n in wanted:
                pipe.lindex(block_key(batch_id, block_of(n)), n % BLOCK_ITEMS)
            entries = pipe.execute() if wanted else []
        found = (_decode(batch_id, n, e) for (_, n), e in zip(wanted, entries, strict=True))
        return {item.id: item for item in found if item is not None}

    def iter_items(self, batch_id: str, *, page: int = 1000) -> Iterator[Item]:
        """Every item in member order, read ``page`` items' worth of blocks at a time."""
        step = max(1, page // BLOCK_ITEMS)
        blocks = self.blocks(batch_id)
        for first in range(0, blocks, step):
            yield from self.items(
                batch_id,
                start=first * BLOCK_ITEMS,
                count=min(step, blocks - first) * BLOCK_ITEMS,
            )

    def item_count(self, batch_id: str) -> int:
        """How many items are recorded (member positions 0 to this - 1 once expanded)."""
        return int(self.redis.hget(batch_key(batch_id), "total") or 0)

    def _run(
        self,
        script,
        batch_id: str,
        *args: Any,
        lease: str | None = None,
        slots: _Slots | None = None,
        extra_keys: list[str] | None = None,
    ) -> Any:
        blocks = (slots.keys() if slots else []) + (extra_keys or [])
        outcome = script(keys=_script_keys(batch_id, blocks, lease), args=[self.ttl_s, *args])
        if outcome in (b"missing", "missing") or (
            isinstance(outcome, list) and outcome and text(outcome[0]) == "missing"
        ):
            raise BatchNotFound(batch_id)
        return outcome
