"""Job records in Redis, with atomic state transitions.

A job is one Redis hash, ``featuremaps:job:<id>``. Every change of status happens inside a
short Lua script that checks the current status first, so two workers (or a worker and a
cancelling user) can never both move the same job forward. Records expire
``JOB_TTL_HOURS`` after they end (never while they wait or run); an id that is not there
is :class:`JobNotFound` (a 404), never a fake "pending".

    queued → running → succeeded | failed
    queued | running → canceled
    running → queued        (a storage error: the task is retried with backoff)
    running → running       (redelivery after the worker died; counted as ``lost``)

A worker's moves carry its lease's fence (shared/leases.py): once its work was handed over to
another worker they raise :class:`LeaseLost` and change nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from redis.client import Pipeline

from shared.errors import RETRYING, WORKER_LOST, Conflict
from shared.leases import FENCE_LUA, UNFENCED, Fence, LeaseLost
from shared.records import (
    FINISHED,
    PREFIX,
    Record,
    RecordNotFound,
    RecordStore,
    new_record_id,
    now_iso,
    parse_iso,
    record_key,
    text,
)
from shared.webhooks import ENQUEUE_LUA, OUTBOX_KEY

STATS_KEY = f"{PREFIX}:stats:jobs"
DURATION_KEY = f"{PREFIX}:stats:job_duration"
# Upper bounds (seconds) of the job-duration histogram kept in Redis for /metrics.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        return self.value in FINISHED


class JobNotFound(RecordNotFound):
    kind = "job"


# Jobs and batches draw their ids from one space; this name stays for the job code's callers.
new_job_id = new_record_id


def job_key(job_id: str) -> str:
    return record_key("job", job_id)


@dataclass
class Job(Record):
    STATUS: ClassVar = JobStatus
    JSON_FIELDS: ClassVar = ("options", "timings", "result", "error", "callbacks")
    INT_FIELDS: ClassVar = ("attempts", "lost")

    id: str
    status: JobStatus
    options: dict[str, Any]
    input_key: str
    owner: str = ""
    created_at: str = field(default_factory=now_iso)
    started_at: str | None = None
    finished_at: str | None = None
    attempts: int = 0
    lost: int = 0
    worker: str | None = None
    device: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    callback_url: str | None = None
    callback_state: str | None = None
    callbacks: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The public job document (docs/design.md "HTTP API"); keys and owner stay private."""
        return {
            **self.document_head(),
            "attempts": self.attempts,
            "worker": self.worker,
            "device": self.device,
            "timings": self.timings,
            "result": self.result,
            "error": self.error,
            **self.callback_document(),
        }


# KEYS[1] job, KEYS[2] stats hash, KEYS[3] webhook outbox, KEYS[4] the caller's lease. ARGV:
# allowed statuses (comma list), new status, ttl, the caller's lease generation ('' unfenced),
# then field/value pairs. Returns "ok", "stale" (the caller's work was handed over), or the
# current status when the move is not allowed. A job that ends and has a callback enters the
# outbox in the same step.
_TRANSITION = (
    ENQUEUE_LUA
    + FENCE_LUA
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 'missing' end
if stale(KEYS[4], ARGV[4]) then return 'stale' end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do if s == cur then allowed = true end end
if not allowed then return cur end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if cur ~= ARGV[2] then redis.call('HINCRBY', KEYS[2], ARGV[2], 1) end
-- Only an ended job expires (JOB_TTL after it ended); one still to run never does.
if ARGV[2] == 'succeeded' or ARGV[2] == 'failed' or ARGV[2] == 'canceled' then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  enqueue_callback(KEYS[1], KEYS[3])
else
  redis.call('PERSIST', KEYS[1])
end
return 'ok'
"""
)

# Start (or restart after a lost worker) a job. KEYS[1] job, KEYS[2] stats, KEYS[3] outbox,
# KEYS[4] lease.
# ARGV: worker, device, started_at, max_attempts, ttl, the worker_lost error code, the lease
# generation. Returns {outcome, attempts}: outcome "ok", "exhausted" (marked failed:
# worker_lost), "missing", "stale", or the finished/canceled status that makes the delivery a
# no-op. The task took its lease first (worker/leasing.py): a running job met here was left by
# a holder that is gone, so it counts as lost.
_START = (
    ENQUEUE_LUA
    + FENCE_LUA
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {'missing', 0} end
if stale(KEYS[4], ARGV[7]) then return {'stale', 0} end
if cur ~= 'queued' and cur ~= 'running' then return {cur, 0} end
if cur == 'running' then
  local lost = redis.call('HINCRBY', KEYS[1], 'lost', 1)
  if lost >= tonumber(ARGV[4]) then
    redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[3], 'error',
      cjson.encode({code = ARGV[6], message = 'the worker died while running this job ' ..
      lost .. ' times (attempts limit ' .. ARGV[4] .. '); not retrying'}))
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
    redis.call('HINCRBY', KEYS[2], 'failed', 1)
    enqueue_callback(KEYS[1], KEYS[3])
    return {'exhausted', tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')}
  end
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'device', ARGV[2],
  'started_at', ARGV[3])
-- A retry's reason ('retrying') was for the wait in the queue; this run starts clean.
redis.call('HDEL', KEYS[1], 'error')
if cur == 'queued' then redis.call('HINCRBY', KEYS[2], 'running', 1) end
redis.call('PERSIST', KEYS[1])
return {'ok', attempts}
"""
)


@dataclass(frozen=True)
class StartOutcome:
    started: bool
    status: str
    attempts: int


class JobStore(RecordStore[Job]):
    """Jobs: every status change one compare-and-set (``_TRANSITION``, ``_START``), and
    monotonic per-status counters and a duration histogram for /metrics."""

    OPEN_INDEXED = True
    RECORD = Job
    NOT_FOUND = JobNotFound
    SCRIPTS: ClassVar = {"_transition": _TRANSITION, "_start": _START}

    def on_create(self, pipe: Pipeline, record: Job) -> None:
        pipe.hincrby(STATS_KEY, record.status.value, 1)

    def start(
        self,
        job_id: str,
        *,
        worker: str,
        device: str,
        max_attempts: int,
        fence: Fence = UNFENCED,
    ) -> StartOutcome:
        """Raises :class:`LeaseLost` when ``fence`` no longer holds its lease."""
        outcome, attempts = self._start(
            keys=[job_key(job_id), STATS_KEY, OUTBOX_KEY, fence.key],
            args=[worker, device, now_iso(), max_attempts, self.ttl_s, WORKER_LOST, fence.gen],
        )
        status = text(outcome)
        if status == "stale":
            raise LeaseLost(job_id)
        return StartOutcome(started=status == "ok", status=status, attempts=int(attempts))

    def succeed(
        self,
        job_id: str,
        *,
        result: dict,
        timings: dict[str, float],
        fence: Fence = UNFENCED,
    ) -> bool:
        """False when the job is no longer running (canceled meanwhile). Like every move with a
        ``fence``, raises :class:`LeaseLost` when the caller's work was handed over."""
        ok = self._move(
            job_id,
            (JobStatus.RUNNING,),
            JobStatus.SUCCEEDED,
            fence,
            finished_at=now_iso(),
            result=json.dumps(result),
            timings=json.dumps(timings),
        )
        if ok:
            self._observe_duration(job_id)
        return ok

    def fail(
        self,
        job_id: str,
        *,
        code: str,
        message: str,
        timings: dict[str, float] | None = None,
        fence: Fence = UNFENCED,
    ) -> bool:
        fields: dict[str, str] = {
            "finished_at": now_iso(),
            "error": json.dumps({"code": code, "message": message}),
        }
        if timings is not None:
            fields["timings"] = json.dumps(timings)
        allowed = (JobStatus.QUEUED, JobStatus.RUNNING)
        return self._move(job_id, allowed, JobStatus.FAILED, fence, **fields)

    def requeue(self, job_id: str, *, reason: str, fence: Fence = UNFENCED) -> bool:
        """Running → queued before a retry with backoff; the reason stays visible."""
        return self._move(
            job_id,
            (JobStatus.RUNNING,),
            JobStatus.QUEUED,
            fence,
            error=json.dumps({"code": RETRYING, "message": reason}),
        )

    def cancel(self, job_id: str, *, owner: str | None = None) -> Job:
        self.get(job_id, owner=owner)  # 404 before 409: others' jobs must look unknown
        moved = self._move(
            job_id,
            (JobStatus.QUEUED, JobStatus.RUNNING),
            JobStatus.CANCELED,
            UNFENCED,
            finished_at=now_iso(),
        )
        if not moved:
            current = self.get(job_id)
            raise Conflict(f"job {job_id} is already {current.status.value}; nothing to cancel")
        return self.get(job_id)

    def counts(self) -> dict[str, int]:
        """How many jobs ever entered each status (monotonic counters for /metrics)."""
        raw = self.redis.hgetall(STATS_KEY)
        return {k.decode(): int(v) for k, v in raw.items()}

    def duration_histogram(self) -> tuple[dict[str, int], float, int]:
        raw = {k.decode(): v for k, v in self.redis.hgetall(DURATION_KEY).items()}
        buckets = {b: int(raw.get(b, 0)) for b in [*map(str, DURATION_BUCKETS), "+Inf"]}
        return buckets, float(raw.get("sum", 0)), int(raw.get("count", 0))

    def _move(
        self,
        job_id: str,
        allowed: tuple[JobStatus, ...],
        new: JobStatus,
        fence: Fence,
        **fields,
    ) -> bool:
        args: list[Any] = [",".join(s.value for s in allowed), new.value, self.ttl_s, fence.gen]
        for name, value in fields.items():
            args += [name, value]
        keys = [job_key(job_id), STATS_KEY, OUTBOX_KEY, fence.key]
        outcome = self._transition(keys=keys, args=args)
        outcome = text(outcome)
        if outcome == "missing":
            raise JobNotFound(job_id)
        if outcome == "stale":
            raise LeaseLost(job_id)
        return outcome == "ok"

    def _observe_duration(self, job_id: str) -> None:
        job = self.get(job_id)
        if not job.finished_at:
            return
        seconds = (parse_iso(job.finished_at) - parse_iso(job.created_at)).total_seconds()
        with self.redis.pipeline(transaction=True) as pipe:
            for bound in DURATION_BUCKETS:
                if seconds <= bound:
                    pipe.hincrby(DURATION_KEY, str(bound), 1)
            pipe.hincrby(DURATION_KEY, "+Inf", 1)
            pipe.hincrbyfloat(DURATION_KEY, "sum", seconds)
            pipe.hincrby(DURATION_KEY, "count", 1)
            pipe.execute()


def elapsed_ms(start_iso: str, end_iso: str) -> float:
    return round((parse_iso(end_iso) - parse_iso(start_iso)).total_seconds() * 1000, 1)
