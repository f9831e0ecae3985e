"""What the API's views need, built once per app from the settings and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from flask import Request, current_app
from redis import Redis

from api.auth import caller
from keeper.reconciler import celery_sender
from keeper.restore import restore
from shared.batches import BatchStore
from shared.jobs import JobStore
from shared.models import ModelStore
from shared.queue import make_producer
from shared.records import Record, RecordNotFound, valid_id
from shared.settings import Settings
from shared.storage import ObjectStore


@dataclass
class Services:
    settings: Settings
    redis: Redis
    jobs: JobStore
    batches: BatchStore
    store: ObjectStore
    producer: Celery
    models: ModelStore | None = None

    def __post_init__(self) -> None:
        if self.models is None:
            self.models = ModelStore(self.redis)

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        redis = Redis.from_url(
            settings.redis_url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30
        )
        return cls(
            settings=settings,
            redis=redis,
            jobs=JobStore(redis, ttl_s=settings.job_ttl_s),
            batches=BatchStore(redis, ttl_s=settings.job_ttl_s),
            store=ObjectStore.from_settings(settings),
            producer=make_producer(settings),
        )

    def caller(self, request: Request) -> str:
        """The owner a /jobs or /batches request acts as, once its token and rate are checked."""
        return caller(request, self.settings, self.redis)

    def polled(self, kind: str, record_id: str, owner: str) -> Record:
        """The caller's ``kind`` record (``job``, ``batch``) for a poll. One accepted and then
        lost with the last writes of Redis's append-only file is restored from its spec
        first (keeper/restore.py); otherwise not found raises as it does for ``get``."""
        records = self.jobs if kind == "job" else self.batches
        try:
            return records.get(record_id, owner=owner)
        except RecordNotFound:
            send = celery_sender(self.producer)
            restored = None
            if valid_id(record_id):
                restored = restore(
                    self.redis, self.store, self.settings, send, kind, record_id, owner=owner
                )
            if restored is None:
                raise
            return restored


def services() -> Services:
    """The current app's services; only views call this, library code gets them passed."""
    return current_app.extensions["featuremaps"]
