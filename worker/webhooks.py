"""Delivering webhooks (docs/design.md "Webhooks"): a thread in each worker process takes
due records from the outbox (``shared/webhooks.py``), POSTs each one's status document,
records the attempt on the record, and removes the entry or puts it back with a later time.

Taking an entry moves it ``LEASE_S`` into the future, so an entry whose deliverer died (a
worker restart) comes back by itself. Delivery is at least once: a deliverer that dies after
the POST and before recording it leaves the entry to be sent again; receivers tell repeats
apart by the id and status in the body. Nothing here runs on a task's thread, so a slow or
dead receiver never holds up a job.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from http.client import HTTPException
from typing import Any

import urllib3
from redis import Redis
from redis.exceptions import RedisError
from urllib3.exceptions import HTTPError

from shared import documents
from shared.batches import Batch, BatchStore
from shared.errors import CallbackRefused, NotFound
from shared.jobs import Job, RedisJobStore
from shared.records import PREFIX, Record, now_iso, parse_iso
from shared.settings import Settings
from shared.storage import ObjectStore
from shared.webhooks import (
    DELIVERED,
    GAVE_UP,
    OUTBOX_KEY,
    PENDING,
    SIGNATURE_HEADER,
    Target,
    check_callback_url,
    signature,
)

log = logging.getLogger(__name__)

IDLE_S = 0.5  # between looks at an outbox with nothing due
MAX_RESPONSE_BYTES = 64 * 1024  # read of a receiver's answer, for the attempt's error
MAX_BACKOFF_S = 600.0
USER_AGENT = "featuremaps-webhook/1"

# Take the first due entry and lease it. KEYS[1] outbox; ARGV: now, lease end.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #due == 0 then return false end
redis.call('ZADD', KEYS[1], ARGV[2], due[1])
return due[1]
"""

# Append an attempt and settle the entry. KEYS[1] record, KEYS[2] outbox.
# ARGV: attempt JSON, callback_state, next attempt time ('' removes the entry).
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
    """Delivers the outbox of one Redis; ``clock`` is Unix seconds."""

    def __init__(
        self,
        redis: Redis,
        store: ObjectStore,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.store = store
        self.settings = settings
        self.clock = clock
        self.lease_s = 4 * settings.webhook_timeout_s + 30
        self.stores: dict[str, RedisJobStore | BatchStore] = {
            "job": RedisJobStore(redis, ttl_s=settings.job_ttl_s),
            "batch": BatchStore(redis, ttl_s=settings.job_ttl_s),
        }
        self._claim = redis.register_script(_CLAIM)
        self._record = redis.register_script(_RECORD)

    def deliver_due(self) -> bool:
        """Make one due delivery attempt; False when nothing was due."""
        key = self.claim()
        if key is None:
            return False
        self.deliver(key)
        return True

    def claim(self) -> str | None:
        """The record key of the first due entry, leased to this deliverer for ``lease_s``."""
        now = self.clock()
        key = self._claim(keys=[OUTBOX_KEY], args=[now, now + self.lease_s])
        return key.decode() if isinstance(key, bytes) else key

    def deliver(self, key: str) -> None:
        """One attempt for a claimed entry, recorded; an expired record's entry is dropped."""
        record = self._load(key)
        if record is None:
            self.redis.zrem(OUTBOX_KEY, key)
            return
        status, error = self._attempt(record)
        self._settle(key, record, status, error)

    def _load(self, key: str) -> Job | Batch | None:
        kind, _, record_id = key.removeprefix(f"{PREFIX}:").partition(":")
        try:
            return self.stores[kind].get(record_id)
        except (KeyError, NotFound):  # expired, or not a record key
            return None

    def _attempt(self, record: Job | Batch) -> tuple[int | None, str | None]:
        """(HTTP status or None, error or None) of one POST of the record's document."""
        body = json.dumps(self._document(record)).encode()
        try:
            target = check_callback_url(
                record.callback_url or "", allow_private=self.settings.webhook_allow_private
            )
            status, answer = post(target, body, self._headers(body, record), self.settings)
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

    def _headers(self, body: bytes, record: Record) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            SIGNATURE_HEADER: signature(self.settings.webhook_secret, int(self.clock()), body),
            "X-Featuremaps-Attempt": str(len(record.callbacks or []) + 1),
        }

    def _settle(self, key: str, record: Record, status: int | None, error: str | None) -> None:
        """Record the attempt; remove the entry, or schedule the next try with backoff
        until WEBHOOK_RETRY_FOR_S after the first attempt."""
        now = self.clock()
        done = len(record.callbacks or [])
        first = parse_iso(record.callbacks[0]["at"]).timestamp() if record.callbacks else now
        delay = min(MAX_BACKOFF_S, self.settings.webhook_backoff_s * 2**done)
        if error is None:
            state, next_at = DELIVERED, ""
        elif now + delay - first > self.settings.webhook_retry_for_s:
            state, next_at = GAVE_UP, ""
        else:
            state, next_at = PENDING, str(now + delay)
        attempt = json.dumps({"at": now_iso(), "status": status, "error": error})
        self._record(keys=[key, OUTBOX_KEY], args=[attempt, state, next_at])
        log.info("webhook %s attempt %d: %s", key, done + 1, error or status)


def post(target: Target, body: bytes, headers: dict[str, str], settings: Settings):
    """POST ``body`` to the checked address, never following a redirect; returns the status
    and at most MAX_RESPONSE_BYTES of the answer."""
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
        return response.status, answer
    finally:
        pool.close()


def webhook_loop(deliverer: Deliverer, *, sleep: Callable[[float], None] = time.sleep) -> None:
    """Deliver forever (a daemon thread of each worker process)."""
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
            sleep(IDLE_S)
