"""Idempotency keys on ``POST /jobs`` and ``POST /batches`` (docs/design.md "Idempotency
keys"): a request sent again with the same ``Idempotency-Key`` gets the first one's answer
instead of creating a second record.

What is compared is what a request *means*, not its bytes (a multipart retry has a new
boundary): the route, a digest of the uploaded file or the source URL, the parsed options,
the callback URL. The key lives in Redis at ``featuremaps:idempotency:<owner>:<key>`` (owner
``anonymous`` without tokens), first as a short-lived *pending* claim taken with ``SET NX``
(so concurrent requests race on one key and one wins), then as the remembered answer for
``JOB_TTL_HOURS``. A request that finds a pending claim waits up to ``WAIT_S`` for the
winner's answer, then gives up with 409 ``idempotency_in_progress`` and Retry-After. The
claim is renewed every third of its TTL while its creation runs (a 20 MB upload to a slow S3
can outlast any fixed TTL, and a retry that found the key free would create a second
record); one left by an API process that died is free again after ``PENDING_TTL_S``.

Only a 202 is remembered: the body is validated before the key is claimed, so a 4xx never
uses a key up, and a failure while creating (503) releases it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from flask import Request
from redis import Redis
from redis.exceptions import RedisError

from shared.errors import IdempotencyInProgress, IdempotencyMismatch, InvalidIdempotencyKey
from shared.records import PREFIX

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
# A pending claim's TTL, renewed while its creation runs: a claim left by an API process
# that died is free again after this.
PENDING_TTL_S = 60
# How long a request that lost the race waits for the winner's answer.
WAIT_S = 10.0
POLL_S = 0.05

# Replace the value only while it is still this request's claim. KEYS[1] key.
# ARGV: claim token, new value ('' deletes), ttl.
_SETTLE = """
local raw = redis.call('GET', KEYS[1])
if not raw or cjson.decode(raw).claim ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3])) end
return 1
"""

# Extend the claim while it is still this request's. KEYS[1] key. ARGV: claim token, ttl.
_RENEW = """
local raw = redis.call('GET', KEYS[1])
if not raw or cjson.decode(raw).claim ~= ARGV[1] then return 0 end
return redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
"""


@dataclass(frozen=True)
class Answer:
    """A creation's answer, as first sent and as replayed."""

    body: dict
    status: int
    location: str

    def response(self, *, replayed: bool = False) -> tuple[dict, int, dict[str, str]]:
        headers = {"Location": self.location}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return self.body, self.status, headers


def idempotency_key(request: Request) -> str | None:
    """The request's key, or None without the header; 400 for one that cannot be a key.
    The key is opaque: the IETF draft's quoted form (``"abc"``) keeps its quotes."""
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    key = raw.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not all(" " <= c <= "~" for c in key):
        raise InvalidIdempotencyKey(
            f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters "
            "(a UUID is a good choice)"
        )
    return key


def fingerprint(route: str, **meaning: object) -> str:
    """A digest of what a request asks for (file digests, source, options, callback)."""
    canonical = json.dumps({"route": route, **meaning}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def file_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Idempotency:
    """The keys of one Redis; answers are remembered for ``ttl_s``."""

    def __init__(self, redis: Redis, *, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._settle = redis.register_script(_SETTLE)
        self._renew = redis.register_script(_RENEW)

    def once(
        self,
        owner: str,
        key: str | None,
        meaning: str,
        create: Callable[[], Answer],
        discard: Callable[[], object] | None = None,
    ) -> tuple[dict, int, dict[str, str]]:
        """``create()``'s answer, or the answer of the first request with ``key``; when this
        request creates nothing, ``discard()`` undoes what it did before (a stored archive)."""
        if key is None:
            return create().response()
        redis_key = f"{PREFIX}:idempotency:{owner or 'anonymous'}:{key}"
        claim = secrets.token_hex(8)
        holds = False
        try:
            earlier = self._claim_or_wait(redis_key, claim, meaning)
            holds = earlier is None
        finally:
            if not holds and discard:
                discard()
        if earlier is not None:
            return earlier.response(replayed=True)
        return self._create(redis_key, claim, meaning, create).response()

    def _claim_or_wait(self, redis_key: str, claim: str, meaning: str) -> Answer | None:
        """None once this request holds the key; the earlier answer when there is one."""
        pending = json.dumps({"claim": claim, "meaning": meaning})
        deadline = time.monotonic() + WAIT_S
        while not self.redis.set(redis_key, pending, nx=True, ex=PENDING_TTL_S):
            raw = self.redis.get(redis_key)
            if raw is None:  # released or expired in between: race for it again
                continue
            entry = json.loads(raw)
            if entry["meaning"] != meaning:
                raise IdempotencyMismatch(
                    f"{HEADER} {redis_key.rsplit(':', 1)[-1]!r} was already used for a different "
                    "request (another file, source, route or options); use a new key for a new "
                    "request"
                )
            if "answer" in entry:
                return Answer(**entry["answer"])
            if time.monotonic() > deadline:
                raise IdempotencyInProgress(
                    f"a request with this {HEADER} is still being processed; retry shortly",
                    retry_after=1,
                )
            time.sleep(POLL_S)
        return None

    def _create(
        self, redis_key: str, claim: str, meaning: str, create: Callable[[], Answer]
    ) -> Answer:
        stop = threading.Event()
        renewer = threading.Thread(
            target=self._keep_claim, args=(redis_key, claim, stop), daemon=True
        )
        renewer.start()
        try:
            answer = create()
        except Exception:
            self._settle(keys=[redis_key], args=[claim, "", 0])  # a failed creation frees the key
            raise
        finally:
            stop.set()
            renewer.join()
        done = {"claim": claim, "meaning": meaning, "answer": asdict(answer)}
        self._settle(keys=[redis_key], args=[claim, json.dumps(done), self.ttl_s])
        return answer

    def _keep_claim(self, redis_key: str, claim: str, stop: threading.Event) -> None:
        """Renew the pending claim every third of its TTL until ``stop``."""
        ttl = PENDING_TTL_S
        while not stop.wait(ttl / 3):
            try:
                if not self._renew(keys=[redis_key], args=[claim, ttl]):
                    return  # no longer ours (expired while Redis was away): nothing to keep
            except RedisError:
                continue  # Redis away: try again at the next tick
