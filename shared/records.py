"""What every kind of record in Redis shares: one hash per record, its codec, and the store
operations that do not depend on the kind (create with its TTL, get with the owner check,
delete). :mod:`shared.jobs` and :mod:`shared.batches` specialise it with their fields,
statuses and Lua transitions.

A record is a dataclass whose fields are stored as strings in the hash
``featuremaps:<kind>:<id>``: ``None`` is left out, the fields named in ``JSON_FIELDS`` are
JSON, those in ``INT_FIELDS`` integers, ``status`` the kind's status enum. An id that is not
there, or belongs to another owner, is the kind's :class:`RecordNotFound` (a 404).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, Generic, Self, TypeVar

from redis import Redis
from redis.client import Pipeline

from shared.errors import NotFound

PREFIX = "featuremaps"
# The statuses a job, a batch and a batch's item end in (each kind's enum spells these three).
FINISHED = ("succeeded", "failed", "canceled")
# The keys of the job and batch records the reconciler checks (keeper/reconciler.py): each is
# added in the transaction that creates its record, and removed by the reconciler once it
# finds the record gone, or ended with nothing left to send.
OPEN_KEY = f"{PREFIX}:open"


def new_record_id() -> str:
    """A server-generated id for a job or a batch."""
    return secrets.token_hex(12)


def record_key(kind: str, record_id: str) -> str:
    return f"{PREFIX}:{kind}:{record_id}"


def valid_id(record_id: str) -> bool:
    """Whether an id from a URL can name a job or batch record (anything else is a 404)."""
    return 0 < len(record_id) <= 64 and all(c.isalnum() or c in "-_" for c in record_id)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def text(value: bytes | str) -> str:
    """A Redis reply (bytes) or a script's constant as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


class RecordNotFound(NotFound):
    kind: ClassVar[str] = "record"

    def __init__(self, record_id: str) -> None:
        super().__init__(f"no {self.kind} with id {record_id!r} (unknown, expired, or not yours)")


class Record:
    """Base of the record dataclasses: their Redis hash codec. Subclasses are dataclasses
    with at least ``id``, ``status`` and ``owner`` fields."""

    STATUS: ClassVar[type[StrEnum]]
    JSON_FIELDS: ClassVar[tuple[str, ...]] = ()
    INT_FIELDS: ClassVar[tuple[str, ...]] = ()

    id: str
    status: StrEnum
    owner: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    options: dict[str, Any]
    # Webhooks (shared/webhooks.py): where to call back, how it went, every attempt.
    callback_url: str | None
    callback_state: str | None
    callbacks: list[dict[str, Any]] | None

    def document_head(self) -> dict[str, Any]:
        """The first keys of the public document, the same for every kind."""
        return {
            "id": self.id,
            "status": self.status.value,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "options": self.options,
        }

    def callback_document(self) -> dict[str, Any]:
        """The webhook part of the public document, the same for every kind."""
        return {
            "callback_url": self.callback_url,
            "callback_state": self.callback_state,
            "callbacks": self.callbacks or [],
        }

    def to_redis(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in self.__dict__.items():
            if value is None:
                continue
            out[name] = json.dumps(value) if name in self.JSON_FIELDS else str(value)
        return out

    @classmethod
    def from_redis(cls, raw: dict[bytes, bytes]) -> Self:
        data = {k.decode(): v.decode() for k, v in raw.items()}
        kwargs: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                continue
            value: Any = data[f.name]
            if f.name in cls.JSON_FIELDS:
                value = json.loads(value)
            elif f.name in cls.INT_FIELDS:
                value = int(value)
            elif f.name == "status":
                value = cls.STATUS(value)
            kwargs[f.name] = value
        return cls(**kwargs)


R = TypeVar("R", bound=Record)


class RecordStore(Generic[R]):
    """Records of one kind in one Redis; the client and the TTL are given, never global.

    A subclass names its record class, its not-found error (whose ``kind`` is the key's
    middle part) and its Lua scripts, each registered as the attribute it is listed under.
    """

    RECORD: ClassVar[type[Record]]
    NOT_FOUND: ClassVar[type[RecordNotFound]]
    SCRIPTS: ClassVar[dict[str, str]] = {}
    # Listed in OPEN_KEY from its creation (jobs and batches).
    OPEN_INDEXED: ClassVar[bool] = False

    def __init__(self, redis: Redis, *, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        for name, source in self.SCRIPTS.items():
            setattr(self, name, redis.register_script(source))

    def key(self, record_id: str) -> str:
        return record_key(self.NOT_FOUND.kind, record_id)

    def record_keys(self, record_id: str) -> list[str]:
        """Every Redis key the record lives in (deleted together)."""
        return [self.key(record_id)]

    def create(self, record: R) -> R:
        """The hash in one transaction with the kind's extra ops; a record created final gets
        its TTL now, others none: a record expires only ``ttl_s`` after it ends, never while
        it waits (a batch queued for days behind others must not vanish)."""
        key = self.key(record.id)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=record.to_redis())
            if record.status.value in FINISHED:
                pipe.expire(key, self.ttl_s)
            if self.OPEN_INDEXED:
                pipe.sadd(OPEN_KEY, key)
            self.on_create(pipe, record)
            pipe.execute()
        return record

    def on_create(self, pipe: Pipeline, record: R) -> None:
        """Further commands for the creating transaction (e.g. a stats counter)."""

    def get(self, record_id: str, *, owner: str | None = None) -> R:
        raw = self.redis.hgetall(self.key(record_id)) if valid_id(record_id) else {}
        if not raw:
            raise self.NOT_FOUND(record_id)
        record = self.RECORD.from_redis(raw)
        if owner is not None and record.owner != owner:
            raise self.NOT_FOUND(record_id)
        return record  # type: ignore[return-value]

    def delete(self, record_id: str) -> None:
        self.redis.delete(*self.record_keys(record_id))
