"""What the API and the workers agree on about the queue: task names, queue names, the
broker settings and the Redis keys the queues live in. The API sends tasks by name and never
imports worker code.

A queue is several Redis lists: kombu files a message sent with a priority under
``<queue><PRIORITY_SEP><step>`` for the highest step of ``PRIORITY_STEPS`` at or below it,
and priority 0 under the bare queue name. Both are set here on purpose (to kombu's own
defaults, so that messages already waiting keep their keys across an upgrade) because
whatever counts a queue from outside (the API's gauges, the KEDA scaler in deploy/k8s/) must
read the same lists: :func:`queue_keys` names them, e.g. ``jobs``, ``jobs\x06\x163``,
``jobs\x06\x166``, ``jobs\x06\x169``.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from bisect import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.signals import before_task_publish

from shared import delayed
from shared.settings import Settings

RENDER_JOB = "featuremaps.render_job"
JOBS_QUEUE = "jobs"
EXPAND_BATCH = "featuremaps.expand_batch"
EXPAND_BATCH_SHARD = "featuremaps.expand_batch_shard"
# A chunk message of an earlier release (batch id and item ids in its arguments); still run,
# so that chunks queued before an upgrade are not lost. Chunks are now sent as turns:
RUN_BATCH_CHUNK = "featuremaps.run_batch_chunk"
# A turn: no arguments; the worker asks the scheduler (shared/schedule.py) which chunk of
# which batch it runs when it starts.
RUN_BATCH_TURN = "featuremaps.run_batch_turn"
FINALIZE_BATCH = "featuremaps.finalize_batch"
FINALIZE_BATCH_SHARD = "featuremaps.finalize_batch_shard"
RENDER_EXAMPLES = "featuremaps.render_examples"
BATCH_QUEUE = "batch"
# Chunk turns go to the batch queue one priority step below expansion (kombu's Redis transport
# takes priority 0 first), so an expansion's continuation never waits behind the thousands
# of chunks its earlier slices dispatched.
CHUNK_PRIORITY = 3
# Workers consume both, interactive jobs first (see worker/celery_app.py).
WORKER_QUEUES = f"{JOBS_QUEUE},{BATCH_QUEUE}"
QUEUES = (JOBS_QUEUE, BATCH_QUEUE)
# kombu's defaults, spelled out: control characters cannot clash with any key of ours.
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
# Unix time at which a message was first sent (a Celery message carries none of its own);
# the API reports the age of the oldest waiting message from it.
SENT_AT_HEADER = "featuremaps_sent_at"
# kombu's Redis transport keeps every delivered, unacknowledged message in this hash
# (delivery tag -> JSON [message, exchange, routing key]) and its delivery time in this
# sorted set, and puts it back in its queue visibility_timeout after delivery.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


def broker_options(settings: Settings) -> dict:
    return {
        # A task running longer than this is handed to another worker, so every time
        # limit must stay below it (checked in worker/celery_app.py).
        "visibility_timeout": settings.visibility_timeout_s,
        # kombu sweeps for abandoned messages (a worker killed mid-task) every interval ×
        # throttle seconds, 10 × 10 by default; scan on every sweep so such a message comes
        # back about visibility_timeout after it was taken, not up to 100 s later.
        "unacked_restore_interval": min(10, max(1, settings.visibility_timeout_s // 3)),
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 3,
        "socket_timeout": 10,
        "retry_on_timeout": True,
        "sep": PRIORITY_SEP,
        "priority_steps": list(PRIORITY_STEPS),
    }


def queue_keys(queue: str, options: dict[str, Any]) -> list[str]:
    """The Redis lists that hold ``queue``'s waiting messages under these broker transport
    options: the bare name (priority 0) and one per further priority step."""
    sep = options["sep"]
    return [queue] + [f"{queue}{sep}{step}" for step in options["priority_steps"] if step]


def queue_key(queue: str, priority: int) -> str:
    """The list that holds ``queue``'s messages of ``priority`` (0-9), as kombu files them."""
    step = PRIORITY_STEPS[bisect(PRIORITY_STEPS, max(0, min(9, priority))) - 1]
    return f"{queue}{PRIORITY_SEP}{step}" if step else queue


@dataclass(frozen=True)
class Unacked:
    """A message delivered to a consumer and not yet acknowledged, as kombu stores it."""

    tag: str
    raw: str
    message: dict[str, Any]
    queue: str

    @property
    def queue_key(self) -> str:
        return queue_key(self.queue, int(self.message["properties"].get("priority") or 0))

    def requeued(self) -> str:
        """The message to queue again: marked redelivered, as kombu's own restore does, and
        with a new delivery tag, so that a late acknowledgement by its old consumer cannot
        remove the new delivery from the unacked hash."""
        message = json.loads(json.dumps(self.message))
        message["headers"]["redelivered"] = True
        message["properties"]["delivery_info"]["redelivered"] = True
        message["properties"]["delivery_tag"] = str(uuid.uuid4())
        return json.dumps(message)


def find_unacked(redis, task_id: str) -> Unacked | None:
    """The unacknowledged message of Celery task ``task_id``, if one is in the hash and
    belongs to one of our queues (its routing key is the queue's name)."""
    for tag, raw in redis.hscan_iter(UNACKED_KEY):
        message, _exchange, routing_key = json.loads(raw)
        if message.get("headers", {}).get("id") == task_id and routing_key in QUEUES:
            return Unacked(tag=tag.decode(), raw=raw.decode(), message=message, queue=routing_key)
    return None


@dataclass(frozen=True)
class Sent:
    """What a waiting or unacknowledged message is about: its task, task id and first
    argument (the job or batch id every task of ours takes first; '' for none)."""

    task: str
    task_id: str
    subject: str


def pending_messages(redis, options: dict[str, Any]) -> Iterator[Sent]:
    """Every message of our queues that something will still run: waiting in a list (any
    priority), delivered and not yet acknowledged, or a storage retry waiting out its backoff
    (shared/delayed.py). Read without locking: a message moving between them while this runs
    can be missed, so callers act only on what stays missing for a while
    (keeper/reconciler.py)."""
    for queue in QUEUES:
        for key in queue_keys(queue, options):
            for raw in redis.lrange(key, 0, -1):
                sent = _sent(raw)
                if sent is not None:
                    yield sent
    for _tag, raw in redis.hscan_iter(UNACKED_KEY):
        try:
            message, _exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue
        sent = _sent(message) if routing_key in QUEUES else None
        if sent is not None:
            yield sent
    for retry in delayed.waiting(redis):
        subject = str(retry.args[0]) if retry.args else ""
        yield Sent(task=retry.task, task_id=retry.task_id, subject=subject)


def _sent(raw: bytes | dict) -> Sent | None:
    """A kombu message (JSON text or parsed) as :class:`Sent`; None when it is not Celery's."""
    try:
        message = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
        headers = message["headers"]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    subject = str(args[0]) if isinstance(args, list) and args else ""
    task, task_id = str(headers.get("task", "")), str(headers.get("id", ""))
    return Sent(task=task, task_id=task_id, subject=subject)


@before_task_publish.connect(dispatch_uid="featuremaps-sent-at")
def _stamp_sent_at(headers: dict | None = None, **_kwargs) -> None:
    # A retry is a new message of the same task; keep the first time it was sent.
    if headers is not None:
        headers.setdefault(SENT_AT_HEADER, time.time())


def make_producer(settings: Settings) -> Celery:
    """A Celery app that only sends: no result backend, no task code."""
    app = Celery("featuremaps-api", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=False,
        broker_connection_timeout=3,
        task_ignore_result=True,
        task_default_queue=JOBS_QUEUE,
        # A "task-sent" event, so Flower lists a job from the moment it is queued.
        task_send_sent_event=True,
    )
    return app
