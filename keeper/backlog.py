"""The backlog: what waits for a worker, read from Redis for the API's gauges
(``featuremaps_queue_depth``, api/metrics.py) and for the autoscaler (``GET /backlog``, which
KEDA's ``metrics-api`` trigger reads; deploy/k8s/base/worker-scaling.yaml).

A waiting message is not all of it: the batch chunks waiting in the fair scheduler
(shared/schedule.py) beyond the turns queued for them, and the messages delivered but not
acknowledged — running tasks, and the message of a worker that died (handed back by the
keeper, or by kombu's restore in a worker after the visibility timeout) — each need a worker
too. Leases are held by running tasks, whose messages are unacknowledged already: *in flight*
is the larger of the two counts, not their sum. Due webhook calls are reported apart and start
no worker: the keeper in the API delivers them. So are storage retries waiting out their
backoff (shared/delayed.py): the keeper queues each when it is due, and it counts from then.
"""

from __future__ import annotations

import time

from redis import Redis

from shared import delayed
from shared.heartbeat import heartbeat_key
from shared.leases import LEASE_INDEX, lease_key
from shared.queue import QUEUES, UNACKED_KEY, broker_options, queue_keys
from shared.records import text
from shared.schedule import Scheduler
from shared.settings import Settings
from shared.webhooks import OUTBOX_KEY


def backlog(redis: Redis, settings: Settings) -> dict[str, int]:
    """``waiting_<queue>`` (messages in its lists, every priority), ``scheduled_chunks`` /
    ``scheduled_items`` (in the scheduler with no turn queued for them / all its items),
    ``unacked``, ``leases`` (held by a process with a heartbeat), ``in_flight``
    (max of those two), ``webhooks_due``, ``retries_waiting`` (storage retries waiting out
    their backoff: the keeper queues them when due, then they count), and ``for_workers``:
    the work a worker is wanted for (waiting + scheduled chunks + in flight), what KEDA
    scales on."""
    options = broker_options(settings)
    out = {
        f"waiting_{queue}": sum(redis.llen(key) for key in queue_keys(queue, options))
        for queue in QUEUES
    }
    scheduled = Scheduler(redis, settings).backlog()
    unclaimed_turns = scheduled["turns"] - scheduled["claimed"]
    out["scheduled_chunks"] = max(0, scheduled["chunks"] - unclaimed_turns)
    out["scheduled_items"] = scheduled["items"]
    out["unacked"] = redis.hlen(UNACKED_KEY)
    out["leases"] = _held_leases(redis)
    out["in_flight"] = max(out["unacked"], out["leases"])
    out["webhooks_due"] = redis.zcount(OUTBOX_KEY, "-inf", time.time())
    out["retries_waiting"] = delayed.count(redis)
    waiting = sum(out[f"waiting_{queue}"] for queue in QUEUES)
    out["for_workers"] = waiting + out["scheduled_chunks"] + out["in_flight"]
    return out


def _held_leases(redis: Redis) -> int:
    """Leases whose holder still has a heartbeat."""
    task_ids = [text(t) for t in redis.zrange(LEASE_INDEX, 0, -1)]
    with redis.pipeline(transaction=False) as pipe:
        for task_id in task_ids:
            pipe.hget(lease_key(task_id), "holder")
        holders = [text(h) for h in pipe.execute() if h]
    with redis.pipeline(transaction=False) as pipe:
        for holder in holders:
            pipe.exists(heartbeat_key(holder))
        return sum(pipe.execute())
