"""Read-repair of a job whose record was lost after its 202: Redis restored from an
append-only file missing its last second (``appendfsync everysec``), or a failover, can lose
a job's record and its message together (they are the newest writes, and an AOF loses a
suffix). Its input is in S3, written before the record, and beside it the record as it was
created (``inputs/<id>/job.json``, :func:`save_spec`). A ``GET /jobs/<id>`` that finds no
record reads that spec and, when it is the caller's and younger than ``JOB_TTL_HOURS`` (so
its record cannot have expired normally: records expire that long after they *end*), creates
the record again, ``queued``, and sends the job: the client sees its job, not a 404, and it
runs. Counted as ``job_restored`` in ``featuremaps_reconciler_repairs_total``.

A job lost with its record and never polled again is not found this way (a webhook-only
client): it stays lost until its input is swept by retention. docs/reliability.md.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from api.services import Services
from keeper.counters import REPAIR, count
from shared import keys
from shared.errors import NotFound
from shared.jobs import Job, JobStatus
from shared.queue import JOBS_QUEUE, RENDER_JOB

log = logging.getLogger(__name__)

# Two polls of the same lost job restore it once.
RESTORE_LOCK_S = 60


def save_spec(svc: Services, job: Job) -> None:
    """Keep the record as created beside the job's input, before the record is written."""
    spec = json.dumps(job.to_redis(), sort_keys=True).encode()
    svc.store.put_bytes(keys.job_spec_key(job.id), spec, "application/json")


def restore_lost_job(svc: Services, job_id: str, owner: str) -> Job | None:
    """The job ``job_id`` of ``owner`` recreated from its spec, queued and sent again; None
    when there is nothing to restore (no spec, another owner's, or too old)."""
    try:
        raw = json.loads(svc.store.get_bytes(keys.job_spec_key(job_id)))
    except (NotFound, ValueError):
        return None
    job = Job.from_redis({k.encode(): str(v).encode() for k, v in raw.items()})
    if job.id != job_id or job.owner != owner or job.status is not JobStatus.QUEUED:
        return None
    age_s = (datetime.now(UTC) - datetime.fromisoformat(job.created_at)).total_seconds()
    if age_s >= svc.settings.job_ttl_s:
        return None
    lock = f"{svc.jobs.key(job_id)}:restore"
    if not svc.redis.set(lock, "1", nx=True, ex=RESTORE_LOCK_S):
        return None  # another request is restoring it right now
    if svc.redis.exists(svc.jobs.key(job_id)):
        return None
    svc.jobs.create(job)
    svc.producer.send_task(RENDER_JOB, args=[job_id], queue=JOBS_QUEUE)
    count(svc.redis, REPAIR, "job_restored")
    log.warning("job %s: its record was lost after it was accepted; restored and queued", job_id)
    return job
