"""Restoring a job or batch whose record was lost after its 202.

Redis restored from an append-only file missing its last second (``appendfsync everysec``),
or a failover to a replica a moment behind, loses a suffix of the writes: a record created in
that second goes with its message and everything after it, and the client that was answered
202 would get 404 for ever. Before the record is written, the API keeps it as it was created
in storage (``accepted/jobs/<id>.json``, ``accepted/batches/<id>.json``: :func:`save_spec`),
beside the input it already wrote there; the spec is deleted when the record ends.

A record is restored from its spec, ``queued``, and its first task sent again (``render_job``,
``expand_batch``), counted as ``job_restored`` / ``batch_restored`` in
``featuremaps_reconciler_repairs_total``:

- by the owner's next ``GET /jobs/<id>`` or ``GET /batches/<id>`` that finds no record
  (:func:`restore`, from api/routes): the client sees its record, not a 404;
- by the keeper's sweep (:func:`maybe_restore_unpolled`, every ``RESTORE_EVERY_S``), for the
  records nobody polls (a client waiting for its webhook): every spec older than
  ``RECONCILE_GRACE_S`` (a submission writes its record right after its spec) whose record
  does not exist.

Only a spec younger than ``JOB_TTL_HOURS`` is restored: records expire that long after they
*end*, so a younger one's cannot have expired normally. A short lock per record makes two
restorers (two polls, a poll and the sweep) restore it once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from redis import Redis

from keeper.counters import REPAIR, count
from keeper.reconciler import Send
from shared import keys
from shared.batches import Batch, BatchStatus, BatchStore
from shared.errors import NotFound
from shared.jobs import Job, JobStatus, JobStore
from shared.queue import BATCH_QUEUE, EXPAND_BATCH, JOBS_QUEUE, RENDER_JOB
from shared.records import PREFIX, Record, RecordStore, record_key
from shared.settings import Settings
from shared.storage import ObjectStore

log = logging.getLogger(__name__)

LOCK_KEY = f"{PREFIX}:restore:lock"
# Two restorers of the same lost record restore it once.
RESTORE_LOCK_S = 60


@dataclass(frozen=True)
class _Kind:
    store: type[RecordStore]
    queued: object
    task: str
    queue: str


KINDS = {
    "job": _Kind(JobStore, JobStatus.QUEUED, RENDER_JOB, JOBS_QUEUE),
    "batch": _Kind(BatchStore, BatchStatus.QUEUED, EXPAND_BATCH, BATCH_QUEUE),
}


def save_spec(store: ObjectStore, kind: str, record: Job | Batch) -> None:
    """Keep the record as created in storage; call before the record is written."""
    spec = json.dumps(record.to_redis(), sort_keys=True).encode()
    store.put_bytes(keys.spec_key(kind, record.id), spec, "application/json")


def delete_spec(store: ObjectStore, kind: str, record_id: str) -> None:
    """The record ended (or was never created): nothing to restore any more."""
    store.delete_keys([keys.spec_key(kind, record_id)])


def restore(
    redis: Redis,
    store: ObjectStore,
    settings: Settings,
    send: Send,
    kind: str,
    record_id: str,
    *,
    owner: str | None = None,
) -> Record | None:
    """The ``kind`` record ``record_id`` recreated from its spec, queued, its task sent; None
    when there is nothing to restore: no spec, another owner's (when ``owner`` is given), too
    old, being restored by another caller, or its record exists."""
    what = KINDS[kind]
    try:
        raw = json.loads(store.get_bytes(keys.spec_key(kind, record_id)))
    except (NotFound, ValueError):
        return None
    records = what.store(redis, ttl_s=settings.job_ttl_s)
    record = records.RECORD.from_redis({k.encode(): str(v).encode() for k, v in raw.items()})
    if record.id != record_id or record.status is not what.queued:
        return None
    if owner is not None and record.owner != owner:
        return None
    age_s = (datetime.now(UTC) - datetime.fromisoformat(record.created_at)).total_seconds()
    if age_s >= settings.job_ttl_s:
        return None
    key = records.key(record_id)
    if not redis.set(f"{key}:restore", "1", nx=True, ex=RESTORE_LOCK_S):
        return None
    if redis.exists(key):
        return None
    records.create(record)
    send(what.task, args=[record_id], queue=what.queue)
    count(redis, REPAIR, f"{kind}_restored")
    log.warning("%s %s: its record was lost after it was accepted; restored", kind, record_id)
    return record


def restore_unpolled(
    redis: Redis, store: ObjectStore, settings: Settings, send: Send
) -> dict[str, int]:
    """Restore every record whose spec is past the grace period and whose record is gone;
    returns how many of each kind."""
    now = datetime.now(UTC)
    restored = {kind: 0 for kind in KINDS}
    for spec, modified in store.list_modified(keys.SPECS_PREFIX):
        parsed = keys.parse_spec_key(spec)
        if parsed is None:
            continue
        kind, record_id = parsed
        age_s = (now - modified).total_seconds()
        if age_s < settings.reconcile_grace_s or age_s >= settings.job_ttl_s:
            continue
        if redis.exists(record_key(kind, record_id)):
            continue
        if restore(redis, store, settings, send, kind, record_id) is not None:
            restored[kind] += 1
    return restored


def maybe_restore_unpolled(
    redis: Redis, store: ObjectStore, settings: Settings, send: Send, holder: str
) -> dict[str, int] | None:
    """Sweep unless another process did in this period; None when it was not our turn."""
    every_ms = int(settings.restore_every_s * 1000)
    if not redis.set(LOCK_KEY, holder, nx=True, px=every_ms):
        return None
    return restore_unpolled(redis, store, settings, send)
