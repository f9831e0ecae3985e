"""Every task runs holding its lease (shared/leases.py): taken when the task starts, given
back when it ends, handed over by keeper/recovery.py when its holder's heartbeat expires.

The lease's fence goes to the final status changes of jobs and batch items, so that a holder
that was presumed dead (a Redis blip longer than the heartbeat TTL, a paused process) records
nothing once its work was handed over. A delivery that finds its lease held by a live process
of another node (a copy of a message that is still being run) is deferred: requeued after a
pause, until the holder has finished (then the delivery is a no-op: the work is done) or its
heartbeat has expired (then the delivery takes the work over).

:class:`LeasedTask` is the base of every task (Celery's ``base=``): it holds the lease around
the task's work and ends it through :func:`worker.guard.guarded`, so a task body is its work
and its give-up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from celery import Task
from celery.exceptions import Reject
from redis.exceptions import RedisError

from shared.delayed import Delayed, hold_back
from shared.leases import Fence
from shared.queue import BATCH_QUEUE, JOBS_QUEUE, QUEUES, RENDER_JOB, SENT_AT_HEADER
from worker import runtime
from worker.guard import guarded
from worker.runtime import WorkerContext

log = logging.getLogger(__name__)

# A deferred delivery waits this long before going back to its queue, so that a worker with
# nothing else to do does not spin on it.
DEFER_S = 1.0


@contextmanager
def lease_held(task: Any, ctx: WorkerContext) -> Iterator[Fence]:
    """Hold the lease of the bound Celery ``task``'s delivery while the body runs."""
    task_id = task.request.id
    try:
        acquired = ctx.leases.acquire(task_id, holder=ctx.holder, node=ctx.hostname, task=task.name)
    except RedisError as exc:  # as in worker/guard.py: the message must come back
        raise Reject(exc, requeue=True) from exc
    if acquired.fence is None:
        log.info("task %s is still run by %s; this delivery waits", task_id, acquired.busy_with)
        time.sleep(DEFER_S)
        raise Reject(f"task {task_id} is still run by {acquired.busy_with}", requeue=True)
    try:
        yield acquired.fence
    finally:
        ctx.release_lease(acquired.fence)


@dataclass(frozen=True)
class Held:
    """What a task's work and give-up get: this process's state and the fence of the lease
    the delivery holds (for the final status changes it records)."""

    ctx: WorkerContext
    fence: Fence


class LeasedTask(Task):
    """The base of every featuremaps task: ``self.run_leased(...)`` in a task body."""

    def run_leased(
        self,
        what: str,
        work: Callable[[Held], object],
        give_up: Callable[[Held, str, str], object],
        *,
        retrying: Callable[[Held, str], object] | None = None,
        subject: str | None = None,
    ) -> object:
        """Hold this delivery's lease while ``work(held)`` runs, ended through
        :func:`worker.guard.guarded` (``what``, ``subject`` and ``retrying`` as there);
        ``give_up(held, code, message)`` ends the work's record ``failed``."""
        ctx = runtime.context()
        with lease_held(self, ctx) as fence:
            held = Held(ctx, fence)
            return guarded(
                self,
                ctx.settings,
                lambda: work(held),
                what=what,
                subject=subject,
                give_up=lambda code, message: give_up(held, code, message),
                hold_back=lambda delay_s: hold_back(
                    ctx.redis, self.as_storage_retry(), time.time() + delay_s
                ),
                retrying=None if retrying is None else lambda reason: retrying(held, reason),
            )

    def as_storage_retry(self) -> Delayed:
        """This delivery as its storage retry: the same task id, arguments, queue and
        priority, one retry more, and when its work was first sent."""
        request = self.request
        info = request.delivery_info or {}
        queue = info.get("routing_key")
        if queue not in QUEUES:
            queue = JOBS_QUEUE if self.name == RENDER_JOB else BATCH_QUEUE
        # Celery puts a message's own headers on the request (protocol 2), or in ``headers``.
        sent_at = getattr(request, SENT_AT_HEADER, None) or (request.headers or {}).get(
            SENT_AT_HEADER
        )
        return Delayed(
            task=self.name,
            task_id=request.id,
            args=list(request.args or []),
            queue=queue,
            priority=info.get("priority"),
            retries=(request.retries or 0) + 1,
            sent_at=sent_at,
        )
