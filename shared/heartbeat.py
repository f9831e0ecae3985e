"""Worker heartbeats in Redis: each worker process refreshes a short-lived key describing
itself (hostname, pid, device, weights, how many times it loaded the model). Readiness
checks and tests read them; a worker that stops refreshing disappears by itself."""

from __future__ import annotations

import json
from typing import Any

from redis import Redis

HEARTBEAT_PREFIX = "featuremaps:worker:"
HEARTBEAT_TTL_S = 15
HEARTBEAT_EVERY_S = 5


def holder_id(hostname: str, pid: int) -> str:
    """How a worker process is named in its heartbeat key and in the leases it holds."""
    return f"{hostname}:{pid}"


def heartbeat_key(holder: str) -> str:
    return f"{HEARTBEAT_PREFIX}{holder}"


def write_heartbeat(redis: Redis, info: dict[str, Any], *, ttl_s: int = HEARTBEAT_TTL_S) -> None:
    redis.set(heartbeat_key(holder_id(info["hostname"], info["pid"])), json.dumps(info), ex=ttl_s)


def live_workers(redis: Redis) -> list[dict[str, Any]]:
    keys = list(redis.scan_iter(match=f"{HEARTBEAT_PREFIX}*", count=100))
    values = redis.mget(keys) if keys else []
    return [json.loads(v) for v in values if v]
