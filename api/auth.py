"""Bearer tokens and per-caller rate limiting.

With ``FEATUREMAPS_API_TOKENS`` set, every job call needs one of the tokens; jobs are owned
by a digest of the token that created them, so a caller sees only its own. Without tokens
everything is owned by the anonymous owner "". The rate limit is a fixed one-minute window
per caller, counted in Redis so every API process shares it.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from flask import Request
from redis import Redis

from shared.errors import RateLimited, Unauthorized
from shared.settings import Settings


def caller(request: Request, settings: Settings, redis: Redis) -> str:
    """The owner a /jobs or /batches request acts as, once its token and rate are checked."""
    owner = owner_for(request, settings)
    enforce_rate_limit(redis, settings, owner)
    return owner


def owner_for(request: Request, settings: Settings) -> str:
    tokens = settings.tokens
    if not tokens:
        return ""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("this API needs a token: send 'Authorization: Bearer <token>'")
    token = token.strip()
    if not any(hmac.compare_digest(token, known) for known in tokens):
        raise Unauthorized("the bearer token is not valid")
    return hashlib.sha256(token.encode()).hexdigest()[:24]


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
