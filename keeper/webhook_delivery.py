"""Delivering webhooks (docs/design.md "Webhooks"): a thread of the keeper (keeper/runner.py),
in each API process and each worker process, takes due records from the outbox
(``shared/webhooks.py``), POSTs each one's status document, records the attempt on the
record, and removes the entry or puts it back with a later time.

Taking an entry moves it ``LEASE_S`` into the future, so an entry whose deliverer died (a
process restart) comes back by itself. Delivery is at least once: a deliverer that dies after
the POST and before recording it leaves the entry to be sent again; receivers tell repeats
apart by the id and status in the body. Nothing here runs on a task's thread, so a slow or
dead receiver never holds up a job.

A batch's item calls (entries ``featuremaps:batch:<id>:item:<item id>``) are paced: entries
come due ``spacing = 1 / WEBHOOK_ITEM_RATE`` apart (shared/webhooks.py), and before each POST
:data:`_PACE` takes the call's turn, across all deliverers: no sooner than ``spacing`` after
the batch's previous item call started (waiting out the rest when it is under
``min(spacing / 2, 1 s)``). Entries that came due together (deliverers were busy elsewhere)
take the batch's next free slots instead of going at once, so a backlog never bursts. An
item's attempts are kept in its info (the first and the latest, :data:`ITEM_ATTEMPTS_KEPT`
in all, with ``callback_attempts`` counting them all).

One slow receiver cannot stall the others: a call has a total deadline of
``DEADLINE_TIMEOUTS · WEBHOOK_TIMEOUT_S`` (the timeout alone bounds each read, and a
receiver dripping a byte every few seconds would hold a deliverer for ever; past the
deadline the socket is shut), and at most :data:`HOST_CALLS` calls to one host run at once
across all deliverers (:data:`_HOST_SLOT`): a deliverer that finds a host's slots taken puts
the entry back :data:`HOST_BUSY_RETRY_S` later, unrecorded, and goes on with the next.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from http.client import HTTPException
from typing import Any
from urllib.parse import urlsplit

import urllib3
from redis import Redis
from redis.exceptions import RedisError
from urllib3.exceptions import HTTPError

from shared import documents
from shared.batches import Batch, BatchStore, Item
from shared.errors import CallbackRefused, NotFound
from shared.jobs import Job, JobStore
from shared.records import PREFIX, Record, now_iso, parse_iso, text
from shared.settings import Settings
from shared.storage import ObjectStore
from shared.webhooks import (
    DELIVERED,
    EVENT_HEADER,
    GAVE_UP,
    ITEM_ENQUEUE_LUA,
    OUTBOX_KEY,
    PENDING,
    SIGNATURE_HEADER,
    Target,
    check_callback_url,
    signature,
    split_item_entry,
)

log = logging.getLogger(__name__)

IDLE_S = 0.5  # between looks at an outbox with nothing due
# A call's whole duration (connect, send, the answer's headers and body) is bounded by this
# many WEBHOOK_TIMEOUT_S; within the entry's lease of 4·WEBHOOK_TIMEOUT_S + 30 s.
DEADLINE_TIMEOUTS = 3
HOST_CALLS = 2  # calls to one receiver host at once, across every deliverer
HOST_BUSY_RETRY_S = 1.0
MAX_RESPONSE_BYTES = 64 * 1024  # read of a receiver's answer, for the attempt's error
MAX_BACKOFF_S = 600.0
USER_AGENT = "featuremaps-webhook/1"
ITEM_ATTEMPTS_KEPT = 5  # on an item: its first attempt and the latest ones

# Take the first due entry and lease it. KEYS[1] outbox; ARGV: now, lease end.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #due == 0 then return false end
redis.call('ZADD', KEYS[1], ARGV[2], due[1])
return due[1]
"""

# Take a claimed item call's turn: the batch's previous item call started at ``sent``; this
# one may start at ``sent + spacing``. KEYS[1] batch, KEYS[2] outbox; ARGV: entry, now.
# Returns the seconds to wait for the turn (as text) when that is under min(spacing/2, 1 s);
# 'later' when the turn is further off (calls due together): the entry then takes the
# batch's next free slot; 'gone' when the batch is.
_PACE = (
    ITEM_ENQUEUE_LUA
    + """
local spacing = tonumber(redis.call('HGET', KEYS[1], 'item_callback_spacing_s') or '')
if not spacing then return 'gone' end
local now = tonumber(ARGV[2])
local sent = tonumber(redis.call('HGET', KEYS[1], 'item_callback_sent') or '')
local at = now
if sent and sent + spacing > now then at = sent + spacing end
if at - now > math.min(spacing / 2, 1) then
  redis.call('ZADD', KEYS[2], next_item_slot(KEYS[1], at), ARGV[1])
  return 'later'
end
redis.call('HSET', KEYS[1], 'item_callback_sent', at)
return tostring(at - now)
"""
)

# Append an attempt and settle the entry. KEYS[1] record, KEYS[2] outbox.
# ARGV: attempt JSON, callback_state, next attempt time ('' removes the entry).
# Take one of a host's call slots. KEYS[1] the host's slots (a sorted set of call ids by the
# time they free themselves, so a deliverer that died frees its slot). ARGV: call id, now,
# the slot's end, how many. Returns 1 when taken, 0 when the host has that many calls.
_HOST_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) - tonumber(ARGV[2])) + 1)
return 1
"""

_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], KEYS[1])
  return 0
end
local raw = redis.call('HGET', KEYS[1], 'callbacks')
local attempts = raw and cjson.decode(raw) or {}
table.insert(attempts, cjson.decode(ARGV[1]))
redis.call('HSET', KEYS[1], 'callbacks', cjson.encode(attempts), 'callback_state', ARGV[2])
if ARGV[3] == '' then redis.call('ZREM', KEYS[2], KEYS[1])
else redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1]) end
return 1
"""


class Deliverer:
    """Delivers the outbox of one Redis; ``clock`` is Unix seconds, ``sleep`` waits out an
    item call's pacing."""

    def __init__(
        self,
        redis: Redis,
        store: ObjectStore,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.redis = redis
        self.store = store
        self.settings = settings
        self.clock = clock
        self.sleep = sleep
        self.lease_s = 4 * settings.webhook_timeout_s + 30
        self.batches = BatchStore(redis, ttl_s=settings.job_ttl_s)
        self.stores: dict[str, JobStore | BatchStore] = {
            "job": JobStore(redis, ttl_s=settings.job_ttl_s),
            "batch": self.batches,
        }
        self._claim = redis.register_script(_CLAIM)
        self._record = redis.register_script(_RECORD)
        self._pace = redis.register_script(_PACE)
        self._host_slot = redis.register_script(_HOST_SLOT)
        self.deadline_s = DEADLINE_TIMEOUTS * settings.webhook_timeout_s

    def deliver_due(self) -> bool:
        """Make one due delivery attempt; False when nothing was due."""
        key = self.claim()
        if key is None:
            return False
        self.deliver(key)
        return True

    def claim(self) -> str | None:
        """The first due entry (a record key, or an item's), leased for ``lease_s``."""
        now = self.clock()
        key = self._claim(keys=[OUTBOX_KEY], args=[now, now + self.lease_s])
        return text(key) if key is not None else None

    def idle_for(self) -> float:
        """How long to wait for the next entry to come due (at most IDLE_S)."""
        first = self.redis.zrange(OUTBOX_KEY, 0, 0, withscores=True)
        if not first:
            return IDLE_S
        return min(IDLE_S, max(0.0, float(first[0][1]) - self.clock()))

    def deliver(self, key: str) -> None:
        """One attempt for a claimed entry, recorded; an expired record's entry is dropped."""
        item = split_item_entry(key)
        if item is not None:
            self._deliver_item(key, *item)
            return
        record = self._load(key)
        if record is None:
            self.redis.zrem(OUTBOX_KEY, key)
            return
        event = "batch" if isinstance(record, Batch) else "job"
        attempt = len(record.callbacks or []) + 1
        slot = self._take_host_slot(key, record.callback_url)
        if slot is None:
            return
        try:
            document = self._document(record)
            status, error = self._attempt(record.callback_url, document, event, attempt)
        finally:
            self._free_host_slot(slot)
        self._settle(key, record, status, error)

    def _deliver_item(self, key: str, batch_key: str, item_id: str) -> None:
        """One paced attempt of an item's call, recorded in the item's info."""
        loaded = self._load_item(batch_key, item_id)
        if loaded is None:
            self.redis.zrem(OUTBOX_KEY, key)
            return
        batch, item = loaded
        document = documents.item_document(self.store, batch, item, self.settings.presign_expiry_s)
        document.update(batch_id=batch.id, links={"batch": f"/batches/{batch.id}"})
        # Paced last, so that the POST follows its turn as closely as it can.
        wait = text(self._pace(keys=[batch_key, OUTBOX_KEY], args=[key, self.clock()]))
        if wait == "gone":
            self.redis.zrem(OUTBOX_KEY, key)
        if wait in ("gone", "later"):
            return
        self.sleep(float(wait))
        attempt = int(item.info.get("callback_attempts", 0)) + 1
        slot = self._take_host_slot(key, batch.callback_url)
        if slot is None:
            return
        try:
            status, error = self._attempt(batch.callback_url, document, "item", attempt)
        finally:
            self._free_host_slot(slot)
        first = (item.info.get("callbacks") or [{}])[0].get("at")
        state, next_at = self._next_try(attempt - 1, first, error)
        self.batches.record_item_call(
            batch.id,
            item_id,
            entry=key,
            attempt=_attempt_json(status, error),
            state=state,
            next_at=next_at,
            keep=ITEM_ATTEMPTS_KEPT,
        )
        log.info("webhook %s attempt %d: %s", key, attempt, error or status)

    def _take_host_slot(self, key: str, url: str | None) -> tuple[str, str] | None:
        """One of the URL's host's call slots, or None when all are taken: the entry is then
        put back ``HOST_BUSY_RETRY_S`` later, without an attempt recorded."""
        host = (urlsplit(url or "").hostname or "").lower()
        slots = f"{PREFIX}:webhook:calls:{host}"
        call = uuid.uuid4().hex
        now = self.clock()
        if self._host_slot(keys=[slots], args=[call, now, now + self.deadline_s + 5, HOST_CALLS]):
            return slots, call
        log.info("webhook %s: %s has %d calls running; later", key, host, HOST_CALLS)
        self.redis.zadd(OUTBOX_KEY, {key: now + HOST_BUSY_RETRY_S})
        return None

    def _free_host_slot(self, slot: tuple[str, str]) -> None:
        self.redis.zrem(*slot)

    def _load(self, key: str) -> Job | Batch | None:
        kind, _, record_id = key.removeprefix(f"{PREFIX}:").partition(":")
        try:
            return self.stores[kind].get(record_id)
        except (KeyError, NotFound):  # expired, or not a record key
            return None

    def _load_item(self, batch_key: str, item_id: str) -> tuple[Batch, Item] | None:
        batch = self._load(batch_key)
        if not isinstance(batch, Batch):
            return None
        item = self.batches.get_items(batch.id, [item_id]).get(item_id)
        return (batch, item) if item is not None else None

    def _attempt(
        self, url: str | None, document: dict[str, Any], event: str, attempt: int
    ) -> tuple[int | None, str | None]:
        """(HTTP status or None, error or None) of one POST of a document."""
        body = json.dumps(document).encode()
        try:
            target = check_callback_url(
                url or "", allow_private=self.settings.webhook_allow_private
            )
            headers = self._headers(body, event, attempt)
            status, answer = post(target, body, headers, self.settings, deadline_s=self.deadline_s)
        except CallbackRefused as exc:
            return None, exc.message
        except (HTTPError, HTTPException, OSError) as exc:  # the receiver's side failed
            return None, f"{type(exc).__name__}: {exc}"
        if 200 <= status < 300:
            return status, None
        why = "redirects are not followed" if 300 <= status < 400 else "not a 2xx answer"
        return status, f"HTTP {status} ({why}): {answer[:200]!r}"

    def _document(self, record: Job | Batch) -> dict[str, Any]:
        expiry = self.settings.presign_expiry_s
        if isinstance(record, Batch):
            doc = documents.batch_document(self.store, record, expiry)
            doc["links"] = {"self": f"/batches/{record.id}"}
        else:
            doc = documents.job_document(self.store, record, expiry)
            doc["links"] = {"self": f"/jobs/{record.id}"}
        return doc

    def _headers(self, body: bytes, event: str, attempt: int) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            SIGNATURE_HEADER: signature(self.settings.webhook_secret, int(self.clock()), body),
            "X-Featuremaps-Attempt": str(attempt),
            EVENT_HEADER: event,
        }

    def _settle(self, key: str, record: Record, status: int | None, error: str | None) -> None:
        """Record the attempt; remove the entry, or schedule the next try."""
        first = record.callbacks[0]["at"] if record.callbacks else None
        state, next_at = self._next_try(len(record.callbacks or []), first, error)
        attempt = _attempt_json(status, error)
        self._record(keys=[key, OUTBOX_KEY], args=[attempt, state, next_at])
        log.info("webhook %s attempt %d: %s", key, len(record.callbacks or []) + 1, error or status)

    def _next_try(self, done: int, first_at: str | None, error: str | None) -> tuple[str, str]:
        """(callback_state, time of the next try or '') after attempt ``done + 1`` failed with
        ``error`` (or succeeded): backoff from WEBHOOK_BACKOFF_S, doubling, until
        WEBHOOK_RETRY_FOR_S after the first attempt (at ``first_at``; None: this one)."""
        now = self.clock()
        first = parse_iso(first_at).timestamp() if first_at else now
        delay = min(MAX_BACKOFF_S, self.settings.webhook_backoff_s * 2**done)
        if error is None:
            return DELIVERED, ""
        if now + delay - first > self.settings.webhook_retry_for_s:
            return GAVE_UP, ""
        return PENDING, str(now + delay)


def _attempt_json(status: int | None, error: str | None) -> str:
    return json.dumps({"at": now_iso(), "status": status, "error": error})


def post(
    target: Target,
    body: bytes,
    headers: dict[str, str],
    settings: Settings,
    *,
    deadline_s: float | None = None,
):
    """POST ``body`` to the checked address, never following a redirect; returns the status
    and at most MAX_RESPONSE_BYTES of the answer. Each connect and read waits at most
    ``WEBHOOK_TIMEOUT_S``; the whole call at most ``deadline_s`` (``TimeoutError`` past it)."""
    timeout = urllib3.Timeout(connect=settings.webhook_timeout_s, read=settings.webhook_timeout_s)
    options: dict[str, Any] = {"timeout": timeout, "retries": False, "maxsize": 1}
    if target.scheme == "https":
        # TLS and the certificate check are for the name; the socket goes to the address.
        options.update(server_hostname=target.host, assert_hostname=target.host)
        pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(
            target.address, target.port, **options
        )
    else:
        pool = urllib3.HTTPConnectionPool(target.address, target.port, **options)
    deadline = _Deadline(deadline_s or DEADLINE_TIMEOUTS * settings.webhook_timeout_s)
    pool.ConnectionCls = deadline.watching(pool.ConnectionCls)
    default_port = 443 if target.scheme == "https" else 80
    host = f"[{target.host}]" if ":" in target.host else target.host
    host_header = host if target.port == default_port else f"{host}:{target.port}"
    try:
        response = pool.urlopen(
            "POST",
            target.path,
            body=body,
            headers={**headers, "Host": host_header},
            redirect=False,
            assert_same_host=False,
            preload_content=False,
        )
        answer = response.read(MAX_RESPONSE_BYTES)
        response.close()
        if deadline.expired:
            raise TimeoutError(f"the call took longer than its deadline of {deadline.seconds:g}s")
        return response.status, answer
    except (HTTPError, HTTPException, OSError) as exc:
        if deadline.expired:
            raise TimeoutError(
                f"the call took longer than its deadline of {deadline.seconds:g}s "
                "(a receiver answering too slowly)"
            ) from exc
        raise
    finally:
        deadline.cancel()
        pool.close()


class _Deadline:
    """Shuts the call's socket ``seconds`` after it connected, wherever the call is waiting
    (the answer's headers or body): the read timeout alone restarts at every byte."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._timer: threading.Timer | None = None

    def watching(self, base: type) -> type:
        deadline = self

        class Watched(base):  # type: ignore[misc, valid-type]
            def connect(self) -> None:
                super().connect()
                deadline.start(self.sock)

        return Watched

    def start(self, sock: socket.socket) -> None:
        def expire() -> None:
            self.expired = True
            with contextlib.suppress(OSError):  # closed already
                sock.shutdown(socket.SHUT_RDWR)

        self._timer = threading.Timer(self.seconds, expire)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _idle_for(deliverer: Deliverer) -> float:
    try:
        return deliverer.idle_for()
    except RedisError:
        return IDLE_S


def webhook_loop(deliverer: Deliverer, *, sleep: Callable[[float], None] = time.sleep) -> None:
    """Deliver forever (a daemon thread of the keeper)."""
    while True:
        try:
            busy = deliverer.deliver_due()
        except RedisError as exc:  # Redis is restarting; the outbox is still there after
            log.warning("webhook delivery paused: %s", exc)
            busy = False
        except Exception:  # a bug must not end delivery for good; the entry's lease runs out
            log.exception("webhook delivery failed; the entry is tried again after its lease")
            busy = False
        if not busy:
            sleep(_idle_for(deliverer))
