"""Bearer tokens and per-caller rate limiting.

With tokens configured (``FEATUREMAPS_API_TOKENS`` or ``_FILE``, see ``shared/access.py``),
every job call needs one of them; jobs and batches are owned by the *name* of the token that
created them, so a caller sees only its own and no record holds a token or its hash. Without
tokens everything is owned by the anonymous owner "". The rate limit is a fixed one-minute
window per caller, counted in Redis so every API process shares it.
"""

from __future__ import annotations

import time

from flask import Request
from redis import Redis

from shared.access import token_name
from shared.errors import RateLimited, Unauthorized
from shared.settings import Settings


def caller(request: Request, settings: Settings, redis: Redis) -> str:
    """The owner a /jobs or /batches request acts as, once its token and rate are checked."""
    owner = owner_for(request, settings)
    enforce_rate_limit(redis, settings, owner)
    return owner


def owner_for(request: Request, settings: Settings) -> str:
    table = settings.token_table
    if not table:
        return ""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("this API needs a token: send 'Authorization: Bearer <token>'")
    name = token_name(table, token.strip())
    if name is None:
        raise Unauthorized("the bearer token is not valid")
    return name


def enforce_rate_limit(redis: Redis, settings: Settings, caller: str) -> None:
    limit = settings.rate_limit_per_minute
    if not limit:
        return
    window = int(time.time() // 60)
    key = f"featuremaps:ratelimit:{caller or 'anonymous'}:{window}"
    with redis.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, 61)
        count, _ = pipe.execute()
    if count > limit:
        retry_after = max(1, 60 - int(time.time() % 60))
        raise RateLimited(
            f"rate limit of {limit} requests per minute reached; retry in {retry_after} s",
            retry_after=retry_after,
        )
