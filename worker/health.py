"""The worker's liveness check: ``python -m worker.health`` exits 0 while a worker process
of this host (pod) has a fresh heartbeat in Redis, 1 when none has.

The heartbeat (worker/runtime.py) is written every few seconds by the pool process that holds
the model, and expires after ``HEARTBEAT_TTL_S``: its presence means a worker finished
loading its model and is still alive enough to run threads and reach Redis, which "the
process exists" does not. While Redis itself cannot be reached the check passes: restarting
workers would not bring Redis back, and Redis has probes of its own.
"""

from __future__ import annotations

import socket
import sys

from redis import Redis
from redis.exceptions import RedisError

from shared.heartbeat import live_workers
from shared.settings import Settings


def worker_alive(redis: Redis, host: str) -> bool:
    """Whether a worker named ``<name>@<host>`` (Celery's ``%h``) has a live heartbeat."""
    return any(w["hostname"].rpartition("@")[2] == host for w in live_workers(redis))


def main() -> int:
    settings = Settings()
    host = socket.gethostname()
    redis = Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=5)
    try:
        alive = worker_alive(redis, host)
    except RedisError as exc:
        print(f"worker.health: Redis unreachable ({exc}); not judging this worker")
        return 0
    if not alive:
        print(f"worker.health: no worker on {host} has a fresh heartbeat", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
