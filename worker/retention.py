"""Retention: deleting the objects of jobs and batches whose records have expired.

Job and batch records expire in Redis by themselves, ``JOB_TTL_HOURS`` after their last
change. Their objects (``inputs/<id>/``, ``results/<id>/``, ``batches/<id>/``, the specs
``accepted/jobs|batches/<id>.json``; and ``models/<id>/``, whose records do not expire but are
deleted) are deleted by :func:`sweep`: an object goes when the record that owns it no longer
exists *and* it is older than the TTL. Every object a record names is written before the
record's last change, so by the time a record expires they are past the TTL too; the age check
spares an upload whose record is being written at this moment. The owner is the id, whatever
the attempt's folder under it (shared/keys.py): objects of attempts no record names (a stale
writer's that it could not delete) go with the record's others, once they are past the TTL
too. Objects with no record at all (a submission undone while a dependency was down) go the
same way.

Each worker process calls :func:`maybe_sweep` once per :func:`sweep_interval_s` on a thread
(worker/runtime.py); a short Redis lock lets one of them sweep per period, so more workers do
not mean more listing.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from redis import Redis

from shared import keys
from shared.batches import batch_key
from shared.jobs import PREFIX, job_key
from shared.models import ModelStore
from shared.records import record_key
from shared.storage import ObjectStore

log = logging.getLogger(__name__)

OWNED_PREFIXES = keys.SERVICE_PREFIXES
LOCK_KEY = f"{PREFIX}:retention:lock"
_ITEM_INDEX_DIGITS = 6  # batch item ids are <batch_id>-NNNNNN (shared.batches.item_id)


def owner_record_key(key: str) -> str | None:
    """The Redis key of the job or batch record that owns object ``key``, if any."""
    if key.startswith(keys.SPECS_PREFIX):
        spec = keys.parse_spec_key(key)
        if spec is None:
            return None
        return record_key(*spec)
    top, _, rest = key.partition("/")
    owner = rest.split("/", 1)[0]
    if not owner or f"{top}/" not in OWNED_PREFIXES:
        return None
    if top == "batches":
        return batch_key(owner)
    if top == "models":
        # An uploaded model's record never expires: only a deleted model's weights (or an
        # upload whose record was never written) are left without one.
        return ModelStore.key(owner)
    batch_id, dash, index = owner.rpartition("-")
    if dash and batch_id and len(index) == _ITEM_INDEX_DIGITS and index.isdigit():
        return batch_key(batch_id)
    return job_key(owner)


def sweep(store: ObjectStore, redis: Redis, *, ttl_s: float, now: datetime | None = None) -> int:
    """Delete every owned object whose record is gone and that is older than ``ttl_s``;
    returns how many were deleted."""
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=ttl_s)
    record_exists: dict[str, bool] = {}
    expired: list[str] = []
    for prefix in OWNED_PREFIXES:
        for key, modified in store.list_modified(prefix):
            owner = owner_record_key(key)
            if owner is None or modified > cutoff:
                continue
            if owner not in record_exists:
                record_exists[owner] = bool(redis.exists(owner))
            if not record_exists[owner]:
                expired.append(key)
    return store.delete_keys(expired)


def sweep_interval_s(ttl_s: float) -> float:
    """A quarter of the TTL, between 1 s and 15 min: objects outlive their record by at
    most that much."""
    return min(900.0, max(1.0, ttl_s / 4))


def maybe_sweep(store: ObjectStore, redis: Redis, *, ttl_s: float, holder: str) -> int | None:
    """Sweep unless another worker did in this period; None when it was not our turn."""
    period_ms = int(sweep_interval_s(ttl_s) * 1000)
    if not redis.set(LOCK_KEY, holder, nx=True, px=period_ms):
        return None
    deleted = sweep(store, redis, ttl_s=ttl_s)
    if deleted:
        log.info("retention: deleted %d expired objects", deleted)
    return deleted
