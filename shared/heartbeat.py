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


def write_heartbeat(redis: Redis, info: dict[str, Any], *, ttl_s: int = HEARTBEAT_TTL_S) -> None:
    key = f"{HEARTBEAT_PREFIX}{info['hostname']}:{info['pid']}"
    redis.set(key, json.dumps(info), ex=ttl_s)


def live_workers(redis: Redis) -> list[dict[str, Any]]:
    keys = list(redis.scan_iter(match=f"{HEARTBEAT_PREFIX}*", count=100))
    values = redis.mget(keys) if keys else []
    return [json.loads(v) for v in values if v]
