"""Every task runs holding its lease (shared/leases.py): taken when the task starts, given
back when it ends, handed over by worker/recovery.py when its holder's heartbeat expires.

The lease's fence goes to the final status changes of jobs and batch items, so that a holder
that was presumed dead (a Redis blip longer than the heartbeat TTL, a paused process) records
nothing once its work was handed over. A delivery that finds its lease held by a live process
of another node (a copy of a message that is still being run) is deferred: requeued after a
pause, until the holder has finished (then the delivery is a no-op: the work is done) or its
heartbeat has expired (then the delivery takes the work over).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.exceptions import Reject
from redis.exceptions import RedisError

from shared.leases import Fence
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
