"""Create a record and send its task, or leave nothing half-created (docs/design.md: a 503
means nothing was created). Jobs and batches both go through :func:`enqueue`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from celery import Celery

from shared.errors import FeatureMapsError, ServiceUnavailable

log = logging.getLogger(__name__)

# The producer retries a send briefly before the request gives up with a 503.
SEND_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2}


def enqueue(
    producer: Celery,
    *,
    kind: str,
    record_id: str,
    create: Callable[[], object],
    task: str,
    queue: str,
    undo: Sequence[Callable[[], object]],
) -> None:
    """``create()`` the record, then send ``task`` by name with the id. When either fails,
    run every ``undo`` step (best effort) and re-raise a :class:`FeatureMapsError`, or
    answer 503 for anything else (Redis or the broker down)."""
    try:
        create()
        producer.send_task(task, args=[record_id], queue=queue, retry_policy=SEND_RETRY_POLICY)
    except Exception as exc:
        for step in undo:
            best_effort(f"cleanup of half-created {kind} {record_id}", step)
        if isinstance(exc, FeatureMapsError):
            raise
        log.warning("could not queue %s %s: %s", kind, record_id, exc)
        raise ServiceUnavailable(
            f"the queue (Redis) is unavailable; the {kind} was not created, try again shortly"
        ) from exc


def best_effort(what: str, step: Callable[[], object]) -> None:
    """Run a cleanup step; its failure is logged, never raised. With a dependency down these
    can fail too: an object no record points at is removed by retention."""
    try:
        step()
    except Exception as exc:  # cleanup must not fail the request; retention is the backstop
        log.warning("%s incomplete: %s", what, exc)
