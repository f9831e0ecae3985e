"""Worker heartbeats in Redis: each worker process refreshes a short-lived key describing
itself (hostname, pid, device, weights, how many times it loaded the model). Readiness
checks and tests read them; a worker that stops refreshing disappears by itself."""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

from redis import Redis

HEARTBEAT_PREFIX = "featuremaps:worker:"
HEARTBEAT_TTL_S = 15
HEARTBEAT_EVERY_S = 5


_nonce: tuple[int, str] = (0, "")


def process_nonce() -> str:
    """A random name for this process's life, made on first use in each process (a forked
    child makes its own): a container restarted in place runs its worker under the same
    hostname and often the same pid, and without it the new process's heartbeat would make
    the dead one's leases look held for their whole TTL."""
    global _nonce
    if _nonce[0] != os.getpid():
        _nonce = (os.getpid(), secrets.token_hex(4))
    return _nonce[1]


def holder_id(hostname: str, pid: int, nonce: str = "") -> str:
    """How a worker process is named in its heartbeat key and in the leases it holds:
    ``hostname:pid``, with ``.nonce`` (:func:`process_nonce`) for a worker process."""
    return f"{hostname}:{pid}.{nonce}" if nonce else f"{hostname}:{pid}"


def heartbeat_key(holder: str) -> str:
    return f"{HEARTBEAT_PREFIX}{holder}"


def write_heartbeat(redis: Redis, info: dict[str, Any], *, ttl_s: int = HEARTBEAT_TTL_S) -> None:
    holder = holder_id(info["hostname"], info["pid"], info.get("nonce", ""))
    redis.set(heartbeat_key(holder), json.dumps(info), ex=ttl_s)


def live_workers(redis: Redis) -> list[dict[str, Any]]:
    keys = list(redis.scan_iter(match=f"{HEARTBEAT_PREFIX}*", count=100))
    values = redis.mget(keys) if keys else []
    return [json.loads(v) for v in values if v]
